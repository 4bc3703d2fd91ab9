"""The engine thread's scheduling, driven tick by tick: chunked prefill never stalls a playing call,
a burst is admitted as fast as the budget allows, and the output is what each request gives alone."""

import time

import numpy as np
import pytest

import csmstream
from csmstream.engine.cuda_step import buckets_for
from csmstream.engine.mimi_stream import DecodeGraphs
from csmstream.engine.prompt import Segment
from csmstream.engine.worker import EngineWorker, GenRequest

LONG = [Segment(1, "Earlier words in the call.", codes=np.random.default_rng(2).integers(0, 2048, (40, 32)))]


class CountingBucketDecode(DecodeGraphs):
    calls = 0

    def decode(self, codes, lo, hi):
        self.calls += 1
        return super().decode(codes, lo, hi)


class ListSink:
    def __init__(self):
        self.parts = []

    def write(self, samples):
        self.parts.append(samples.copy())
        return len(samples)

    @property
    def audio(self):
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int16)


@pytest.fixture()
def engine():
    return csmstream.load("tiny", device="cpu", max_streams=4)


def _queue(w, req):
    """What submit() does, minus the running thread: these tests call _tick() themselves."""
    w._inbox.put(w.prepare(req))
    return req


def _ticks_until(w, cond, limit=200):
    for _ in range(limit):
        if cond():
            return
        w._tick()
    raise AssertionError("condition not reached")


