"""Triton kernels for the GPU hot path, each beside the plain PyTorch reference it must equal.

- `sample`: top-k + temperature sampling over the audio logits in ONE kernel, reserved ids
  (>= codebook size) never drawn, any k. No sort: a 32-step bisection over the logits' bit patterns
  finds the k-th largest as a threshold (ties to the lower code ids), the noise is hashed in the
  kernel from (seed, counter, codebook, code) and looked up in the shared Gumbel table, and the
  code is written straight into its column of the frame (reference: engine/sampling.sample, which
  sorts). It replaces torch.topk + a pick kernel + the per-frame noise tensor's ~15 launches.
  (An in-register sort of the whole row was tried earlier: 39 us a row on an H100.)
- `add_rms_norm`: the residual add fused with the next RMSNorm: h += delta (in place), returns
  rms_norm(h) * weight (reference: `add_rms_norm_ref`); `add=False` starts the residual stream.
- `rope_store_`: one decode step's q/k rotation AND the cache write: q rotated in place, rotated
  k and v stored at each row's own position of its KV cache (reference: `rope_store_ref`). One
  program a row does all its heads (48 x 32 pairs in csm-1b's backbone, 95 registers for sm_90,
  no spill). It was a program a (row, head): 48 programs of 32 pairs, most lanes idle, and 8x the
  programs for CI's interpreter to walk one at a time (an interpreted frame step took 20-25 % longer).
- decode attention lives in kernels/triton_attn.py (split over the keys for long caches).
- `silu_mul`: SiLU(gate) * up of a fused gate/up projection (reference: `silu_mul_ref`).

On a GPU they run compiled; in CI they run on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Multiply-adds compile to FMAs (Triton's default so far, which 3.10 turns off): pinned here so the
# kernels compute and perform the same under any Triton version. No draw depends on it: the sampling
# kernel's only float arithmetic is one division (div_rn) and one add.
FMA = True


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """For a kernel with nothing to load ahead: under a programmatic dependent launch
    (kernels/pdl.py) let the next kernel start, then wait for the previous one to finish."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


# -- sampling ----------------------------------------------------------------------------------
WAYS = (2, 4, 8, 16)  # the draw's search for its threshold: bisection (2) or that many ways a step
DRAW_WAYS = 2  # until a GPU has timed the others (bench/gpu.py's sample stage)


@triton.jit
def _fmix32(h):
    # murmur3 finaliser on int64 values holding 32 bits (engine/sampling._fmix32)
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit(do_not_specialize=["codebook"])
def _sample_kernel(l_ptr, l_stride, temp_ptr, topk_ptr, seed_ptr, ctr_ptr, codebook, table_ptr, out_ptr,
                   out_stride, V, emb_ptr, x_ptr, D, NOISE_BITS: tl.constexpr, BLOCK: tl.constexpr,
                   EMBED: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr, WAYS: tl.constexpr = 2,
                   STEPS: tl.constexpr = 32):
    _pdl_start(PDL)
    row = tl.program_id(0)
    code = tl.arange(0, BLOCK)
    ok = code < V
    v = tl.load(l_ptr + row * l_stride + code, mask=ok, other=0.0).to(tl.float32)
    # an integer key with the floats' order: flip the magnitude bits of negatives (-0.0 is 0.0)
    bits = tl.where(v == 0.0, 0, v.to(tl.int32, bitcast=True))
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    k = tl.minimum(tl.maximum(tl.load(topk_ptr + row), 1), V)
    # the k-th largest key: the largest t with #(key >= t) >= k, by bisection over the key range
    lo = tl.min(tl.where(ok, key, 1 << 40), axis=0)  # #(key >= lo) = V >= k
    hi = tl.max(tl.where(ok, key, -(1 << 40)), axis=0) + 1  # #(key >= hi) = 0 < k
    if WAYS == 2:
        for _ in range(32):
            mid = (lo + hi) >> 1
            enough = tl.sum((ok & (key >= mid)).to(tl.int32), axis=0) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
    else:  # WAYS - 1 thresholds a step, counted in one reduction: log2(WAYS) bits a step, not one
        w = tl.arange(0, WAYS).to(tl.int64)
        for _ in range(STEPS):
            step = (hi - lo + WAYS - 1) // WAYS  # the range hi - lo (<= 2**32) shrinks to <= step
            ts = lo + w * step  # ts[0] = lo: #(key >= lo) >= k holds
            cnt = tl.sum(((key[None, :] >= ts[:, None]) & ok[None, :]).to(tl.int32), axis=1)
            j = tl.sum(((ts < hi) & (cnt >= k)).to(tl.int64), axis=0) - 1  # counts fall with t: a prefix
            lo = lo + j * step
            hi = tl.minimum(lo + step, hi)
    above = ok & (key > lo)
    tied = ok & (key == lo)  # the k-th place's ties go to the lowest code ids
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= k - tl.sum(above.to(tl.int32), axis=0)))
    # noise keyed by (seed, counter, codebook, code): engine/sampling.noise_index
    seed = tl.load(seed_ptr + row)
    c = tl.load(ctr_ptr + row) & 0xFFFFFFFF
    h = _fmix32(((seed & 0xFFFFFFFF) * 0x9E3779B1 + c) & 0xFFFFFFFF)
    mix = codebook.to(tl.int64) * 0x165667B1 + code
    h = _fmix32(((h ^ ((seed >> 32) & 0xFFFFFFFF)) * 0x27D4EB2F + mix) & 0xFFFFFFFF)
    h = _fmix32(h ^ ((c * 0x61C88647) & 0xFFFFFFFF))
    g = tl.load(table_ptr + (h >> (32 - NOISE_BITS)), mask=take, other=0.0)
    t = tl.load(temp_ptr + row).to(tl.float32)
    s = tl.where(take, tl.math.div_rn(v, tl.zeros_like(v) + t) + g, -float("inf"))
    best = tl.argmax(s, axis=0, tie_break_left=True)  # equal scores: the lower code id
    tl.store(out_ptr + row * out_stride, best.to(tl.int64))
    if EMBED:  # the drawn code's embedding row: the next depth pass's input
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            e = tl.load(emb_ptr + best.to(tl.int64) * D + d, mask=d < D)
            tl.store(x_ptr + row * D + d, e, mask=d < D)


