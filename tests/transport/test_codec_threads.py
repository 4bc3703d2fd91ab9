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

    def counted(loop, calls):
        seen.append([arg for _, arg, _ in calls])
        run(loop, calls)

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
        loop.run_until_complete(main())
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
