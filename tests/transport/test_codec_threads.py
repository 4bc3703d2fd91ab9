"""transport/codec_threads.py: a loop iteration's hand-offs go to the codec threads together, up to
BATCH a job, each call's result (or exception) back to its own awaiter; a cancelled awaiter or a
closed loop loses nothing else. And a stream at a speed reads 40 ms pieces only until its first
chunk is out."""

import asyncio
import threading

import numpy as np
import pytest
import uvloop

from csmstream.transport import codec_threads
from csmstream.transport.codec_threads import BATCH, handoff


@pytest.fixture
def jobs(monkeypatch):
    """The codec-thread jobs run, as the lists of arguments each took."""
    seen, run = [], codec_threads._run

    def counted(loop, calls, *rest):
        seen.append([arg for _, arg, _ in calls])
        run(loop, calls, *rest)

    monkeypatch.setattr(codec_threads, "_run", counted)
    return seen


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_one_iterations_handoffs_go_together_and_each_gets_its_own_result(jobs, new_loop):
    threads = set()

    def square(x):
        threads.add(threading.current_thread().name)
        return x * x

    async def main():
        n = 2 * BATCH + 3  # three jobs: BATCH, BATCH, 3
        got = await asyncio.gather(*(handoff(square, i) for i in range(n)))
        assert got == [i * i for i in range(n)]
        assert jobs == [list(range(0, BATCH)), list(range(BATCH, 2 * BATCH)), list(range(2 * BATCH, n))]
        jobs.clear()
        # tasks woken together (as one engine tick wakes every stream) hand off in one job
        go = asyncio.Event()

        async def stream(i):
            await go.wait()
            return await handoff(square, 100 + i)

        tasks = [asyncio.create_task(stream(i)) for i in range(5)]
        await asyncio.sleep(0)
        go.set()
        assert await asyncio.gather(*tasks) == [(100 + i) ** 2 for i in range(5)]
        assert jobs == [[100, 101, 102, 103, 104]]
        jobs.clear()
        assert await handoff(square, 7) == 49 and await handoff(square, 8) == 64  # one after another: a job each
        assert jobs == [[7], [8]]

    loop = new_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 30))  # (a lost result fails, not hangs)
    finally:
        loop.close()
    assert threads and all(name.startswith("codec") for name in threads)  # never the loop's thread
    assert not codec_threads._QUEUED  # nothing of a closed loop is kept


def test_an_exception_goes_to_its_own_awaiter_and_a_cancelled_one_loses_nothing_else(jobs):
    release = threading.Event()

    def work(x):
        if x == "slow":
            release.wait(10)
        if x == "bad":
            raise ValueError("bad input")
        if x == "stop":
            raise StopIteration  # (a future cannot hold a StopIteration)
        return x.upper()

    async def main():
        slow = asyncio.ensure_future(handoff(work, "slow"))
        futs = [handoff(work, x) for x in ("bad", "ok", "stop")]
        await asyncio.sleep(0.05)
        slow.cancel()  # its call is under way: it still runs, and its result is dropped
        release.set()
        got = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 10)
        assert isinstance(got[0], ValueError) and str(got[0]) == "bad input"
        assert got[1] == "OK"
        assert isinstance(got[2], RuntimeError) and "StopIteration" in str(got[2])
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await handoff(work, "after") == "AFTER"

    asyncio.run(main())
    assert jobs[0] == ["slow", "bad", "ok", "stop"]


def test_results_for_a_loop_closed_meanwhile_are_dropped():
    release, finished = threading.Event(), threading.Event()

    def work(x):
        release.wait(10)
        finished.set()
        return x

    loop = asyncio.new_event_loop()
    fut = None

    async def start():
        nonlocal fut
        fut = handoff(work, 1)
        await asyncio.sleep(0.01)  # flushed: the job is on a codec thread

    loop.run_until_complete(start())
    loop.close()
    release.set()
    assert finished.wait(10)  # the job ran to its end without raising into the pool
    codec_threads.pool().submit(lambda: None).result(10)  # and the pool still works
    assert not fut.done()


def test_a_stream_at_a_speed_reads_40_ms_pieces_only_until_its_first_chunk():
    from csmstream.transport.encoder import encoder_for

    enc = encoder_for("pcm_24000", 100, 1.25)
    assert enc.chunk_in == 960  # 40 ms: the first chunk does not wait for a whole chunk's input
    pcm = np.zeros(960, np.int16)
    pieces = 0
    while not enc.feed(pcm):
        pieces += 1
        assert enc.chunk_in == 960
    assert pieces == 3  # 100 ms at 1.25 is 125 ms of input, plus the search's 28 ms: four pieces
    assert enc.chunk_in == 2400  # then a chunk's worth a piece
    assert encoder_for("ulaw_8000", 20, 0.8).chunk_in == 480  # a chunk shorter than 40 ms is read whole


def test_a_failing_job_or_a_shut_pool_still_answers_every_awaiter(monkeypatch):
    """Whatever goes wrong around the calls, no awaiter is left waiting (a stream that hangs)."""
    import time as real_time
    from concurrent.futures import ThreadPoolExecutor

    class Clock:  # fails on a codec thread, before any call of the job has run
        @staticmethod
        def perf_counter():
            if threading.current_thread().name.startswith("codec"):
                raise MemoryError("no memory for a clock")
            return real_time.perf_counter()

    async def three():
        return await asyncio.wait_for(asyncio.gather(*(handoff(str, i) for i in range(3)), return_exceptions=True), 10)

    monkeypatch.setattr(codec_threads, "time", Clock)
    got = asyncio.run(three())
    assert all(isinstance(e, RuntimeError) and "failed before this call ran" in str(e) for e in got), got
    monkeypatch.undo()

    shut = ThreadPoolExecutor(1)
    shut.shutdown()
    monkeypatch.setattr(codec_threads, "pool", lambda: shut)
    got = asyncio.run(three())
    assert all(isinstance(e, RuntimeError) and "shutdown" in str(e) for e in got), got


def test_the_metrics_count_calls_jobs_busy_time_and_waits(server):
    """/metrics of a running server: a request at a speed hands its pieces off; the counters grow
    by what was handed off (checked against the module's own count, process-wide)."""
    import urllib.request

    from csmstream.transport.client import SesameWebSocketService
    from csmstream.transport.metrics import parse

    url = server.url.replace("ws://", "http://").replace("/ws/generate", "/metrics")

    def scrape():
        return parse(urllib.request.urlopen(url, timeout=10).read().decode())

    async def speak():
        svc = SesameWebSocketService(server.url)
        return b"".join([c async for c in svc.stream_tts("A request at a speed.", seed=1, speed=1.5,
                                                          max_audio_ms=600)])

    before = scrape()
    assert len(asyncio.run(speak())) == 600 * 48
    after = scrape()
    # 900 ms of input: 40 ms pieces, then 100 ms ones, then the flush's
    assert after["csm_codec_calls_total"] - before["csm_codec_calls_total"] >= 3
    assert after["csm_codec_calls_total"] == codec_threads.STATS.calls  # (the server is idle now)
    jobs = after["csm_codec_jobs_total"] - before["csm_codec_jobs_total"]
    assert 1 <= jobs <= after["csm_codec_calls_total"] - before["csm_codec_calls_total"]
    assert after["csm_codec_wait_milliseconds_count"] == after["csm_codec_jobs_total"]  # a wait a job
    assert after["csm_codec_busy_seconds_total"] > before["csm_codec_busy_seconds_total"]
    assert after["csm_codec_threads"] == codec_threads.thread_count() >= 1
