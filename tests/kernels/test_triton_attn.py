"""Decode attention (kernels/triton_attn.py; interpreted on CPU in CI) against PyTorch SDPA."""

import pytest
import torch

from csmstream.kernels import triton_attn
from csmstream.kernels.triton_attn import decode_attention, decode_attention_ref, pick_splits
from tests.kernels import kernels_device as device

TOL = dict(rtol=1e-4, atol=1e-5)


def _inputs(B, H, KV, hd, S, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H + 2 * KV, hd, generator=g).to(device())[:, :H]  # q heads of a fused buffer
    cache = torch.randn(2, B, S, 2 * KV, hd, generator=g).to(device())[0]  # a strided view
    return q, cache


GROUPED = pytest.mark.parametrize("grouped", [False, True], ids=["per_head", "grouped"])


@GROUPED
@pytest.mark.parametrize(("H", "KV", "hd"), [(4, 2, 64), (8, 2, 32), (4, 4, 16)])
def test_decode_attention_reads_each_rows_own_length(H, KV, hd, grouped):
    B, S = 4, 150
    q, cache = _inputs(B, H, KV, hd, S, H * hd)
    lengths = torch.tensor([1, 37, 150, 64], device=device())
    got = decode_attention(q, cache, lengths, grouped=grouped)
    torch.testing.assert_close(got, decode_attention_ref(q, cache, lengths), **TOL)
    cache[1, 37:] = 1e4  # beyond a row's length is never read
    torch.testing.assert_close(decode_attention(q, cache, lengths, grouped=grouped)[1], got[1])
    one = torch.tensor([20], device=device()).expand(B)  # one length for all rows (stride 0)
    torch.testing.assert_close(decode_attention(q, cache, one, grouped=grouped),
                               decode_attention_ref(q, cache, one.contiguous()), **TOL)


@GROUPED
@pytest.mark.parametrize("splits", [1, 2, 4, 16])
def test_split_keys_merge_to_the_reference_whatever_the_lengths(splits, grouped):
    """Lengths inside the first split, on split and key-tile boundaries, and the whole cache: every
    split count merges to SDPA's answer, splits past a row's length included (they hold no keys)."""
    B, H, KV, hd, S = 6, 4, 2, 32, 300  # key tiles of 128; a split takes whole tiles (4 and 16: some empty)
    q, cache = _inputs(B, H, KV, hd, S, splits)
    lengths = torch.tensor([1, 19, 32, 129, 256, 300], device=device())
    counts = triton_attn.counters(B, H, device())
    got = decode_attention(q, cache, lengths, splits=splits, counts=counts, grouped=grouped)
    torch.testing.assert_close(got, decode_attention_ref(q, cache, lengths), **TOL)
    assert not counts.any()  # the last program of each (row, head) put its counter back
    again = decode_attention(q, cache, lengths, splits=splits, counts=counts, grouped=grouped)
    assert torch.equal(again, got)  # same counters reused: the same bits


@GROUPED
def test_a_row_whose_keys_fit_the_first_split_touches_no_counter(grouped):
    """Early in a call (keys <= one split's chunk) split 0 writes the output itself: the row's
    counters are never read or written (a junk value stays), the merge is skipped."""
    B, H, KV, hd, S = 3, 4, 2, 32, 300  # 4 splits of 128 keys
    q, cache = _inputs(B, H, KV, hd, S, 21)
    lengths = torch.tensor([1, 128, 129], device=device())
    counts = triton_attn.counters(B, H, device())
    n = KV if grouped else H  # counters a row: one per kv head / query head
    counts[: 2 * n] = 5  # rows 0 and 1: junk a merge would trip over
    got = decode_attention(q, cache, lengths, splits=4, counts=counts, grouped=grouped)
    torch.testing.assert_close(got, decode_attention_ref(q, cache, lengths), **TOL)
    assert (counts[: 2 * n] == 5).all() and not counts[2 * n :].any()  # row 2 merged two splits


@GROUPED
def test_split_attention_shares_a_cache_row_between_positions_of_one_sequence(grouped):
    """rows 2c and 2c + 1 read cache row c (the depth decoder's first pass), also when split."""
    C, H, KV, hd, S = 3, 4, 2, 16, 600
    q, _ = _inputs(2 * C, H, KV, hd, S, 5)
    cache = torch.randn(C, S, 2 * KV, hd, generator=torch.Generator().manual_seed(6)).to(device())
    lengths = torch.tensor([3, 4, 290, 291, 599, 600], device=device())
    got = decode_attention(q, cache, lengths, splits=4, grouped=grouped)
    torch.testing.assert_close(got, decode_attention_ref(q, cache, lengths), **TOL)
    copies = cache.repeat_interleave(2, dim=0)
    torch.testing.assert_close(got, decode_attention(q, copies, lengths, splits=4, grouped=grouped), rtol=0, atol=0)


@GROUPED
def test_bfloat16_split_attention(grouped):
    B, H, KV, hd, S = 2, 8, 2, 64, 400
    q, cache = _inputs(B, H, KV, hd, S, 9)
    q, cache = q.bfloat16(), cache.bfloat16()
    lengths = torch.tensor([77, 400], device=device())
    got = decode_attention(q, cache, lengths, splits=8, grouped=grouped)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), decode_attention_ref(q, cache, lengths).float(), rtol=2e-2, atol=2e-2)


def test_pick_splits_fills_the_gpu_at_small_batches_only():
    # csm-1b's backbone (32 heads of 128, 2,048 positions): 16 splits at batch 1, fewer as the
    # rows fill the 2,048 programs, none from 64 rows; the depth decoder's 32 positions never split
    assert [pick_splits(b, 32, 2048, 128) for b in (1, 2, 4, 8, 16, 32, 64, 256)] == [16, 16, 16, 8, 4, 2, 1, 1]
    assert pick_splits(1, 8, 32, 128) == 1 and pick_splits(2, 8, 33, 128) == 2  # 33 keys: two tiles of 32
    assert pick_splits(1, 4, 150, 64) == 2  # three key tiles of 64: the power of two below
    # grouped, a program per kv head (8 of them): 16 splits still at batch 1, 8 at 32 rows
    assert [pick_splits(b, 8, 2048, 128) for b in (1, 16, 32, 256)] == [16, 16, 8, 1]


def test_bad_splits_and_counters_are_refused():
    q, cache = _inputs(2, 4, 2, 16, 64, 1)
    lengths = torch.tensor([5, 64], device=device())
    for bad in (0, 3, 32):
        with pytest.raises(ValueError, match="power of two in 1..16"):
            decode_attention(q, cache, lengths, splits=bad)
    with pytest.raises(ValueError, match=r"counts must be contiguous int32 with >= 8 entries \(counters\(2, 4\)\)"):
        decode_attention(q, cache, lengths, splits=2, counts=torch.zeros(4, dtype=torch.int32, device=device()))
    with pytest.raises(ValueError, match="counts must be contiguous int32"):
        decode_attention(q, cache, lengths, splits=2, counts=torch.zeros(8, dtype=torch.int64, device=device()))
