"""csmstream.kernels: Triton kernels (GPU hot path) and numba kernels (the CPU depth-decoder loop,
CPU audio), each beside a plain reference implementation it is tested against."""
