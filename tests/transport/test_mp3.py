"""MP3 output: frame headers against hand-computed lengths; the encoder's chunks against an
independent decoder (libsndfile/mpg123 through soundfile) and the PCM that went in."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from csmstream.kernels.resample import Resampler
from csmstream.transport import protocol
from csmstream.transport.encoder import SOURCE_RATE, encoder_for
from csmstream.transport.mp3 import LAME_DELAY, Mp3Encoder, frame_length, samples_per_frame


@pytest.mark.parametrize("header, length", [
    ("fffb9000", 417),  # MPEG-1 Layer III, 128 kbps, 44.1 kHz: 144 * 128000 / 44100 = 417.96 -> 417
    ("fffb9200", 418),  # ... with the padding bit
    ("fffbb000", 626),  # 192 kbps: 626.9 -> 626
    ("fff36400", 144),  # MPEG-2 Layer III, 48 kbps, 24 kHz: 72 * 48000 / 24000
    ("fff34000", 104),  # MPEG-2, 32 kbps, 22.05 kHz: 104.49 -> 104
    ("ffe36400", 288),  # MPEG-2.5, 48 kbps, 12 kHz: 72 * 48000 / 12000
])
def test_frame_length_of_hand_checked_headers(header, length):
    assert frame_length(bytes.fromhex(header)) == length


@pytest.mark.parametrize("header", [
    "00fb9000",  # no sync
    "fffd9000",  # Layer II
    "ffeb9000",  # reserved version
    "fffb0000",  # free bitrate
    "fffbf000",  # bad bitrate index
    "fffb9c00",  # reserved sample rate
    "fffb90",  # too short
])
def test_frame_length_refuses_what_is_not_a_layer3_header(header):
    assert frame_length(bytes.fromhex(header)) == 0


def signal(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Noise (MP3's hardest case, and no periodicity to fool the delay search) with a chirp."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SOURCE_RATE * seconds)) / SOURCE_RATE
    x = 2500 * rng.standard_normal(len(t)) + 6000 * np.sin(2 * np.pi * (200 + 400 * t) * t)
    return np.clip(x, -32768, 32767).astype(np.int16)


def encode(fmt: str, pcm: np.ndarray, chunk_ms: int = 100) -> tuple[list[list[bytes]], list[bytes], Mp3Encoder]:
    enc = encoder_for(fmt, chunk_ms)
    per_feed = [enc.feed(pcm[i:i + enc.chunk_in]) for i in range(0, len(pcm), enc.chunk_in)]
    return per_feed, enc.finish(), enc


def frames_of(chunk: bytes) -> int:
    n, at = 0, 0
    while at < len(chunk):
        length = frame_length(chunk[at:at + 4])
        assert length, f"no frame header at byte {at} of a {len(chunk)}-byte chunk"
        at += length
        n += 1
    assert at == len(chunk)
    return n


@pytest.mark.parametrize("fmt", sorted(protocol.MP3_FORMATS))
def test_chunks_are_whole_frames_that_decode_to_the_input(fmt):
    rate, _ = protocol.MP3_FORMATS[fmt]
    pcm = signal()
    per_feed, tail, enc = encode(fmt, pcm)
    chunks = [c for feed in per_feed for c in feed] + tail
    assert per_feed[0], "the first 100 ms of PCM already give a chunk (time to first audio)"
    frame_ms = 1000 * samples_per_frame(rate) / rate
    durations = [enc.ms_of(len(c)) for c in chunks[:-1]]
    assert max(durations) <= 200  # LAME's output is lumpy (bit reservoir), but chunks stay short ...
    assert abs(np.mean(durations[1:]) - 100) < frame_ms  # ... and about chunk_ms on average
    frames = sum(frames_of(c) for c in chunks)

    audio, sr = sf.read(io.BytesIO(b"".join(chunks)), dtype="float32")
    assert sr == rate and audio.ndim == 1
    assert len(audio) == frames * samples_per_frame(rate)
    assert enc.audio_ms == pytest.approx(1000 * len(audio) / rate, abs=1.0)
    # the PCM that went in, at the output rate (our resampler is tested on its own)
    r = Resampler(SOURCE_RATE, rate) if rate != SOURCE_RATE else None
    ref = (np.concatenate([r.process(pcm), r.flush()]) if r else pcm).astype(np.float32) / 32768
    lag = int(np.argmax([np.dot(audio[d:d + rate], ref[:rate]) for d in range(0, 2 * LAME_DELAY)]))
    assert lag == LAME_DELAY  # the delay the alignment shifts by
    got = audio[lag:lag + len(ref)]
    assert len(got) == len(ref)  # nothing is lost at the end
    corr = np.dot(got, ref) / np.sqrt(np.dot(got, got) * np.dot(ref, ref))
    kbps = int(fmt.rsplit("_", 1)[1])
    assert corr > (0.95 if kbps >= 96 else 0.7), corr  # lossy, and noise is its hardest input


def whole_and_cut(fmt: str, pcm: np.ndarray) -> tuple[bytes, bytes]:
    """The stream of `pcm` fed at once, and fed in pieces of 1, 999, 777 and the rest samples."""
    whole = encoder_for(fmt, 100)
    one = b"".join(whole.feed(pcm) + whole.finish())
    cut = encoder_for(fmt, 100)
    out = []
    for a, b in ((0, 1), (1, 1000), (1000, 1777), (1777, len(pcm))):
        out += cut.feed(pcm[a:b])
    return one, b"".join(out + cut.finish())


def test_the_bytes_do_not_depend_on_how_the_pcm_was_cut():
    """The server feeds a sentence's end in a shorter piece; the stream must be the same."""
    one, two = whole_and_cut("mp3_24000_48", signal(1.0, seed=3))
    assert one == two


def test_an_empty_request_gives_no_audio():
    enc = encoder_for("mp3_44100_128", 100)
    assert b"".join(enc.finish()) == b"" and enc.audio_ms == 0


def test_raw_formats_keep_their_encoder():
    assert not isinstance(encoder_for("pcm_24000", 100), Mp3Encoder)
    assert encoder_for("ulaw_8000", 100).delay_ms == 0
    assert encoder_for("mp3_24000_48", 100).delay_ms == pytest.approx(1000 * LAME_DELAY / 24000)


def test_mp3_is_encoded_off_the_event_loop_with_the_same_bytes():
    """LAME runs on a codec thread (it releases the GIL); the raw formats stay on the loop."""
    import asyncio
    import threading

    pcm = signal(0.5, seed=5)

    async def go(fmt):
        enc, threads = encoder_for(fmt, 100), set()
        feed = enc.feed

        def spy(x):
            threads.add(threading.current_thread().name)
            return feed(x)

        enc.feed = spy
        out = []
        for i in range(0, len(pcm), enc.chunk_in):
            out += await enc.feed_async(pcm[i:i + enc.chunk_in])
        return b"".join(out + enc.finish()), threads

    got, threads = asyncio.run(go("mp3_24000_48"))
    ref = encoder_for("mp3_24000_48", 100)
    assert got == b"".join(ref.feed(pcm) + ref.finish())
    assert threads and all(t.startswith("codec") for t in threads)
    _, threads = asyncio.run(go("ulaw_8000"))
    assert threads == {threading.main_thread().name}
