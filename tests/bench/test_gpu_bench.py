"""bench/gpu.py's parts that run without a GPU (interpreted kernels, wall-clock times)."""

import torch

from bench.gpu import sample_us


def test_sample_us_checks_the_kernel_and_times_both_paths():
    rows = sample_us(batches=(1, 3), device="cpu", dtype=torch.float32)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["one_kernel_us"] > 0 and r["topk_path_us"] > 0 for r in rows)
