"""Programmatic dependent launch (kernels/pdl.py) checked on CPU.

A kernel launched with pdl=True may run while the kernel before it is still writing, so it must not
read or write anything but weights before its gdc_wait(). The interpreter runs programs one after
another, so a race cannot happen here -- `PoisonUntilWait` makes one visible instead: each program
starts (gdc_launch_dependents) with every non-weight tensor poisoned and gets the real values back
at its gdc_wait, after a check that it wrote none of them before waiting. A read too early gives
NaN / wrong results, a write too early fails the check; the kernels with pdl=True must then give
exactly what they give without it.
"""

import pytest
import torch
import triton
import triton.language as tl
import triton.language.extra.cuda as tlc

from csmstream.kernels import pdl, triton_attn, triton_gemv, triton_ops
from csmstream.kernels.int8 import quantize_int8


def _poison(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan") if t.is_floating_point() else -1)


class PoisonUntilWait:
    def __init__(self, monkeypatch, *tensors: torch.Tensor) -> None:
        self.tensors, self.starts, self.waits = tensors, 0, 0
        monkeypatch.setattr(tlc, "gdc_launch_dependents", self.start)
        monkeypatch.setattr(tlc, "gdc_wait", self.wait)

    def start(self) -> None:
        self.starts += 1
        self.saved = [t.clone() for t in self.tensors]
        for t in self.tensors:
            t.copy_(_poison(t))

    def wait(self) -> None:
        assert self.waits == self.starts - 1, "gdc_wait without gdc_launch_dependents before it"
        self.waits += 1
        for i, t in enumerate(self.tensors):
            assert torch.equal(t.isnan(), torch.ones_like(t, dtype=torch.bool)) if t.is_floating_point() \
                else bool((t == -1).all()), f"tensor {i} was written before gdc_wait"
        for t, s in zip(self.tensors, self.saved, strict=True):
            t.copy_(s)


def _data(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["plain", "swiglu", "int8"])
def test_norm_matvec_reads_only_weights_before_its_wait(monkeypatch, kind):
    B, K, N = 3, 200, 40
    x, nw = _data(1, B, K) * 2, _data(2, K)
    w, scale = _data(3, 2 * N if kind == "swiglu" else N, K) / K ** 0.5, None
    if kind == "int8":
        w, scale = quantize_int8(w)
    kw = dict(swiglu=kind == "swiglu", scale=scale, tiles=(16, 64, 4))  # 4 K tiles: the peeled one + 3
    want = triton_gemv.norm_matvec(x, nw, w, 1e-5, **kw)
    y = torch.empty_like(want)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: y)  # the kernel's output: poisoned too
    guard = PoisonUntilWait(monkeypatch, x, y)
    got = triton_gemv.norm_matvec(x, nw, w, 1e-5, pdl=True, **kw)
    monkeypatch.undo()
    assert got is y and torch.equal(got, want)
    assert guard.starts == guard.waits == triton.cdiv(N, 16)  # every program waited, once


