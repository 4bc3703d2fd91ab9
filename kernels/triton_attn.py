"""Decode attention: one query position per row against that row's KV cache up to its own length.

A frame's backbone step attends over the whole call so far (up to the model's 2,048-frame window),
and a row's keys are one long sequential chain for a single program: at batch 1 the loop over keys
is latency-bound (a load round trip per BLOCK_N keys), so the step would grow ~linearly slower as a
call goes on. The kernel therefore splits the keys (flash-decoding): program (row, head, split)
runs online softmax over its CHUNK of keys and leaves a partial (running max m, denominator, the
unnormalised output); the last program of a (row, head) to finish -- a counter per (row, head),
taken with an atomic -- merges the partials in split order and writes the output. The merge order
is fixed, so results do not depend on which program finishes last (a CUDA graph's replay equals the
eager step bit for bit), and the last program puts the counter back to 0, so the same counters
serve every layer and every replay. Splits past a row's length do nothing, and a row whose keys
all fall in split 0 (early in a call) is written by that program directly: no partials, no
counter, no merge, the one-pass kernel's work. With one split (short caches: the depth decoder's
32 positions, or batches large enough to fill the GPU by rows) that is always the case.

Two forms: one program per query head (the default), or `grouped=True`, one per kv head taking the
query heads that share it at once with tensor-core dots (`_attend_group`), so keys and values are
read once rather than once per query head. `attend_rows` is the grouped form for all rows in one
program: kernels/triton_gemv.py's qkv kernel runs it in its last program (attention folded into
the projection, for the depth decoder's short cache at batch 1).

Reference: `decode_attention_ref` (PyTorch SDPA with a length mask).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_ops import FMA, _pdl_start, cache_rows_div

MAX_SPLITS = 16
TARGET_PROGRAMS = 2048  # (row, head, split) programs a launch aims for before it stops splitting


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1: CI and the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_keys(hd: int) -> int:
    """Keys a program loads at once: a [BLOCK_N, hd] tile of ~4K values."""
    return max(16, 4096 // hd)


def group_rows(G: int) -> int:
    """Rows of a grouped program's dots: its G query heads padded to the tensor cores' 16."""
    return max(16, triton.next_power_of_2(G))


def pick_splits(rows: int, heads: int, max_len: int, hd: int) -> int:
    """Key splits per (row, head): enough programs to fill a large GPU (TARGET_PROGRAMS), at most
    MAX_SPLITS, a power of two, and no more than the cache has key tiles."""
    tiles = triton.cdiv(max_len, block_keys(hd))
    want = triton.next_power_of_2(max(1, TARGET_PROGRAMS // max(1, rows * heads)))
    s = min(MAX_SPLITS, want)
    while s > 1 and s > tiles:
        s //= 2
    return s


def counters(rows: int, heads: int, device) -> torch.Tensor:
    """The per-(row, head) counters a split launch needs: zeros, left at zeros by every launch, so
    one buffer serves all the launches of a stream (they run one after another)."""
    return torch.zeros(rows * heads, dtype=torch.int32, device=device)


@triton.jit
def _decode_attn_kernel(q_ptr, q_stride, c_ptr, c_row_stride, c_pos_stride, len_ptr, len_stride, out_ptr,
                        out_stride, acc_ptr, ml_ptr, cnt_ptr, scale, KV, G, H, CHUNK, HD: tl.constexpr,
                        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, ROW_DIV: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)  # one query head; its kv head is head // G
    split = tl.program_id(2)
    n_keys = tl.load(len_ptr + row * len_stride)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + row * q_stride + head * HD + d).to(tl.float32) * scale  # [HD]
    m = tl.max(tl.full([BLOCK_N], -float("inf"), tl.float32), axis=0)
    den = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([HD], tl.float32)
    base = c_ptr + (row // ROW_DIV) * c_row_stride + (head // G) * HD
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, n_keys)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        ok = n < hi
        at = base + n[:, None] * c_pos_stride + d[None, :]
        k = tl.load(at, mask=ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, HD]
        v = tl.load(at + KV * HD, mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    o = out_ptr + row * out_stride + head * HD + d
    if SPLITS == 1:
        tl.store(o, (acc / den).to(out_ptr.dtype.element_ty))
    else:
        _merge_splits(acc, m, den, o, d, acc_ptr, ml_ptr, cnt_ptr, row * H + head, split,
                      tl.cdiv(n_keys, CHUNK), HD, SPLITS)


@triton.jit
def _merge_splits(acc, m, den, o, d, acc_ptr, ml_ptr, cnt_ptr, rh, split, used, HD: tl.constexpr,
                  SPLITS: tl.constexpr):
    """A split's end: `used` splits hold keys; the others leave no trace."""
    if used == 1:  # all keys in split 0: it writes the output, no partials, no merge
        if split == 0:
            tl.store(o, (acc / den).to(o.dtype.element_ty))
    elif split < used:
        at = rh * SPLITS + split
        tl.store(acc_ptr + at * HD + d, acc)
        tl.store(ml_ptr + 2 * at, m)
        tl.store(ml_ptr + 2 * at + 1, den)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        done = tl.atomic_add(cnt_ptr + rh, 1, sem="acq_rel", scope="gpu")
        if done == used - 1:  # the last of this (row, head): merge its splits, in split order
            _merge_head(acc_ptr, ml_ptr, rh, used, o, d, HD, SPLITS)
            tl.atomic_xchg(cnt_ptr + rh, 0)  # ready for the next launch


