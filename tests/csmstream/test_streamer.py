"""csmstream.Streamer: many streams of one engine in one batched step a tick, from asyncio or threads,
each yielding what the engine yields for it alone; every way of leaving one frees its slot."""

import asyncio
import threading
import time

import numpy as np
import pytest

import csmstream

TEXTS = ["Hello there, how are you today?", "Thanks for calling.", "One moment please, I will check."]


@pytest.fixture(scope="module")
def engine():
    return csmstream.load("tiny", device="cpu", max_streams=4)


@pytest.fixture(scope="module")
def alone(engine):
    """Each text's codes and PCM from Engine.frames/stream, one at a time: the reference."""
    codes = [np.stack(list(engine.frames(t, seed=i, max_frames=16))) for i, t in enumerate(TEXTS)]
    pcm = [np.concatenate(list(engine.stream(t, seed=i, max_frames=16))) for i, t in enumerate(TEXTS)]
    return codes, pcm


def _fail_after_4_frames(message):
    """A worker fault hook: the request fails as its fifth frame is taken (after 4 were made)."""
    def hook(req):
        if req.frames == 4:
            raise OSError(message)
    return hook


def _all_free(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(engine._free) < engine.max_streams:
        if time.monotonic() > deadline:
            raise AssertionError(f"slots still held: free {sorted(engine._free)} of {engine.max_streams}")
        time.sleep(0.01)


def test_concurrent_async_streams_share_each_step_and_each_gets_what_it_gets_alone(engine, alone):
    async def main():
        async with csmstream.Streamer(engine) as tts:
            async def codes(i, text):
                return np.stack([c async for c in tts.frames(text, seed=i, max_frames=16)])

            async def pcm(i, text):
                return [p async for p in tts.stream(text, seed=i, max_frames=16)]

            got_codes = await asyncio.gather(*(codes(i, t) for i, t in enumerate(TEXTS)))
            ticks = tts.stats.ticks
            got_pcm = await asyncio.gather(*(pcm(i, t) for i, t in enumerate(TEXTS)))
            return got_codes, ticks, got_pcm, tts.stats

    got_codes, ticks, got_pcm, stats = asyncio.run(main())
    for mine, ref in zip(got_codes, alone[0], strict=True):
        assert np.array_equal(mine, ref)
    frames = sum(len(c) for c in got_codes)
    assert frames == 48 and ticks < frames  # batched: fewer steps than frames (3 streams a step at most)
    assert ticks >= 16  # (and no stream got more than one frame a step)
    for frames_pcm, ref in zip(got_pcm, alone[1], strict=True):
        assert all(p.dtype == np.int16 and p.shape == (1920,) for p in frames_pcm)
        got = np.concatenate(frames_pcm)
        assert got.shape == ref.shape and np.abs(got.astype(np.int32) - ref).max() <= 1  # batched decode rounding
    assert stats.requests == 6
    _all_free(engine)


def test_streams_from_threads_are_batched_too(engine, alone):
    got = {}
    with csmstream.Streamer(engine) as tts:
        def run(i, text):
            got[i] = np.stack(list(tts.frames(text, seed=i, max_frames=16)))

        threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(TEXTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ticks = tts.stats.ticks
    assert all(np.array_equal(got[i], alone[0][i]) for i in range(len(TEXTS)))
    assert ticks < 48


def test_every_way_of_leaving_a_stream_early_stops_it_and_frees_its_slot(engine):
    long = "A long answer that goes on and on. " * 4

    async def main():
        async with csmstream.Streamer(engine) as tts:
            async for _ in tts.stream(long, max_frames=400):  # break: the loop drops the iterator
                break
            await asyncio.to_thread(_all_free, engine)
            s = tts.stream(long, max_frames=400)
            assert len(await anext(s)) == 1920
            await s.aclose()
            assert [p async for p in s] == []  # (closed: nothing more)
            assert s.req.cancelled and s.frames_made < 400
            async with tts.frames(long, max_frames=400) as s:
                await anext(s)
            await asyncio.to_thread(_all_free, engine)
            started = asyncio.Event()

            async def consume():
                async for _ in tts.stream(long, max_frames=400):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()  # the consuming task is cancelled: so is the generation
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(_all_free, engine)
            return tts.stats

    stats = asyncio.run(main())
    assert stats.frames < 4 * 400 // 4  # each stopped within a few ticks, nowhere near its 400 frames


def test_bad_arguments_and_a_full_queue_are_refused_at_once(engine):
    with csmstream.Streamer(engine, max_waiting=0) as tts:
        with pytest.raises(ValueError, match="topk"):
            tts.stream("Hi.", topk=0)
        with pytest.raises(ValueError, match="temperature"):
            tts.frames("Hi.", temperature=-1)
        held = [tts.frames("A long answer that goes on and on.", max_frames=400) for _ in range(4)]
        with pytest.raises(csmstream.Busy, match="busy"):
            tts.frames("One more.")
        for s in held:
            s.close()
    _all_free(engine)
    with pytest.raises(RuntimeError, match="not running: use `with Streamer"):
        csmstream.Streamer(engine).stream("Hi.")
    with pytest.raises(RuntimeError, match="it was closed"):
        tts.stream("Hi.")
    with pytest.raises(RuntimeError, match="closed; make a new one"):
        tts.start()
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        csmstream.Streamer(engine, prefill_chunk=0)
    with pytest.raises(TypeError, match=r"engine must be an Engine from csmstream.load\(\), got str"):
        csmstream.Streamer("tiny")


def test_a_failed_generation_yields_what_was_made_then_says_why(engine):
    with csmstream.Streamer(engine) as tts:
        tts._worker.fault_hook = _fail_after_4_frames("the device fell over")
        got = []
        with pytest.raises(csmstream.GenerationError, match="generation failed: OSError: the device fell over"):
            for pcm in tts.stream("A long answer that goes on and on.", seed=1, max_frames=100):
                got.append(pcm)
        assert len(got) == 4
        tts._worker.fault_hook = None
        assert len(list(tts.frames("And the next one is fine.", max_frames=6))) == 6
    _all_free(engine)


def test_a_stuck_engine_ends_the_streams_with_a_generation_error_not_a_wait():
    """stall_timeout: a tick that never returns (a blocking fault hook, as a GPU that stopped
    answering) ends the stream with GenerationError saying why, after what it had made; the next
    stream is refused at once."""
    import threading

    release = threading.Event()
    tts = csmstream.Streamer(csmstream.load("tiny", device="cpu", max_streams=1), stall_timeout=3).start()
    try:
        assert len(list(tts.frames("Warm up.", max_frames=2))) == 2  # (a cold first tick is slow, not stuck)
        tts._worker.fault_hook = lambda req: req.frames >= 4 and release.wait(60)  # stuck at the fifth frame
        got = []
        with pytest.raises(csmstream.GenerationError, match=r"the engine stopped: one step has run over 3 s"):
            for codes in tts.frames("A long answer that goes on and on.", seed=1, max_frames=100):
                got.append(codes)
        assert len(got) == 4
        with pytest.raises(RuntimeError, match="the engine thread is not running"):
            next(iter(tts.frames("Anyone there?", max_frames=3)))
    finally:
        release.set()
        tts.close()


def test_closing_the_streamer_ends_running_streams_after_what_they_made(engine):
    tts = csmstream.Streamer(engine).start()
    s = tts.frames("A long answer that goes on and on.", max_frames=400)
    first = [next(s), next(s)]
    tts.close()
    rest = []
    with pytest.raises(csmstream.StreamerClosed, match="closed while this stream ran"):
        for codes in s:
            rest.append(codes)
    assert len(first) + len(rest) == s.frames_made < 400
    _all_free(engine)


def test_a_format_gives_the_servers_chunks_of_the_same_audio_and_keeps_what_was_made_on_a_failure(engine):
    from csmstream.transport.encoder import encoder_for

    def encoded(pcm_frames, fmt, chunk_ms):
        enc = encoder_for(fmt, chunk_ms)
        return b"".join(enc.feed(np.concatenate(pcm_frames)) + enc.finish())

    text = "Hello there, how are you today?"
    pcm = list(engine.stream(text, seed=3, max_frames=12))
    with csmstream.Streamer(engine) as tts:
        chunks = list(tts.stream(text, seed=3, max_frames=12, format="ulaw_8000", chunk_ms=20))
        assert all(isinstance(c, bytes) for c in chunks)
        assert {len(c) for c in chunks[:-1]} == {160} and 0 < len(chunks[-1]) <= 160  # 20 ms of 8 kHz mu-law
        assert b"".join(chunks) == encoded(pcm, "ulaw_8000", 20)  # (one stream alone: the engine's very PCM)

        tts._worker.fault_hook = _fail_after_4_frames("gone")
        got = []
        with pytest.raises(csmstream.GenerationError, match="OSError: gone"):
            for chunk in tts.stream(text, seed=3, max_frames=12, format="pcm_16000", chunk_ms=100):
                got.append(chunk)
        tts._worker.fault_hook = None
        assert b"".join(got) == encoded(pcm[:4], "pcm_16000", 100)  # the 4 frames made, to the last sample

        with pytest.raises(ValueError, match="format must be one of pcm_24000, .*got 'wav'"):
            tts.stream(text, format="wav")
        with pytest.raises(ValueError, match="chunk_ms must be an integer from 20 to 1000, got 5"):
            tts.stream(text, format="ulaw_8000", chunk_ms=5)
        with pytest.raises(ValueError, match="chunk_ms goes with format"):
            tts.stream(text, chunk_ms=20)
    _all_free(engine)


def test_speed_plays_the_streams_audio_at_that_speed_as_pcm_or_in_a_format(engine):
    """speed: the stream's PCM played by the stretcher (its whole-signal reference: kernels/stretch),
    as int16 arrays without a format, in the format's chunks with one; codes and bad speeds refused."""
    from csmstream.kernels.stretch import stretch_ref
    from csmstream.transport.encoder import encoder_for

    text = "Thanks for calling."
    played = stretch_ref(np.concatenate(list(engine.stream(text, seed=2, max_frames=12))), 1.4)
    with csmstream.Streamer(engine) as tts:
        pieces = list(tts.stream(text, seed=2, max_frames=12, speed=1.4))
        assert all(p.dtype == np.int16 for p in pieces) and np.array_equal(np.concatenate(pieces), played)
        chunks = list(tts.stream(text, seed=2, max_frames=12, speed=1.4, format="pcm_16000", chunk_ms=40))
        enc = encoder_for("pcm_16000", 40)
        assert b"".join(chunks) == b"".join(enc.feed(played) + enc.finish())
        for bad in (0.1, "2", None):
            with pytest.raises(ValueError, match=r"speed must be a number in 0\.25\.\.4"):
                tts.stream(text, speed=bad)
        with pytest.raises(ValueError, match="speed are for audio"):
            tts.stream_text(iter(["Hi."]), codes=True, speed=2)
