"""Fused small-batch matvec kernels (kernels/triton_gemv.py) against their PyTorch references,
interpreted on CPU (TRITON_INTERPRET=1 in tests/conftest.py). With TRITON_INTERPRET=0 on a CUDA
machine (bench/gpu_session.sh) the same tests run the compiled kernels: every tensor is made there."""

import json
from pathlib import Path

import pytest
import torch
import triton

from csmstream.kernels.int8 import dequantize, quantize_int8
from csmstream.kernels.triton_gemv import (
    DOT_TILE,
    MAX_CHAIN,
    MAX_ROWS,
    PRODUCTS,
    matvec_add_,
    matvec_add_ref,
    norm_matvec,
    norm_matvec_ref,
    pick_tiles,
    tile_args,
)
from tests.kernels import kernels_device

ROOT = Path(__file__).resolve().parents[2]
DEV = kernels_device()


@pytest.fixture(autouse=True)
def _on_the_kernels_device():
    """Tensors are made where the kernels run (the GPU when there is one, else the interpreter's CPU)."""
    before = torch.get_default_device()
    torch.set_default_device(DEV)
    yield
    torch.set_default_device(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


SHAPES = [(1, 128, 96), (3, 200, 72), (16, 96, 40)]  # (rows, K, N): ragged tiles on both axes


@pytest.mark.parametrize("B, K, N", SHAPES)
@pytest.mark.parametrize("swiglu", [False, True])
def test_norm_matvec_equals_norm_then_linear(B, K, N, swiglu):
    g = gen(B * K + N)
    x, nw = torch.randn(B, K, generator=g) * 3, torch.randn(K, generator=g)
    w = torch.randn(2 * N if swiglu else N, K, generator=g) / K ** 0.5
    got = norm_matvec(x, nw, w, 1e-5, swiglu=swiglu)
    assert got.shape == (B, N)
    torch.testing.assert_close(got, norm_matvec_ref(x, nw, w, 1e-5, swiglu=swiglu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B, K, N", SHAPES)
def test_matvec_add_adds_in_place_and_nothing_else(B, K, N):
    g = gen(B + K + N)
    w, a = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(B, K, generator=g)
    big = torch.randn(B + 2, N, generator=g)  # rows beyond B must stay untouched
    want = big.clone()
    matvec_add_ref(want[:B], w, a)
    assert matvec_add_(big[:B], w, a).data_ptr() == big.data_ptr()
    torch.testing.assert_close(big, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(big[B:], want[B:])


def test_half_precision_is_close_to_the_reference():
    g = gen(0)
    x = (torch.randn(2, 256, generator=g)).bfloat16()
    nw, w = torch.randn(256, generator=g).bfloat16(), (torch.randn(128, 256, generator=g) / 16).bfloat16()
    torch.testing.assert_close(norm_matvec(x, nw, w, 1e-5, swiglu=True).float(),
                               norm_matvec_ref(x, nw, w, 1e-5, swiglu=True).float(), rtol=2e-2, atol=2e-2)
    y = torch.randn(2, 128, generator=g).bfloat16()
    a = torch.randn(2, 256, generator=g).bfloat16()
    torch.testing.assert_close(matvec_add_(y.clone(), w, a).float(), matvec_add_ref(y.clone(), w, a).float(),
                               rtol=2e-2, atol=2e-2)


def test_more_rows_than_the_kernels_take_are_refused():
    with pytest.raises(AssertionError):
        norm_matvec(torch.zeros(MAX_ROWS + 1, 16), torch.ones(16), torch.zeros(8, 16), 1e-5)


# -- int8 weights and tiles ----------------------------------------------------------------------
@pytest.mark.parametrize("B, K, N", SHAPES)
@pytest.mark.parametrize("swiglu", [False, True])
def test_int8_norm_matvec_equals_the_dequantized_matmul(B, K, N, swiglu):
    g = gen(7 * B + K)
    x, nw = torch.randn(B, K, generator=g), torch.randn(K, generator=g)
    qw = quantize_int8(torch.randn(2 * N if swiglu else N, K, generator=g) / K ** 0.5)
    got = norm_matvec(x, nw, qw.q, 1e-5, swiglu=swiglu, scale=qw.scale)
    want = norm_matvec_ref(x, nw, dequantize(qw.q, qw.scale, torch.float32), 1e-5, swiglu=swiglu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm_matvec_ref(x, nw, qw.q, 1e-5, swiglu=swiglu, scale=qw.scale), want)


@pytest.mark.parametrize("B, K, N", SHAPES)
def test_int8_matvec_add_equals_the_dequantized_matmul(B, K, N):
    g = gen(B * N + 3)
    qw, a = quantize_int8(torch.randn(N, K, generator=g)), torch.randn(B, K, generator=g)
    x = torch.randn(B, N, generator=g)
    want = x + a @ dequantize(qw.q, qw.scale, torch.float32).T
    torch.testing.assert_close(matvec_add_(x.clone(), qw.q, a, scale=qw.scale), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tiles", [(4, 16, 1), (8, 64, 2), (16, 512, 4), (2, 256, 4), (4, 32, 4, 3), (8, 16, 2, 2),
                                   (16, 32, 4, 1, 1, 1), (32, 64, 4, 2, 3, 1)])
def test_any_tiles_give_the_same_result(tiles):
    """The GPU picks small output tiles (many programs); CPU picks few large ones: all must agree,
    ragged edges included (N = 37 and K = 200 fit no tile exactly). With a fourth entry the K loop is
    software-pipelined that many stages deep (compiled on a GPU: async copies ahead of the
    multiply, with the ragged last tile among them); a sixth entry 1 accumulates with tl.dot (the
    3 rows padded to 16), here also staged and split."""
    g = gen(11)
    x, nw, w = torch.randn(3, 200, generator=g), torch.randn(200, generator=g), torch.randn(74, 200, generator=g) / 15
    torch.testing.assert_close(norm_matvec(x, nw, w, 1e-5, swiglu=True, tiles=tiles),
                               norm_matvec_ref(x, nw, w, 1e-5, swiglu=True), rtol=1e-5, atol=1e-5)
    y, a = torch.randn(3, 74, generator=g), torch.randn(3, 200, generator=g)
    torch.testing.assert_close(matvec_add_(y.clone(), w, a, tiles=tiles), matvec_add_ref(y.clone(), w, a),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("int8", [False, True])
def test_the_dot_path_sums_what_the_plain_path_sums_in_half_precision(B, int8):
    """Tiles with dot = 1 accumulate on tensor cores (tl.dot over rows padded to 16) where the plain
    path multiplies and adds in registers: the same products of the same bf16 (or exactly converted
    int8) operands, summed in fp32 in another order, so both are the fp32 matmul of the rounded
    inputs to within a rounding of the output (one bf16 step: < 1 %), for every form: plain, SwiGLU
    and the residual add (the plain path is held to the references above).
    (Interpreted, the operands go to tl.dot as fp32 -- Triton's interpreter multiplies bf16 as raw
    bits -- which holds bf16 and int8 values exactly; compiled, they stay bf16.)"""
    g = gen(B * 2 + int8)
    K, N = 96, 48
    x = torch.randn(B, K, generator=g).bfloat16()
    nw = (torch.rand(K, generator=g) + 0.5).bfloat16()
    w = (torch.randn(2 * N, K, generator=g) / K ** 0.5).bfloat16()
    scale = None
    if int8:
        qw = quantize_int8(w.float())
        w, scale = qw.q, qw.scale
    plain, dot = (16, 32, 4), (16, 32, 4, 1, 1, 1)
    tol = dict(rtol=1e-2, atol=1e-2)
    for swiglu in (False, True):
        ww = w if swiglu else w[:N]
        sc = scale if swiglu or scale is None else scale[:N]
        a = norm_matvec(x, nw, ww, 1e-5, swiglu=swiglu, scale=sc, tiles=plain).float()
        b = norm_matvec(x, nw, ww, 1e-5, swiglu=swiglu, scale=sc, tiles=dot).float()
        assert a.abs().max() > 1  # not a comparison of zeros
        torch.testing.assert_close(b, a, **tol)
    y, act = torch.randn(B, N, generator=g).bfloat16(), torch.randn(B, K, generator=g).bfloat16()
    sc = None if scale is None else scale[:N]
    torch.testing.assert_close(matvec_add_(y.clone(), w[:N], act, scale=sc, tiles=dot).float(),
                               matvec_add_(y.clone(), w[:N], act, scale=sc, tiles=plain).float(), **tol)


def test_dot_tiles_are_checked():
    x, nw, w = torch.randn(1, 32), torch.ones(32), torch.randn(32, 32)
    for bad in ((8, 32, 4, 1, 1, 1), (16, 8, 4, 1, 1, 1), (16, 32, 4, 1, 1, 2)):
        with pytest.raises(ValueError, match="dot"):
            norm_matvec(x, nw, w, 1e-5, tiles=bad)
    torch.testing.assert_close(norm_matvec(x, nw, w, 1e-5, tiles=(16, 32, 4, 1, 1, 0)), norm_matvec_ref(x, nw, w, 1e-5))


# csm-1b's projections (N, K): backbone qkv / wo / w13 (gate half) / w2, then the depth decoder's
CSM1B = [(3072, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (1536, 1024), (1024, 1024), (8192, 1024),
         (1024, 8192)]


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
def test_gpu_tiles_cover_the_gpu_and_fit_registers(rows):
    """The guess (no table): one row, plain tiles; 2..16 rows, the dot path. Either way every SM of a
    132-SM H100 gets work (output tiles times K splits), a program's registers hold its tile (the
    plain path's [rows, BLOCK_N, BLOCK_K] accumulator, the dot path's weight tile), and a dot-path
    program walks at most MAX_CHAIN of K's tiles."""
    for N, K, mats in [(n, k, 1) for n, k in CSM1B] + [(8192, 1024, 2), (768, 1024, 2), (1536, 2048, 2)]:
        bn, bk, warps, stages, splits, dot = tile_args(pick_tiles(rows, K, N, mats))
        assert triton.cdiv(N, bn) * splits >= 128, (N, K, bn, splits)
        assert bk <= K and warps in (1, 2, 4, 8) and stages == 1 and dot == (rows > 1)
        if dot:
            assert bn * bk * mats <= DOT_TILE and min(bn, bk) >= 16
            assert splits & (splits - 1) == 0 and triton.cdiv(triton.cdiv(K, bk), splits) <= MAX_CHAIN
        else:
            assert rows * bn * bk * mats <= PRODUCTS and splits == 1


def test_the_one_row_guess_is_what_the_h200_sweep_measured_fastest(monkeypatch):
    """Against measurement, not belief: the tile sweep of csm-1b's projections at one row on an H200
    (bench/gemv_sweep.py, 2026-12-04, committed under bench/results/h200/) timed a grid of tiles per
    shape. Where no table is named, pick_tiles' guess must be one it timed and, in the model's dtype,
    within 5 % of each shape's best and 2 % of the best frame (the guess before it was 10 % over)."""
    monkeypatch.delenv("CSM_GEMV_TILES", raising=False)
    doc = json.loads(next((ROOT / "bench" / "results" / "h200").glob("gemv_sweep_rows1_*.json")).read_text())
    frame = best = 0.0
    for c in (c for c in doc["cases"] if c["rows"] == 1 and not c["int8"]):
        us = c["tiles"][str(pick_tiles(1, c["K"], c["cols"], c["mats"]))]
        assert us <= 1.05 * c["best_us"], (c["name"], us, c["best_us"])
        frame, best = frame + us * c["calls"], best + c["best_us"] * c["calls"]
    assert best > 0 and frame <= 1.02 * best


def test_a_scale_must_come_with_int8_weights_and_fit_them():
    x, nw = torch.randn(1, 16), torch.ones(16)
    qw = quantize_int8(torch.randn(8, 16))
    with pytest.raises(ValueError, match="int8 weights need their per-row scale"):
        norm_matvec(x, nw, qw.q, 1e-5)
    with pytest.raises(ValueError, match="int8 weights need their per-row scale"):
        matvec_add_(torch.zeros(1, 8), qw.q.float(), x, scale=qw.scale)
    with pytest.raises(ValueError, match=r"scale must be contiguous \[8\], got \[4\]"):
        norm_matvec(x, nw, qw.q, 1e-5, scale=qw.scale[:4])


@pytest.mark.parametrize(("B", "dtype", "int8", "tiles"), [
    (1, torch.float32, False, None), (3, torch.float32, True, None), (2, torch.bfloat16, False, None),
    (5, torch.float32, False, (4, 16, 1)), (1, torch.float32, False, (2, 64, 4)),
    (3, torch.float32, True, (8, 16, 4, 1, 3)), (2, torch.bfloat16, False, (4, 16, 2, 2, 2)),
    (3, torch.float32, True, (16, 16, 4, 1, 2, 1)), (2, torch.bfloat16, False, (16, 16, 4, 2, 1, 1)),
])
def test_qkv_with_rope_and_cache_write_equals_the_unfused_pair(B, dtype, int8, tiles):
    """norm_matvec(rope=...) against the unfused pair it replaces (norm_matvec, then
    triton_ops.rope_store_) bit for bit, and against the PyTorch references (rope_store_ref): same
    rotated q, same cache (k rotated and v at each row's position, nothing else), v passed through;
    rows at different positions and at one shared position (stride 0). With split K too (the last
    split of each tile rotates and writes it)."""
    from csmstream.kernels.triton_ops import rope_store_, rope_store_ref

    g = gen(B)
    H, KV, hd, S, K = 4, 2, 16, 12, 48
    N = (H + 2 * KV) * hd
    x = torch.randn(B, K, generator=g).to(dtype)
    nw = (torch.rand(K, generator=g) + 0.5).to(dtype)
    w = (torch.randn(N, K, generator=g) * 0.2).to(dtype)
    scale = None
    if int8:
        qw = quantize_int8(w)
        w, scale = qw.q, qw.scale
    angles = torch.rand(S, hd // 2, generator=g) * 6
    cos, sin = torch.cos(angles), torch.sin(angles)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for pos in (torch.randint(0, S, (B,), generator=g), torch.tensor([7]).expand(B)):
        cache = torch.randn(B, S, 2 * KV, hd, generator=g).to(dtype)
        unfused_cache, ref_cache, before = cache.clone(), cache.clone(), cache.clone()
        got = norm_matvec(x, nw, w, 1e-5, scale=scale, tiles=tiles, rope=(H, cos, sin, pos, cache)).view(B, -1, hd)
        unfused = norm_matvec(x, nw, w, 1e-5, scale=scale, tiles=tiles).view(B, -1, hd)
        v = unfused[:, H + KV:].clone()
        rope_store_(unfused, H, cos, sin, pos, unfused_cache)
        assert torch.equal(got[:, :H], unfused[:, :H])  # rotated q, what attention reads
        assert torch.equal(cache, unfused_cache)
        assert torch.equal(got[:, H + KV:], v)
        ref = norm_matvec_ref(x, nw, w, 1e-5, scale=scale).view(B, -1, hd)
        rope_store_ref(ref, H, cos, sin, pos, ref_cache)
        torch.testing.assert_close(got[:, :H], ref[:, :H], **tol)
        torch.testing.assert_close(cache, ref_cache, **tol)
        untouched = torch.ones(B, S, dtype=torch.bool)
        untouched[torch.arange(B), pos] = False
        assert torch.equal(cache[untouched], before[untouched])  # only each row's own position written


def test_qkv_with_rope_writes_rows_of_one_sequence_to_its_cache_row():
    """Rows 2c, 2c + 1 at positions 0 and 1 of sequence c (the depth decoder's first pass) write
    cache row c: the same as the unfused pair on the same grouped cache, and as each row on its own."""
    from csmstream.kernels.triton_ops import rope_store_

    g = gen(21)
    H, KV, hd, S, K, C = 4, 2, 16, 8, 48, 3
    B, N = 2 * C, (H + 2 * KV) * hd
    x = torch.randn(B, K, generator=g)
    nw = torch.rand(K, generator=g) + 0.5
    w = torch.randn(N, K, generator=g) * 0.2
    angles = torch.rand(S, hd // 2, generator=g) * 6
    cos, sin = torch.cos(angles), torch.sin(angles)
    pos = torch.arange(B) % 2
    cache = torch.randn(C, S, 2 * KV, hd, generator=g)
    unfused_cache, alone_cache, before = cache.clone(), cache.clone(), cache.clone()
    got = norm_matvec(x, nw, w, 1e-5, rope=(H, cos, sin, pos, cache)).view(B, -1, hd)
    unfused = norm_matvec(x, nw, w, 1e-5).view(B, -1, hd)
    rope_store_(unfused, H, cos, sin, pos, unfused_cache)
    assert torch.equal(got[:, :H], unfused[:, :H]) and torch.equal(cache, unfused_cache)
    for r in range(B):  # one row at a time, each against its own one-row cache view
        norm_matvec(x[r : r + 1], nw, w, 1e-5, rope=(H, cos, sin, pos[r : r + 1], alone_cache[r // 2 : r // 2 + 1]))
    torch.testing.assert_close(cache, alone_cache, rtol=1e-6, atol=1e-6)
    assert torch.equal(cache[:, 2:], before[:, 2:])


@pytest.mark.parametrize(("B", "C", "dtype", "tiles"), [
    (1, 1, torch.float32, (8, 32, 4)), (2, 1, torch.float32, (8, 32, 4)), (3, 3, torch.float32, (8, 32, 4)),
    (2, 1, torch.bfloat16, (8, 32, 4)), (1, 1, torch.float32, (32, 16, 4, 1, 4)),
    (2, 1, torch.float32, (16, 16, 4, 1, 2, 1)),
])
def test_attention_folded_into_the_qkv_kernel_equals_the_separate_kernel(B, C, dtype, tiles):
    """norm_matvec(rope=..., attend=(out, counter)): the last program attends for every row, over its
    cache positions [0, pos]; the qkv output and the cache are the plain rope call's bit for bit,
    out is decode_attention's over that cache (the depth decoder's shape: 8 heads on 2 kv heads;
    C = 1: two rows at positions 0 and 1 of one sequence, as its first pass), and the counter is
    back at 0. With split K only the program that writes a tile (its last split) counts towards the
    last (6 tiles of 4 splits: were all 24 programs to count, no count would reach the fold on time).
    Compiled on a GPU (bench/gpu_session.sh) the fold's cross-program reads are real."""
    from csmstream.kernels.triton_attn import decode_attention

    g = gen(B * 10 + C)
    H, KV, hd, S, D = 8, 2, 32, 32, 64
    N = (H + 2 * KV) * hd
    x, nw = torch.randn(B, D, generator=g).to(dtype), (torch.rand(D, generator=g) + 0.5).to(dtype)
    w = (torch.randn(N, D, generator=g) / 8).to(dtype)
    angles = torch.rand(S, hd // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    pos = torch.tensor([5, 31, 17][:B]) if C == B else torch.arange(B) % 2
    cache = torch.randn(C, S, 2 * KV, hd, generator=g).to(dtype)
    plain_cache = cache.clone()
    plain = norm_matvec(x, nw, w, 1e-5, rope=(H, cos, sin, pos, plain_cache), tiles=tiles)
    want = decode_attention(plain.view(B, -1, hd)[:, :H], plain_cache, pos + 1)
    out, counter = torch.full((B, H * hd), float("nan"), dtype=dtype), torch.zeros(1, dtype=torch.int32)
    for _ in range(2):  # the counter is ready for the next launch
        got = norm_matvec(x, nw, w, 1e-5, rope=(H, cos, sin, pos, cache), tiles=tiles, attend=(out, counter))
        assert torch.equal(got, plain) and torch.equal(cache, plain_cache) and int(counter) == 0
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out, want, **tol)
    with pytest.raises(ValueError, match="attend needs rope"):
        norm_matvec(x, nw, w, 1e-5, attend=(out, counter))
    with pytest.raises(ValueError, match="counter must be an int32"):
        norm_matvec(x, nw, w, 1e-5, rope=(H, cos, sin, pos, cache), attend=(out, counter.long()))