def sample(logits: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor, seed: torch.Tensor,
           counter: torch.Tensor, codebook: int, table: torch.Tensor, codebook_size: int,
           out: torch.Tensor | None = None, pdl: bool = False, embed: tuple | None = None,
           warps: int | None = None, ways: int | None = None) -> torch.Tensor:
    """One kernel: engine/sampling.sample's draw, with no sort and no noise tensor.

    logits [B, V] (row stride free; ids >= codebook_size are reserved and never drawn); temperature
    [B] float; topk [B] int64 in 1..codebook_size (any k: no upper bound); seed/counter [B] int64;
    codebook: host int; table: engine/sampling.gumbel_table on this device. Returns [B] int64,
    written into `out` if given (any row stride, e.g. one column of a frame). pdl: launched as a
    programmatic dependent launch (kernels/pdl.py). embed = (table [C', D], x [B, D]), both
    contiguous: also writes table[code] into x's row (F.embedding's work, folded into the draw).
    warps: the program's warps (default 4, 8 past 2,048 codes). The draw is the same with any: the
    k-th largest logit is one value however it is searched for; fewer warps reduce without shared
    memory (bench/gpu.py's sample stage times 1, 2 and 4 side by side).
    ways: how the k-th largest logit is searched for (default DRAW_WAYS): 2 is bisection, 32 steps of
    one count each; 4, 8 or 16 count ways - 1 thresholds at once, ceil(32 / log2(ways)) steps (8 at
    16), each one block-wide reduction: fewer round trips through shared memory and barriers, more
    compares. The threshold found, and so the draw, is the same with any (the sample stage times them)."""
    ways = DRAW_WAYS if ways is None else ways
    if ways not in WAYS:
        raise ValueError(f"ways must be one of {', '.join(map(str, WAYS))}, got {ways}")
    B = logits.shape[0]
    assert logits.stride(-1) == 1 and table.numel() & (table.numel() - 1) == 0
    out = torch.empty(B, dtype=torch.int64, device=logits.device) if out is None else out
    block = triton.next_power_of_2(codebook_size)
    warps = warps or (4 if block <= 2048 else 8)
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"warps must be 1, 2, 4, 8 or 16, got {warps}")
    emb, x, D = out, out, 1  # unused without embed
    if embed is not None:
        (emb, x), D = embed, embed[0].shape[1]
        assert emb.is_contiguous() and x.is_contiguous() and x.shape == (B, D) and emb.shape[0] >= codebook_size
    _sample_kernel[(B,)](logits, logits.stride(0), temperature, topk, seed, counter, codebook, table, out,
                         out.stride(0), codebook_size, emb, x, D, NOISE_BITS=table.numel().bit_length() - 1,
                         BLOCK=block, EMBED=embed is not None, BLOCK_D=min(1024, triton.next_power_of_2(D)),
                         PDL=pdl, WAYS=ways, STEPS=-(-32 // (ways.bit_length() - 1)), num_warps=warps,
                         enable_fp_fusion=FMA, launch_pdl=pdl)
    return out


# -- residual + norm ---------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, D, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    h = tl.load(d_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    if ADD:
        h += tl.load(h_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    h = h.to(h_ptr.dtype.element_ty)  # the residual stream keeps the model's dtype, as eager does
    tl.store(h_ptr + row * D + offs, h, mask=m)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (hf * inv * w).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 add: bool = True, pdl: bool = False) -> torch.Tensor:
    """h += delta in place (h = delta when add=False; both contiguous [..., D]); returns
    rms_norm(h) * weight. pdl: as in sample."""
    D = h.shape[-1]
    rows = h.numel() // D
    out = torch.empty_like(h)
    _add_rms_norm_kernel[(rows,)](h, delta, weight, out, D, eps, ADD=add, BLOCK=triton.next_power_of_2(D),
                                  PDL=pdl, enable_fp_fusion=FMA, launch_pdl=pdl)
    return out


def add_rms_norm_ref(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h += delta
    return F.rms_norm(h.float(), (h.shape[-1],), weight.float(), eps).to(h.dtype)


# -- KV-cache rows ------------------------------------------------------------------------------
def cache_rows_div(rows: int, cache: torch.Tensor) -> int:
    """How many consecutive rows share one cache row: 1, or r when the rows are r positions of each
    sequence at once (cache [rows / r, S, ...]; the depth decoder's first pass takes two)."""
    div = rows // max(1, cache.shape[0])
    if div < 1 or div * cache.shape[0] != rows:
        raise ValueError(f"{rows} rows cannot share a cache of {cache.shape[0]} rows")
    return div


# -- rotary embedding --------------------------------------------------------------------------
@triton.jit
def _rope_store_kernel(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, pos_ptr, pos_stride, c_ptr, c_row_stride,
                       c_pos_stride, H, KV, NH: tl.constexpr, HALF: tl.constexpr, ROW_DIV: tl.constexpr):
    # one program a row, every head of it at once: [NH, HALF] pairs (NH the heads rounded up to a
    # power of two; 0..H-1 queries, H..H+KV-1 keys, then values)
    row = tl.program_id(0)
    head = tl.arange(0, NH)[:, None]
    i = tl.arange(0, HALF)[None, :]
    live = head < H + 2 * KV
    p = tl.load(pos_ptr + row * pos_stride)
    src = qkv_ptr + row * qkv_stride + head * 2 * HALF
    a = tl.load(src + 2 * i, mask=live, other=0.0).to(tl.float32)
    b = tl.load(src + 2 * i + 1, mask=live, other=0.0).to(tl.float32)
    rotate = head < H + KV
    c = tl.where(rotate, tl.load(cos_ptr + p * HALF + i), 1.0)
    s = tl.where(rotate, tl.load(sin_ptr + p * HALF + i), 0.0)
    ra = (a * c - b * s)
    rb = (a * s + b * c)
    dst = tl.where(head < H, src, c_ptr + (row // ROW_DIV) * c_row_stride + p * c_pos_stride + (head - H) * 2 * HALF)
    tl.store(dst + 2 * i, ra.to(qkv_ptr.dtype.element_ty), mask=live)
    tl.store(dst + 2 * i + 1, rb.to(qkv_ptr.dtype.element_ty), mask=live)


def rope_store_(qkv: torch.Tensor, n_heads: int, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                cache: torch.Tensor) -> None:
    """qkv [B, H + 2KV, hd] (one decode position per row); cos/sin tables [S, hd/2] float32; pos [B]
    int64 (stride 0 allowed: one position for all rows); cache [C, S, 2KV, hd] (a strided view is
    fine if each position's heads are contiguous). q is rotated in place; rotated k and raw v go
    to cache[b // (B / C), pos[b]]: C = B, or C = B / r when r consecutive rows are positions of
    one sequence (see cache_rows_div)."""
    B, NH, hd = qkv.shape
    KV = (NH - n_heads) // 2
    assert qkv.stride(2) == 1 and qkv.stride(1) == hd and cache.stride(3) == 1 and cache.stride(2) == hd
    assert qkv.dtype == cache.dtype
    _rope_store_kernel[(B,)](qkv, qkv.stride(0), cos, sin, pos, pos.stride(0), cache, cache.stride(0),
                             cache.stride(1), n_heads, KV, NH=triton.next_power_of_2(NH), HALF=hd // 2,
                             ROW_DIV=cache_rows_div(B, cache), enable_fp_fusion=FMA)


def rope_store_ref(qkv, n_heads, cos, sin, pos, cache) -> None:
    B, NH, _ = qkv.shape
    rot = torch.complex(cos[pos], sin[pos])  # [B, hd/2]
    x = torch.view_as_complex(qkv[:, : NH - (NH - n_heads) // 2].float().unflatten(-1, (-1, 2)))
    qk = torch.view_as_real(x * rot[:, None, :]).flatten(-2).to(qkv.dtype)
    qkv[:, : n_heads] = qk[:, :n_heads]
    rows = torch.arange(B, device=qkv.device) // cache_rows_div(B, cache)
    cache[rows, pos] = torch.cat([qk[:, n_heads:], qkv[:, NH - (NH - n_heads) // 2:]], dim=1)


# -- feed-forward ------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(g_ptr, out_ptr, F_, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < F_
    a = tl.load(g_ptr + row * 2 * F_ + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(g_ptr + row * 2 * F_ + F_ + offs, mask=m, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + row * F_ + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(g: torch.Tensor) -> torch.Tensor:
    """g [B, 2F] contiguous (gate then up) -> silu(gate) * up [B, F]."""
    B, F2 = g.shape
    Fd = F2 // 2
    out = torch.empty(B, Fd, device=g.device, dtype=g.dtype)
    block = min(1024, triton.next_power_of_2(Fd))
    _silu_mul_kernel[(B, triton.cdiv(Fd, block))](g, out, Fd, BLOCK=block, enable_fp_fusion=FMA)
    return out


def silu_mul_ref(g: torch.Tensor) -> torch.Tensor:
    gate, up = g.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(g.dtype)
