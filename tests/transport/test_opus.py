"""Ogg Opus output: the page checksum against a hand-checked vector and a bitwise reference; the
encoder's chunks parsed page by page here and decoded by two independent decoders (libsndfile's
libogg + libopus through soundfile, at 24 kHz; FFmpeg's Ogg demuxer + libopus through PyAV, at
48 kHz) and compared with the PCM that went in."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from csmstream.kernels.crc import ogg_crc32
from csmstream.transport import protocol
from csmstream.transport.encoder import SOURCE_RATE, TimedChunk, encoder_for
from csmstream.transport.opus import OpusEncoder
from tests.transport.test_mp3 import signal, whole_and_cut


def crc_bitwise(data: bytes) -> int:
    """RFC 3533's checksum one bit at a time (polynomial 0x04C11DB7, MSB first, no init, no XOR)."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def test_ogg_checksum():
    assert ogg_crc32(b"123456789") == 0x89A1897F  # the CRC-32/CKSUM check value without its final XOR
    data = np.random.default_rng(0).integers(0, 256, 3000).astype(np.uint8).tobytes()
    assert ogg_crc32(data) == crc_bitwise(data) and ogg_crc32(b"") == 0


def pages(chunk: bytes) -> list[dict]:
    """Parse whole Ogg pages (a chunk must hold nothing else), checking each one's checksum."""
    out, at = [], 0
    while at < len(chunk):
        magic, version, flags, granule, serial, seq, crc, nseg = struct.unpack_from("<4sBBqIIIB", chunk, at)
        assert magic == b"OggS" and version == 0, f"no page at byte {at} of a {len(chunk)}-byte chunk"
        lacing = chunk[at + 27 : at + 27 + nseg]
        size = 27 + nseg + sum(lacing)
        page = chunk[at : at + size]
        assert len(page) == size
        assert crc_bitwise(page[:22] + b"\0\0\0\0" + page[26:]) == crc
        packets = sum(1 for n in lacing if n < 255)  # a lacing value under 255 ends a packet
        out.append({"flags": flags, "granule": granule, "serial": serial, "seq": seq, "packets": packets,
                    "body": page[27 + nseg :]})
        at += size
    return out


def encode(fmt: str, pcm: np.ndarray, chunk_ms: int = 100):
    enc = encoder_for(fmt, chunk_ms)
    per_feed = [enc.feed(pcm[i : i + enc.chunk_in]) for i in range(0, len(pcm), enc.chunk_in)]
    return per_feed, enc.finish(), enc


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


@pytest.mark.parametrize("fmt", sorted(protocol.OPUS_FORMATS))
def test_chunks_are_whole_pages_that_decode_to_exactly_the_input(fmt):
    pcm = signal(2.0) // 2
    per_feed, tail, enc = encode(fmt, pcm)
    assert isinstance(enc, OpusEncoder) and per_feed[0], "the first 100 ms of PCM already give a chunk"
    chunks = [c for feed in per_feed for c in feed] + tail
    parsed = [pages(c) for c in chunks]
    flat = [p for ps in parsed for p in ps]
    assert [p["seq"] for p in flat] == list(range(len(flat))) and len({p["serial"] for p in flat}) == 1
    assert flat[0]["flags"] == 2 and flat[0]["body"][:8] == b"OpusHead" and flat[1]["body"][:8] == b"OpusTags"
    assert flat[-1]["flags"] == 4 and all(p["flags"] == 0 for p in flat[1:-1])
    pre_skip = int.from_bytes(flat[0]["body"][10:12], "little")
    assert flat[-1]["granule"] == pre_skip + 2 * len(pcm)  # the end trimmed to the input's length
    # 20 ms packets: the input and the encoder's look-ahead (the pre-skip, at 24 kHz) rounded up
    assert sum(p["packets"] for p in flat[2:]) == -(-(len(pcm) + pre_skip // 2) // 480)
    # each chunk says how much audio it holds: what its pages add to the granule, less the pre-skip
    assert all(isinstance(c, TimedChunk) and enc.duration_ms(c) == c.ms for c in chunks)
    assert sum(c.ms for c in chunks) == pytest.approx(1000 * len(pcm) / SOURCE_RATE) == pytest.approx(enc.audio_ms)
    assert max(c.ms for c in chunks[1:-1]) <= 200 and enc.delay_ms == 0
    data = b"".join(chunks)
    a, sr = sf.read(io.BytesIO(data), dtype="float32")  # libogg refuses pages whose checksum is wrong
    assert sr == SOURCE_RATE and len(a) == len(pcm)
    ref = pcm.astype(np.float32) / 32768
    kbps = int(fmt.rsplit("_", 1)[1])
    assert corr(a, ref) > (0.9 if kbps >= 64 else 0.75), corr(a, ref)  # no delay: pre-skip is dropped
    with av.open(io.BytesIO(data)) as f:
        b = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])
        assert f.streams.audio[0].rate == 48000 and len(b) == 2 * len(pcm)
    assert corr(b[::2], ref) > 0.7


def test_the_audio_does_not_depend_on_how_the_pcm_was_cut():
    """The server feeds a sentence's end in a shorter piece: the same packets (the pages' serial
    number is random per stream, so the decoded audio is compared)."""
    one, two = whole_and_cut("opus_48000_64", signal(1.0, seed=3))
    np.testing.assert_array_equal(sf.read(io.BytesIO(one), dtype="int16")[0],
                                  sf.read(io.BytesIO(two), dtype="int16")[0])
    packets = [b"".join(p["body"] for p in pages(d)[2:]) for d in (one, two)]  # pages group them differently
    assert packets[0] == packets[1]


def test_an_empty_request_gives_no_audio_and_a_tiny_one_a_valid_stream():
    enc = encoder_for("opus_48000_32", 100)
    assert enc.finish() == [] and enc.audio_ms == 0
    enc = encoder_for("opus_48000_32", 100)
    data = b"".join(enc.feed(np.full(100, 1000, np.int16)) + enc.finish())  # less than one packet
    assert len(sf.read(io.BytesIO(data))[0]) == 100 and enc.audio_ms == pytest.approx(100 / 24)


def test_opus_is_encoded_off_the_event_loop():
    assert encoder_for("opus_48000_64", 100).offload and not encoder_for("g722_16000", 100).offload