@triton.jit
def _merge_head(acc_ptr, ml_ptr, rh, used, o, d, HD: tl.constexpr, SPLITS: tl.constexpr):
    """Query head rh's output from its `used` splits' partials, merged in split order (the partials
    come from other programs: read past L1)."""
    s = tl.arange(0, SPLITS)
    has = s < used
    sp = rh * SPLITS + s
    ms = tl.load(ml_ptr + 2 * sp, mask=has, other=-float("inf"), cache_modifier=".cg")
    ds = tl.load(ml_ptr + 2 * sp + 1, mask=has, other=0.0, cache_modifier=".cg")
    w = tl.exp(ms - tl.max(ms, axis=0))
    parts = tl.load(acc_ptr + sp[:, None] * HD + d[None, :], mask=has[:, None], other=0.0, cache_modifier=".cg")
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(ds * w, axis=0)
    tl.store(o, out.to(o.dtype.element_ty))


@triton.jit
def _attend_group(q_ptr, kv_ptr, c_pos_stride, lo, hi, scale, KV, G: tl.constexpr, GP: tl.constexpr,
                  HD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, CG: tl.constexpr):
    """The G query heads at q_ptr (contiguous, HD each) against one kv head's keys [lo, hi) at
    kv_ptr (position p's key at kv_ptr + p * c_pos_stride, its value KV * HD further): online
    softmax over BLOCK_N keys at a time, scores and P·V as tensor-core dots over the heads padded
    to GP >= 16 rows. Returns the unnormalised output [GP, HD], the running max and the denominator
    [GP] (rows >= G: padding). IEEE: the dots in float32, exact (not TF32) -- float32 models, and
    bfloat16 ones interpreted on CPU (Triton 3.9's interpreter gets bfloat16 dots wrong). CG: read
    q, keys and values past L1 (another program of the same launch wrote them)."""
    d = tl.arange(0, HD)
    j = tl.arange(0, GP)
    qp = q_ptr + j[:, None] * HD + d[None, :]
    if CG:
        q = tl.load(qp, mask=(j < G)[:, None], other=0.0, cache_modifier=".cg")
    else:
        q = tl.load(qp, mask=(j < G)[:, None], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    m = tl.full([GP], -float("inf"), tl.float32)
    den = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, HD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        ok = n < hi
        at = kv_ptr + n[:, None] * c_pos_stride + d[None, :]
        if CG:
            k = tl.load(at, mask=ok[:, None], other=0.0, cache_modifier=".cg")  # [BLOCK_N, HD]
            v = tl.load(at + KV * HD, mask=ok[:, None], other=0.0, cache_modifier=".cg")
        else:
            k = tl.load(at, mask=ok[:, None], other=0.0)
            v = tl.load(at + KV * HD, mask=ok[:, None], other=0.0)
        if IEEE:
            k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * scale, -float("inf"))  # [GP, BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    return acc, m, den


