"""Embedded use, tiny, CPU: STREAMS concurrent callers each speaking one sentence, through
Engine.stream() from threads (each call steps alone, under the engine's lock) against a
csmstream.Streamer (one batched step a tick for all of them), side by side in one run.

    .venv/bin/python -m pytest bench/test_streamer.py --benchmark-only -s

The benchmark time is the wall time until every caller has all its audio. Nothing asserts a time.
"""

import threading

import pytest

STREAMS, FRAMES = 4, 25
TEXT = "Hello there, how are you today?"


@pytest.fixture(scope="module")
def engine():
    import csmstream

    eng = csmstream.load("tiny", device="cpu", max_streams=STREAMS)
    for _ in eng.stream(TEXT, max_frames=3):  # build the streaming decoder, touch every path once
        pass
    return eng


def _callers(speak) -> list[int]:
    """STREAMS threads, each draining speak(i); returns each one's frame count."""
    frames = [0] * STREAMS

    def run(i):
        frames[i] = sum(1 for _ in speak(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return frames


@pytest.mark.parametrize("how", ["engine_stream_threads", "streamer"])
def test_concurrent_callers(benchmark, engine, how):
    import csmstream

    benchmark.group = f"embedded-{STREAMS}-callers"
    with csmstream.Streamer(engine) as tts:
        source = tts.stream if how == "streamer" else engine.stream
        frames = benchmark.pedantic(lambda: _callers(lambda i: source(TEXT, seed=i, max_frames=FRAMES)),
                                    rounds=3, warmup_rounds=1)
        ticks = tts.stats.ticks
    benchmark.extra_info["frames"] = sum(frames)
    if how == "streamer":
        benchmark.extra_info["frames_per_step"] = round(tts.stats.frames / max(1, ticks), 2)
    if benchmark.stats is not None:  # (None under --benchmark-disable: each round ran once, untimed)
        print(f"\n{how}: {sum(frames)} frames, {benchmark.stats.stats.median * 1000:.0f} ms median")
