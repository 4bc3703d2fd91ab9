"""Triton kernels (interpreted on CPU in CI: TRITON_INTERPRET=1) against their PyTorch references."""

import os

import pytest
import torch

from csmstream.engine.sampling import gumbel_table, sample
from csmstream.kernels import triton_attn, triton_ops
from tests.kernels import kernels_device as device

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(), "tests/conftest.py sets it"


@pytest.mark.parametrize(("kmax", "B", "V", "C", "dtype"), [
    (1, 8, 2051, 2048, torch.float32), (5, 4, 259, 256, torch.float32), (64, 8, 2051, 2048, torch.bfloat16),
    (2048, 3, 2051, 2048, torch.bfloat16), (50, 6, 131, 128, torch.float32)])
def test_one_kernel_sample_equals_the_reference(kmax, B, V, C, dtype):
    """The kernel (threshold select, hashed noise) against engine/sampling.sample (a stable sort):
    same codes, any k up to the codebook size; bf16 logits tie often, also at the k-th place."""
    g = torch.Generator().manual_seed(kmax + V)
    logits = torch.randn(B, V, generator=g).to(dtype)
    logits[:, C:] = 100.0  # reserved ids would win if they were not left out
    logits[0, : C // 2] = logits[0, : C // 2].round()  # row 0: long runs of equal values
    temp = torch.rand(B, generator=g) + 0.3
    topk = torch.randint(1, kmax + 1, (B,), generator=g)
    seed, counter = torch.randint(0, 1 << 62, (B,), generator=g), torch.randint(0, 1 << 40, (B,), generator=g)
    frame = torch.full((B, 3), -1, dtype=torch.int64, device=device())  # write into a strided column
    args = [t.to(device()) for t in (logits, temp, topk, seed, counter)]
    got = triton_ops.sample(*args, 7, gumbel_table(device()), C, out=frame[:, 1]).cpu()
    want = sample(logits[:, :C].float(), temp, topk, kmax, seed, counter, 7)
    assert torch.equal(got, want) and torch.equal(frame[:, 1].cpu(), want) and int(got.max()) < C
    assert (frame[:, [0, 2]] == -1).all()  # nothing else written
    for w in (1, 2):  # fewer warps reduce differently (compiled: bench/gpu_session.sh), same draw
        assert torch.equal(triton_ops.sample(*args, 7, gumbel_table(device()), C, warps=w).cpu(), want)
    with pytest.raises(ValueError, match="warps must be 1, 2, 4, 8 or 16, got 3"):
        triton_ops.sample(*args, 7, gumbel_table(device()), C, warps=3)
    for ways in (4, 16):  # the threshold searched for several ways a step: the same draw
        assert torch.equal(triton_ops.sample(*args, 7, gumbel_table(device()), C, ways=ways).cpu(), want)
    for b in range(B):  # independent check: each code is among its row's k largest logits
        kth = logits[b, :C].float().topk(int(topk[b])).values[-1]
        assert logits[b, int(got[b])] >= kth
    if kmax > 1:  # the draw really samples: some rows leave the argmax
        assert not torch.equal(want, logits[:, :C].float().argmax(-1))


def test_one_kernel_sample_breaks_ties_at_the_kth_place_by_code_id():
    C = 256
    logits = torch.zeros(64, C)
    logits[:, 200] = 1.0  # one best, then 255 ties at 0: k = 3 keeps codes 200, 0 and 1
    args = [t.to(device()) for t in (logits, torch.full((64,), 100.0), torch.full((64,), 3),
                                     torch.arange(64), torch.zeros(64, dtype=torch.long))]
    got = triton_ops.sample(*args, 0, gumbel_table(device()), C).cpu()
    assert set(got.tolist()) == {200, 0, 1}
    temp, topk, seed, counter = (a.cpu() for a in args[1:])
    assert torch.equal(got, sample(logits, temp, topk, 3, seed, counter, 0))


@pytest.mark.parametrize("ways", [2, 4, 8, 16])
def test_the_threshold_search_holds_over_the_widest_range_of_logits(ways):
    """The search walks the logits' ordered bit patterns, a range of up to 2**32 keys: with the
    largest and smallest finite floats, -0.0, subnormals, ties and runs of adjacent floats in a row,
    every k from 1 to the codebook size draws what the sorting reference draws, for bisection and
    the multiway steps (ceil(32 / log2(ways)) of them) alike. At an infinite temperature the scores are the noise
    alone, so which codes are kept -- the threshold -- is all that decides a draw."""
    C, B = 64, 192
    g = torch.Generator().manual_seed(ways)
    logits = torch.randn(B, C, generator=g) * 10.0 ** torch.randint(-30, 30, (B, 1), generator=g)
    # in each row: runs of adjacent floats (adjacent keys: a threshold one key off keeps a code too
    # many), starting at random values, so the search's steps fall differently against them
    run = logits[:, 16:56].view(B, 8, 5)
    for j in range(1, 5):
        run[:, :, j] = torch.nextafter(run[:, :, j - 1], torch.tensor(float("inf")))
    logits[:, :6] = torch.tensor([3.4e38, -3.4e38, -0.0, 1e-45, -1e-45, 3.4e38])  # extremes, -0.0, subnormals, a tie
    logits[:, 10:14] = 0.5  # a run of ties
    topk = torch.arange(B) % C + 1  # every k, three times (other rows, other noise)
    temp = torch.full((B,), float("inf"))
    seed, counter = torch.arange(B) * 7919, torch.arange(B)
    args = [t.to(device()) for t in (logits, temp, topk, seed, counter)]
    got = triton_ops.sample(*args, 2, gumbel_table(device()), C, ways=ways).cpu()
    want = sample(logits, temp, topk, C, seed, counter, 2)
    assert torch.equal(got, want)
    assert len(set(want.tolist())) > C // 2  # the noise spreads the draws: they test the kept sets
    with pytest.raises(ValueError, match="ways must be one of 2, 4, 8, 16, got 3"):
        triton_ops.sample(*args, 2, gumbel_table(device()), C, ways=3)


@pytest.mark.parametrize("D", [48, 1500])  # one chunk of the row, and two (the second ragged)
def test_the_draw_also_writes_the_drawn_codes_embedding(D):
    """embed=(table, x): x[b] = table[code[b]] exactly (F.embedding's rows), the codes unchanged."""
    g = torch.Generator().manual_seed(D)
    B, C = 5, 256
    logits = torch.randn(B, C + 3, generator=g).to(device())
    args = [t.to(device())
            for t in (torch.full((B,), 0.8), torch.full((B,), 20), torch.arange(B), torch.ones(B).long())]
    table = torch.randn(C + 3, D, generator=g).to(device(), torch.bfloat16)  # rows past C: never drawn
    x = torch.full((B + 1, D), 7.0, device=device(), dtype=torch.bfloat16)
    want = triton_ops.sample(logits, *args, 3, gumbel_table(device()), C)
    got = triton_ops.sample(logits, *args, 3, gumbel_table(device()), C, embed=(table, x[:B]))
    assert torch.equal(got, want)
    assert torch.equal(x[:B], torch.nn.functional.embedding(want, table)) and (x[B] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("add", [True, False])
def test_add_rms_norm_equals_the_reference(dtype, add):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 96, generator=g).to(device(), dtype)
    d = torch.randn(5, 96, generator=g).to(device(), dtype)
    w = (torch.rand(96, generator=g) + 0.5).to(device(), dtype)
    h2 = h.clone() if add else torch.zeros_like(h)  # add=False starts the residual stream at delta
    got = triton_ops.add_rms_norm(h, d, w, 1e-5, add=add)
    want = triton_ops.add_rms_norm_ref(h2, d, w, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h, h2, **tol)  # the residual was updated in place
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_pos", [False, True])
def test_rope_store_rotates_q_and_writes_k_v_at_each_rows_position(dtype, shared_pos):
    g = torch.Generator().manual_seed(3)
    B, H, KV, hd, S = 3, 4, 2, 16, 9
    qkv = torch.randn(B, H + 2 * KV, hd, generator=g).to(device(), dtype)
    angles = torch.rand(S, hd // 2, generator=g) * 6
    cos, sin = angles.cos().to(device()), angles.sin().to(device())
    pos = torch.tensor([5], device=device()).expand(B) if shared_pos else torch.tensor([0, 7, 3], device=device())
    stacked = torch.randn(2, B, S, 2 * KV, hd, generator=g).to(device(), dtype)  # a layer view, like the engine's
    cache, want_cache, want_qkv, before = stacked[1], stacked[1].clone(), qkv.clone(), stacked[1].clone()
    triton_ops.rope_store_ref(want_qkv, H, cos, sin, pos, want_cache)
    triton_ops.rope_store_(qkv, H, cos, sin, pos, cache)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(qkv[:, :H], want_qkv[:, :H], **tol)
    torch.testing.assert_close(cache, want_cache, **tol)
    written = torch.zeros(B, S, dtype=torch.bool, device=device())
    written[torch.arange(B, device=device()), pos] = True
    assert torch.equal(cache[~written], before[~written])  # nothing but [b, pos[b]] was touched


def test_rows_that_are_positions_of_one_sequence_share_its_cache_row():
    """rows 2c and 2c + 1 are positions 0 and 1 of sequence c (the depth decoder's first pass):
    both write cache row c and attention reads it, as if each row had a copy of that cache row."""
    g = torch.Generator().manual_seed(11)
    C, H, KV, hd, S = 3, 4, 2, 16, 6
    B = 2 * C
    qkv = torch.randn(B, H + 2 * KV, hd, generator=g).to(device())
    angles = torch.rand(S, hd // 2, generator=g) * 6
    cos, sin = angles.cos().to(device()), angles.sin().to(device())
    pos = (torch.arange(B) % 2).to(device())
    cache = torch.randn(C, S, 2 * KV, hd, generator=g).to(device())
    want_cache, want_qkv, ref_qkv, before = cache.clone(), qkv.clone(), qkv.clone(), cache.clone()
    triton_ops.rope_store_(qkv, H, cos, sin, pos, cache)
    # independent expectation: each row through the one-row-per-cache-row kernel on its own
    for r in range(B):
        one = want_cache[r // 2 : r // 2 + 1]
        triton_ops.rope_store_(want_qkv[r : r + 1], H, cos, sin, pos[r : r + 1], one)
    torch.testing.assert_close(qkv[:, :H], want_qkv[:, :H], rtol=0, atol=0)
    torch.testing.assert_close(cache, want_cache, rtol=0, atol=0)
    assert torch.equal(cache[:, 2:], before[:, 2:])  # positions 0 and 1 only
    ref_cache = before.clone()
    triton_ops.rope_store_ref(ref_qkv, H, cos, sin, pos, ref_cache)
    torch.testing.assert_close(cache, ref_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, :H], ref_qkv[:, :H], rtol=1e-5, atol=1e-5)
    lengths = pos + 1
    got = triton_attn.decode_attention(qkv[:, :H], cache, lengths)
    copies = cache.repeat_interleave(2, dim=0)
    torch.testing.assert_close(got, triton_attn.decode_attention(qkv[:, :H], copies, lengths), rtol=0, atol=0)
    torch.testing.assert_close(got, triton_attn.decode_attention_ref(qkv[:, :H], cache, lengths), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="5 rows cannot share a cache of 3 rows"):
        triton_attn.decode_attention(qkv[:5, :H], cache, lengths[:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_the_reference(dtype):
    g = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(4)).to(device(), dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(triton_ops.silu_mul(g), triton_ops.silu_mul_ref(g), **tol)
