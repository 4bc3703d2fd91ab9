"""The whole CSM frame step as one numba call, for CPU float32.

On a CPU the small models are bound by per-op dispatch: the eager step issues ~1,000 small ops a
frame (31 sequential codebooks x layers x ~15 ops, plus the backbone). This kernel runs, per
active row: codebook 0 (head + draw), the 31-position depth decoder (head + draw each), then the
backbone step that feeds the frame back (summed audio embeddings, every layer over the row's own
KV cache, final norm) -- in one compiled call that releases the GIL.

Matvecs are unit-stride axpy loops over weights stored [in, out]; RMSNorm, interleaved-pair RoPE,
grouped-query attention and SwiGLU are plain loops. Each row is computed on its own with the same
arithmetic whatever else is in the batch, so a seeded stream is bit-identical alone or batched.

The draw is engine/sampling.sample's rule: greedy when k == 1, else Gumbel-max over the k best
logits, the noise hashed from (seed, frame counter, codebook, code id) into the shared Gumbel
table. The eager PyTorch path (engine/depth.py, engine/model.py) is the reference this kernel is
tested against.

Weights arrive in tuples (see engine/cpu_step.py):
  layers = (attn_norm [L, D], wqkv_t [L, D, (H + 2KV) hd], wo_t [L, H hd, D], ffn_norm [L, D],
            w13_t [L, D, 2F], w2_t [L, F, D])
  dims   = (n_heads, n_kv, eps)
"""

from __future__ import annotations

import numpy as np
from numba import njit

# reassociation lets the reductions vectorise; no nnan/ninf so comparisons stay IEEE
_FM = {"reassoc", "contract", "nsz"}
_M32 = 0xFFFFFFFF


@njit(fastmath=_FM, nogil=True, cache=True)
def _axpy_matvec(x, wt, out, accumulate):
    """out (+)= x @ wt, wt [in, out] row-major."""
    if not accumulate:
        out[:] = 0.0
    for i in range(wt.shape[0]):
        xi = x[i]
        row = wt[i]
        for o in range(wt.shape[1]):
            out[o] += xi * row[o]


@njit(fastmath=_FM, nogil=True, cache=True)
def _rms_norm(x, w, eps, out):
    ss = np.float32(0.0)
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = w[i] * (x[i] * inv)


@njit(fastmath=_FM, nogil=True, cache=True)
def _rope(v, cos, sin):
    """Rotate interleaved pairs (v[2i], v[2i+1]) of one head in place."""
    for i in range(cos.shape[0]):
        a = v[2 * i]
        b = v[2 * i + 1]
        v[2 * i] = a * cos[i] - b * sin[i]
        v[2 * i + 1] = a * sin[i] + b * cos[i]


@njit(nogil=True, cache=True)
def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


@njit(nogil=True, cache=True)
def _log2(n):
    bits = 0
    while (1 << (bits + 1)) <= n:
        bits += 1
    return bits


@njit(nogil=True, cache=True)
def row_key(seed, counter, bits):
    """A row's noise key for a frame: the hash's seed/counter stage (engine/sampling.noise_index),
    done once per row and frame rather than once per candidate, with the counter and table bits."""
    c = counter & _M32
    pre = _fmix32(((seed & _M32) * 0x9E3779B1 + c) & _M32) ^ ((seed >> 32) & _M32)
    return pre, c, bits


@njit(nogil=True, cache=True)
def _noise(key, codebook, code, table):
    """engine/sampling.gumbel for one code: int64 arithmetic masked to 32 bits, as torch does it."""
    pre, c, bits = key
    h = _fmix32((pre * 0x27D4EB2F + codebook * 0x165667B1 + code) & _M32)
    h = _fmix32(h ^ ((c * 0x61C88647) & _M32))
    return table[h >> (32 - bits)]


@njit(nogil=True, cache=True)
def _insert_top_k(logits, k, vals, idx):
    """The k best logits, sorted descending, into vals/idx by insertion (equal values keep the
    earlier code first); returns how many were filled (min(k, n))."""
    filled = 0
    for i in range(logits.shape[0]):
        v = logits[i]
        if filled < k or v > vals[filled - 1]:
            pos = filled if filled < k else k - 1
            while pos > 0 and vals[pos - 1] < v:
                vals[pos] = vals[pos - 1]
                idx[pos] = idx[pos - 1]
                pos -= 1
            vals[pos] = v
            idx[pos] = i
            if filled < k:
                filled += 1
    return filled


