"""The event-loop watch: lag when the loop is blocked, the loop thread's CPU, on /metrics."""

import asyncio
import logging
import re
import time
import urllib.request

import pytest

from csmstream.transport.loopwatch import LoopWatch
from csmstream.transport.metrics import parse


def test_a_blocked_loop_is_one_late_wake_of_about_the_block_and_is_logged_once(caplog):
    caplog.set_level(logging.WARNING, "csmstream.loop")

    async def go():
        w = LoopWatch(interval=0.01, warn_ms=100, warn_every=60).start()
        await asyncio.sleep(0.1)  # idle: on-time wakes
        quiet = w.lag_ms.n
        time.sleep(0.2)  # the loop cannot run anything for 200 ms
        await asyncio.sleep(0.1)
        time.sleep(0.15)  # a second block inside warn_every: counted, not logged again
        await asyncio.sleep(0.05)
        await w.stop()
        return w, quiet

    w, quiet = asyncio.run(go())
    assert quiet >= 5  # it did sample while idle
    p = parse("\n".join(w.lines()))
    assert p['csm_event_loop_lag_milliseconds_bucket{le="+Inf"}'] == w.lag_ms.n
    late = w.lag_ms.n - p['csm_event_loop_lag_milliseconds_bucket{le="100"}']
    assert late == 2  # each block is one late wake (not 25 of them), both over 100 ms
    assert w.lag_ms.n - p['csm_event_loop_lag_milliseconds_bucket{le="1000"}'] == 0  # and not much more
    assert 195 <= w.max_recent_ms() <= 400
    assert 195 <= p["csm_event_loop_lag_max_milliseconds"] <= 400
    warnings = [r for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert len(warnings) == 1
    assert 195 <= int(re.search(r"blocked for (\d+) ms", warnings[0].getMessage()).group(1)) <= 400


def test_cpu_counts_the_loop_threads_work_not_its_idle_time_nor_other_threads():
    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def go():
        w = LoopWatch(interval=0.01).start()
        await asyncio.sleep(0.3)  # idle
        idle = w.cpu_seconds
        await asyncio.to_thread(spin, 0.3)  # CPU on another thread only
        other = w.cpu_seconds
        spin(0.3)  # CPU on the loop's thread
        await asyncio.sleep(0.05)
        busy = w.cpu_seconds
        await w.stop()
        return idle, other, busy

    idle, other, busy = asyncio.run(go())
    assert idle < 0.1
    assert other - idle < 0.1
    assert 0.28 <= busy - other <= 0.45


def test_the_lag_window_forgets_old_stalls():
    w = LoopWatch(window_s=10)
    w.record(300.0, now=100.0)
    w.record(2.0, now=105.0)
    w._trim(109.0)
    assert max(lag for _, lag in w._recent) == 300.0
    w._trim(111.0)
    assert [lag for _, lag in w._recent] == [2.0]
    assert w.lag_ms.n == 2  # the histogram keeps everything


@pytest.mark.parametrize("interval", [0, -1, float("nan")])
def test_a_bad_interval_is_refused(interval):
    with pytest.raises(ValueError, match="interval must be > 0"):
        LoopWatch(interval=interval)


def test_metrics_page_has_the_loop_and_process_cpu():
    import csmstream
    from tests.servers import RunningServer

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1)).start()
    try:
        url = rs.url.replace("ws://", "http://").replace("/ws/generate", "/metrics")
        first = parse(urllib.request.urlopen(url, timeout=10).read().decode())
        time.sleep(0.3)
        second = parse(urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        rs.stop()
    for p in (first, second):
        assert p['csm_event_loop_lag_milliseconds_bucket{le="+Inf"}'] == p["csm_event_loop_lag_milliseconds_count"]
        assert p["csm_event_loop_cpu_seconds_total"] <= p["process_cpu_seconds_total"]
    assert second["csm_event_loop_lag_milliseconds_count"] > first["csm_event_loop_lag_milliseconds_count"]
    assert second["process_cpu_seconds_total"] >= first["process_cpu_seconds_total"] > 0


@pytest.mark.parametrize("wakes", ["before_ready", "after_ready"])
def test_a_block_during_start_up_is_noted_at_info_and_one_after_is_warned_of(caplog, wakes):
    """The model's load blocked the loop for ~100 ms at every start and was logged as a WARNING that
    every stream's audio waited, when no stream was served yet. So was the codecs' warm-up (numba
    compiling on a worker thread, holding the GIL), whose stall the loop woke from, and measured,
    just after the server had become ready: what counts is when the stall was."""
    caplog.set_level(logging.INFO, "csmstream.loop")

    async def go():
        w = LoopWatch(interval=0.01, warn_ms=50, warn_every=0)
        w.starting = True
        w.start()
        await asyncio.sleep(0.05)
        time.sleep(0.12)  # the model loading, or the warm-up starving the loop
        if wakes == "before_ready":
            await asyncio.sleep(0.05)
        w.starting = False  # ready
        await asyncio.sleep(0.05 if wakes == "after_ready" else 0)
        time.sleep(0.12)  # a stream-delaying block
        await asyncio.sleep(0.05)
        await w.stop()

    asyncio.run(go())
    blocked = [(r.levelno, r.getMessage()) for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert [level for level, _ in blocked] == [logging.INFO, logging.WARNING], blocked
    assert "during start-up" in blocked[0][1] and "every stream's audio waited" in blocked[1][1]
