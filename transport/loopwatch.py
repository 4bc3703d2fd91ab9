"""How busy the event loop is: every connection's audio is sent from this one loop, so a loop that
falls behind delays every stream at once.

`LoopWatch` runs one small task that asks to wake every `interval` seconds and records how late it
woke (the loop's lag: how long a ready callback waited for the one in front of it to finish), and
the CPU time of the loop's own thread (`time.thread_time`, read on that thread), which is the
figure that says how many more calls one process can take. A lag over `warn_ms` is logged (at
most once every `warn_every` seconds) with what the loop was doing, since a blocked loop is heard
as a gap on every call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

from .metrics import Histogram

log = logging.getLogger("csmstream.loop")

LAG_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 250, 1000)


class LoopWatch:
    def __init__(self, interval: float = 0.05, warn_ms: float = 100.0, warn_every: float = 10.0,
                 window_s: float = 10.0) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.interval, self.warn_ms, self.warn_every = interval, warn_ms, warn_every
        self.lag_ms = Histogram(LAG_BUCKETS_MS)
        self.cpu_seconds = 0.0  # the loop thread's CPU time since start()
        self._recent: deque[tuple[float, float]] = deque()  # (when, lag ms) over the last window_s
        self._window = window_s
        self._task: asyncio.Task | None = None
        self._cpu0 = 0.0
        self._thread: int | None = None
        self._warned = float("-inf")
        self._starting = False
        self._ready_at = float("-inf")  # (time.monotonic) when starting last went False

    @property
    def starting(self) -> bool:
        """True until the server is ready: loading and warming the model hold the GIL in bursts, and
        a lag then delays no stream (none is served yet), so it is noted at INFO, not warned of. A
        stall mostly before the server was ready is start-up too, though the loop wakes from it (and
        measures it) just after."""
        return self._starting

    @starting.setter
    def starting(self, value: bool) -> None:
        if self._starting and not value:
            self._ready_at = time.monotonic()
        self._starting = value

    def start(self) -> LoopWatch:
        """Start watching the running loop (call from a coroutine on it)."""
        if self._task is None:
            self._cpu0, self._thread = time.thread_time(), threading.get_ident()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-watch")
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def max_recent_ms(self) -> float:
        """The largest lag of the last `window_s` seconds."""
        self._trim(time.monotonic())
        return max((lag for _, lag in self._recent), default=0.0)

    def _trim(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > self._window:
            self._recent.popleft()

    def record(self, lag_ms: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        startup = self._starting or now - lag_ms / 2000 < self._ready_at  # (most of the stall was before ready)
        self.lag_ms.observe(lag_ms)
        self._recent.append((now, lag_ms))
        self._trim(now)
        if lag_ms > self.warn_ms and now - self._warned >= self.warn_every:
            self._warned = now
            if startup:
                log.info("event loop blocked for %.0f ms during start-up (the model's load and warm-up run in "
                         "this process; no stream is served yet)", lag_ms)
                return
            log.warning("event loop blocked for %.0f ms (every stream's audio waited that long); loop CPU %.1f s "
                        "so far -- too many connections for one process, or blocking work on the loop", lag_ms,
                        self.cpu_seconds)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            self.cpu_seconds = time.thread_time() - self._cpu0
            self.record(max(0.0, (now - due) * 1000.0))
            due = max(due + self.interval, now)  # a long stall counts once, not as a run of late wakes

    def lines(self) -> list[str]:
        """Prometheus text lines."""
        if self._task is not None and threading.get_ident() == self._thread:  # scraped on the loop: read it now
            self.cpu_seconds = time.thread_time() - self._cpu0
        return [("# HELP csm_event_loop_lag_milliseconds how late the event loop ran a callback that was due "
                 f"(sampled every {self.interval:g} s)"),
                "# TYPE csm_event_loop_lag_milliseconds histogram",
                *self.lag_ms.lines("csm_event_loop_lag_milliseconds"),
                f"# HELP csm_event_loop_lag_max_milliseconds the largest lag of the last {self._window:g} s",
                "# TYPE csm_event_loop_lag_max_milliseconds gauge",
                f"csm_event_loop_lag_max_milliseconds {self.max_recent_ms():.2f}",
                "# HELP csm_event_loop_cpu_seconds_total CPU time of the event loop's thread (all network work)",
                "# TYPE csm_event_loop_cpu_seconds_total counter",
                f"csm_event_loop_cpu_seconds_total {self.cpu_seconds:.3f}"]