def test_norm_matvec_with_rope_writes_the_cache_only_after_its_wait(monkeypatch):
    B, H, KV, hd, S, K = 2, 4, 2, 8, 6, 64
    x, nw, w = _data(4, B, K), _data(5, K), _data(6, (H + 2 * KV) * hd, K) / 8
    ang = _data(7, S, hd // 2)
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    pos = torch.tensor([3, 5])
    caches = [_data(8, B, S, 2 * KV, hd) for _ in range(2)]
    args = dict(tiles=(8, 16, 4))
    want = triton_gemv.norm_matvec(x, nw, w, 1e-5, rope=(H, cos, sin, pos, caches[0]), **args)
    guard = PoisonUntilWait(monkeypatch, x, pos, caches[1])
    got = triton_gemv.norm_matvec(x, nw, w, 1e-5, rope=(H, cos, sin, pos, caches[1]), pdl=True, **args)
    monkeypatch.undo()
    assert torch.equal(got, want) and torch.equal(caches[1], caches[0])
    assert guard.starts == guard.waits > 1


def test_matvec_add_waits_before_reading_or_adding(monkeypatch):
    B, K, N = 2, 96, 24
    w, a, x = _data(9, N, K) / 10, _data(10, B, K), _data(11, B, N)
    want = triton_gemv.matvec_add_(x.clone(), w, a, tiles=(8, 32, 4))
    guard = PoisonUntilWait(monkeypatch, x, a)
    triton_gemv.matvec_add_(x, w, a, tiles=(8, 32, 4), pdl=True)
    monkeypatch.undo()
    assert torch.equal(x, want) and guard.starts == guard.waits == 3


def test_attention_draw_and_norm_wait_first(monkeypatch):
    B, H, KV, hd, S = 2, 4, 2, 16, 9
    q, cache, lengths = _data(12, B, H, hd), _data(13, B, S, 2 * KV, hd), torch.tensor([4, 9])
    for splits, grouped in ((1, False), (2, False), (2, True)):  # split: the counters are another launch's too
        want = triton_attn.decode_attention(q, cache, lengths, splits=splits, grouped=grouped)
        out, counts = torch.empty_like(want), triton_attn.counters(B, H, "cpu")
        guard = PoisonUntilWait(monkeypatch, q, cache, lengths, out, counts)
        triton_attn.decode_attention(q, cache, lengths, out=out, pdl=True, splits=splits, counts=counts,
                                     grouped=grouped)
        monkeypatch.undo()
        assert torch.equal(out, want) and guard.starts == B * (KV if grouped else H) * splits and not counts.any()

    logits, temp, topk = _data(14, B, 2051) * 3, torch.tensor([0.9, 1.2]), torch.tensor([50, 7])
    seed, ctr = torch.tensor([5, 6]), torch.tensor([2, 3])
    from csmstream.engine.sampling import gumbel_table

    table = gumbel_table("cpu")
    want = triton_ops.sample(logits, temp, topk, seed, ctr, 4, table, 2048)
    codes, emb, x = torch.zeros(B, 3, dtype=torch.int64), _data(18, 2048, 24), torch.zeros(B, 24)
    guard = PoisonUntilWait(monkeypatch, logits, temp, topk, seed, ctr, codes[:, 1], x)
    triton_ops.sample(logits, temp, topk, seed, ctr, 4, table, 2048, out=codes[:, 1], pdl=True, embed=(emb, x))
    monkeypatch.undo()
    assert torch.equal(codes[:, 1], want) and torch.equal(x, emb[want]) and guard.starts == B

    h, d, wn = _data(15, B, 32), _data(16, B, 32), _data(17, 32)
    h2 = h.clone()
    want = triton_ops.add_rms_norm(h2, d, wn, 1e-5)
    guard = PoisonUntilWait(monkeypatch, h, d)
    got = triton_ops.add_rms_norm(h, d, wn, 1e-5, pdl=True)
    monkeypatch.undo()
    assert torch.equal(got, want) and torch.equal(h, h2) and guard.starts == B


# -- the harness itself must catch the two mistakes it is there for ---------------------------------
@triton.jit
def _early_read(x_ptr, y_ptr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    o = tl.arange(0, 8)
    v = tl.load(x_ptr + o)  # an activation read before the wait: the bug
    if PDL:
        tl.extra.cuda.gdc_wait()
    tl.store(y_ptr + o, v * 2)


@triton.jit
def _early_write(x_ptr, y_ptr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    o = tl.arange(0, 8)
    tl.store(y_ptr + o, tl.zeros((8,), tl.float32))  # a write before the wait: the bug
    if PDL:
        tl.extra.cuda.gdc_wait()
    tl.store(y_ptr + o, tl.load(x_ptr + o) * 2)


def test_the_harness_catches_an_early_read_and_an_early_write(monkeypatch):
    x, y = torch.arange(8.0), torch.zeros(8)
    PoisonUntilWait(monkeypatch, x, y)
    _early_read[(1,)](x, y, PDL=True)
    assert y.isnan().all()  # the result of reading the poison: a comparison with the reference fails
    with pytest.raises(Exception, match="tensor 1 was written before gdc_wait"):
        _early_write[(1,)](x, y, PDL=True)


def test_pdl_needs_a_hopper_gpu():
    assert "CUDA device" in pdl.unavailable(torch.device("cpu"))
