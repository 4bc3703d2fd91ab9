"""The codec threads: where the CPU work of encoding (LAME, PyAV; a phone call's resampling and
G.711 / G.722 when it opts in, integrations/telnyx_bridge.py) and of a request's speaking rate
(kernels/stretch.py) runs, off the event loop, and the batched hand-off that takes it there.

One engine tick wakes every stream at once (one `call_soon_threadsafe` for all), so the streams
that need a codec thread ask for it in the same loop iteration. `handoff(fn, arg)` queues the call
and the first one of an iteration schedules a flush: the next iteration sends the whole queue to
the threads, up to BATCH calls a job, and each job's results come back with one wake-up of the
loop. The loop's cost of a hand-off is then a future and a list entry, not an executor round
trip of its own (a `run_in_executor` per 40 ms piece of a stream at a speed doubled what the loop
spent on that stream; see the README's "Speaking rate").

The limit: a codec thread's Python (the calls around a kernel) needs the GIL, and a busy loop gives
it up only every switch interval (5 ms). Once the loop is near a full core a hand-off's round trip
grows to tens of milliseconds, so work handed off a chunk at a time then falls behind where the
same work on the loop would not (measured for phone calls: README, "How many calls a process
carries"). Hand off what is heavy per call (LAME, Opus, WSOLA), not what costs a few microseconds.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .metrics import Histogram

BATCH = 8  # calls a job takes: a tick of many streams is spread over the threads, a few streams take one
WAIT_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100)
_POOL: list[ThreadPoolExecutor] = []  # made on first use: codec threads shared by all streams
_QUEUED: dict[asyncio.AbstractEventLoop, list] = {}  # calls of this loop iteration, not yet flushed


class _Stats:
    """What the codec threads did, for /metrics (process-wide, like the threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = self.jobs = 0
        self.busy_s = 0.0  # the threads' time running jobs: its rate over the thread count is how busy they are
        self.wait_ms = Histogram(WAIT_BUCKETS_MS)  # a job's wait for a free thread: grows when they are saturated


STATS = _Stats()


def thread_count() -> int:
    """How many codec threads there are (or will be): at most 8, at most one a core."""
    return min(8, os.cpu_count() or 1)


def pool() -> ThreadPoolExecutor:
    """The codec threads."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(thread_count(), thread_name_prefix="codec"))
    return _POOL[0]


def handoff(fn: Callable, arg) -> asyncio.Future:
    """`fn(arg)` on a codec thread; await the result (or its exception). The caller must not hand
    off work on the same object again before this one is done (one encoder, one thread at a time).
    Cancelling the future does not stop the call: its result is dropped."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    queued = _QUEUED.get(loop)
    if queued is None:
        queued = _QUEUED[loop] = []
        loop.call_soon(_flush, loop)
    queued.append((fn, arg, fut))
    return fut


def _flush(loop: asyncio.AbstractEventLoop) -> None:
    queued = _QUEUED.pop(loop, [])
    now = time.perf_counter()
    for i in range(0, len(queued), BATCH):
        calls = queued[i:i + BATCH]
        try:
            pool().submit(_run, loop, calls, now)
        except RuntimeError as e:  # a pool shut down (the interpreter exiting): the awaiters hear it
            _settle([(fut, None, e) for _, _, fut in calls])


def _run(loop: asyncio.AbstractEventLoop, calls: list, submitted: float = 0.0) -> None:
    """A job on a codec thread: every call in turn, then their results to the loop at once --
    whatever happens here, every awaiter hears back (a lost result would be a stream that hangs)."""
    done = []
    try:
        start = time.perf_counter()
        for fn, arg, fut in calls:
            try:
                done.append((fut, fn(arg), None))
            except StopIteration as e:  # (a future cannot hold one)
                done.append((fut, None, RuntimeError(f"StopIteration from {fn!r}: {e}")))
            except BaseException as e:  # noqa: BLE001 - whatever it was, its awaiter gets it
                done.append((fut, None, e))
        _count(len(calls), start, submitted)
    finally:
        if len(done) < len(calls):
            lost = RuntimeError("the codec thread's job failed before this call ran")
            done += [(fut, None, lost) for _, _, fut in calls[len(done):]]
        try:
            loop.call_soon_threadsafe(_settle, done)
        except RuntimeError:  # the loop was closed meanwhile: nobody waits for these any more
            pass


def _count(calls: int, start: float, submitted: float) -> None:
    end = time.perf_counter()
    with STATS.lock:
        STATS.calls += calls
        STATS.jobs += 1
        STATS.busy_s += end - start
        STATS.wait_ms.observe(1000.0 * (start - submitted) if submitted else 0.0)


def _settle(done: list) -> None:
    for fut, result, exc in done:
        if fut.done():  # its awaiter was cancelled
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


def metric_lines() -> list[str]:
    """Prometheus text lines of the codec threads."""
    with STATS.lock:
        calls, jobs, busy = STATS.calls, STATS.jobs, STATS.busy_s
        wait = STATS.wait_ms.lines("csm_codec_wait_milliseconds")
    return ["# HELP csm_codec_threads threads that encode (MP3, Opus, AAC, FLAC) and stretch (speed) off the loop",
            "# TYPE csm_codec_threads gauge", f"csm_codec_threads {thread_count()}",
            "# HELP csm_codec_calls_total encoder and stretcher calls run on the codec threads",
            "# TYPE csm_codec_calls_total counter", f"csm_codec_calls_total {calls}",
            "# HELP csm_codec_jobs_total batches of them (one loop iteration's calls, up to 8 a job)",
            "# TYPE csm_codec_jobs_total counter", f"csm_codec_jobs_total {jobs}",
            "# HELP csm_codec_busy_seconds_total time the codec threads spent running jobs (rate / threads: "
            "how busy they are)", "# TYPE csm_codec_busy_seconds_total counter",
            f"csm_codec_busy_seconds_total {busy:.6f}",
            "# HELP csm_codec_wait_milliseconds how long a job waited for a free codec thread (a growing tail: "
            "they are saturated, and the streams' audio waits)", "# TYPE csm_codec_wait_milliseconds histogram",
            *wait]
