"""int8-depth (engine/quant.py): the depth decoder computes with rounded weights everywhere, and
the fused int8 kernels give the eager step's frames with them."""

import copy
from types import SimpleNamespace

import pytest
import torch

import csmstream
from csmstream.engine.model import Attend, KVCache
from csmstream.engine.quant import check_mode, quantize_depth_
from csmstream.engine.rope import rope_table

from .test_fast_step import _prefilled


@pytest.fixture(scope="module")
def int8_engine():
    return csmstream.load("tiny", device="cpu", max_streams=4, quantize="int8-depth")


def test_modes():
    assert check_mode(None) is None and check_mode("none") is None and check_mode("int8-depth") == "int8-depth"
    with pytest.raises(ValueError, match=r"quantize must be None or one of 'none', 'int8-depth', got 'int4'"):
        check_mode("int4")
    with pytest.raises(ValueError, match="quantize must be"):
        csmstream.load("tiny", device="cpu", quantize="int4")


def test_only_the_depth_projections_are_rounded(tiny_engine, int8_engine):
    plain, q = tiny_engine.model.state_dict(), int8_engine.model.state_dict()
    rounded = {k for k in plain if not torch.equal(plain[k], q[k])}
    assert rounded == {f"depth.layers.{i}.{m}.weight" for i in range(len(int8_engine.model.depth.layers))
                       for m in ("attn.wqkv", "attn.wo", "ffn.w13", "ffn.w2")}
    for i, layer in enumerate(int8_engine.model.depth_int8):
        qw = layer["w2"]
        w = plain[f"depth.layers.{i}.ffn.w2.weight"]
        assert bool(((q[f"depth.layers.{i}.ffn.w2.weight"] - w).abs() <= qw.scale[:, None] * 0.5001).all())
    assert quantize_depth_(int8_engine.model) is int8_engine.model.depth_int8  # idempotent
    assert "quantize=int8-depth" in repr(int8_engine) and "quantize" not in repr(tiny_engine)


def test_the_int8_kernels_give_the_eager_steps_frames(short_engine, monkeypatch):
    # tiny cut to 4 codebooks (tests/conftest.py), quantized as load(quantize="int8-depth") does
    model = copy.deepcopy(short_engine.model)
    quantize_depth_(model)
    int8 = SimpleNamespace(model=model, tokenizer=short_engine.tokenizer)
    monkeypatch.setenv("CSM_FUSED_GEMV", "on")
    # the reference: the eager PyTorch step over the dequantized weights
    ref, fast = _prefilled(int8, False, [0, 1], 50), _prefilled(int8, True, [0, 1], 50)
    assert fast.fast.int8 and fast.fast.fused_buckets == {1, 2, 4}
    assert fast.fast.dd_fused[0][1][0].dtype == torch.int8  # the kernels really read int8
    for _ in range(2):
        assert torch.equal(ref.step(0, 2, 50), fast.step(0, 2, 50))
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)


def _depth_logits(model, h, codes):
    """Teacher-forced depth decoder over one frame: logits [N-1, V] for codebooks 1..N-1 given the
    backbone state h [Db] and the frame's codes [N] (one causal pass, a fresh cache)."""
    dd, n = model.cfg.depth, model.cfg.num_codebooks
    x = torch.cat([model.depth_proj(h)[None],
                   model.depth_proj(model.depth_embed(codes[:-1] + model.audio_offsets[:-1]))])[None]
    caches = [KVCache(1, dd.n_kv_heads, n, dd.head_dim, device="cpu", dtype=torch.float32) for _ in range(dd.n_layers)]
    out = model.depth(x, rope_table(dd.rope, dd.head_dim, n)[None, :, None, :], caches, Attend(slice(0, 1), length=n))
    return torch.einsum("pd,pdv->pv", out[0, 1:], model.depth_heads)


@torch.no_grad()
def test_int8_moves_the_depth_logits_about_a_percent(tiny_engine, int8_engine):
    """Per-row int8 moves each weight by <= scale / 2 (~0.3% of a row's spread on average), so the
    teacher-forced logits should move by about that times the layers' gain: bound it at 5%."""
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        h = torch.randn(tiny_engine.config.backbone.dim, generator=g)
        codes = torch.randint(0, tiny_engine.config.codebook_size, (32,), generator=g)
        a, b = _depth_logits(tiny_engine.model, h, codes), _depth_logits(int8_engine.model, h, codes)
        rel = float((b - a).norm() / a.norm())
        assert 1e-4 < rel < 0.05, rel  # moved (it is rounded), but only a little
