"""Fused matrix-vector kernels for small batches (B <= 16 rows), each beside its PyTorch reference.

A decode step at a small batch reads every weight once and does little else, so a layer's time is
its weight bytes plus one launch per op. These fold the ops around the projections into them:

- `norm_matvec`: y = act(W · rms_norm(x) * w_norm), the norm computed in the prologue (every
  program re-reads the B short rows of x, which costs nothing next to its slice of W). With
  `swiglu=True` W is the fused gate/up projection [2F, K] and y = SiLU(gate) * up [B, F].
- `matvec_add_`: x += W · a in place, the residual add done in the epilogue (each program owns a
  slice of x's columns, so reading and writing it in place is race-free).

  With `rope=...` W is the fused qkv projection and the epilogue rotates q and k by each row's
  position and writes k and v into the KV cache (the work of triton_ops.rope_store_): a program
  then covers pairs of output columns, one accumulator for the even and one for the odd member.
  With `attend=...` as well, the last program to finish (an atomic counter) also runs decode
  attention for every row (kernels/triton_attn.attend_rows): one launch fewer a layer where one
  program can do it, the depth decoder's 32-position cache at batch 1.

A decoder layer then runs as: norm_matvec(qkv, rope) -> attention -> matvec_add_(wo)
-> norm_matvec(w13, swiglu) -> matvec_add_(w2): five kernels instead of nine, and no separate
pass over the activations for the norms, RoPE and SiLU. One program covers a BLOCK_N slice of the
outputs for all rows, so each weight is read once per step whatever B is (up to MAX_ROWS).

Weights may be int8 with a float scale per output row (engine/quant.py: weight-only int8 for the
depth decoder; format in kernels/int8.py): pass `scale`. The kernels then read one byte a weight,
accumulate in fp32 and scale the sums: the matmul with the dequantized weights (q * scale) up to
summation order.

The loop over K only multiplies and adds into a [BLOCK_B, BLOCK_N, BLOCK_K] fp32 accumulator; the
reduction across K (shuffles between threads) happens once, after it, so the loop is loads and FMAs.
Tiles are (BLOCK_N, BLOCK_K, num_warps) or (BLOCK_N, BLOCK_K, num_warps, stages). With stages >= 2
the K loop is software-pipelined (Triton's num_stages): each program copies its next weight tiles
into shared memory asynchronously (cp.async on sm_80+) while it multiplies the current one, so a
program keeps up to stages - 1 tiles in flight instead of waiting out one load's latency per K
tile -- what bounds a one-row GEMV (see pick_tiles). stages = 1 (a 3-tuple) is the plain loop, the
same code as before the option existed.
A fifth entry, splits >= 2, splits K: program (output tile, split) runs the K loop over its own
range of whole K tiles (`split_plan`), so a one-row projection with a long K (w2: K = 8,192 over
1,024 outputs) has splits times the programs, and loads, in flight at once instead of a long
serial chain in each. Each program stores its fp32 sums, and the last of a tile's programs to
finish (an atomic counter per tile, in a SplitWork the step reuses) adds them in split order --
the same sum whichever finishes last -- and runs the epilogue (kernels/gemv_split.py; on a GPU a
split tile is used only once split K has given the unsplit sums there). splits = 1 compiles to
exactly the unsplit kernel.
A sixth entry, dot = 1, accumulates on tensor cores: tl.dot of the rows (padded to 16, its smallest
M) and the weight tile, in the activations' dtype (int8 weights convert exactly), into fp32 sums
[16, BLOCK_N]. The plain path's [rows, BLOCK_N, BLOCK_K] accumulator caps a program's weight tile
at PRODUCTS / rows elements (512 at 16 rows: little in flight, a long K loop); the dot path's stays
DOT_TILE at any row count. Interpreted, tl.dot gets fp32 operands (Triton's interpreter multiplies
bfloat16 as raw bits), which hold bf16 and int8 values exactly. dot = 0 (or no sixth entry)
compiles to exactly the kernel without the option.
Tiles: `pick_tiles()` takes measured ones (env CSM_GEMV_TILES: a bench/gemv_sweep.py table, else
the GPU's built-in table, kernels/tiles/) or guesses them from the shape. At B = 1 the step is
bound by reading weights, so the grid must cover the GPU (>= ~256 programs: a 1024-row projection
gets 4-row tiles), and the accumulator stays within a register budget as B grows; from B = 2 the
guess is the dot path, split K where that fills the GPU (`_dot_guess`). Every kernel also takes
explicit `tiles=` (bench/gemv_sweep.py times a grid of them against cuBLAS on a GPU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemv_split import SplitWork, k_range, settle, split_args, unsplit_if_unsafe
from .gemv_tiles import DOT_MIN, MAX_SPLITS, measured, tile_args
from .int8 import dequantize
from .triton_attn import attend_rows, block_keys, group_rows, interpreted
from .triton_ops import FMA, cache_rows_div

MAX_ROWS = 16
TARGET_PROGRAMS = 256  # enough output tiles to keep every SM of a large GPU reading weights
ONE_ROW_PROGRAMS = 1024  # at one row, output tiles stay 4 wide until there are more programs than this
PRODUCTS = 8192  # fp32 partial sums a program holds in registers (BLOCK_B * BLOCK_N * BLOCK_K per matrix)
DOT_TILE = 8192  # weight elements a dot-path program multiplies a K step (BLOCK_N * BLOCK_K * matrices)
MAX_CHAIN = 8  # K tiles one dot-path program walks at most (split K past that): its loads' latency chain


def pick_tiles(rows: int, K: int, N: int, mats: int = 1, int8: bool = False,
               device: str | None = None) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_K, num_warps[, stages[, splits]]) on a GPU for B = rows (<= MAX_ROWS) against a
    [N, K] weight (mats = 2: the gate and up halves at once): the measured tiles of the table env
    CSM_GEMV_TILES names, or of the built-in table for GPU `device` (its name), when it has the
    shape (kernels/gemv_tiles.py), else a guess from the shape."""
    found = measured(rows, K, N, mats, int8, device)
    if found is not None:
        return found
    bb = triton.next_power_of_2(rows)
    if bb == 1:
        # Measured (H200, 2026-12-04, bench/results/h200/gemv_sweep_rows1_*): at one row a GEMV is
        # bound by the latency of its K loop, not by bandwidth (int8 weights, half the bytes, took
        # the same time), so the widest K tile wins every shape (512 beat 256 by 10-50 %), then the
        # narrowest output tile (4 rows, more programs in flight) until programs pass
        # ONE_ROW_PROGRAMS. Over a frame's GEMVs this guess gave 5.33 ms against the sweep's best
        # 5.28 (the older guess: 5.83).
        bk = min(512, triton.next_power_of_2(K))
        bn = max(4, triton.next_power_of_2(N) // ONE_ROW_PROGRAMS)
        while bn > 4 and bn * bk * mats > PRODUCTS:
            bn //= 2
        return bn, bk, 4
    if min(K, N) >= DOT_MIN:
        return _dot_guess(K, N, mats)
    bn = max(4, min(32, triton.next_power_of_2(max(1, N // TARGET_PROGRAMS))))
    bk = max(16, min(512, PRODUCTS // (bb * bn * mats), triton.next_power_of_2(K)))
    if int8 and bb >= 16:  # 16 int8 rows at BLOCK_K 128 spill in matvec_add under Triton 3.6 (not 3.9)
        bk = max(16, bk // 2)
    return bn, bk, 4


def _dot_guess(K: int, N: int, mats: int) -> tuple[int, ...]:
    """Tiles for 2..16 rows: the dot path (tl.dot on tensor cores over the rows padded to 16), whose
    accumulator is [16, BLOCK_N] whatever BLOCK_K is, so a program's weight tile stays DOT_TILE
    elements where the plain path's [rows, BLOCK_N, BLOCK_K] accumulator would cut it to
    PRODUCTS / rows (512 at 16 rows: the H200 of 2026-12-04 took 8.3 to 20.6 ms a frame on those
    guesses at 2 to 16 rows, cuBLAS ~7.2). Output tiles narrow to DOT_MIN until the grid can reach
    TARGET_PROGRAMS; K splits until it does and no program walks more than MAX_CHAIN K tiles.
    A guess, not yet timed on a GPU: the step's capture (CSM_FUSED_GEMV=auto) times it against
    cuBLAS and keeps the faster."""
    bk = min(128, triton.next_power_of_2(K))
    ktiles = triton.cdiv(K, bk)
    most = min(MAX_SPLITS, ktiles)  # splits past K's tiles would get no work (split_plan)
    bn = max(DOT_MIN, min(64, DOT_TILE // (bk * mats)))
    while bn > DOT_MIN and triton.cdiv(N, bn) * most < TARGET_PROGRAMS:
        bn //= 2
    splits = 1
    while 2 * splits <= most and (triton.cdiv(N, bn) * splits < TARGET_PROGRAMS
                                  or triton.cdiv(ktiles, splits) > MAX_CHAIN):
        splits *= 2
    return bn, bk, 4, 1, splits, 1


@functools.cache
def gpu_name(index: int) -> str:
    """torch.cuda.get_device_name, once per device: the key of its built-in tile table."""
    return torch.cuda.get_device_name(index)


def _tiles(x: torch.Tensor, K: int, N: int, mats: int = 1, int8: bool = False) -> tuple[int, ...]:
    if x.is_cuda:
        return unsplit_if_unsafe(pick_tiles(x.shape[0], K, N, mats, int8, gpu_name(x.device.index or 0)), x.device)
    # on CPU the kernels run interpreted, a numpy pass per program: few wide programs are fastest
    return min(1024, triton.next_power_of_2(N)), min(256, triton.next_power_of_2(K)), 4


def dot_args(x: torch.Tensor, dot: int, rows: int) -> dict:
    """The dot path's constexprs for activations x: BLOCK_B (rows padded to DOT_MIN for tl.dot), the
    operands' type (x's; float32 interpreted, where Triton's interpreter multiplies bfloat16 as
    its raw bits) and whether float32 operands multiply in full precision (not tf32)."""
    if not dot:
        return dict(DOT=False, BLOCK_B=triton.next_power_of_2(rows))
    f32 = x.dtype == torch.float32 or interpreted()
    return dict(DOT=True, BLOCK_B=max(DOT_MIN, triton.next_power_of_2(rows)),
                DOT_T=tl.float32 if f32 else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype],
                DOT_IEEE=x.dtype == torch.float32)


def _check_scale(w: torch.Tensor, scale: torch.Tensor | None, rows: int) -> None:
    if (w.dtype == torch.int8) != (scale is not None):
        raise ValueError("int8 weights need their per-row scale, and only int8 weights take one")
    if scale is not None and (scale.shape != (rows,) or not scale.is_contiguous()):
        raise ValueError(f"scale must be contiguous [{rows}], got {list(scale.shape)}")


@triton.jit
def _dot_acc(acc, a, w, DOT_T: tl.constexpr, DOT_IEEE: tl.constexpr):
    """acc [BLOCK_B, BLOCK_N] + a [BLOCK_B, BLOCK_K] · w [BLOCK_N, BLOCK_K]ᵀ on tensor cores, both in
    DOT_T (int8 weights convert exactly; fp32 sums)."""
    if DOT_IEEE:
        acc = tl.dot(a.to(DOT_T), tl.trans(w.to(DOT_T)), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(DOT_T), tl.trans(w.to(DOT_T)), acc)
    return acc


@triton.jit
def _mac(acc, a, w, DOT: tl.constexpr, DOT_T: tl.constexpr, DOT_IEEE: tl.constexpr):
    """One K tile into the accumulator: a [BLOCK_B, BLOCK_K] times w [BLOCK_N, BLOCK_K]. The plain
    path multiplies into a [BLOCK_B, BLOCK_N, BLOCK_K] fp32 accumulator reduced over K once, after
    the loop (`_sums`); the dot path (DOT) accumulates [BLOCK_B, BLOCK_N] with tl.dot."""
    if DOT:
        acc = _dot_acc(acc, a, w, DOT_T, DOT_IEEE)
    else:
        acc += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _acc0(BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """A zero accumulator of _mac's shape."""
    if DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float32)
    return acc


@triton.jit
def _sums(acc, DOT: tl.constexpr):
    """An accumulator's [BLOCK_B, BLOCK_N] sums over K."""
    if not DOT:
        acc = tl.sum(acc, axis=2)
    return acc


@triton.jit
def _nm_tile(acc, acc2, w, u, x_ptr, nw_ptr, y_ptr, b, bm, k0, kk, K, inv, TWO: tl.constexpr, DOT: tl.constexpr,
             DOT_T: tl.constexpr, DOT_IEEE: tl.constexpr):
    """One BLOCK_K tile of norm_matvec's main loop: x's tile normed (as the unfused path feeds its
    matmul, in the model's dtype: y's) times the weight tile(s) w (and u) already loaded."""
    km = k0 + kk < K
    xs = tl.load(x_ptr + b[:, None] * K + k0 + kk[None, :], mask=bm[:, None] & km[None, :], other=0.0)
    g = tl.load(nw_ptr + k0 + kk, mask=km, other=0.0).to(tl.float32)
    xn = (xs.to(tl.float32) * inv[:, None] * g[None, :]).to(y_ptr.dtype.element_ty)
    acc = _mac(acc, xn, w, DOT, DOT_T, DOT_IEEE)
    if TWO:
        acc2 = _mac(acc2, xn, u, DOT, DOT_T, DOT_IEEE)
    return acc, acc2


@triton.jit
def _norm_matvec_kernel(x_ptr, nw_ptr, w_ptr, s_ptr, y_ptr, B, K, N, eps, cos_ptr, sin_ptr, pos_ptr, pos_stride,
                        c_ptr, c_row_stride, c_pos_stride, QN, KN, HALF, a_ptr, a_stride, cnt_ptr, att_scale,
                        SWIGLU: tl.constexpr, ROPE: tl.constexpr, SCALED: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_DIV: tl.constexpr, PDL: tl.constexpr,
                        ATTN: tl.constexpr = False, G: tl.constexpr = 1, GP: tl.constexpr = 16,
                        HD: tl.constexpr = 16, KVH: tl.constexpr = 1, BLOCK_S: tl.constexpr = 16,
                        IEEE: tl.constexpr = False, STAGES: tl.constexpr = 1, part_ptr=None, sc_ptr=None,
                        CHUNK=0, SPLITS: tl.constexpr = 1, MATS: tl.constexpr = 1, DOT: tl.constexpr = False,
                        DOT_T: tl.constexpr = tl.float32, DOT_IEEE: tl.constexpr = False):
    if PDL:  # the next kernel may start loading its weights as this one's programs are all running
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    b = tl.arange(0, BLOCK_B)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns; with ROPE, pairs of columns
    kk = tl.arange(0, BLOCK_K)
    bm, nm = b < B, n < N
    dt = y_ptr.dtype.element_ty
    # the weight rows behind acc (and acc2): n (and N + n, the up half) or 2n and 2n + 1 (a pair)
    if ROPE:
        r1 = 2 * n
        r2 = r1 + 1
    else:
        r1 = n
        r2 = N + n
    lo, hi = k_range(K, CHUNK, SPLITS)  # with split K, this program's share of the K loop
    # the first weight tile depends on no earlier kernel: its loads go out before the wait
    wm = nm[:, None] & (lo + kk < K)[None, :]
    w = tl.load(w_ptr + r1[:, None] * K + lo + kk[None, :], mask=wm, other=0.0)
    u = w
    if SWIGLU or ROPE:
        u = tl.load(w_ptr + r2[:, None] * K + lo + kk[None, :], mask=wm, other=0.0)
    if PDL:  # x (and the positions) come from earlier kernels: nothing reads or writes them before
        tl.extra.cuda.gdc_wait()
    ss = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # prologue: each row's mean square
        km = k0 + kk < K
        xs = tl.load(x_ptr + b[:, None] * K + k0 + kk[None, :], mask=bm[:, None] & km[None, :], other=0.0)
        xs = xs.to(tl.float32)
        ss += tl.sum(xs * xs, axis=1)
    inv = 1.0 / tl.sqrt(ss / K + eps)
    acc = _acc0(BLOCK_B, BLOCK_N, BLOCK_K, DOT)
    acc2 = _acc0(BLOCK_B, BLOCK_N, BLOCK_K, DOT)
    acc, acc2 = _nm_tile(acc, acc2, w, u, x_ptr, nw_ptr, y_ptr, b, bm, lo, kk, K, inv, SWIGLU or ROPE, DOT, DOT_T,
                         DOT_IEEE)
    for k0 in tl.range(lo + BLOCK_K, hi, BLOCK_K, num_stages=STAGES):  # STAGES > 1: tiles copied ahead (cp.async)
        wm = nm[:, None] & (k0 + kk < K)[None, :]
        w = tl.load(w_ptr + r1[:, None] * K + k0 + kk[None, :], mask=wm, other=0.0)
        if SWIGLU or ROPE:
            u = tl.load(w_ptr + r2[:, None] * K + k0 + kk[None, :], mask=wm, other=0.0)
        acc, acc2 = _nm_tile(acc, acc2, w, u, x_ptr, nw_ptr, y_ptr, b, bm, k0, kk, K, inv,
                             SWIGLU or ROPE, DOT, DOT_T, DOT_IEEE)
    y = _sums(acc, DOT)
    y2 = y
    if SWIGLU or ROPE:
        y2 = _sums(acc2, DOT)
    m = bm[:, None] & nm[None, :]
    if SPLITS > 1:  # the last of the output tile's programs sums the splits and runs the epilogue
        y, y2, m, last = settle(part_ptr, sc_ptr, pid, y, y2, b, n, m, B, N, SPLITS, MATS)
    if SCALED:
        y *= tl.load(s_ptr + r1, mask=nm, other=0.0).to(tl.float32)[None, :]
    if SWIGLU or ROPE:
        if SCALED:
            y2 *= tl.load(s_ptr + r2, mask=nm, other=0.0).to(tl.float32)[None, :]
        y, y2 = y.to(dt).to(tl.float32), y2.to(dt).to(tl.float32)  # rounded as the unfused matmul rounds
    if SWIGLU:
        y = y / (1.0 + tl.exp(-y)) * y2
    if ROPE:
        # q and k pairs rotate by each row's position (v passes through); k and v also go to the
        # row's cache at that position (kernels/triton_ops.rope_store_ is the unfused form)
        p = tl.load(pos_ptr + b * pos_stride, mask=bm, other=0)
        rot = (r1 < KN)[None, :] & m
        at = p[:, None] * HALF + (n % HALF)[None, :]
        c = tl.load(cos_ptr + at, mask=rot, other=1.0)
        s = tl.load(sin_ptr + at, mask=rot, other=0.0)
        ya, yb = y * c - y2 * s, y * s + y2 * c
        yp = y_ptr + b[:, None] * (2 * N) + r1[None, :]
        tl.store(yp, ya.to(dt), mask=m)
        tl.store(yp + 1, yb.to(dt), mask=m)
        kv = m & (r1 >= QN)[None, :]
        cp = c_ptr + (b // ROW_DIV)[:, None] * c_row_stride + p[:, None] * c_pos_stride + (r1 - QN)[None, :]
        tl.store(cp, ya.to(c_ptr.dtype.element_ty), mask=kv)
        tl.store(cp + 1, yb.to(c_ptr.dtype.element_ty), mask=kv)
        if ATTN:  # the last program to finish attends for every row (all of q, k, v are written then)
            tl.debug_barrier()
            if SPLITS == 1:
                go = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1
            else:  # a program counts once it has written its tile (the last of its splits); the others add 0
                done = tl.atomic_add(cnt_ptr, last.to(tl.int32), sem="acq_rel", scope="gpu")
                go = tl.where(last, done == tl.num_programs(0) - 1, False)
            if go:
                attend_rows(y_ptr, 2 * N, c_ptr, c_row_stride, c_pos_stride, pos_ptr, pos_stride, a_ptr, a_stride,
                            B, att_scale, G, GP, HD, KVH, BLOCK_S, ROW_DIV, IEEE)
                tl.atomic_xchg(cnt_ptr, 0)  # ready for the next launch
    else:
        tl.store(y_ptr + b[:, None] * N + n[None, :], y.to(dt), mask=m)


def norm_matvec(x: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor, eps: float, *,
                swiglu: bool = False, scale: torch.Tensor | None = None,
                tiles: tuple[int, ...] | None = None, rope: tuple | None = None, pdl: bool = False,
                attend: tuple | None = None, work: SplitWork | None = None) -> torch.Tensor:
    """x [B, K] contiguous (B <= MAX_ROWS), norm_w [K], w [N, K] contiguous ([2F, K] with swiglu;
    int8 with its per-row `scale` [N], or the activations' dtype).
    Returns F.linear(rms_norm(x) * norm_w, w) [B, N], or SiLU(gate) * up [B, F] with swiglu.

    rope = (n_heads, cos, sin, pos, cache): w is a fused qkv projection (q heads, k heads, v heads,
    interleaved pairs) and the epilogue does rope_store_'s work: q and k rotated by each row's
    position (cos/sin [S, hd/2] float32, pos [B] int64, stride 0 allowed), then k and v written to
    cache[b // (B / C), pos[b]] (cache [C, S, 2KV, hd], each position's heads contiguous; C = B, or
    B / r for r positions of each sequence at once). The returned [B, N] holds rotated q and k and
    raw v.

    attend = (out, counter), with rope: decode attention folded in (kernels/triton_attn.attend_rows):
    the last program to finish -- counter, an int32 zero that the launch leaves at zero -- computes
    each row's attention over its cache positions [0, pos[b]] (its own included) into out [B, n_heads
    * hd], as triton_attn.decode_attention would with lengths pos + 1; one program does all the rows,
    so it is for short caches and few rows (the depth decoder at batch 1).

    pdl=True launches it as a programmatic dependent launch (Hopper and later; kernels/pdl.py): its
    first weight tile loads while the kernel before it finishes.

    Tiles with a fifth entry, splits > 1, split K: that many programs share each output tile, each
    over its own K range, and the last to finish sums their fp32 partials (kept in `work`, a
    SplitWork a stream reuses; default fresh scratch) and runs the epilogue (with attend, only those
    programs count towards the last one)."""
    B, K = x.shape
    assert B <= MAX_ROWS and x.is_contiguous() and w.is_contiguous() and w.shape[1] == K
    _check_scale(w, scale, w.shape[0])
    N = w.shape[0] // 2 if swiglu else w.shape[0]
    y = torch.empty(B, N, dtype=x.dtype, device=x.device)
    cols = N // 2 if rope else N  # programs cover pairs of columns with rope
    bn, bk, warps, stages, splits, dot = tile_args(tiles or _tiles(x, K, cols, 2 if swiglu or rope else 1,
                                                                   scale is not None))
    mats = 2 if swiglu or rope else 1
    used, chunk, parts, counts = split_args(K, bk, splits, B, cols, bn, mats, work, x.device)
    if rope:
        n_heads, cos, sin, pos, cache = rope
        hd = cos.shape[1] * 2
        kv = (N // hd - n_heads) // 2
        assert not swiglu and N == (n_heads + 2 * kv) * hd and cache.shape[2:] == (2 * kv, hd)
        assert cache.stride(3) == 1 and cache.stride(2) == hd and cos.is_contiguous() and sin.is_contiguous()
        r = (cos, sin, pos, pos.stride(0), cache, cache.stride(0), cache.stride(1), n_heads * hd,
             (n_heads + kv) * hd, hd // 2)
        div = cache_rows_div(B, cache)
    else:
        r, div = (y, y, y, 0, y, 0, 0, 0, 0, 1), 1  # unused
    fold, att = {}, (y, 0, y, 1.0)  # (unused without attend)
    if attend is not None:
        out, counter = attend
        if rope is None or out.shape != (B, n_heads * hd) or out.stride(1) != 1 or out.dtype != x.dtype:
            raise ValueError(f"attend needs rope and out [{B}, n_heads * hd] in the activations' dtype")
        if counter.dtype != torch.int32 or counter.numel() < 1:
            raise ValueError("attend's counter must be an int32 tensor holding 0")
        att = (out, out.stride(0), counter, hd ** -0.5)
        G = n_heads // kv
        fold = dict(ATTN=True, G=G, GP=group_rows(G), HD=hd, KVH=kv, BLOCK_S=block_keys(hd),
                    IEEE=x.dtype == torch.float32 or interpreted())
    _norm_matvec_kernel[(triton.cdiv(cols, bn), used)](
        x, norm_w, w, w if scale is None else scale, y, B, K, cols, eps, *r, *att, SWIGLU=swiglu,
        ROPE=rope is not None, SCALED=scale is not None, BLOCK_N=bn, BLOCK_K=bk, ROW_DIV=div, PDL=pdl,
        STAGES=stages, part_ptr=parts, sc_ptr=counts, CHUNK=chunk, SPLITS=used, MATS=mats, num_warps=warps,
        enable_fp_fusion=FMA, launch_pdl=pdl, **fold, **dot_args(x, dot, B))
    return y


def norm_matvec_ref(x, norm_w, w, eps, *, swiglu=False, scale=None):
    xn = (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * norm_w.float()).to(x.dtype)
    y = F.linear(xn, dequantize(w, scale, x.dtype))
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = (F.silu(gate.float()) * up.float()).to(x.dtype)
    return y


@triton.jit
def _mva_tile(acc, w, a_ptr, b, bm, k0, kk, K, DOT: tl.constexpr, DOT_T: tl.constexpr, DOT_IEEE: tl.constexpr):
    """One BLOCK_K tile of matvec_add_'s loop, its weight tile w already loaded."""
    a = tl.load(a_ptr + b[:, None] * K + k0 + kk[None, :], mask=bm[:, None] & (k0 + kk < K)[None, :], other=0.0)
    return _mac(acc, a, w, DOT, DOT_T, DOT_IEEE)


@triton.jit
def _matvec_add_kernel(x_ptr, w_ptr, s_ptr, a_ptr, B, K, N, SCALED: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr = 1,
                       part_ptr=None, sc_ptr=None, CHUNK=0, SPLITS: tl.constexpr = 1, DOT: tl.constexpr = False,
                       DOT_T: tl.constexpr = tl.float32, DOT_IEEE: tl.constexpr = False):
    if PDL:  # as in _norm_matvec_kernel: the next kernel may start, and the first weight tile loads
        tl.extra.cuda.gdc_launch_dependents()  # before waiting for the kernel that wrote a and x
    pid = tl.program_id(0)
    b = tl.arange(0, BLOCK_B)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    bm, nm = b < B, n < N
    lo, hi = k_range(K, CHUNK, SPLITS)  # as in _norm_matvec_kernel
    w = tl.load(w_ptr + n[:, None] * K + lo + kk[None, :], mask=nm[:, None] & (lo + kk < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = _acc0(BLOCK_B, BLOCK_N, BLOCK_K, DOT)
    acc = _mva_tile(acc, w, a_ptr, b, bm, lo, kk, K, DOT, DOT_T, DOT_IEEE)
    for k0 in tl.range(lo + BLOCK_K, hi, BLOCK_K, num_stages=STAGES):  # as in _norm_matvec_kernel
        w = tl.load(w_ptr + n[:, None] * K + k0 + kk[None, :], mask=nm[:, None] & (k0 + kk < K)[None, :], other=0.0)
        acc = _mva_tile(acc, w, a_ptr, b, bm, k0, kk, K, DOT, DOT_T, DOT_IEEE)
    acc = _sums(acc, DOT)
    m = bm[:, None] & nm[None, :]
    if SPLITS > 1:  # as in _norm_matvec_kernel: the last program adds the splits' sum into x
        acc, _, m, _ = settle(part_ptr, sc_ptr, pid, acc, acc, b, n, m, B, N, SPLITS, 1)
    if SCALED:
        acc *= tl.load(s_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    xp = x_ptr + b[:, None] * N + n[None, :]
    dt = x_ptr.dtype.element_ty
    x = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    tl.store(xp, (x + acc.to(dt).to(tl.float32)).to(dt), mask=m)  # rounded as linear-then-add rounds


def matvec_add_(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, *, scale: torch.Tensor | None = None,
                tiles: tuple[int, ...] | None = None, pdl: bool = False, work: SplitWork | None = None) -> torch.Tensor:
    """x [B, N] += F.linear(a, w) in place; a [B, K], w [N, K] (int8 with `scale` [N], or a's dtype),
    all contiguous, B <= MAX_ROWS. pdl, and split K (tiles' fifth entry, `work`): as in norm_matvec."""
    B, N = x.shape
    K = a.shape[1]
    assert B <= MAX_ROWS and x.is_contiguous() and a.is_contiguous() and w.is_contiguous() and w.shape == (N, K)
    _check_scale(w, scale, N)
    bn, bk, warps, stages, splits, dot = tile_args(tiles or _tiles(x, K, N, 1, scale is not None))
    used, chunk, parts, counts = split_args(K, bk, splits, B, N, bn, 1, work, x.device)
    _matvec_add_kernel[(triton.cdiv(N, bn), used)](x, w, w if scale is None else scale, a, B, K, N,
                                                   SCALED=scale is not None, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl,
                                                   STAGES=stages, part_ptr=parts, sc_ptr=counts, CHUNK=chunk,
                                                   SPLITS=used, num_warps=warps, enable_fp_fusion=FMA,
                                                   launch_pdl=pdl, **dot_args(x, dot, B))
    return x


def matvec_add_ref(x, w, a, *, scale=None):
    x += F.linear(a, dequantize(w, scale, a.dtype))
    return x
