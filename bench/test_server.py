"""Server latency and throughput on tiny, CPU, measured side by side with the engine in one run.

    .venv/bin/python -m pytest bench/test_server.py --benchmark-only -s

- time to first audio over the socket vs the engine's own (same text, same seed, alternately);
- time to first audio over the OpenAI-compatible HTTP endpoint vs the socket (alternately);
- a kept connection's turns with continue_previous (4 earlier sentences heard) vs without;
- 8 concurrent streams: each stream's real-time factor (wall time / audio time);
- the SPSC ring: one write + one read of a 2,400-sample chunk;
- the event loop's CPU a second of audio of 4 streams at speed 1.25 against speed 1 (and against
  how a stream at a speed reached its codec thread before);
- one outgoing WebSocket frame (a 100 ms PCM chunk of /ws/generate, a Telnyx media message) with
  and without permessage-deflate, as websockets builds it on the event loop (the server's default
  is off since 2026-11-25; `serve --ws-compression deflate` turns it on).
Figures go to extra_info and stdout; nothing here asserts a time.
"""

import asyncio
import json
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect

TEXT = "Hello, this is a latency check for the streaming server."


@pytest.fixture(scope="module")
def running():
    import csmstream
    from tests.servers import RunningServer

    eng = csmstream.load("tiny", device="cpu", max_streams=8)
    rs = RunningServer(eng, http_port=0).start()
    ref = csmstream.load("tiny", device="cpu", max_streams=1)
    yield rs, ref
    rs.stop()


async def socket_ttfa(url, chunk_ms, seed):
    async with connect(url) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"text": TEXT, "seed": seed, "chunk_ms": chunk_ms, "max_audio_ms": 800}))
        first = None
        while True:
            m = await ws.recv()
            if isinstance(m, bytes) and first is None:
                first = time.perf_counter() - t0
            elif isinstance(m, str):
                return first


def engine_ttfa(eng, frames_needed, seed):
    t0 = time.perf_counter()
    it = eng.stream(TEXT, 0, seed=seed, max_frames=10)
    for _ in range(frames_needed):
        next(it)
    t = time.perf_counter() - t0
    it.close()
    return t


def test_ttfa_socket_vs_engine(benchmark, running):
    rs, ref = running
    rows = {}
    for chunk_ms, frames in ((80, 1), (100, 2)):
        s, e = [], []
        for i in range(12):
            s.append(asyncio.run(socket_ttfa(rs.url, chunk_ms, i)))
            e.append(engine_ttfa(ref, frames, i))
        s_ms, e_ms = 1000 * float(np.median(s[2:])), 1000 * float(np.median(e[2:]))
        rows[chunk_ms] = (s_ms, e_ms)
        benchmark.extra_info[f"socket_ttfa_ms_chunk{chunk_ms}"] = s_ms
        benchmark.extra_info[f"engine_ttfa_ms_{frames}frames"] = e_ms
        print(f"\nchunk_ms={chunk_ms}: socket TTFA {s_ms:.1f} ms, engine time to {frames} frame(s) {e_ms:.1f} ms, "
              f"overhead {s_ms - e_ms:+.1f} ms")
    benchmark.pedantic(lambda: asyncio.run(socket_ttfa(rs.url, 100, 0)), rounds=5)  # socket TTFA


def http_ttfa(client, url, seed):
    """POST /v1/audio/speech on a kept-alive connection: seconds to the first audio bytes."""
    body = {"input": TEXT, "seed": seed, "response_format": "pcm", "max_audio_ms": 800}
    t0 = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        it = r.iter_raw()
        next(it)
        first = time.perf_counter() - t0
        for _ in it:
            pass
    return first


