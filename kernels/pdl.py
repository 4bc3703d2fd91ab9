"""Programmatic dependent launch (PDL: Hopper and later) for the small-batch fused frame step.

At batch 1 a frame is ~800 short kernels (kernels/triton_gemv.py), most of them a few microseconds
long, and each one's first microsecond or so -- its programs being scheduled, its first weight
bytes on their way from HBM -- is latency no bandwidth hides. Launched with `pdl=True` a kernel may
start while the one before it is still running: every kernel of the chain calls
`gdc_launch_dependents()` first thing (once all its programs have started, the next kernel may
launch), issues the loads of its first weight tile, and only then `gdc_wait()`s for the kernel
before it to finish and its writes to be visible. The contract each such kernel keeps:

1. `gdc_wait()` comes before the first read of anything an earlier kernel may have written
   (activations, positions, lengths, the KV cache, the frame's codes) and before its first write;
2. before it, it reads weights only (nothing in a step writes them).

A kernel waits for the one before, which waited for its own predecessor before finishing, so past
its wait every earlier kernel is done -- buffers the graph's memory pool hands on included.
Kernels launched without PDL (cuBLAS, PyTorch's) keep plain stream order around them.
tests/kernels/test_pdl.py checks the contract on CPU: the interpreter runs each program with
everything but the weights poisoned until its wait.
"""

from __future__ import annotations

import torch


def unavailable(device: torch.device) -> str | None:
    """None when the kernels may launch with pdl=True on `device`, else why they may not."""
    if device.type != "cuda":
        return f"PDL needs a CUDA device, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"PDL needs compute capability 9.0 or later (Hopper); this GPU is {major}.{minor}"
    import triton

    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return f"Triton {triton.__version__} has no grid dependency control"
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return f"Triton {triton.__version__} cannot launch a kernel with PDL"
    return None
