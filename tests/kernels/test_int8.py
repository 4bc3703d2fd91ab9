"""Weight-only int8 format (kernels/int8.py): bounds checked against the definition."""

import pytest
import torch

from csmstream.kernels.int8 import dequantize, quantize_int8


def test_every_weight_moves_at_most_half_a_step():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    qw = quantize_int8(w)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape and qw.scale.shape == (64,)
    assert int(qw.q.abs().max()) == 127 and int(qw.q.min()) >= -127
    assert torch.equal(qw.q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))  # each row uses its range
    err = (dequantize(qw.q, qw.scale, torch.float32) - w).abs()
    assert bool((err <= qw.scale[:, None] / 2 * (1 + 1e-5)).all())
    torch.testing.assert_close(qw.scale, w.abs().amax(dim=1) / 127)


def test_zero_rows_and_bad_shapes():
    w = torch.zeros(3, 8)
    w[1] = torch.tensor([-127.0, -64, -3, -1, 0, 2, 50, 126])
    qw = quantize_int8(w)
    assert torch.equal(dequantize(qw.q, qw.scale, torch.float32)[0], torch.zeros(8))
    assert torch.equal(dequantize(qw.q, qw.scale, torch.float32)[1], w[1])  # max 127: scale 1, exact
    with pytest.raises(ValueError, match=r"takes a \[N, K\] matrix, got \[8\]"):
        quantize_int8(torch.ones(8))


def test_dequantize_without_a_scale_is_the_weight_itself():
    w = torch.randn(4, 4)
    assert dequantize(w, None, torch.float32) is w
