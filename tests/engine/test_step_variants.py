"""The frame step's variants (engine/cuda_step.py): cuBLAS, the five-kernel fused step, and that step
as a chain of programmatic dependent launches (kernels/pdl.py), and how capture() picks one.

The PDL chain runs on CPU here with the grid-dependency calls counted (the interpreter runs
programs in order, so they have nothing to wait for; tests/kernels/test_pdl.py checks each kernel's
ordering). The choice among captured variants is checked with stand-in graphs: that logic is what
keeps a racy or slower chain off a production GPU."""

import logging

import pytest
import torch
import triton.language.extra.cuda as tlc

from csmstream.engine import cuda_step
from csmstream.engine.cuda_step import fold_setting, grouped_setting, pdl_setting, variant_name
from csmstream.engine.generator import FrameGenerator
from csmstream.engine.prompt import build_prompt

CUBLAS, FUSED, PDL, FOLD = (False, False, False), (True, False, False), (True, True, False), (True, False, True)


def _prefilled(engine, fast):
    g = FrameGenerator(engine.model, rows=4, fast=fast)
    g.cpu = None  # the reference: the eager PyTorch step
    for r, text in enumerate(["Hello there.", "A longer line of text."]):
        tok, mask = build_prompt(engine.tokenizer, text, 0, [], engine.model.cfg.num_codebooks)
        g.prefill(r, torch.from_numpy(tok), torch.from_numpy(mask), seed=5 + r, temperature=0.9, topk=50)
    return g


def test_the_pdl_chain_gives_the_eager_steps_frames_and_every_program_waits(short_engine, monkeypatch):
    calls = {"start": 0, "wait": 0}
    monkeypatch.setattr(tlc, "gdc_launch_dependents", lambda: calls.__setitem__("start", calls["start"] + 1))
    monkeypatch.setattr(tlc, "gdc_wait", lambda: calls.__setitem__("wait", calls["wait"] + 1))
    monkeypatch.setenv("CSM_FUSED_GEMV", "on")
    ref, fast = _prefilled(short_engine, False), _prefilled(short_engine, True)
    fast.fast.pdl_buckets = set(fast.fast.fused_buckets)  # on CPU pdl_ok is False: set it by hand
    assert fast.fast.kept(2) == "fused+pdl"
    for active in (None, [True, False]):
        a, b = ref.step(0, 2, 50, active), fast.step(0, 2, 50, active)
        live = [0, 1] if active is None else [0]
        assert torch.equal(a[live], b[live])
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)
    assert calls["start"] == calls["wait"] > 0
    before = dict(calls)
    fast.fast.pdl_buckets.clear()  # the plain fused step makes no grid-dependency calls
    fast.step(0, 2, 50)
    assert calls == before


def _switch_reads(monkeypatch, env: str, setting) -> None:
    """An auto/on/off switch: auto by default, the argument over the environment, a bad value named."""
    monkeypatch.delenv(env, raising=False)
    assert setting() == "auto" and setting("0") == "off" and setting("1") == "on"
    monkeypatch.setenv(env, "maybe")
    with pytest.raises(ValueError, match=f"{env} must be auto, on or off, got 'maybe'"):
        setting()
    assert setting("off") == "off"
    monkeypatch.delenv(env)


def test_the_grouped_attention_switch_is_on_or_off_and_names_a_bad_value(monkeypatch):
    monkeypatch.delenv("CSM_ATTN_GROUPED", raising=False)
    assert grouped_setting() == "off" and grouped_setting("1") == "on" and grouped_setting("no") == "off"
    monkeypatch.setenv("CSM_ATTN_GROUPED", "auto")  # nothing chooses it yet: no auto
    with pytest.raises(ValueError, match="CSM_ATTN_GROUPED must be on or off, got 'auto'"):
        grouped_setting()


def test_pdl_setting_and_the_variants_a_bucket_may_run(short_engine, monkeypatch):
    _switch_reads(monkeypatch, "CSM_PDL", pdl_setting)
    step = _prefilled(short_engine, True).fast
    assert not step.pdl_ok and step.pdl_buckets == set()  # CPU: no PDL, whatever the setting
    step.pdl_ok = True
    step.fold_mode = "off"
    cases = {("auto", "auto"): [CUBLAS, FUSED, PDL], ("auto", "off"): [CUBLAS, FUSED], ("on", "on"): [PDL],
             ("on", "auto"): [FUSED, PDL], ("off", "on"): [CUBLAS]}
    for (fused, pdl), want in cases.items():
        step.fused_mode, step.pdl_mode = fused, pdl
        assert step.variants(1) == want, (fused, pdl)
    step.fused_mode, step.pdl_mode = "auto", "auto"
    assert step.variants(32) == [CUBLAS]  # past the fused kernels' 16 rows
    step.pdl_ok = False
    assert step.variants(1) == [CUBLAS, FUSED]
    assert [variant_name(*w) for w in step.variants(1)] == ["cublas", "fused"]