def test_ttfa_http_vs_socket(benchmark, running):
    """The OpenAI-compatible HTTP endpoint against /ws/generate, alternately, same requests."""
    import httpx

    rs, _ = running
    h, s = [], []
    with httpx.Client(timeout=60) as client:
        for i in range(12):
            h.append(http_ttfa(client, rs.srv.speech_url, i))
            s.append(asyncio.run(socket_ttfa(rs.url, 100, i)))
        h_ms, s_ms = 1000 * float(np.median(h[2:])), 1000 * float(np.median(s[2:]))
        benchmark.extra_info.update(http_ttfa_ms=h_ms, socket_ttfa_ms=s_ms)
        print(f"\nTTFA (100 ms chunks): HTTP {h_ms:.1f} ms, WebSocket {s_ms:.1f} ms, difference {h_ms - s_ms:+.1f} ms")
        benchmark.pedantic(lambda: http_ttfa(client, rs.srv.speech_url, 0), rounds=5)  # HTTP TTFA


async def elevenlabs_ttfas(url, n):
    """One multi-stream-input connection kept open (as pipecat keeps it), a new context per turn:
    seconds from the turn's text to its first audio, per turn."""
    out = []
    async with connect(url) as ws:
        for i in range(n):
            cid = f"turn{i}"
            t0 = time.perf_counter()
            await ws.send(json.dumps({"text": TEXT + " ", "context_id": cid, "flush": True}))
            await ws.send(json.dumps({"context_id": cid, "close_context": True}))
            first = None
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("audio") and first is None:
                    first = time.perf_counter() - t0
                if msg.get("isFinal"):
                    break
            out.append(first)
    return out


def test_ttfa_elevenlabs_multi_vs_socket(benchmark, running):
    """ElevenLabs' multi-context socket against /ws/generate (100 ms chunks both), alternately."""
    rs, _ = running
    url = rs.url.replace("/ws/generate", "/v1/text-to-speech/0/multi-stream-input?seed=1")
    e, s = [], []
    for _ in range(12):
        e += asyncio.run(elevenlabs_ttfas(url, 1))
        s.append(asyncio.run(socket_ttfa(rs.url, 100, 1)))
    kept = asyncio.run(elevenlabs_ttfas(url, 12))  # turns on one kept connection
    e_ms, s_ms, k_ms = (1000 * float(np.median(x[2:])) for x in (e, s, kept))
    benchmark.extra_info.update(elevenlabs_ttfa_ms=e_ms, elevenlabs_kept_ttfa_ms=k_ms, socket_ttfa_ms=s_ms)
    print(f"\nTTFA (100 ms chunks): ElevenLabs multi-context {e_ms:.1f} ms (new connection), {k_ms:.1f} ms "
          f"(next turn on a kept connection), /ws/generate {s_ms:.1f} ms")
    benchmark.pedantic(lambda: asyncio.run(elevenlabs_ttfas(url, 1)), rounds=5)  # ElevenLabs TTFA


def test_eight_concurrent_streams_rtf(benchmark, running):
    rs, _ = running

    async def one(i):
        async with connect(rs.url) as ws:
            t0 = time.perf_counter()
            await ws.send(json.dumps({"text": TEXT, "seed": i}))
            n = 0
            while True:
                m = await ws.recv()
                if isinstance(m, bytes):
                    n += len(m)
                else:
                    return (time.perf_counter() - t0) / (n / 2 / 24000)

    async def all8():
        return await asyncio.gather(*(one(i) for i in range(8)))

    asyncio.run(all8())  # warm
    rtfs = asyncio.run(all8())
    benchmark.extra_info.update(max_rtf=max(rtfs), mean_rtf=float(np.mean(rtfs)))
    print(f"\n8 concurrent streams: real-time factor per stream max {max(rtfs):.3f}, mean {np.mean(rtfs):.3f} "
          f"(< 1 is faster than real time)")
    benchmark.pedantic(lambda: asyncio.run(all8()), rounds=1)  # 8 concurrent streams end to end


def test_ring_chunk_write_read(benchmark):
    from csmstream.transport.ring import PcmRing

    ring = PcmRing(24000 * 10)
    chunk = np.arange(2400, dtype=np.int16)
    out = np.empty(2400, np.int16)

    def cycle():
        ring.write(chunk)
        ring.read(2400, out)

    benchmark.group = "ring"
    benchmark(cycle)


