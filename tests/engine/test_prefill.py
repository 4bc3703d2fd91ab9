"""Chunked prefill (engine/prefill.py): a prompt fed in chunks, with frame steps of other rows in
between, leaves the row exactly where one whole prefill leaves it; the budget's arithmetic."""

import numpy as np
import pytest
import torch

import csmstream
from csmstream.engine.generator import FrameGenerator
from csmstream.engine.prefill import FRAME_S, PrefillBudget, PrefillJob, lead
from csmstream.engine.prompt import Segment

TEXT = "A sentence long enough to need a few chunks of prompt."


class _Eng:
    """The parts of an Engine a PrefillJob touches, around a chosen FrameGenerator."""

    def __init__(self, engine, gen):
        self.gen, self.prefixes, self.decoder = gen, engine.prefixes, None


def _gen(engine, mode: str) -> FrameGenerator:
    """compiled: the CPU step (idle rows untouched); eager / fast: the PyTorch step and the GPU step
    (run eagerly here), which compute idle rows too and write their cache: the hard case."""
    g = FrameGenerator(engine.model, rows=3, fast=mode == "fast")
    if mode == "eager":
        g.cpu = None
    return g


def _prepared(engine, context=()):
    return engine._validate(TEXT, 0, list(context), 0.9, 1, 11, 20)


# chunks of 1 on the numba step only: a chunk's prefill is the same whichever step runs between
# (1-position chunks make a tick per prompt position, and the eager step is the slow one: 17-50 s
# of a CI run went to that case alone)
@pytest.mark.parametrize("mode, chunk", [("eager", 7), ("eager", 64), ("compiled", 1), ("compiled", 7),
                                         ("fast", 43)])
def test_chunks_with_steps_between_give_the_whole_prefills_frames(request, mode, chunk):
    # the eager and the GPU (interpreted) steps on tiny cut to 4 codebooks (tests/conftest.py): the
    # same prefill, its frames' depth loops 8x shorter
    engine = request.getfixturevalue("tiny_engine" if mode == "compiled" else "short_engine")
    n = engine.config.num_codebooks
    prep = _prepared(engine, [Segment(1, "Earlier words.", codes=np.ones((6, n), np.int64))])
    whole, chunked = _gen(engine, mode), _gen(engine, mode)
    for g in (whole, chunked):  # row 0 is another call, generating throughout
        PrefillJob(_Eng(engine, g), 0, _prepared(engine), audio=False).run()
    PrefillJob(_Eng(engine, whole), 1, prep, audio=False).run()
    job, other = PrefillJob(_Eng(engine, chunked), 1, prep, audio=False), []
    ticks = 0
    while job.remaining:
        before = job.remaining
        assert job.run(chunk) == min(chunk, before)
        if job.remaining:  # row 1 rides along idle in the range while its prompt is half in
            other.append(chunked.step(0, 2, 1, [True, False])[0])
            ticks += 1
    assert ticks == -(-len(prep[0]) // chunk) - 1
    assert chunked.host_pos[1] == whole.host_pos[1] == len(prep[0])
    ref = [whole.step(0, 1, 1)[0] for _ in range(ticks)]
    assert all(torch.equal(a, b) for a, b in zip(ref, other, strict=True))  # row 0 never noticed
    for _ in range(1 if mode == "fast" else 4):  # the GPU step takes seconds a frame interpreted
        a, b = whole.step(0, 2, 1), chunked.step(0, 2, 1)
        assert torch.equal(a, b)
    torch.testing.assert_close(chunked.h[:2], whole.h[:2], rtol=1e-5, atol=1e-6)


def test_chunked_prefill_after_a_cached_voice_prefix(tiny_engine):
    eng = csmstream.load("tiny", device="cpu", max_streams=2)
    codes = np.random.default_rng(1).integers(0, 2048, (30, 32))
    ctx = [Segment(0, "The voice.", codes=codes), Segment(0, "Then this.", codes=codes[:9])]
    want = eng._validate(TEXT, 0, ctx, 0.9, 1, 3, 6)
    eng.pin_voice("The voice.", codes)
    row = eng._acquire()
    job = PrefillJob(eng, row, eng._validate(TEXT, 0, ctx, 0.9, 1, 3, 6), audio=False)
    while job.remaining:  # the first use stores the voice's KV only once its positions are all in
        assert len(eng.prefixes) == 0
        job.run(5)
    assert len(eng.prefixes) == 1
    full = [eng.gen.step(row, row + 1, 1)[0] for _ in range(4)]
    eng._release(row)
    hit = eng._validate(TEXT, 0, ctx, 0.9, 1, 3, 6)
    assert hit[6].kv is not None and len(hit[0]) < len(want[0])
    row = eng._acquire()
    job = PrefillJob(eng, row, hit, audio=False)
    while job.remaining:
        job.run(4)
    assert eng.gen.host_pos[row] == len(want[0])
    assert all(torch.equal(a, eng.gen.step(row, row + 1, 1)[0]) for a in full)


def test_bad_prefill_positions_are_refused(tiny_engine):
    g = _gen(tiny_engine, "compiled")
    tok = torch.zeros(3, 33, dtype=torch.int64)
    with pytest.raises(ValueError, match="inside the 4-position prefix"):
        g.prefill(0, tok, tok.bool(), seed=0, temperature=1.0, topk=1, prefix=(4, g.cached_kv(0, 4)), start=2)
    with pytest.raises(ValueError, match="window"):
        g.prefill(0, tok, tok.bool(), seed=0, temperature=1.0, topk=1, start=g.max_seq_len - 2)


def test_budget_allowance_and_cost_model():
    b = PrefillBudget(64, max_tick_s=0.08, margin_s=0.01)
    assert b.estimate(500) == 0.0  # nothing measured yet
    assert b.allowance([]) == 0.08  # nobody playing: the tick cap
    assert b.can_grow(10_000)  # no step measured yet
    b.record_step(0.02, 4)  # 5 ms a row: a batch of 14 still steps within 80 ms - 10 ms margin
    assert b.can_grow(14) and not b.can_grow(15)
    assert b.allowance([0.05]) == pytest.approx(0.02)  # 50 ms ahead - 20 ms step - 10 ms margin
    assert b.allowance([1.0, 0.05]) == pytest.approx(0.02)  # the least buffered call decides
    assert b.allowance([5.0]) == 0.08 and b.allowance([-0.3]) == 0.0
    b.record_prefill(10, 0.0064)  # a short prefill costs its floor of 64 tokens
    assert b.estimate(1) == pytest.approx(0.0064) and b.estimate(640) == pytest.approx(0.064)
    b.record_prefill(640, 0.128)  # averaged: 1e-4 s/token + 0.2 * (2e-4 - 1e-4)
    assert b.s_per_token == pytest.approx(1.2e-4)


def test_lead_counts_whole_chunks():
    assert lead(10, 0.5) == pytest.approx(10 * FRAME_S - 0.5)
    assert lead(3, 0.1, chunk_s=0.1) == pytest.approx(0.2 - 0.1)  # 240 ms made, 200 ms sent
    assert lead(5, 0.0, chunk_s=0.2) == pytest.approx(0.4)


@pytest.mark.parametrize("kw, match", [(dict(chunk_tokens=0), "chunk must be an integer >= 1"),
                                       (dict(chunk_tokens=2.5), "chunk must be an integer >= 1"),
                                       (dict(max_tick_s=-1), "finite number >= 0"),
                                       (dict(max_tick_s=float("nan")), "finite number >= 0")])
def test_bad_budget_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        PrefillBudget(**kw)