def test_fold_setting_and_the_variants_it_adds_at_batch_1(short_engine, monkeypatch):
    _switch_reads(monkeypatch, "CSM_ATTN_FOLD", fold_setting)
    step = _prefilled(short_engine, True).fast
    assert step.fold_mode == "auto" and step.fold_buckets == set()  # auto: only capture() may fold
    step.pdl_ok = True
    # auto: one more way at bucket 1, folded without PDL; on: every fused way folds; never past bucket 1
    assert step.variants(1) == [CUBLAS, FUSED, PDL, FOLD]
    assert step.variants(2) == [CUBLAS, FUSED, PDL]
    step.fold_mode = "on"
    assert step.variants(1) == [CUBLAS, FOLD, (True, True, True)]
    assert [variant_name(*w) for w in step.variants(1)] == ["cublas", "fused+fold", "fused+pdl+fold"]
    step.fused_mode = "off"
    assert step.variants(1) == [CUBLAS]


class FakeGraph:
    """Stands in for a captured CUDA graph: a replay writes its codes into the shared buffer."""

    def __init__(self, out, codes, ms):
        self.out, self.codes, self.ms = out, codes, ms

    def replay(self):
        self.out.copy_(self.codes)


@pytest.fixture
def step_with_fake_graphs(short_engine, monkeypatch):
    step = _prefilled(short_engine, True).fast
    out = torch.zeros(1, 4, dtype=torch.int64)
    plan = {}  # way -> (codes, ms) or an exception to raise at capture

    def capture_one(B, pool):
        way = (B in step.fused_buckets, B in step.pdl_buckets, B in step.fold_buckets)
        if isinstance(plan[way], Exception):
            raise plan[way]
        codes, ms = plan[way]
        return FakeGraph(out, torch.tensor([codes]), ms), out

    monkeypatch.setattr(step, "_capture_one", capture_one)
    monkeypatch.setattr(cuda_step, "replay_ms", lambda graph: graph.ms)
    return step, plan


def test_capture_keeps_the_fastest_variant(step_with_fake_graphs):
    step, plan = step_with_fake_graphs
    plan.update({CUBLAS: ([7, 7, 7, 7], 7.4), FUSED: ([1, 2, 3, 4], 6.1),
                 PDL: ([1, 2, 3, 4], 5.2)})
    graph, _ = step._capture_best(1, list(plan), None)
    assert graph.ms == 5.2 and step.kept(1) == "fused+pdl"
    assert step.timing[1] == {"cublas": 7.4, "fused": 6.1, "fused+pdl": 5.2}
    plan[PDL] = ([1, 2, 3, 4], 6.5)  # slower than the plain fused step: not kept
    graph, _ = step._capture_best(1, list(plan), None)
    assert graph.ms == 6.1 and step.kept(1) == "fused"


def test_a_pdl_chain_whose_codes_differ_is_dropped(step_with_fake_graphs, caplog):
    step, plan = step_with_fake_graphs
    plan.update({CUBLAS: ([7, 7, 7, 7], 7.4), FUSED: ([1, 2, 3, 4], 6.1),
                 PDL: ([1, 2, 3, 5], 5.2)})  # fastest, but one code differs: a race
    with caplog.at_level(logging.WARNING, logger="csmstream.engine"):
        graph, _ = step._capture_best(1, list(plan), None)
    assert graph.ms == 6.1 and step.kept(1) == "fused" and "fused+pdl" not in step.timing[1]
    assert "the PDL chain's codes differ from the fused step's" in caplog.text


def test_a_folded_step_is_kept_when_fastest_and_dropped_when_its_codes_differ(step_with_fake_graphs, caplog):
    step, plan = step_with_fake_graphs
    plan.update({CUBLAS: ([7, 7, 7, 7], 7.4), FUSED: ([1, 2, 3, 4], 6.1), FOLD: ([1, 2, 3, 4], 5.6)})
    graph, _ = step._capture_best(1, list(plan), None)
    assert graph.ms == 5.6 and step.kept(1) == "fused+fold" and step.fold_buckets == {1}
    assert step.timing[1] == {"cublas": 7.4, "fused": 6.1, "fused+fold": 5.6}
    plan[FOLD] = ([1, 2, 9, 4], 5.6)  # a code of its own: a read of another program's writes gone wrong
    with caplog.at_level(logging.WARNING, logger="csmstream.engine"):
        graph, _ = step._capture_best(1, list(plan), None)
    assert graph.ms == 6.1 and step.kept(1) == "fused" and step.fold_buckets == set()
    assert "the folded attention's codes differ from the fused step's" in caplog.text


def test_a_variant_that_fails_to_capture_is_skipped_unless_it_is_the_only_one(step_with_fake_graphs, caplog):
    step, plan = step_with_fake_graphs
    plan.update({CUBLAS: ([7, 7, 7, 7], 7.4), FUSED: ([1, 2, 3, 4], 6.1),
                 PDL: RuntimeError("cudaErrorStreamCaptureUnsupported")})
    with caplog.at_level(logging.WARNING, logger="csmstream.engine"):
        graph, _ = step._capture_best(1, list(plan), None)
    assert graph.ms == 6.1 and step.kept(1) == "fused"
    assert "the fused+pdl graph for bucket 1 failed (cudaErrorStreamCaptureUnsupported)" in caplog.text
    with pytest.raises(RuntimeError, match="CaptureUnsupported"):
        step._capture_best(1, [PDL], None)
    with pytest.raises(RuntimeError, match="no way to run batch bucket 1"):
        step._capture_best(1, [], None)
