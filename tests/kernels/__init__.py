"""Triton kernels (interpreted on CPU in CI: TRITON_INTERPRET=1) against their PyTorch references."""


def kernels_device() -> str:
    """Where the kernel tests make their tensors: the GPU when there is one (the kernels compiled,
    bench/gpu_session.sh), else the CPU (the kernels interpreted)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
