"""The codec threads: where the CPU work of encoding (LAME, PyAV) and of a request's speaking rate
(kernels/stretch.py) runs, off the event loop, and the batched hand-off that takes it there.

One engine tick wakes every stream at once (one `call_soon_threadsafe` for all), so the streams
that need a codec thread ask for it in the same loop iteration. `handoff(fn, arg)` queues the call
and the first one of an iteration schedules a flush: the next iteration sends the whole queue to
the threads, up to BATCH calls a job, and each job's results come back with one wake-up of the
loop. The loop's cost of a hand-off is then a future and a list entry, not an executor round
trip of its own (a `run_in_executor` per 40 ms piece of a stream at a speed doubled what the loop
spent on that stream; see the README's "Speaking rate").
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

BATCH = 8  # calls a job takes: a tick of many streams is spread over the threads, a few streams take one
_POOL: list[ThreadPoolExecutor] = []  # made on first use: codec threads shared by all streams
_QUEUED: dict[asyncio.AbstractEventLoop, list] = {}  # calls of this loop iteration, not yet flushed


def pool() -> ThreadPoolExecutor:
    """The codec threads (at most 8, at most one a core)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="codec"))
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
    for i in range(0, len(queued), BATCH):
        pool().submit(_run, loop, queued[i:i + BATCH])


def _run(loop: asyncio.AbstractEventLoop, calls: list) -> None:
    """A job on a codec thread: every call in turn, then their results to the loop at once."""
    done = []
    for fn, arg, fut in calls:
        try:
            done.append((fut, fn(arg), None))
        except StopIteration as e:  # (a future cannot hold one)
            done.append((fut, None, RuntimeError(f"StopIteration from {fn!r}: {e}")))
        except BaseException as e:  # noqa: BLE001 - whatever it was, its awaiter gets it
            done.append((fut, None, e))
    try:
        loop.call_soon_threadsafe(_settle, done)
    except RuntimeError:  # the loop was closed meanwhile: nobody waits for these any more
        pass


def _settle(done: list) -> None:
    for fut, result, exc in done:
        if fut.done():  # its awaiter was cancelled
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