def test_text_stream_first_sentence_to_first_audio(benchmark, running):
    """Streamed text: time from the piece that completes the first sentence to the first audio,
    against the engine's own time to first audio for that sentence (100 ms chunk = 2 frames)."""
    rs, ref = running
    first, rest = "Sure, I can help with that.", " Your order shipped on Monday. It arrives Friday."

    async def one(seed):
        async with connect(rs.url) as ws:
            await ws.send(json.dumps({"text": first, "final": False, "seed": seed}))
            await asyncio.sleep(0.05)  # the LLM is still thinking
            t0 = time.perf_counter()
            await ws.send(json.dumps({"text": rest[:3]}))  # the character that confirms the sentence end
            t_first = None
            await ws.send(json.dumps({"text": rest[3:], "final": True}))
            while True:
                m = await ws.recv()
                if isinstance(m, bytes) and t_first is None:
                    t_first = time.perf_counter() - t0
                elif isinstance(m, str):
                    return t_first

    s, e = [], []
    for i in range(10):
        s.append(asyncio.run(one(i)))
        t = time.perf_counter()
        it = ref.stream(first, 0, seed=i, max_frames=10)
        next(it), next(it)
        e.append(time.perf_counter() - t)
        it.close()
    s_ms, e_ms = 1000 * float(np.median(s[2:])), 1000 * float(np.median(e[2:]))
    benchmark.extra_info.update(stream_first_audio_ms=s_ms, engine_two_frames_ms=e_ms)
    print(f"\ntext stream: first sentence complete -> first audio {s_ms:.1f} ms; engine time to 2 frames "
          f"{e_ms:.1f} ms ({s_ms - e_ms:+.1f} ms)")
    benchmark.pedantic(lambda: asyncio.run(one(0)), rounds=3)  # streamed text to first audio


async def turn_ttfa(ws, seed: int, **fields) -> tuple[float, dict]:
    """One turn (TEXT with the request's other `fields`; for continue_previous whole: no
    max_audio_ms, whose cut sentence would be no context) on a kept connection: (seconds to its
    first audio, its done)."""
    t0 = time.perf_counter()
    await ws.send(json.dumps({"text": TEXT, "seed": seed, **fields}))
    first = None
    while True:
        m = await ws.recv()
        if isinstance(m, bytes):
            first = first or time.perf_counter() - t0
        else:
            done = json.loads(m)
            assert done.get("done"), done
            return first, done


def test_ttfa_continue_previous_vs_fresh_turns(benchmark, running):
    """A voice agent's turns on a kept /ws/generate connection, with continue_previous (each turn's
    first sentence hears the last 4: a longer prompt) against without, on two connections used in
    turn: what keeping the voice costs in time to first audio."""
    rs, _ = running

    async def side_by_side(n):
        cont, fresh = [], []
        async with connect(rs.url) as a, connect(rs.url) as b:
            for i in range(n):
                t, done = await turn_ttfa(a, i, continue_previous=True)
                assert done["continued"] == min(i, 4)  # (it heard what it claims to)
                cont.append(t)
                fresh.append((await turn_ttfa(b, i))[0])
        return cont, fresh

    async def pair():  # a new connection: a turn, then one that continues it
        async with connect(rs.url) as ws:
            await turn_ttfa(ws, 0)
            await turn_ttfa(ws, 1, continue_previous=True)

    cont, fresh = asyncio.run(side_by_side(14))
    c_ms, f_ms = 1000 * float(np.median(cont[6:])), 1000 * float(np.median(fresh[6:]))  # (4 heard from turn 4 on)
    benchmark.extra_info.update(continue_ttfa_ms=c_ms, fresh_ttfa_ms=f_ms)
    print(f"\nTTFA of a turn on a kept connection: continue_previous (4 sentences heard) {c_ms:.1f} ms, "
          f"fresh {f_ms:.1f} ms ({c_ms - f_ms:+.1f} ms)")
    benchmark.pedantic(lambda: asyncio.run(pair()), rounds=3)  # a turn, then one that continues it


