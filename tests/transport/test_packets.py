"""AAC (ADTS) and FLAC output: container bytes against hand-checked headers, the streams decoded
by independent decoders (FFmpeg through PyAV; libsndfile's libFLAC) and compared with the PCM
that went in -- FLAC sample for sample, being lossless."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from csmstream.transport.encoder import SOURCE_RATE, TimedChunk, encoder_for
from csmstream.transport.packets import AacEncoder, FlacEncoder
from tests.transport.test_mp3 import signal
from tests.transport.test_opus import corr, encode


def ffmpeg_decode(data: bytes, fmt: str) -> np.ndarray:
    with av.open(io.BytesIO(data), format=fmt) as f:
        assert f.streams.audio[0].rate == SOURCE_RATE
        return np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])


def with_length(flac: bytes, samples: int) -> bytes:
    """The stream with STREAMINFO's total-samples field (36 bits at byte 18) filled in, as a file
    writer that can seek back does: libsndfile's FLAC reader needs it (it fails at the end of a
    stream of unknown length, which the FLAC format allows and FFmpeg reads)."""
    v = int.from_bytes(flac[18:26], "big")
    assert v & ((1 << 36) - 1) == 0  # unknown, as a stream must say
    return flac[:18] + (v | samples).to_bytes(8, "big") + flac[26:]


def sf_read(data: bytes) -> np.ndarray:
    with sf.SoundFile(io.BytesIO(data)) as f:
        assert f.samplerate == SOURCE_RATE
        return f.read(dtype="int16")


def adts_frames(chunk: bytes) -> int:
    """Whole ADTS frames only: each starts with the sync word and says its own length."""
    n, at = 0, 0
    while at < len(chunk):
        assert chunk[at] == 0xFF and chunk[at + 1] & 0xF6 == 0xF0, f"no ADTS header at byte {at}"
        at += ((chunk[at + 3] & 3) << 11) | (chunk[at + 4] << 3) | (chunk[at + 5] >> 5)
        n += 1
    assert at == len(chunk)
    return n


def test_adts_header_by_hand():
    enc = encoder_for("aac_24000_64", 100)
    # AAC-LC (profile 1), 24 kHz (rate index 6), mono, no CRC, 107 bytes, buffer fullness 0x7FF
    assert enc.adts(bytes(100))[:7] == bytes.fromhex("fff158400d7ffc")


def test_aac_chunks_are_whole_adts_frames_that_decode_to_the_input_after_the_priming_frame():
    pcm = signal(2.0) // 2
    per_feed, tail, enc = encode("aac_24000_64", pcm)
    assert isinstance(enc, AacEncoder) and per_feed[0], "the first 100 ms of PCM already give a chunk"
    chunks = [c for feed in per_feed for c in feed] + tail
    frames = sum(adts_frames(c) for c in chunks)
    # a chunk goes once chunk_ms of frames wait: under chunk_ms + one feed (100 ms) + one frame
    assert all(isinstance(c, TimedChunk) for c in chunks) and max(c.ms for c in chunks[1:-1]) < 200 + 1024 / 24
    assert sum(c.ms for c in chunks) == pytest.approx(1000 * frames * 1024 / SOURCE_RATE) == pytest.approx(enc.audio_ms)
    out = ffmpeg_decode(b"".join(chunks), "aac")
    assert len(out) == frames * 1024 >= len(pcm) + 1024  # the priming frame, then all of the input
    ref = pcm.astype(np.float32) / 32768
    lag = int(np.argmax([np.dot(out[d : d + 4800], ref[:4800]) for d in range(0, 2048)]))
    assert lag == 1024 == round(enc.delay_ms * SOURCE_RATE / 1000)  # what the alignment shifts by
    assert corr(out[lag : lag + len(ref)], ref) > 0.9


def test_flac_is_lossless_and_streams():
    pcm = signal(2.0, seed=1)
    per_feed, tail, enc = encode("flac_24000", pcm)
    assert isinstance(enc, FlacEncoder) and per_feed[0]
    chunks = [c for feed in per_feed for c in feed] + tail
    assert chunks[0][:4] == b"fLaC" and all(c[:2] == b"\xff\xf8" for c in chunks[1:])  # frames' sync code
    assert sum(c.ms for c in chunks) == pytest.approx(1000 * len(pcm) / SOURCE_RATE) == pytest.approx(enc.audio_ms)
    data = b"".join(chunks)
    np.testing.assert_array_equal(ffmpeg_decode(data, "flac"), pcm)
    np.testing.assert_array_equal(sf_read(with_length(data, len(pcm))), pcm)  # libFLAC: the frames are valid
    # and a stream cut short (a client that hangs up) still decodes up to where it stopped
    part = ffmpeg_decode(b"".join(chunks[:3]), "flac")
    np.testing.assert_array_equal(part, pcm[: len(part)])
    assert len(part) >= 2304


@pytest.mark.parametrize("fmt", ["aac_24000_64", "flac_24000"])
def test_no_audio_gives_no_bytes(fmt):
    enc = encoder_for(fmt, 100)
    assert enc.finish() == [] and enc.audio_ms == 0 and enc.offload
