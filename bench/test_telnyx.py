"""Telnyx path figures (tiny, CPU): encoding cost, first media and barge-in latency.

    .venv/bin/python -m pytest bench/test_telnyx.py --benchmark-only -s

- encoding 1 s of 24 kHz audio into Telnyx media messages (resample to the codec's rate, encode:
  PCMU, G722, L16 at 16 and 24 kHz; base64, JSON), fed in 20 ms pieces as the server sends them:
  target < 1 ms on one core;
- first media at a simulated Telnyx vs the engine's own time to first audio, side by side;
- time from interrupt() to the `clear` arriving at the simulator;
- 50 full-duplex calls on a server process: its event loop's CPU per call (bench/telnyx_capacity.py).
"""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from csmstream.integrations.telnyx_session import TelnyxMediaSession


@pytest.mark.parametrize("codec,rate", [("PCMU", None), ("G722", None), ("L16", 16000), ("L16", 24000)])
def test_encode_one_second(benchmark, codec, rate):
    pcm = (np.random.default_rng(0).normal(size=24000) * 4000).astype(np.int16)
    pieces = [pcm[i : i + 480] for i in range(0, 24000, 480)]
    s = TelnyxMediaSession(codec, rate)
    s.receive('{"event": "start", "start": {"call_control_id": "c"}}')

    def encode():
        s.current = None
        s.start_utterance()
        n = 0
        for p in pieces:
            n += len(s.audio(p))
        return n

    assert encode() == 50
    benchmark.group = "telnyx-encode"
    benchmark.extra_info["audio_seconds"] = 1.0
    benchmark(encode)


@pytest.mark.benchmark(group="telnyx-feed-event-loop-cpu", timer=time.thread_time)
@pytest.mark.parametrize("where", ["loop", "codec-thread"])
@pytest.mark.parametrize("codec,rate", [("PCMU", None), ("G722", None), ("L16", 16000)])
def test_feed_event_loop_cpu_16_calls(benchmark, codec, rate, where):
    """The event loop's own CPU time for one engine frame (80 ms) of 16 calls speaking at once
    (TelnyxCall._media: resample, encode, frame): the codec's work on the loop, or on the codec
    threads in one batch (encode_off_loop)."""
    from csmstream.integrations.telnyx_bridge import TelnyxCall

    loop = asyncio.new_event_loop()
    calls = [TelnyxCall(SimpleNamespace(send=None), codec=codec, sampling_rate=rate) for _ in range(16)]
    frame = (np.random.default_rng(0).normal(size=1920) * 4000).astype(np.int16)
    for c in calls:
        c.encode_off_loop = where == "codec-thread"
        c.session.start_utterance()

    async def tick():
        return sum(m.ms for msgs in await asyncio.gather(*(c._media(frame) for c in calls)) for m in msgs)

    assert loop.run_until_complete(tick()) == 16 * 80.0  # every call's 80 ms out as media
    benchmark(lambda: loop.run_until_complete(tick()))
    loop.close()


@pytest.fixture(scope="module")
def running():
    import csmstream
    from tests.servers import RunningServer

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=4)).start()
    yield rs, csmstream.load("tiny", device="cpu", max_streams=1)
    rs.stop()


def test_first_media_and_clear_latency(benchmark, running):
    from websockets.asyncio.server import serve

    from csmstream.integrations.telnyx_bridge import CallRegistry, handle_telnyx_media
    from csmstream.integrations.telnyx_service import TelnyxService
    from tests.integrations.telnyx_sim import TelnyxSimulator

    rs, ref = running
    text = "Hello, and thanks for calling. How can I help you today? " * 3

    async def one(seed):
        registry = CallRegistry()

        async def handler(ws):
            await handle_telnyx_media(ws, registry)

        async with serve(handler, "127.0.0.1", 0) as srv:
            url = f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/telnyx"
            svc = TelnyxService(registry, sesame_url=rs.url)
            async with TelnyxSimulator(url, send_caller_audio=False) as sim:
                await registry.wait_for("v2:call-1")
                t0 = time.monotonic()
                cfg = {"tts_provider": "sesame", "sesame_settings": {"seed": seed}}
                task = asyncio.create_task(svc.speak_text("v2:call-1", text, cfg))
                await sim.media_event.wait()
                first = sim.media_times()[0] - t0
                await asyncio.sleep(0.3)
                t1 = time.monotonic()
                await svc.interrupt("v2:call-1")
                while not sim.cleared_at:
                    await asyncio.sleep(0.0005)
                clear = sim.cleared_at[0] - t1
                await task
                return first, clear

    def engine_first(seed):
        t = time.perf_counter()
        it = ref.stream(text, 0, seed=seed)
        next(it)
        it.close()
        return time.perf_counter() - t

    firsts, clears, engine = [], [], []
    for i in range(8):
        f, c = asyncio.run(one(i))
        firsts.append(f)
        clears.append(c)
        engine.append(engine_first(i))
    f, c, e = (1000 * float(np.median(x[2:])) for x in (firsts, clears, engine))
    benchmark.extra_info.update(first_media_ms=f, engine_first_audio_ms=e, clear_ms=c)
    print(f"\nfirst media at Telnyx {f:.1f} ms vs engine's first audio {e:.1f} ms (+{f - e:.1f} ms); "
          f"interrupt -> clear at Telnyx {c:.2f} ms")
    benchmark.pedantic(lambda: asyncio.run(one(0)), rounds=2)  # a call: speak, interrupt, clear


def test_calls_per_event_loop(benchmark):
    """50 full-duplex calls (PCMU) on a server in its own process: its loop's CPU per call, from
    its /metrics (bench/telnyx_capacity.py; run that for more calls, other codecs, compression)."""
    from bench.telnyx_capacity import measure, row_text

    rows = []

    def run():
        rows[:] = measure([50], seconds=10.0, progress=lambda line: None)  # the lag gauge spans 10 s

    benchmark.group = "telnyx-capacity"
    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(rows[0])
    print("\n" + row_text(rows[0]))
