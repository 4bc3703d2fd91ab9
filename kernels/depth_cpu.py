"""The depth decoder's whole inner loop as one numba call, for CPU float32.

On a CPU the tiny and small models are bound by per-op dispatch: the eager loop issues ~1,000
small ops a frame (31 sequential codebooks x 2-4 layers x ~15 ops). This kernel runs every
position of every row of one frame in a single compiled call: matvecs as contiguous axpy loops
(the weights are stored [in, out], so the inner loop is unit-stride and vectorises), RMSNorm,
interleaved-pair RoPE, grouped-query attention over a per-call scratch cache, SwiGLU, the codebook
head and the draw. It releases the GIL, so an event loop in another thread keeps running.

The draw is the same rule as engine/sampling.sample: greedy when top-k is 1, else Gumbel-max over
the k best logits (sorted descending, noise indexed by rank), with the noise the caller made.
Optional teacher forcing (`force`) and logit recording (`record`) exist for the parity tests.
The eager PyTorch loop in engine/depth.py is the reference this kernel is tested against.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# reassociation lets the reductions vectorise; no nnan/ninf so comparisons stay IEEE
_FM = {"reassoc", "contract", "nsz"}


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
def _draw(logits, k, temp, noise, vals, idx):
    """Greedy (k == 1) or Gumbel-max over the k best logits; noise[r] is rank r's Gumbel draw."""
    n = logits.shape[0]
    if k == 1:
        best = 0
        for i in range(1, n):
            if logits[i] > logits[best]:
                best = i
        return best
    filled = 0
    for i in range(n):
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
    choice = 0
    best = vals[0] / temp + noise[0]
    for r in range(1, filled):
        s = vals[r] / temp + noise[r]
        if s > best:
            best = s
            choice = r
    return idx[choice]


@njit(fastmath=_FM, nogil=True, cache=True)
def depth_frame(h, c0, proj_t, table, vocab, attn_norm, wqkv_t, wo_t, ffn_norm, w13_t, w2_t, norm_w,
                heads, cos, sin, n_heads, n_kv, eps, temp, topk, noise, force, record, codes):
    """Codebooks 1..N-1 for each row.

    h [B, Db] backbone state; c0 [B] codebook-0 codes; proj_t [Db, D]; table [N * vocab, D] depth
    input per (codebook, code); per layer l (stacked on axis 0): attn_norm [L, D], wqkv_t
    [L, D, (H + 2KV) * hd], wo_t [L, H * hd, D], ffn_norm [L, D], w13_t [L, D, 2F], w2_t [L, F, D];
    norm_w [D]; heads [N-1, D, C]; cos/sin [N, hd/2]; temp [B] f32; topk [B] i64; noise
    [B, N, >= max topk] f32 (unused where topk == 1); force [B, N-1] i64 or [0, 0] (teacher
    forcing); record [B, N-1, C] f32 or [0, 0, 0] (logits out); codes [B, N-1] i64 out.
    """
    B = h.shape[0]
    L = wqkv_t.shape[0]
    D = norm_w.shape[0]
    n_cb = codes.shape[1] + 1
    hd = 2 * cos.shape[1]
    F = w2_t.shape[1]
    C = heads.shape[2]
    group = n_heads // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    kmax = 1
    for b in range(B):
        kmax = max(kmax, topk[b])
    x = np.empty(D, np.float32)
    xn = np.empty(D, np.float32)
    qkv = np.empty((n_heads + 2 * n_kv) * hd, np.float32)
    att = np.empty(n_heads * hd, np.float32)
    g13 = np.empty(2 * F, np.float32)
    act = np.empty(F, np.float32)
    logits = np.empty(C, np.float32)
    w = np.empty(n_cb, np.float32)
    vals = np.empty(kmax, np.float32)
    idx = np.empty(kmax, np.int64)
    cache = np.empty((L, n_cb, 2 * n_kv, hd), np.float32)  # one row at a time
    for b in range(B):
        for p in range(n_cb):
            if p == 0:
                _axpy_matvec(h[b], proj_t, x, False)
            else:
                code = c0[b] if p == 1 else codes[b, p - 2]
                x[:] = table[(p - 1) * vocab + code]
            for layer in range(L):
                _rms_norm(x, attn_norm[layer], eps, xn)
                _axpy_matvec(xn, wqkv_t[layer], qkv, False)
                for hh in range(n_heads + n_kv):  # q heads then k heads
                    _rope(qkv[hh * hd:(hh + 1) * hd], cos[p], sin[p])
                for j in range(2 * n_kv):
                    cache[layer, p, j] = qkv[(n_heads + j) * hd:(n_heads + j + 1) * hd]
                for hh in range(n_heads):
                    g = hh // group
                    q = qkv[hh * hd:(hh + 1) * hd]
                    top = np.float32(-np.inf)
                    for t in range(p + 1):
                        s = np.float32(0.0)
                        kt = cache[layer, t, g]
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
                        vt = cache[layer, t, n_kv + g]
                        for i in range(hd):
                            o[i] += wt * vt[i]
                _axpy_matvec(att, wo_t[layer], x, True)
                _rms_norm(x, ffn_norm[layer], eps, xn)
                _axpy_matvec(xn, w13_t[layer], g13, False)
                for i in range(F):
                    gate = g13[i]
                    act[i] = gate / (np.float32(1.0) + np.exp(-gate)) * g13[F + i]
                _axpy_matvec(act, w2_t[layer], x, True)
            if p == 0:
                continue
            _rms_norm(x, norm_w, eps, xn)
            _axpy_matvec(xn, heads[p - 1], logits, False)
            if record.shape[0] > 0:
                record[b, p - 1] = logits
            if force.shape[0] > 0:
                codes[b, p - 1] = force[b, p - 1]
            else:
                codes[b, p - 1] = _draw(logits, topk[b], temp[b], noise[b, p], vals, idx)
