"""Hot small pieces: audio kernels and the protocol (per call, one 100 ms chunk unless noted)."""

import asyncio
import json
import time

import numpy as np
import pytest

from csmstream.kernels.audio import float_to_int16
from csmstream.kernels.g711 import alaw_encode, ulaw_decode, ulaw_encode
from csmstream.kernels.g722 import G722Decoder, G722Encoder
from csmstream.kernels.resample import Resampler
from csmstream.kernels.stretch import TimeStretcher
from csmstream.transport import protocol
from csmstream.transport.encoder import encoder_for

PCM = (np.random.default_rng(0).normal(size=2400) * 4000).astype(np.int16)


@pytest.mark.parametrize("fs_out", [8000, 16000])
def test_resample_chunk(benchmark, fs_out):
    r = Resampler(24000, fs_out)
    benchmark.group = "audio-kernels"
    benchmark(r.process, PCM)


@pytest.mark.parametrize("speed", [0.8, 1.25, 2.0])
def test_stretch_chunk(benchmark, speed):
    """A stream's speaking rate (kernels/stretch.py): one 100 ms chunk through a running stretcher
    (a stream's steady state; compare with test_resample_chunk, which every 8 kHz call pays)."""
    st = TimeStretcher(speed)
    st.process(np.tile(PCM, 4))  # past the start
    benchmark.group = "audio-kernels"
    benchmark(st.process, PCM)


def test_float_to_int16_frame(benchmark):
    x = np.random.default_rng(1).normal(size=1920).astype(np.float32)
    benchmark.group = "audio-kernels"
    benchmark(float_to_int16, x)


@pytest.mark.parametrize("enc", [ulaw_encode, alaw_encode], ids=["ulaw", "alaw"])
def test_g711_encode_chunk(benchmark, enc):
    x = PCM[:800]  # 100 ms at 8 kHz
    benchmark.group = "audio-kernels"
    benchmark(enc, x)


def test_g722_encode_chunk(benchmark):
    enc = G722Encoder()
    x = PCM[:1600]  # 100 ms at 16 kHz
    benchmark.group = "audio-kernels"
    benchmark(enc.encode, x)


def test_g722_decode_chunk(benchmark):
    dec = G722Decoder()
    b = G722Encoder().encode(PCM[:1600]).tobytes()
    benchmark.group = "audio-kernels"
    benchmark(dec.decode, b)


def test_ulaw_decode_chunk(benchmark):
    b = ulaw_encode(PCM[:800]).tobytes()
    benchmark.group = "audio-kernels"
    benchmark(ulaw_decode, b)


@pytest.mark.parametrize("fmt", ["pcm_24000", "ulaw_8000", "g722_16000", "mp3_24000_48", "mp3_22050_32",
                                 "mp3_44100_128", "opus_48000_32", "opus_48000_64", "aac_24000_64", "flac_24000"])
def test_encoder_chunk(benchmark, fmt):
    """CPU per stream per 100 ms of audio: the raw formats (on the event loop), MP3 (LAME, plus the
    resampler where the rate is not 24 kHz), Ogg Opus, AAC and FLAC (FFmpeg's), those on codec threads."""
    enc = encoder_for(fmt, 100)
    benchmark.group = "protocol"
    benchmark(enc.feed, PCM)


@pytest.mark.benchmark(group="codec-event-loop-cpu", timer=time.thread_time)
@pytest.mark.parametrize("offload", ["inline", "codec-thread", "executor-call-each"])
@pytest.mark.parametrize("fmt", ["mp3_24000_48", "opus_48000_32"])
def test_codec_event_loop_cpu_16_streams(benchmark, offload, fmt):
    """The event loop's own CPU time (thread_time) for one 100 ms chunk of 16 mp3 or opus streams:
    encoded on the loop, or handed to the codec threads in one batch (what the server does:
    transport/codec_threads.py), or by a run_in_executor each (as it did before 2026-12-07). The
    loop is what every connection shares, so this is the capacity figure."""
    from csmstream.transport.codec_threads import pool

    loop = asyncio.new_event_loop()
    encs = [encoder_for(fmt, 100) for _ in range(16)]
    for e in encs:
        e.offload = offload != "inline"
        if offload == "executor-call-each":
            e.feed_async = lambda pcm, e=e: asyncio.get_running_loop().run_in_executor(pool(), e.feed, pcm)

    async def tick():
        await asyncio.gather(*(e.feed_async(PCM) for e in encs))

    benchmark(lambda: loop.run_until_complete(tick()))
    loop.close()


@pytest.mark.benchmark(group="codec-event-loop-cpu", timer=time.thread_time)
@pytest.mark.parametrize("where", ["inline", "codec-thread"])
def test_stretch_event_loop_cpu_16_calls(benchmark, where):
    """The event loop's own CPU time for one engine frame (80 ms) of 16 phone calls at speed 1.25
    (transport/call_stream._at_speed): stretched on the loop, as before 2026-12-07's third sitting,
    or handed to the codec threads in one batch, as now."""
    from csmstream.transport.codec_threads import handoff

    loop = asyncio.new_event_loop()
    calls = [TimeStretcher(1.25) for _ in range(16)]
    frame = PCM[:1920]
    for st in calls:
        st.process(np.tile(PCM, 4))  # past the start

    async def on_loop(st):
        return st.process(frame)

    async def tick():
        await asyncio.gather(*((handoff(st.process, frame) if where == "codec-thread" else on_loop(st))
                               for st in calls))

    benchmark(lambda: loop.run_until_complete(tick()))
    loop.close()


def test_parse_request(benchmark):
    msg = json.dumps({"text": "Hello there, how can I help you today?", "speaker_id": 1, "format": "ulaw_8000",
                      "chunk_ms": 20, "seed": 3, "request_id": "abc-123"})
    benchmark.group = "protocol"
    benchmark(protocol.parse, msg)


def test_build_done(benchmark):
    benchmark.group = "protocol"
    benchmark(protocol.done, "abc-123", 4160.0, 31.5, False)
