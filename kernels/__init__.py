"""csmstream.kernels: Triton kernels (GPU hot path) and numba kernels (CPU audio), each beside a
plain reference implementation it is tested against."""
