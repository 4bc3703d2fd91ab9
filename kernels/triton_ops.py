"""Triton kernels for the GPU hot path, each beside the plain PyTorch reference it must equal.

- `sample_topk`: top-k + temperature sampling over one row of audio logits per program, reserved
  ids (>= codebook size) masked, no sort of the row: k rounds of max-and-mask, the Gumbel-max draw
  over ranks as engine/sampling.sample does (reference: `sample`).
- `add_rms_norm`: the residual add fused with the next RMSNorm: h += delta (in place), returns
  rms_norm(h) * weight (reference: `add_rms_norm_ref`).
- `rope_`: rotary embedding on interleaved pairs, in place on q and k heads (reference:
  engine/rope.apply_rope_).

On a GPU they run compiled; in CI they run on CPU tensors under TRITON_INTERPRET=1. The engine's
CUDA path wires them in with CUDA graphs (issue 7); nothing here imports at package import time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_kernel(logits_ptr, stride, temp_ptr, topk_ptr, noise_ptr, noise_stride, out_ptr, C,
                   KMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride + offs, mask=offs < C, other=-float("inf")).to(tl.float32)
    k = tl.load(topk_ptr + row)
    t = tl.load(temp_ptr + row).to(tl.float32)
    best = -float("inf")
    choice = 0
    for r in tl.static_range(KMAX):  # rank r: the r-th largest logit, then mask it out
        m = tl.max(x, axis=0)
        i = tl.argmax(x, axis=0)
        g = tl.load(noise_ptr + row * noise_stride + r).to(tl.float32)
        s = m / t + g
        take = (r < k) & (s > best)
        best = tl.where(take, s, best)
        choice = tl.where(take, i, choice)
        x = tl.where(offs == i, -float("inf"), x)
    tl.store(out_ptr + row, choice.to(tl.int64))


def sample_topk(logits: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor, kmax: int,
                noise: torch.Tensor | None, codebook_size: int) -> torch.Tensor:
    """logits [B, V] (V may include reserved ids >= codebook_size); temperature [B]; topk [B] <= kmax;
    noise [B, >= kmax] Gumbel (None: greedy). Returns [B] int64."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if noise is None:
        noise = torch.zeros(B, 1, device=logits.device)
        kmax = 1
        topk = torch.ones_like(topk)
    block = triton.next_power_of_2(V)
    _sample_kernel[(B,)](logits, logits.stride(0), temperature, topk, noise, noise.stride(0), out,
                         min(codebook_size, V), KMAX=kmax, BLOCK=block)
    return out


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    h = tl.load(h_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    h = h + d
    tl.store(h_ptr + row * D + offs, h.to(h_ptr.dtype.element_ty), mask=m)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (h * inv * w).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta in place (h, delta contiguous [..., D]); returns rms_norm(h) * weight."""
    D = h.shape[-1]
    rows = h.numel() // D
    out = torch.empty_like(h)
    _add_rms_norm_kernel[(rows,)](h, delta, weight, out, D, eps, BLOCK=triton.next_power_of_2(D))
    return out


def add_rms_norm_ref(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h += delta
    return torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), weight.float(), eps).to(h.dtype)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, n_heads, row_stride, HALF: tl.constexpr):
    pid = tl.program_id(0)  # one (row, head)
    row = pid // n_heads
    head = pid % n_heads
    i = tl.arange(0, HALF)
    base = x_ptr + row * row_stride + head * 2 * HALF
    a = tl.load(base + 2 * i).to(tl.float32)
    b = tl.load(base + 2 * i + 1).to(tl.float32)
    c = tl.load(cos_ptr + row * HALF + i)
    s = tl.load(sin_ptr + row * HALF + i)
    tl.store(base + 2 * i, (a * c - b * s).to(x_ptr.dtype.element_ty))
    tl.store(base + 2 * i + 1, (a * s + b * c).to(x_ptr.dtype.element_ty))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate in place. x [R, H, hd] (interleaved pairs; row stride may skip other heads, e.g. the
    v heads of a fused qkv buffer); cos/sin [R, hd/2] float32 for each row's position."""
    R, H, hd = x.shape
    assert x.stride(2) == 1 and x.stride(1) == hd, "heads must be contiguous within a row"
    _rope_kernel[(R * H,)](x, cos.contiguous(), sin.contiguous(), H, x.stride(0), HALF=hd // 2)
