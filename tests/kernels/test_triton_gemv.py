"""Fused small-batch matvec kernels (kernels/triton_gemv.py) against their PyTorch references,
interpreted on CPU (TRITON_INTERPRET=1 in tests/conftest.py); the GPU runs the same code compiled."""

import pytest
import torch

from csmstream.kernels.triton_gemv import MAX_ROWS, matvec_add_, matvec_add_ref, norm_matvec, norm_matvec_ref

SHAPES = [(1, 128, 96), (3, 200, 72), (16, 96, 40)]  # (rows, K, N): ragged tiles on both axes


@pytest.mark.parametrize("B, K, N", SHAPES)
@pytest.mark.parametrize("swiglu", [False, True])
def test_norm_matvec_equals_norm_then_linear(B, K, N, swiglu):
    g = torch.Generator().manual_seed(B * K + N)
    x, nw = torch.randn(B, K, generator=g) * 3, torch.randn(K, generator=g)
    w = torch.randn(2 * N if swiglu else N, K, generator=g) / K ** 0.5
    got = norm_matvec(x, nw, w, 1e-5, swiglu=swiglu)
    assert got.shape == (B, N)
    torch.testing.assert_close(got, norm_matvec_ref(x, nw, w, 1e-5, swiglu=swiglu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B, K, N", SHAPES)
def test_matvec_add_adds_in_place_and_nothing_else(B, K, N):
    g = torch.Generator().manual_seed(B + K + N)
    w, a = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(B, K, generator=g)
    big = torch.randn(B + 2, N, generator=g)  # rows beyond B must stay untouched
    want = big.clone()
    matvec_add_ref(want[:B], w, a)
    assert matvec_add_(big[:B], w, a).data_ptr() == big.data_ptr()
    torch.testing.assert_close(big, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(big[B:], want[B:])


def test_half_precision_is_close_to_the_reference():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 256, generator=g)).bfloat16()
    nw, w = torch.randn(256, generator=g).bfloat16(), (torch.randn(128, 256, generator=g) / 16).bfloat16()
    torch.testing.assert_close(norm_matvec(x, nw, w, 1e-5, swiglu=True).float(),
                               norm_matvec_ref(x, nw, w, 1e-5, swiglu=True).float(), rtol=2e-2, atol=2e-2)
    y = torch.randn(2, 128, generator=g).bfloat16()
    a = torch.randn(2, 256, generator=g).bfloat16()
    torch.testing.assert_close(matvec_add_(y.clone(), w, a).float(), matvec_add_ref(y.clone(), w, a).float(),
                               rtol=2e-2, atol=2e-2)


def test_more_rows_than_the_kernels_take_are_refused():
    with pytest.raises(AssertionError):
        norm_matvec(torch.zeros(MAX_ROWS + 1, 16), torch.ones(16), torch.zeros(8, 16), 1e-5)
