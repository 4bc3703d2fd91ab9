"""Weight-only int8 for the depth decoder (`load(..., quantize="int8-depth")`).

At batch 1 a frame is bound by reading weights, and the depth decoder's 31 passes read its
weights 31 times a frame: about three quarters of the bytes a csm-1b frame moves. Storing those
matrices as int8 with one scale per output row (kernels/int8.py) halves them.

The model's own depth weights are replaced by the dequantized values (q * scale, in the model's
dtype), so every path (eager, CPU, the cuBLAS step for large batches) computes the same function as
the int8 kernels (kernels/triton_gemv.py with `scale`), which read the bytes and scale the sums.
Quality: int8 per-row rounding moves each weight by at most half a step (scale / 2); what that does
to a trained voice is for a listening check on the real weights (default off).
"""

from __future__ import annotations

import torch

from ..kernels.int8 import QWeight, dequantize, quantize_int8

MODES = ("int8-depth",)


def check_mode(quantize: str | None) -> str | None:
    """None / 'none' -> None; a known mode -> itself; anything else -> ValueError."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in MODES:
        allowed = ", ".join(map(repr, ("none",) + MODES))
        raise ValueError(f"quantize must be None or one of {allowed}, got {quantize!r}")
    return quantize


@torch.no_grad()
def quantize_depth_(model) -> list[dict[str, QWeight]]:
    """Quantize the depth decoder's four projections per layer in place (their weights become the
    dequantized values) and keep the int8 form on the model as `model.depth_int8` (one dict per
    layer: wqkv, wo, w13, w2), which the fused GPU step reads. Idempotent."""
    if getattr(model, "depth_int8", None) is not None:
        return model.depth_int8
    out = []
    for layer in model.depth.layers:
        qs = {}
        for name, lin in (("wqkv", layer.attn.wqkv), ("wo", layer.attn.wo), ("w13", layer.ffn.w13),
                          ("w2", layer.ffn.w2)):
            qw = quantize_int8(lin.weight)
            lin.weight.copy_(dequantize(qw.q, qw.scale, lin.weight.dtype))
            qs[name] = qw
        out.append(qs)
    model.depth_int8 = out
    return out
