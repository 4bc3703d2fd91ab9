"""Fused matrix-vector kernels for small batches (B <= 16 rows), each beside its PyTorch reference.

A decode step at a small batch reads every weight once and does little else, so a layer's time is
its weight bytes plus one launch per op. These fold the ops around the projections into them:

- `norm_matvec`: y = act(W · rms_norm(x) * w_norm), the norm computed in the prologue (every
  program re-reads the B short rows of x, which costs nothing next to its slice of W). With
  `swiglu=True` W is the fused gate/up projection [2F, K] and y = SiLU(gate) * up [B, F].
- `matvec_add_`: x += W · a in place, the residual add done in the epilogue (each program owns a
  slice of x's columns, so reading and writing it in place is race-free).

A decoder layer then runs as: norm_matvec(qkv) -> RoPE + cache write -> attention -> matvec_add_(wo)
-> norm_matvec(w13, swiglu) -> matvec_add_(w2): six kernels instead of nine, and no separate
pass over the activations for the norms and SiLU. One program covers a BLOCK_N slice of the
outputs for all rows, so each weight is read once per step whatever B is (up to MAX_ROWS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16
BLOCK_N = 32


def _block_k(rows: int) -> int:
    """Reduction tile: BLOCK_B * BLOCK_N * BLOCK_K partial products live in registers."""
    return max(16, min(128, 8192 // (rows * BLOCK_N)))


@triton.jit
def _norm_matvec_kernel(x_ptr, nw_ptr, w_ptr, y_ptr, B, K, N, eps, SWIGLU: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.arange(0, BLOCK_B)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    bm, nm = b < B, n < N
    ss = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # prologue: each row's mean square
        km = k0 + kk < K
        xs = tl.load(x_ptr + b[:, None] * K + k0 + kk[None, :], mask=bm[:, None] & km[None, :], other=0.0)
        xs = xs.to(tl.float32)
        ss += tl.sum(xs * xs, axis=1)
    inv = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = k0 + kk < K
        xs = tl.load(x_ptr + b[:, None] * K + k0 + kk[None, :], mask=bm[:, None] & km[None, :], other=0.0)
        g = tl.load(nw_ptr + k0 + kk, mask=km, other=0.0).to(tl.float32)
        # the normed activations in the model's dtype, as the unfused path feeds its matmul
        xn = (xs.to(tl.float32) * inv[:, None] * g[None, :]).to(w_ptr.dtype.element_ty).to(tl.float32)
        wm = nm[:, None] & km[None, :]
        w = tl.load(w_ptr + n[:, None] * K + k0 + kk[None, :], mask=wm, other=0.0).to(tl.float32)
        acc += tl.sum(xn[:, None, :] * w[None, :, :], axis=2)
        if SWIGLU:
            u = tl.load(w_ptr + (N + n[:, None]) * K + k0 + kk[None, :], mask=wm, other=0.0).to(tl.float32)
            acc2 += tl.sum(xn[:, None, :] * u[None, :, :], axis=2)
    if SWIGLU:
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = acc2.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(y_ptr + b[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=bm[:, None] & nm[None, :])


def norm_matvec(x: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor, eps: float, *,
                swiglu: bool = False) -> torch.Tensor:
    """x [B, K] contiguous (B <= MAX_ROWS), norm_w [K], w [N, K] contiguous ([2F, K] with swiglu).
    Returns F.linear(rms_norm(x) * norm_w, w) [B, N], or SiLU(gate) * up [B, F] with swiglu."""
    B, K = x.shape
    assert B <= MAX_ROWS and x.is_contiguous() and w.is_contiguous() and w.shape[1] == K
    N = w.shape[0] // 2 if swiglu else w.shape[0]
    y = torch.empty(B, N, dtype=x.dtype, device=x.device)
    bb = triton.next_power_of_2(B)
    _norm_matvec_kernel[(triton.cdiv(N, BLOCK_N),)](x, norm_w, w, y, B, K, N, eps, SWIGLU=swiglu, BLOCK_B=bb,
                                                     BLOCK_N=BLOCK_N, BLOCK_K=_block_k(bb))
    return y


def norm_matvec_ref(x, norm_w, w, eps, *, swiglu=False):
    xn = (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * norm_w.float()).to(x.dtype)
    y = F.linear(xn, w)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = (F.silu(gate.float()) * up.float()).to(x.dtype)
    return y


@triton.jit
def _matvec_add_kernel(x_ptr, w_ptr, a_ptr, B, K, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.arange(0, BLOCK_B)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    bm, nm = b < B, n < N
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = k0 + kk < K
        a = tl.load(a_ptr + b[:, None] * K + k0 + kk[None, :], mask=bm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + k0 + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    m = bm[:, None] & nm[None, :]
    xp = x_ptr + b[:, None] * N + n[None, :]
    dt = x_ptr.dtype.element_ty
    x = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    tl.store(xp, (x + acc.to(dt).to(tl.float32)).to(dt), mask=m)  # rounded as linear-then-add rounds


def matvec_add_(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [B, N] += F.linear(a, w) in place; a [B, K], w [N, K], all contiguous, B <= MAX_ROWS."""
    B, N = x.shape
    K = a.shape[1]
    assert B <= MAX_ROWS and x.is_contiguous() and a.is_contiguous() and w.is_contiguous() and w.shape == (N, K)
    bb = triton.next_power_of_2(B)
    _matvec_add_kernel[(triton.cdiv(N, BLOCK_N),)](x, w, a, B, K, N, BLOCK_B=bb, BLOCK_N=BLOCK_N,
                                                    BLOCK_K=_block_k(bb))
    return x


def matvec_add_ref(x, w, a):
    x += F.linear(a, w)
    return x