def test_a_long_prompt_goes_in_a_chunk_a_tick_while_the_others_play(engine):
    w = EngineWorker(engine, prefill_chunk=16, max_prefill_s=0.0)  # one chunk a tick, nothing more
    a = _queue(w, GenRequest("The first caller.", seed=1, max_frames=60, keep_codes=True))
    _ticks_until(w, lambda: a.frames > 0)
    b = _queue(w, GenRequest("The second caller.", context=LONG, seed=2, max_frames=5, keep_codes=True))
    chunks = -(-b.prompt_len // 16)
    assert chunks >= 4
    seen = []
    while not b.frames:
        before = a.frames
        w._tick()
        assert a.frames == before + 1  # the playing call got its frame every tick
        seen.append(w.stats.prefilling)
    assert seen == [1] * (chunks - 1) + [0]  # B went in over `chunks` ticks and then generated at once
    assert w.stats.prefill_chunks == -(-a.prompt_len // 16) + chunks
    assert w.stats.prefill_tokens == a.prompt_len + b.prompt_len
    _ticks_until(w, lambda: a.finished and b.finished)
    for req, ctx in ((a, ()), (b, LONG)):
        alone = np.stack(list(engine.frames(req.text, req.speaker_id, context=ctx, seed=req.seed,
                                            max_frames=req.max_frames)))
        assert np.array_equal(np.stack(req.codes), alone)


@pytest.mark.parametrize("max_prefill_s, per_tick", [(30.0, 3), (0.0, 1)])
def test_a_burst_is_admitted_as_far_as_the_budget_allows(engine, max_prefill_s, per_tick):
    # (a wide budget: a loaded machine's measured prefill times must not be what limits it)
    w = EngineWorker(engine, max_prefill_s=max_prefill_s)
    reqs = [_queue(w, GenRequest(f"Caller number {i}.", seed=i, max_frames=8)) for i in range(3)]
    w._tick()
    assert sum(r.frames == 1 for r in reqs) == per_tick
    assert w.stats.waiting == 3 - per_tick


def test_calls_with_little_audio_ahead_get_no_extra_prefill(engine):
    """With no audio ahead a tick admits one prompt; with plenty ahead, all waiting. The budget is
    wide (30 s a tick, 60 s ahead) so that the measured prefill times of a loaded machine (the
    suite runs in parallel processes) cannot be what stops the second case, and the capacity check
    (PrefillBudget.can_grow, from measured step times; tested on its own) is held open."""
    w = EngineWorker(engine, max_prefill_s=30.0)
    w.budget.can_grow = lambda rows: True
    a = _queue(w, GenRequest("Playing now.", seed=1, max_frames=80, sink=ListSink()))
    _ticks_until(w, lambda: a.t_first_audio > 0)
    reqs = [_queue(w, GenRequest(f"Caller number {i}.", seed=i, max_frames=3)) for i in range(3)]
    admitted = []
    for _ in range(3):
        a.t_first_audio = time.perf_counter() - a.frames * 0.08  # its buffer is empty: no time to spare
        w._tick()
        admitted.append(sum(r.frames > 0 for r in reqs))
    assert admitted == [1, 2, 3]
    _ticks_until(w, lambda: all(r.finished for r in reqs))
    a.t_first_audio = time.perf_counter() - a.frames * 0.08 + 60.0  # 60 s of audio ahead
    more = [_queue(w, GenRequest(f"Caller number {i}.", seed=i, max_frames=3)) for i in range(3, 6)]
    w._tick()
    assert all(r.frames == 1 for r in more)


def test_cancel_while_prefilling_frees_the_slot(engine):
    w = EngineWorker(engine, prefill_chunk=8, max_prefill_s=0.0)
    b = _queue(w, GenRequest("Cancelled midway.", context=LONG, seed=2, max_frames=5))
    w._tick()
    assert w.stats.prefilling == 1 and len(engine._free) == 3
    b.cancel()
    w._tick()
    assert b.finished and b.reason == "cancelled" and b.frames == 0
    assert w.stats.prefilling == 0 and len(engine._free) == 4


def test_whole_bucket_decode_while_a_row_is_still_prefilling(engine):
    """A whole-bucket decode (the CUDA graph's rule, run eagerly here) moves the decoder state of a
    row whose prompt is half in; the reset when its prompt is done must leave no trace."""
    engine._decoder = None
    engine.decoder  # noqa: B018 - build it, then put a whole-bucket decoder beside it
    engine._decode_graphs = dg = CountingBucketDecode(engine.decoder, buckets_for(4), 32, capture=False)
    w = EngineWorker(engine, prefill_chunk=16, max_prefill_s=0.0)
    short = _queue(w, GenRequest("A short one.", seed=3, max_frames=2, sink=ListSink()))
    a = _queue(w, GenRequest("The first caller.", seed=1, max_frames=14, sink=ListSink()))
    _ticks_until(w, lambda: short.finished and a.frames > 0)
    assert (short.frames, a._row) == (2, 1)
    b = _queue(w, GenRequest("The second caller.", context=LONG, seed=2, max_frames=6, sink=ListSink()))
    w._tick()
    assert b._row == 0 and w.stats.prefilling == 1  # row 0 prefills below a playing row 1: bucket 2
    _ticks_until(w, lambda: a.finished and b.finished)
    assert w.stats.prefill_chunks > 3
    assert dg.calls == w.stats.ticks  # every tick's decode was the whole-bucket one (the prefilling row is ours)
    engine._decode_graphs = None  # the reference: each alone, decoded eagerly
    for req, ctx in ((a, ()), (b, LONG)):
        alone = np.concatenate(list(engine.stream(req.text, req.speaker_id, context=ctx, seed=req.seed,
                                                  max_frames=req.max_frames)))
        got = req.sink.audio
        assert got.shape == alone.shape
        assert np.abs(got.astype(np.int32) - alone).max() <= 1  # rounding of batched vs single decode


def test_a_request_submitted_as_the_engine_thread_dies_is_refused_not_left_to_hang(engine, monkeypatch):
    """The thread ends (here: dies) while a submit is between its aliveness check and the queue:
    the request must be refused or failed, never left in an inbox nobody reads. The window is made
    certain by reporting the thread alive after it has ended."""
    def die(req):
        raise SystemExit("injected: the engine thread dies")

    w = EngineWorker(engine).start()
    w.fault_hook = die
    first = w.submit(GenRequest("Goodbye, engine.", seed=1, max_frames=5))
    w._thread.join(timeout=30)  # `alive` turns false before the thread fails what it held: wait for the end
    assert not w._thread.is_alive(), "the dying engine thread did not end"
    assert not w.alive and isinstance(w.died, SystemExit)
    assert first.reason == "error" and "engine thread died" in first.error
    monkeypatch.setattr(EngineWorker, "alive", property(lambda self: True))  # the race's view of it
    with pytest.raises(RuntimeError, match="the engine thread is not running"):
        w.submit(GenRequest("Anyone there?", seed=2, max_frames=5))
    assert w.queued() == 0


def test_the_engine_thread_is_reported_dead_before_any_request_hears_it_died(engine, monkeypatch):
    """A dying thread fails the requests it held while it still runs: by then `alive` (what /healthz
    reads) must already be false, else a client told "the engine thread died" could find the
    server healthy (CI saw it: tests/transport/test_reliability.py got a 200 from /healthz)."""
    seen = []
    fail_all = EngineWorker._fail_all

    def recording(self, *a, **kw):
        seen.append((self.alive, self._thread is not None and self._thread.is_alive()))
        return fail_all(self, *a, **kw)

    monkeypatch.setattr(EngineWorker, "_fail_all", recording)
    w = EngineWorker(engine).start()
    assert w.alive
    w.fault_hook = lambda req: (_ for _ in ()).throw(SystemExit("injected: the engine thread dies"))
    req = w.submit(GenRequest("Goodbye, engine.", seed=1, max_frames=5))
    w._thread.join(timeout=30)
    assert req.reason == "error" and "engine thread died" in req.error
    assert seen[0] == (False, True)  # reported dead while the thread was still running


def test_a_stuck_engine_thread_is_given_up_on_and_no_request_hangs(engine):
    """A tick that never ends (here: a fault hook that blocks, as a GPU that stopped answering
    would) is given up on after stall_s: every request the worker holds -- playing, prefilling,
    waiting, just submitted -- ends with the stall's error, new ones are refused, and `alive` is
    false. When the thread comes back it stops, and the requests' ends are not told twice."""
    import threading

    release, told, hooked = threading.Event(), [], []
    list(engine.frames("Warm up.", seed=0, max_frames=2))  # (a cold first tick is slow, not stuck)
    w = EngineWorker(engine, notify=told.extend, stall_s=3.0)
    w.fault_hook = lambda req: hooked.append(req) or release.wait(60)
    w.start()
    first = [w.submit(GenRequest(f"Request {i}.", seed=i, max_frames=50)) for i in range(6)]  # 4 slots, 2 wait
    t0 = time.monotonic()
    while w.stalled is None and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    assert w.stalled is not None and "over 3 s" in w.stalled and not w.alive
    assert len(hooked) == 1  # (it was the blocked step that stalled)
    assert all(r.finished and r.reason == "error" and r.error == w.stalled for r in first)
    assert sorted(map(id, told)) == sorted(map(id, first))  # each told once that it ended
    with pytest.raises(RuntimeError, match="the engine thread is not running"):
        w.submit(GenRequest("Anyone there?", seed=9, max_frames=5))
    assert w.abandon("again") == 0  # (once)
    release.set()
    w._thread.join(timeout=30)
    assert not w._thread.is_alive()
    assert sorted(map(id, told)) == sorted(map(id, first))  # the thread's own tick told no one anything
    w2 = EngineWorker(engine).start()  # it gave its slots back: a new worker gets all four
    again = [w2.submit(GenRequest(f"Again {i}.", seed=i, max_frames=3)) for i in range(4)]
    t0 = time.monotonic()
    while not all(r.finished for r in again) and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    w2.stop()
    assert [r.reason for r in again] == ["max_frames"] * 4 and all(r.t_start for r in again)


def test_stall_timeouts_by_device_and_bad_ones_refused(engine):
    from types import SimpleNamespace

    from csmstream.engine.worker import default_stall_s, stall_seconds

    assert default_stall_s(engine) == 300.0 and stall_seconds(None, engine) == 300.0
    assert default_stall_s(SimpleNamespace(device="cuda:0")) == 120.0  # (a GPU step is ms; but a cold compile)
    assert stall_seconds(0, engine) is None and stall_seconds(2, engine) == 2.0
    for bad in (-1, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="stall_timeout must be seconds >= 0"):
            stall_seconds(bad, engine)
        with pytest.raises(ValueError, match="stall_s must be"):
            EngineWorker(engine, stall_s=bad)
    with pytest.raises(ValueError, match="stall_s must be"):
        EngineWorker(engine, stall_s=0)  # (the worker's own: no watch is None)
    with pytest.raises(ValueError, match="stall_timeout must be seconds >= 0"):
        csmstream.Streamer(engine, stall_timeout=-5)


def test_a_temperature_float32_cannot_hold_costs_the_batch_nothing(engine):
    """One caller's temperature of 1e-50 (0 in the step's float32) crashed the whole batched CPU
    step: every caller sharing the tick got generation_failed. Now it is clamped (the greedy limit)
    and the caller beside it plays exactly what it plays alone."""
    w = EngineWorker(engine)
    a = _queue(w, GenRequest("The caller beside it.", seed=1, max_frames=12, keep_codes=True))
    b = _queue(w, GenRequest("Nearly zero.", temperature=1e-50, seed=2, max_frames=12, keep_codes=True))
    _ticks_until(w, lambda: a.finished and b.finished)
    assert a.reason != "error" and b.reason != "error", (a.error, b.error)
    alone = np.stack(list(engine.frames(a.text, seed=1, max_frames=12)))
    assert np.array_equal(np.stack(a.codes), alone)
    greedy = np.stack(list(engine.frames(b.text, seed=2, max_frames=12, topk=1)))
    assert np.array_equal(np.stack(b.codes), greedy)


def test_a_later_sentence_of_a_playing_reply_is_admitted_before_newcomers(engine):
    """Every slot busy, two newcomers waiting; then the next sentence of a reply that is playing
    comes: the first slot that frees goes to it (its listener is waiting), and a second
    continuation queues behind it, still ahead of the newcomers."""
    w = EngineWorker(engine, prefill_chunk=512)
    playing = [_queue(w, GenRequest(f"Caller {i} speaks.", seed=i, max_frames=8 + i)) for i in range(4)]
    _ticks_until(w, lambda: w.stats.active == 4)
    new = [_queue(w, GenRequest(f"Newcomer {i}.", seed=9, max_frames=2)) for i in range(2)]
    nxt = _queue(w, GenRequest("The next sentence.", seed=5, max_frames=2, continues=True))
    nxt2 = _queue(w, GenRequest("And the one after.", seed=6, max_frames=2, continues=True))
    w._tick()
    assert [id(r) for r in w._waiting] == [id(r) for r in (nxt, nxt2, *new)]
    _ticks_until(w, lambda: playing[0].finished)  # one slot frees...
    _ticks_until(w, lambda: nxt.t_start or any(r.t_start for r in new))
    assert nxt.t_start and not any(r.t_start for r in new)  # ...and the continuation has it
    _ticks_until(w, lambda: all(r.finished for r in [*playing, nxt, nxt2, *new]))
    assert nxt2.t_start < min(r.t_start for r in new)


def test_a_slot_freed_by_a_reply_that_goes_on_is_kept_for_its_next_sentence(engine):
    """A sentence whose reply goes on (more=True) ends: a newcomer waiting does not get its slot
    while the next sentence is on its way (the slot is kept reserve_s); that sentence takes it. A
    kept slot nobody claims in time goes to the newcomer; a reply's last sentence keeps nothing."""
    w = EngineWorker(engine, prefill_chunk=512)
    w.reserve_s = 3600.0  # (kept until claimed, for this part)
    playing = [_queue(w, GenRequest(f"Caller {i} speaks.", seed=i, max_frames=4 if i == 0 else 400, more=i == 0))
               for i in range(4)]
    _ticks_until(w, lambda: w.stats.active == 4)
    newcomer = _queue(w, GenRequest("A newcomer.", seed=9, max_frames=400))
    _ticks_until(w, lambda: playing[0].finished)
    for _ in range(5):
        w._tick()
    assert newcomer._row < 0 and len(engine._free) == 1  # the freed slot waits for the next sentence
    nxt = _queue(w, GenRequest("The next sentence.", seed=5, max_frames=2, continues=True))  # more=False: the last
    _ticks_until(w, lambda: nxt._row >= 0 or nxt.finished)
    assert newcomer._row < 0
    _ticks_until(w, lambda: nxt.finished)
    _ticks_until(w, lambda: newcomer._row >= 0, limit=5)  # the last sentence kept nothing: the newcomer is in
    playing[1].more = True
    w.reserve_s = 0.05
    late = _queue(w, GenRequest("Another newcomer.", seed=8, max_frames=400))
    playing[1].cancel()  # (a cancelled sentence keeps nothing either)
    _ticks_until(w, lambda: late._row >= 0 or late.finished, limit=5)
    playing[2].more, playing[2].max_frames = True, playing[2].frames + 1  # ends well at its next frame
    third = _queue(w, GenRequest("A third newcomer.", seed=7, max_frames=2))
    _ticks_until(w, lambda: playing[2].finished)
    w._tick()
    assert third._row < 0  # kept...
    time.sleep(0.06)
    _ticks_until(w, lambda: third._row >= 0 or third.finished, limit=5)  # ...until reserve_s passed unclaimed
