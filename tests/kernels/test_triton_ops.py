"""Triton kernels (interpreted on CPU in CI: TRITON_INTERPRET=1) against their PyTorch references."""

import os

import pytest
import torch

from csmstream.engine.rope import apply_rope_
from csmstream.engine.sampling import gumbel_noise, sample
from csmstream.kernels import triton_ops

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(), "tests/conftest.py sets it"


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("kmax", [1, 5, 50])
def test_sample_topk_equals_the_reference(kmax):
    g = torch.Generator().manual_seed(kmax)
    B, V, C = 8, 2051, 2048
    logits = (torch.randn(B, V, generator=g) * 3).to(device())
    logits[:, C:] = 100.0  # reserved ids would win if they were not masked
    temp = (torch.rand(B, generator=g) + 0.3).to(device())
    topk = torch.randint(1, kmax + 1, (B,), generator=g).to(device())
    noise = gumbel_noise(torch.arange(B) + 7, torch.full((B,), 3), 1, kmax)[:, 0].to(device()) if kmax > 1 else None
    got = triton_ops.sample_topk(logits, temp, topk, kmax, noise, C)
    want = sample(logits[:, :C].float(), temp, topk, kmax, noise)
    assert torch.equal(got, want) and int(got.max()) < C


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_equals_the_reference(dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 96, generator=g).to(device(), dtype)
    d = torch.randn(5, 96, generator=g).to(device(), dtype)
    w = (torch.rand(96, generator=g) + 0.5).to(device(), dtype)
    h2 = h.clone()
    got = triton_ops.add_rms_norm(h, d, w, 1e-5)
    want = triton_ops.add_rms_norm_ref(h2, d, w, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h, h2, **tol)  # the residual was updated in place
    torch.testing.assert_close(got, want, **tol)


def test_rope_in_place_on_a_fused_qkv_buffer_equals_the_reference():
    g = torch.Generator().manual_seed(2)
    R, Hq, Hk, Hv, hd = 3, 4, 2, 2, 16
    qkv = torch.randn(R, Hq + Hk + Hv, hd, generator=g).to(device())
    angles = torch.rand(R, hd // 2, generator=g) * 6
    rot = torch.polar(torch.ones_like(angles), angles)
    want = qkv.clone()
    apply_rope_(want[:, None, : Hq + Hk], rot[:, None, None, :].to(device()))
    triton_ops.rope_(qkv[:, : Hq + Hk], rot.real.float().to(device()), rot.imag.float().to(device()))
    torch.testing.assert_close(qkv, want, rtol=1e-5, atol=1e-5)  # v heads untouched, q/k rotated