@triton.jit
def _decode_attn_grouped_kernel(q_ptr, q_stride, c_ptr, c_row_stride, c_pos_stride, len_ptr, len_stride, out_ptr,
                                out_stride, acc_ptr, ml_ptr, cnt_ptr, scale, KV, H, CHUNK, G: tl.constexpr,
                                GP: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                                ROW_DIV: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    """One program per (row, kv head, split): the G query heads sharing the kv head at once
    (_attend_group), so each key and value is read once, not G times."""
    _pdl_start(PDL)
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_keys = tl.load(len_ptr + row * len_stride)
    d = tl.arange(0, HD)
    j = tl.arange(0, GP)
    real = j < G
    heads = kvh * G + j
    lo = split * CHUNK
    acc, m, den = _attend_group(q_ptr + row * q_stride + kvh * G * HD, c_ptr + (row // ROW_DIV) * c_row_stride
                                + kvh * HD, c_pos_stride, lo, tl.minimum(lo + CHUNK, n_keys), scale, KV, G, GP, HD,
                                BLOCK_N, IEEE, False)
    o = out_ptr + row * out_stride + heads[:, None] * HD + d[None, :]
    if SPLITS == 1:
        tl.store(o, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=real[:, None])
    else:
        used = tl.cdiv(n_keys, CHUNK)
        if used == 1:  # as _merge_splits: split 0 holds every key and writes the output
            if split == 0:
                tl.store(o, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=real[:, None])
        elif split < used:
            at = (row * H + heads) * SPLITS + split
            tl.store(acc_ptr + at[:, None] * HD + d[None, :], acc, mask=real[:, None])
            tl.store(ml_ptr + 2 * at, m, mask=real)
            tl.store(ml_ptr + 2 * at + 1, den, mask=real)
            tl.debug_barrier()
            rk = row * KV + kvh  # one counter per (row, kv head)
            done = tl.atomic_add(cnt_ptr + rk, 1, sem="acq_rel", scope="gpu")
            if done == used - 1:
                for i in tl.static_range(G):
                    h = kvh * G + i
                    _merge_head(acc_ptr, ml_ptr, row * H + h, used, out_ptr + row * out_stride + h * HD + d, d,
                                HD, SPLITS)
                tl.atomic_xchg(cnt_ptr + rk, 0)


@triton.jit
def attend_rows(q_ptr, q_stride, c_ptr, c_row_stride, c_pos_stride, pos_ptr, pos_stride, out_ptr, out_stride, B,
                scale, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, KVH: tl.constexpr,
                BLOCK_N: tl.constexpr, ROW_DIV: tl.constexpr, IEEE: tl.constexpr):
    """Decode attention for rows [0, B) in ONE program, each over its cache positions [0, pos[b]]:
    what kernels/triton_gemv's qkv kernel runs in its last program (attend=...), reading q, keys
    and values that other programs of that launch wrote (past L1). q rows at q_ptr + b * q_stride
    (heads contiguous), outputs at out_ptr + b * out_stride. GP, BLOCK_N: group_rows(G), block_keys(HD)."""
    d = tl.arange(0, HD)
    j = tl.arange(0, GP)
    for b in range(B):
        n_keys = tl.load(pos_ptr + b * pos_stride) + 1
        kv = c_ptr + (b // ROW_DIV) * c_row_stride
        for g in tl.static_range(KVH):
            acc, m, den = _attend_group(q_ptr + b * q_stride + g * G * HD, kv + g * HD, c_pos_stride, 0, n_keys, scale,
                                        KVH, G, GP, HD, BLOCK_N, IEEE, True)
            o = out_ptr + b * out_stride + (g * G + j)[:, None] * HD + d[None, :]
            tl.store(o, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=(j < G)[:, None])


def decode_attention(q: torch.Tensor, cache: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor | None = None,
                     pdl: bool = False, splits: int | None = None, counts: torch.Tensor | None = None,
                     grouped: bool = False) -> torch.Tensor:
    """q [B, H, hd] (row stride free); cache [C, S, 2KV, hd] (keys then values per position; C = B,
    or B / r when r consecutive rows are positions of one sequence); lengths [B] int64 >= 1 (stride
    0 allowed): row b attends to positions [0, lengths[b]) of cache row b // (B / C).
    Returns [B, H * hd] in q's dtype.

    splits: key splits per (row, head) (a power of two; default pick_splits); with more than one,
    counts = counters(>= B, H) that no other stream uses at the same time (default: fresh zeros
    for this call -- a caller replaying a CUDA graph passes its own, kept for the graph's life).
    pdl: a programmatic dependent launch (kernels/pdl.py).
    grouped: one program per (row, kv head, split) computes the kv head's query heads together with
    tensor-core dots (keys and values read once, not once per query head; P rounded to the cache's
    dtype for the P·V dot, as flash attention does; float32 stays exact)."""
    B, H, hd = q.shape
    KV, S = cache.shape[2] // 2, cache.shape[1]
    G = H // KV
    out = torch.empty(B, H * hd, device=q.device, dtype=q.dtype) if out is None else out
    assert q.stride(2) == 1 and q.stride(1) == hd and cache.stride(3) == 1 and cache.stride(2) == hd
    splits = pick_splits(B, KV if grouped else H, S, hd) if splits is None else splits
    if splits < 1 or splits & (splits - 1) or splits > MAX_SPLITS:
        raise ValueError(f"splits must be a power of two in 1..{MAX_SPLITS}, got {splits}")
    bn = block_keys(hd)
    chunk = triton.cdiv(triton.cdiv(S, splits), bn) * bn  # whole key tiles per split
    if splits > 1:
        counts = counters(B, H, q.device) if counts is None else counts
        if counts.dtype != torch.int32 or counts.numel() < B * H or not counts.is_contiguous():
            raise ValueError(f"counts must be contiguous int32 with >= {B * H} entries (counters({B}, {H}))")
        acc = torch.empty(B * H * splits, hd, device=q.device, dtype=torch.float32)
        ml = torch.empty(B * H * splits, 2, device=q.device, dtype=torch.float32)
    else:
        counts = acc = ml = out  # unused
    args = (q, q.stride(0), cache, cache.stride(0), cache.stride(1), lengths, lengths.stride(0), out, out.stride(0),
            acc, ml, counts, hd ** -0.5, KV)
    div = cache_rows_div(B, cache)
    if grouped:
        _decode_attn_grouped_kernel[(B, KV, splits)](*args, H, chunk, G=G, GP=group_rows(G), HD=hd, BLOCK_N=bn,
                                                     SPLITS=splits, ROW_DIV=div, PDL=pdl, enable_fp_fusion=FMA,
                                                     IEEE=q.dtype == torch.float32 or interpreted(), launch_pdl=pdl)
    else:
        _decode_attn_kernel[(B, H, splits)](*args, G, H, chunk, HD=hd, BLOCK_N=bn, SPLITS=splits, ROW_DIV=div,
                                            PDL=pdl, enable_fp_fusion=FMA, launch_pdl=pdl)
    return out


def decode_attention_ref(q: torch.Tensor, cache: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    B, H, hd = q.shape
    KV, S = cache.shape[2] // 2, cache.shape[1]
    cache = cache.repeat_interleave(cache_rows_div(B, cache), dim=0)
    keep = torch.arange(S, device=q.device)[None, :] < lengths[:, None]  # [B, S]
    k, v = cache[:, :, :KV].transpose(1, 2).float(), cache[:, :, KV:].transpose(1, 2).float()
    o = F.scaled_dot_product_attention(q.float().view(B, KV, H // KV, hd), k, v, attn_mask=keep[:, None, None, :])
    return o.reshape(B, H * hd).to(q.dtype)