def test_ttfa_with_the_callers_turn_as_context_vs_without(benchmark, running):
    """A reply that hears the caller's last words ("context": 2 s of 8 kHz mu-law, as a phone call
    carries them) against the same reply without, alternating on one connection: what decoding,
    resampling and encoding the turn (transport/context.py) and the longer prompt cost in time to
    first audio."""
    from bench.gpu_measure import caller_turn

    rs, _ = running
    turn = [caller_turn()]

    async def ttfa(ws, seed, **context):
        return (await turn_ttfa(ws, seed, max_audio_ms=400, **context))[0]

    async def side_by_side(n):
        with_ctx, without = [], []
        async with connect(rs.url) as ws:
            for i in range(n):
                with_ctx.append(await ttfa(ws, i, context=turn))
                without.append(await ttfa(ws, i))
        return with_ctx, without

    async def one():
        async with connect(rs.url) as ws:
            await ttfa(ws, 0, context=turn)

    w, wo = asyncio.run(side_by_side(12))
    w_ms, wo_ms = 1000 * float(np.median(w[2:])), 1000 * float(np.median(wo[2:]))
    benchmark.extra_info.update(context_ttfa_ms=w_ms, plain_ttfa_ms=wo_ms)
    print(f"\nTTFA with the caller's 2 s turn as context {w_ms:.1f} ms, without {wo_ms:.1f} ms "
          f"({w_ms - wo_ms:+.1f} ms)")
    benchmark.pedantic(lambda: asyncio.run(one()), rounds=3)


def test_ttfa_at_a_speed_vs_speed_1(benchmark, running):
    """Requests at speed 1.25 and 1.5 (kernels/stretch.py) against speed 1, alternating on one
    connection: what the stretcher's look-ahead costs in time to first audio (at 1.25 a first 100 ms
    chunk still needs two engine frames, at 1.5 three)."""
    rs, _ = running

    async def ttfa(ws, seed, speed):
        return (await turn_ttfa(ws, seed, max_audio_ms=400, **({} if speed == 1 else {"speed": speed})))[0]

    async def side_by_side(n):
        got = {1: [], 1.25: [], 1.5: []}
        async with connect(rs.url) as ws:
            for i in range(n):
                for speed in got:
                    got[speed].append(await ttfa(ws, i, speed))
        return got

    async def one():
        async with connect(rs.url) as ws:
            await ttfa(ws, 0, 1.25)

    ms = {k: 1000 * float(np.median(v[2:])) for k, v in asyncio.run(side_by_side(12)).items()}
    benchmark.extra_info.update({f"ttfa_ms_speed_{k}": v for k, v in ms.items()})
    print("\nTTFA by speed: " + ", ".join(f"{k}: {v:.1f} ms" for k, v in ms.items()))
    benchmark.pedantic(lambda: asyncio.run(one()), rounds=3)