@njit(nogil=True, cache=True)
def _draw(logits, k, temp, key, codebook, table, vals, idx):
    """engine/sampling.sample's draw: greedy (k == 1) or Gumbel-max over the k best logits (ties at
    the k-th place to the lower code id), noise keyed by code id. key: row_key(seed, counter, bits)."""
    n = logits.shape[0]
    if k == 1:
        best = 0
        for i in range(1, n):
            if logits[i] > logits[best]:
                best = i
        return best
    if k > 64:  # a long top k: one stable sort (O(n log n)) beats insertion (O(n k))
        order = np.argsort(-logits, kind="mergesort")  # equal values keep the earlier code first
        filled = min(k, n)
        for r in range(filled):
            idx[r] = order[r]
            vals[r] = logits[order[r]]
    else:
        filled = _insert_top_k(logits, k, vals, idx)
    choice = 0
    best = np.float32(-np.inf)
    for r in range(filled):
        s = vals[r] / temp + _noise(key, codebook, idx[r], table)
        if s > best or (s == best and idx[r] < idx[choice]):
            best = s
            choice = r
    return idx[choice]


@njit(fastmath=_FM, nogil=True, cache=True)
def _block(x, layer, layers, dims, cache, p, cos, sin, xn, qkv, att, g13, act, w):
    """One decoder layer for one token at position p, in place on x. cache [T, 2KV, hd] (this row,
    this layer): writes position p, attends to 0..p."""
    attn_norm, wqkv_t, wo_t, ffn_norm, w13_t, w2_t = layers
    n_heads, n_kv, eps = dims
    hd = 2 * cos.shape[0]
    F = w2_t.shape[1]
    group = n_heads // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    _rms_norm(x, attn_norm[layer], eps, xn)
    _axpy_matvec(xn, wqkv_t[layer], qkv, False)
    for hh in range(n_heads + n_kv):  # q heads then k heads
        _rope(qkv[hh * hd:(hh + 1) * hd], cos, sin)
    for j in range(2 * n_kv):
        cache[p, j] = qkv[(n_heads + j) * hd:(n_heads + j + 1) * hd]
    for hh in range(n_heads):
        g = hh // group
        q = qkv[hh * hd:(hh + 1) * hd]
        top = np.float32(-np.inf)
        for t in range(p + 1):
            s = np.float32(0.0)
            kt = cache[t, g]
            for i in range(hd):
                s += q[i] * kt[i]
            w[t] = s * scale
            top = max(top, w[t])
        total = np.float32(0.0)
        for t in range(p + 1):
            w[t] = np.exp(w[t] - top)
            total += w[t]
        o = att[hh * hd:(hh + 1) * hd]
        o[:] = 0.0
        for t in range(p + 1):
            wt = w[t] / total
            vt = cache[t, n_kv + g]
            for i in range(hd):
                o[i] += wt * vt[i]
    _axpy_matvec(att, wo_t[layer], x, True)
    _rms_norm(x, ffn_norm[layer], eps, xn)
    _axpy_matvec(xn, w13_t[layer], g13, False)
    for i in range(F):
        gate = g13[i]
        act[i] = gate / (np.float32(1.0) + np.exp(-gate)) * g13[F + i]
    _axpy_matvec(act, w2_t[layer], x, True)


@njit(fastmath=_FM, nogil=True, cache=True)
def _scratch(dim, layers, dims, positions):
    """Per-call work buffers for a transformer of width dim."""
    n_heads, n_kv, _ = dims
    hd = layers[1].shape[2] // (n_heads + 2 * n_kv)
    F = layers[5].shape[1]
    return (np.empty(dim, np.float32), np.empty(dim, np.float32),
            np.empty((n_heads + 2 * n_kv) * hd, np.float32), np.empty(n_heads * hd, np.float32),
            np.empty(2 * F, np.float32), np.empty(F, np.float32), np.empty(positions, np.float32))


@njit(fastmath=_FM, nogil=True, cache=True)
def _depth_row(h, c0, depth, dlayers, ddims, k, temp, key, gtable, force, record, codes, vals, idx, cache, buf):
    """Codebooks 1..N-1 for one row: codes[j - 1] for j = 1..N-1. h [Db] backbone state; key and
    gtable: the row's noise key (row_key) and the Gumbel table (see _draw)."""
    proj_t, table, vocab, norm_w, heads, cos, sin = depth
    x, xn, qkv, att, g13, act, w = buf
    n_cb = codes.shape[0] + 1
    L = dlayers[0].shape[0]
    logits = np.empty(heads.shape[2], np.float32)
    for p in range(n_cb):
        if p == 0:
            _axpy_matvec(h, proj_t, x, False)
        else:
            code = c0 if p == 1 else codes[p - 2]
            x[:] = table[(p - 1) * vocab + code]
        for layer in range(L):
            _block(x, layer, dlayers, ddims, cache[layer], p, cos[p], sin[p], xn, qkv, att, g13, act, w)
        if p == 0:
            continue
        _rms_norm(x, norm_w, ddims[2], xn)
        _axpy_matvec(xn, heads[p - 1], logits, False)
        if record.shape[0] > 0:
            record[p - 1] = logits
        if force.shape[0] > 0:
            codes[p - 1] = force[p - 1]
        else:
            codes[p - 1] = _draw(logits, k, temp, key, p, gtable, vals, idx)


