"""Prefix cache for named voices: the cached KV gives the frames a full prefill gives."""

import time

import numpy as np
import pytest

import csmstream
from csmstream.engine.prefix import PrefixCache
from csmstream.engine.prompt import Segment
from csmstream.engine.worker import EngineWorker, GenRequest


@pytest.fixture()
def engine():
    return csmstream.load("tiny", device="cpu", max_streams=2)


def _voice():
    return "A voice prompt.", np.random.default_rng(0).integers(0, 2048, (40, 32))


def test_cached_voice_prefix_gives_the_same_frames(engine):
    text, codes = _voice()
    ctx = [Segment(0, text, codes=codes), Segment(0, "An earlier sentence.", codes=codes[:5])]
    want = np.stack(list(engine.frames("Hello there.", 0, context=ctx, seed=1, max_frames=8)))
    engine.pin_voice(text, codes)
    first = np.stack(list(engine.frames("Hello there.", 0, context=ctx, seed=1, max_frames=8)))  # stores
    assert len(engine.prefixes) == 1 and engine.prefixes.misses == 1 and engine.prefixes.hits == 0
    prep = engine._validate("Hello there.", 0, ctx, 0.9, 50, 1, 8)
    assert prep[6].kv is not None and len(prep[0]) + prep[6].length == len(engine._validate(
        "Hello there.", 0, ctx[1:], 0.9, 50, 1, 8)[0]) + prep[6].length  # only the rest is prefilled
    again = np.stack(list(engine.frames("Hello there.", 0, context=ctx, seed=1, max_frames=8)))  # copies
    assert engine.prefixes.hits >= 1
    assert np.array_equal(want, first) and np.array_equal(want, again)


def test_the_key_includes_the_speaker_and_unpinned_turns_are_not_cached(engine):
    text, codes = _voice()
    engine.pin_voice(text, codes)
    for spk in (0, 1, 1):
        list(engine.frames("Hi.", spk, context=[Segment(spk, text, codes=codes)], seed=1, max_frames=2))
    assert len(engine.prefixes) == 2 and engine.prefixes.hits == 1
    list(engine.frames("Hi.", 0, context=[Segment(0, "Other words.", codes=codes)], seed=1, max_frames=2))
    assert len(engine.prefixes) == 2


def test_worker_requests_use_the_cache(engine):
    text, codes = _voice()
    engine.pin_voice(text, codes)
    w = EngineWorker(engine).start()
    try:
        reqs = []
        for _ in range(2):
            r = w.submit(GenRequest("Hello.", context=[Segment(0, text, codes=codes)], seed=3, max_frames=4,
                                    keep_codes=True))
            t0 = time.monotonic()
            while not r.finished:
                assert time.monotonic() - t0 < 30, "request did not finish"
                time.sleep(0.002)
            reqs.append(r)
    finally:
        w.stop()
    assert engine.prefixes.hits == 1
    assert reqs[0].prompt_len == reqs[1].prompt_len  # the cached positions still count
    assert np.array_equal(np.stack(reqs[0].codes), np.stack(reqs[1].codes))


def test_lru_eviction_and_bad_pins():
    c = PrefixCache(max_entries=2)
    for i in range(3):
        c.store((0, bytes([i])), i)
    assert len(c) == 2 and (0, bytes([0])) not in c._kv
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    with pytest.raises(ValueError, match=r"codes must be \[frames, 32\]"):
        eng.pin_voice("x", np.zeros((4, 3), np.int64))
