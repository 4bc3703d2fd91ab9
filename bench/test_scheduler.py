"""A burst of callers on tiny, CPU: the chunked-prefill budget against one prefill chunk a tick (the
scheduler before it), side by side in one run.

    .venv/bin/python -m pytest bench/test_scheduler.py --benchmark-only -s

Every request is sent at once; per setting: time to first 100 ms of audio (median, max) and late
writes (a write is late if its first sample should already be playing, playback starting at each
stream's first 100 ms). The benchmark time is the whole burst's wall time. Nothing asserts a time.
"""

import pytest

from bench.gpu_measure import live

STREAMS, SECONDS = 16, 2.0
SETTINGS = {"budget": None, "one_chunk_a_tick": 0.0}


@pytest.fixture(scope="module")
def engine():
    import csmstream

    eng = csmstream.load("tiny", device="cpu", max_streams=STREAMS)
    eng.decoder  # noqa: B018 - build the streaming decoder before timing
    live(eng, 2, 0.3)  # compile and touch every path once
    return eng


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_burst(benchmark, engine, setting):
    benchmark.group = f"burst-{STREAMS}"
    out = {}

    def run():
        out.update(live(engine, STREAMS, SECONDS, SETTINGS[setting]))

    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    for k in ("ttfa_median_ms", "ttfa_max_ms", "late_writes", "worst_lateness_ms", "mean_tick_ms"):
        benchmark.extra_info[k] = out[k]
    print(f"\n{setting}: TTFA median {out['ttfa_median_ms']:.0f} ms, max {out['ttfa_max_ms']:.0f} ms, "
          f"{out['late_writes']} late writes, mean tick {out['mean_tick_ms']:.1f} ms")