@njit(fastmath=_FM, nogil=True, cache=True)
def depth_frame(h, c0, depth, dlayers, ddims, temp, topk, seed, counter, gtable, force, record, codes):
    """Codebooks 1..N-1 for each row (the depth decoder alone; tests use force/record).
    h [B, Db]; c0 [B]; seed/counter [B] noise keys; gtable the Gumbel table; force [B, N-1] or
    [0, 0]; record [B, N-1, C] or [0, 0, 0]; codes [B, N-1] out."""
    K = max(1, topk.max())
    bits = _log2(gtable.shape[0])
    n_cb = codes.shape[1] + 1
    buf = _scratch(depth[0].shape[1], dlayers, ddims, n_cb)
    hd = 2 * depth[5].shape[1]
    cache = np.empty((dlayers[0].shape[0], n_cb, 2 * ddims[1], hd), np.float32)
    vals, idx = np.empty(K, np.float32), np.empty(K, np.int64)
    for b in range(h.shape[0]):
        if force.shape[0] > 0:
            fb = force[b]
        else:
            fb = np.empty(0, np.int64)
        if record.shape[0] > 0:
            rb = record[b]
        else:
            rb = np.empty((0, 0), np.float32)
        _depth_row(h[b], c0[b], depth, dlayers, ddims, topk[b], temp[b], row_key(seed[b], counter[b], bits), gtable,
                   fb, rb, codes[b], vals, idx, cache, buf)


@njit(fastmath=_FM, nogil=True, cache=True)
def frame_step(rows, h, pos, counter, seed, temp, topk, gtable, c0_t, audio_embed, vocab,
               blayers, bdims, bnorm, bcos, bsin, bcache, depth, dlayers, ddims, frames):
    """One frame for each row index in `rows` (others untouched).

    h [R, Db] backbone state (updated); pos [R] next cache position (advanced); counter [R] frames
    generated (advanced, the noise counter); seed [R]; temp/topk [R]; gtable the Gumbel table
    (engine/sampling.gumbel_table); c0_t [Db, C]; audio_embed
    [N * vocab, Db]; bcache [L, R, S, 2KV, hd]; bcos/bsin [S, hd/2]; frames [len(rows), N] out.
    """
    K = 1
    for i in range(rows.shape[0]):
        K = max(K, topk[rows[i]])
    bits = _log2(gtable.shape[0])
    n_cb = frames.shape[1]
    Db = h.shape[1]
    S = bcache.shape[2]
    bbuf = _scratch(Db, blayers, bdims, S)
    dbuf = _scratch(depth[0].shape[1], dlayers, ddims, n_cb)
    dcache = np.empty((dlayers[0].shape[0], n_cb, 2 * ddims[1], 2 * depth[5].shape[1]), np.float32)
    vals, idx = np.empty(K, np.float32), np.empty(K, np.int64)
    logits = np.empty(c0_t.shape[1], np.float32)
    x, xn, qkv, att, g13, act, w = bbuf
    no_force = np.empty(0, np.int64)
    no_record = np.empty((0, 0), np.float32)
    L = blayers[0].shape[0]
    for i in range(rows.shape[0]):
        r = rows[i]
        k = topk[r]
        key = row_key(seed[r], counter[r], bits)
        # codebook 0 from the backbone state, then the depth decoder
        _axpy_matvec(h[r], c0_t, logits, False)
        frames[i, 0] = _draw(logits, k, temp[r], key, 0, gtable, vals, idx)
        _depth_row(h[r], frames[i, 0], depth, dlayers, ddims, k, temp[r], key, gtable, no_force, no_record,
                   frames[i, 1:], vals, idx, dcache, dbuf)
        # feed the frame back through the backbone at this row's position
        x[:] = 0.0
        for j in range(n_cb):
            x += audio_embed[j * vocab + frames[i, j]]
        p = pos[r]
        for layer in range(L):
            _block(x, layer, blayers, bdims, bcache[layer, r], p, bcos[p], bsin[p], xn, qkv, att, g13, act, w)
        _rms_norm(x, bnorm, bdims[2], h[r])
        pos[r] = p + 1
        counter[r] += 1
