"""Hot small pieces: audio kernels and the protocol (per call, one 100 ms chunk unless noted)."""

import json

import numpy as np
import pytest

from csmstream.kernels.audio import float_to_int16
from csmstream.kernels.g711 import alaw_encode, ulaw_decode, ulaw_encode
from csmstream.kernels.resample import Resampler
from csmstream.transport import protocol
from csmstream.transport.encoder import AudioEncoder

PCM = (np.random.default_rng(0).normal(size=2400) * 4000).astype(np.int16)


@pytest.mark.parametrize("fs_out", [8000, 16000])
def test_resample_chunk(benchmark, fs_out):
    r = Resampler(24000, fs_out)
    benchmark.group = "audio-kernels"
    benchmark(r.process, PCM)


def test_float_to_int16_frame(benchmark):
    x = np.random.default_rng(1).normal(size=1920).astype(np.float32)
    benchmark.group = "audio-kernels"
    benchmark(float_to_int16, x)


@pytest.mark.parametrize("enc", [ulaw_encode, alaw_encode], ids=["ulaw", "alaw"])
def test_g711_encode_chunk(benchmark, enc):
    x = PCM[:800]  # 100 ms at 8 kHz
    benchmark.group = "audio-kernels"
    benchmark(enc, x)


def test_ulaw_decode_chunk(benchmark):
    b = ulaw_encode(PCM[:800]).tobytes()
    benchmark.group = "audio-kernels"
    benchmark(ulaw_decode, b)


@pytest.mark.parametrize("fmt", ["pcm_24000", "ulaw_8000"])
def test_encoder_chunk(benchmark, fmt):
    enc = AudioEncoder(fmt, 100)
    benchmark.group = "protocol"
    benchmark(enc.feed, PCM)


def test_parse_request(benchmark):
    msg = json.dumps({"text": "Hello there, how can I help you today?", "speaker_id": 1, "format": "ulaw_8000",
                      "chunk_ms": 20, "seed": 3, "request_id": "abc-123"})
    benchmark.group = "protocol"
    benchmark(protocol.parse, msg)


def test_build_done(benchmark):
    benchmark.group = "protocol"
    benchmark(protocol.done, "abc-123", 4160.0, 31.5, False)