def test_loop_cpu_of_streams_at_a_speed_vs_speed_1(benchmark, running, monkeypatch):
    """The event loop's CPU (its thread's, from /metrics) a second of audio sent, 4 streams at once,
    alternately: at speed 1; at 1.25; at 1.25 read in 40 ms pieces throughout; and at 1.25 in 40 ms
    pieces each sent to a codec thread by its own run_in_executor (as before 2026-12-07's third
    sitting: transport/codec_threads.py now batches a loop iteration's hand-offs)."""
    import re
    import urllib.request

    from csmstream.transport.codec_threads import pool
    from csmstream.transport.encoder import SpeedEncoder

    rs, _ = running
    metrics = rs.url.replace("ws://", "http://").replace("/ws/generate", "/metrics")
    growing, batched = SpeedEncoder.chunk_in, SpeedEncoder.feed_async

    async def own_executor_call(self, pcm):
        return await asyncio.get_running_loop().run_in_executor(pool(), self.feed, pcm)

    def loop_cpu() -> float:
        text = urllib.request.urlopen(metrics, timeout=10).read().decode()
        return float(re.search(r"^csm_event_loop_cpu_seconds_total (\S+)", text, re.M).group(1))

    async def four(speed):
        async def one(seed):
            n = 0
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": TEXT + " " + TEXT, "seed": seed, "max_audio_ms": 4000,
                                          **({} if speed == 1 else {"speed": speed})}))
                async for m in ws:
                    if isinstance(m, str):
                        return n
                    n += len(m)
        return sum(await asyncio.gather(*(one(i) for i in range(4))))

    def ms_per_audio_s(speed, pieces_40ms=False, executor=False):
        monkeypatch.setattr(SpeedEncoder, "chunk_in", property(lambda e: e._first_piece) if pieces_40ms else growing)
        monkeypatch.setattr(SpeedEncoder, "feed_async", own_executor_call if executor else batched)
        c0 = loop_cpu()
        nbytes = asyncio.run(four(speed))
        return 1000 * (loop_cpu() - c0) / (nbytes / 48000)

    ways = {"speed 1": dict(speed=1), "speed 1.25": dict(speed=1.25),
            "1.25, 40 ms pieces": dict(speed=1.25, pieces_40ms=True),
            "1.25, 40 ms pieces, an executor call each": dict(speed=1.25, pieces_40ms=True, executor=True)}
    got = {k: [] for k in ways}
    for _ in range(6):
        for k, kw in ways.items():
            got[k].append(ms_per_audio_s(**kw))
    med = {k: float(np.median(v)) for k, v in got.items()}
    benchmark.extra_info.update({f"loop_cpu_ms_per_audio_s ({k})": v for k, v in med.items()})
    print("\nloop CPU a second of audio: " + ", ".join(f"{k}: {v:.2f} ms" for k, v in med.items()))
    benchmark.pedantic(lambda: ms_per_audio_s(1.25), rounds=1)


@pytest.mark.parametrize("what", ["pcm_chunk", "telnyx_media"])
@pytest.mark.parametrize("compression", ["off", "deflate"])
def test_websocket_frame_on_the_loop(benchmark, running, what, compression):
    """CPU on the event loop to turn one outgoing message into its WebSocket frame, with the
    extension websockets' server negotiates for a client that offers permessage-deflate."""
    import base64

    from websockets.extensions.permessage_deflate import PerMessageDeflate
    from websockets.frames import Frame, Opcode

    from csmstream.kernels.g711 import ulaw_encode
    from csmstream.kernels.resample import Resampler

    _, ref = running
    pcm = np.concatenate(list(ref.stream(TEXT, 0, seed=1, max_frames=20)))  # what the server sends here
    if what == "pcm_chunk":
        frames = [Frame(Opcode.BINARY, pcm[i : i + 2400].astype("<i2").tobytes())
                  for i in range(0, len(pcm) - 2400, 2400)]
    else:
        coded = ulaw_encode(Resampler(24000, 8000).process(pcm)).tobytes()
        frames = [Frame(Opcode.TEXT, json.dumps({"event": "media", "media": {
                            "payload": base64.b64encode(coded[i : i + 160]).decode()}}).encode())
                  for i in range(0, len(coded) - 160, 160)]
    ext = [PerMessageDeflate(False, False, 12, 12, {"memLevel": 5})] if compression == "deflate" else []
    sizes = [len(f.serialize(mask=False, extensions=ext)) for f in frames]
    it = iter(range(1 << 62))

    def one():
        return frames[next(it) % len(frames)].serialize(mask=False, extensions=ext)

    benchmark.group = f"ws-frame-{what}"
    benchmark.extra_info.update(bytes_in=int(np.mean([len(f.data) for f in frames])), bytes_out=float(np.mean(sizes)))
    benchmark(one)
