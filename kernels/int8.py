"""Weight-only int8: symmetric, one scale per output row (the format kernels/triton_gemv.py reads).

scale = max|w_row| / 127 and q = round(w / scale) in [-127, 127]; the weights a kernel computes with
are q * scale, so the rounding error of any weight is at most scale / 2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class QWeight(NamedTuple):
    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]


def quantize_int8(w: torch.Tensor) -> QWeight:
    """Per-row symmetric int8 of a [N, K] matrix."""
    if w.ndim != 2:
        raise ValueError(f"int8 quantization takes a [N, K] matrix, got {list(w.shape)}")
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QWeight(q.contiguous(), scale.contiguous())


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weights a kernel computes with: w itself (scale None), or q * scale for int8."""
    return w if scale is None else (w.float() * scale.float()[:, None]).to(dtype)
