"""How much a busy Python thread slows the engine's thread, by GIL switch interval.

    python bench/gil_convoy.py [--switch-ms 5,1,0.5] [--duty 0.3,0.6,0.9,1] [--frames 40]

In the server the event loop and the engine's thread share one GIL. The engine gives it up around
every torch call (and numba kernel) and must take it back after; while the loop runs Python it
gets it back only when the loop waits for I/O or, failing that, after the switch interval
(`sys.setswitchinterval`, 5 ms by default), once per call. This measures that in one process:
the embedded tiny model streams a sentence in this thread (its real-time factor, RTF) alone, then
beside a thread that runs Python for a share `duty` of every 10 ms and sleeps the rest (1: never
sleeps, a loop past saturation). Also: how long the engine keeps the GIL at a time, as a thread
that sleeps 1 ms at a time beside it oversleeps (and the same with nothing running: the OS's
part). `--json FILE` writes the rows. Figures hold for one machine: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import threading
import time

from csmstream.benchtool import write_rows

TEXT = "Hello there, this is a test of the engine beside a busy thread."
PERIOD_S = 0.01


@contextlib.contextmanager
def beside(step):
    """While the block runs, `step()` runs again and again on a thread of its own."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            step()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def busy(duty: float) -> None:
    """One PERIOD_S: Python work for `duty` of it, asleep (the GIL free) for the rest."""
    d, t0 = {"a": list(range(50))}, time.perf_counter()
    while time.perf_counter() - t0 < duty * PERIOD_S:
        json.dumps(d)
    if duty < 1:
        time.sleep(PERIOD_S * (1 - duty))


def rtf(eng, frames: int) -> float:
    t, n = time.perf_counter(), 0
    for pcm in eng.stream(TEXT, seed=3, max_frames=frames):
        n += len(pcm)
    return (time.perf_counter() - t) / (n / eng.sample_rate)


def oversleep(work) -> tuple[float, float]:
    """(p99, max) ms that a thread sleeping 1 ms at a time overslept while this thread did `work()`:
    with the engine streaming, how long its thread kept the GIL at a time plus the OS's own wake-up
    (which `work` = a sleep measures alone)."""
    late = []

    def nap() -> None:
        t = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - t - 0.001)

    with beside(nap):
        work()
    late.sort()
    return 1000 * late[int(0.99 * (len(late) - 1))], 1000 * late[-1]


def measure(switches_ms: list[float], duties: list[float], frames: int = 40, progress=print) -> list[dict]:
    import csmstream

    if not switches_ms or not all(0.01 <= s <= 100 for s in switches_ms):  # (nan fails this too)
        raise ValueError(f"switch interval(s) must be milliseconds in 0.01..100, got {switches_ms}")
    if not duties or not all(0 < d <= 1 for d in duties):
        raise ValueError(f"duty must be shares in (0, 1], got {duties}")
    if not 2 <= frames <= 1000:
        raise ValueError(f"frames must be 2..1000, got {frames}")
    eng = csmstream.load("tiny", device="cpu")
    rtf(eng, 4)  # warm: numba compiles, torch allocates
    before = sys.getswitchinterval()
    rows = []
    try:
        for s in switches_ms:
            sys.setswitchinterval(s / 1000)
            row = {"switch_ms": s, "frames": frames, "alone": round(rtf(eng, frames), 4)}
            t = time.perf_counter()
            busy_late = oversleep(lambda: rtf(eng, frames))
            idle_late = oversleep(functools.partial(time.sleep, time.perf_counter() - t))
            row.update(oversleep_p99_ms=round(busy_late[0], 2), oversleep_max_ms=round(busy_late[1], 2),
                       idle_oversleep_p99_ms=round(idle_late[0], 2), idle_oversleep_max_ms=round(idle_late[1], 2))
            for duty in duties:
                with beside(functools.partial(busy, duty)):
                    row[f"duty_{duty:g}"] = round(rtf(eng, frames), 4)
            rows.append(row)
            progress(f"switch interval {s:g} ms: RTF alone {row['alone']:.3f} (a 1 ms sleep beside it overslept "
                     f"p99 {row['oversleep_p99_ms']:.2f}, max {row['oversleep_max_ms']:.2f} ms; with nothing running "
                     f"{row['idle_oversleep_p99_ms']:.2f}, {row['idle_oversleep_max_ms']:.2f}); beside a thread busy "
                     + ", ".join(f"{100 * d:.0f}% {row[f'duty_{d:g}']:.3f}" for d in duties))
    finally:
        sys.setswitchinterval(before)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--switch-ms", default="5,1,0.5", help="GIL switch intervals to measure, ms (default 5,1,0.5)")
    ap.add_argument("--duty", default="0.3,0.6,0.9,1",
                    help="the busy thread's shares of each 10 ms spent running Python (default 0.3,0.6,0.9,1)")
    ap.add_argument("--frames", type=int, default=40, help="80 ms frames a measured sentence (default 40)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        switches = [float(x) for x in args.switch_ms.split(",")]
        duties = [float(x) for x in args.duty.split(",")]
    except ValueError:
        ap.error(f"--switch-ms and --duty take comma-separated numbers, got {args.switch_ms!r} and {args.duty!r}")
    try:
        rows = measure(switches, duties, args.frames)
    except ValueError as e:
        ap.error(str(e))
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
