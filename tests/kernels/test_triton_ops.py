"""Triton kernels (interpreted on CPU in CI: TRITON_INTERPRET=1) against their PyTorch references."""

import os

import pytest
import torch

from csmstream.engine.rope import apply_rope_
from csmstream.engine.sampling import gumbel_noise, sample
from csmstream.kernels import triton_ops

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(), "tests/conftest.py sets it"


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("kmax", "B", "V", "C"), [(1, 8, 2051, 2048), (5, 4, 259, 256), (50, 4, 131, 128),
                                                 (50, 1, 2051, 2048)])
def test_sample_topk_equals_the_reference(kmax, B, V, C):
    # small vocabularies keep the interpreted in-register sort fast; one row at the real 2,051
    g = torch.Generator().manual_seed(kmax + V)
    logits = (torch.randn(B, V, generator=g) * 3).to(device())
    logits[:, C:] = 100.0  # reserved ids would win if they were not masked
    temp = (torch.rand(B, generator=g) + 0.3).to(device())
    topk = torch.randint(1, kmax + 1, (B,), generator=g).to(device())
    noise = gumbel_noise(torch.arange(B) + 7, torch.full((B,), 3), 2, 64)[:, 1].to(device()) if kmax > 1 else None
    frame = torch.full((B, 3), -1, dtype=torch.int64, device=device())  # write into a strided column
    got = triton_ops.sample_topk(logits, temp, topk, 64 if kmax > 1 else 1, noise, C, out=frame[:, 1])
    want = sample(logits[:, :C].float(), temp, topk, kmax, noise)
    assert torch.equal(got, want) and torch.equal(frame[:, 1], want) and int(got.max()) < C
    assert (frame[:, [0, 2]] == -1).all()  # nothing else written
    if kmax > 1:  # the draw really samples: with k = kmax some rows leave the argmax
        assert topk.max() == 1 or not torch.equal(want, logits[:, :C].argmax(-1)) or B == 1


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


def test_rope_in_place_on_a_fused_qkv_buffer_equals_the_reference():
    g = torch.Generator().manual_seed(2)
    R, Hq, Hk, Hv, hd = 3, 4, 2, 2, 16
    qkv = torch.randn(R, Hq + Hk + Hv, hd, generator=g).to(device())
    angles = torch.rand(R, hd // 2, generator=g) * 6
    rot = torch.polar(torch.ones_like(angles), angles)
    want = qkv.clone()
    apply_rope_(want[:, None, : Hq + Hk], rot[:, None, None, :].to(device()))
    triton_ops.rope_(qkv[:, : Hq + Hk], rot.real.float().to(device()), rot.imag.float().to(device()))
    torch.testing.assert_close(qkv, want, rtol=1e-5, atol=1e-5)  # v heads untouched, q/k rotated


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


@pytest.mark.parametrize(("H", "KV", "hd"), [(4, 2, 64), (8, 2, 32), (4, 4, 16)])
def test_decode_attention_reads_each_rows_own_length(H, KV, hd):
    g = torch.Generator().manual_seed(H * hd)
    B, S = 4, 150
    q = torch.randn(B, H + 2 * KV, hd, generator=g).to(device())[:, :H]  # q heads of a fused buffer
    cache = torch.randn(2, B, S, 2 * KV, hd, generator=g).to(device())[0]
    lengths = torch.tensor([1, 37, 150, 64], device=device())
    got = triton_ops.decode_attention(q, cache, lengths)
    torch.testing.assert_close(got, triton_ops.decode_attention_ref(q, cache, lengths), rtol=1e-4, atol=1e-5)
    cache[1, 37:] = 1e4  # beyond a row's length is never read
    torch.testing.assert_close(triton_ops.decode_attention(q, cache, lengths)[1], got[1])
    one = torch.tensor([20], device=device()).expand(B)  # one length for all rows (stride 0)
    torch.testing.assert_close(triton_ops.decode_attention(q, cache, one),
                               triton_ops.decode_attention_ref(q, cache, one.contiguous()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_the_reference(dtype):
    g = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(4)).to(device(), dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(triton_ops.silu_mul(g), triton_ops.silu_mul_ref(g), **tol)
