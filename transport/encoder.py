"""24 kHz int16 PCM -> the client's format, chunk by chunk, with exact chunk sizes.

One AudioEncoder per request: it resamples (stateful, flushed at the end) and encodes, and cuts
the result into chunks of exactly `chunk_bytes`; `finish()` returns the rest (the one short chunk).
`encoder_for(fmt)` picks the class: MP3 formats get mp3.Mp3Encoder (whole frames per chunk); Ogg
Opus, AAC and FLAC get opus.py's and packets.py's (whole pages or frames, each chunk timed).
`AudioDecoder` (decoder.py) is the other end, for clients: a raw format's bytes back to PCM.
"""

from __future__ import annotations

import numpy as np

from ..kernels.g711 import alaw_encode, ulaw_encode
from ..kernels.g722 import G722Encoder
from ..kernels.resample import Resampler
from ..kernels.stretch import TimeStretcher
from .codec_threads import handoff
from .decoder import AudioDecoder  # (here before 2026-12-07: still importable from this module)
from .protocol import ALL_FORMATS, BYTES_PER_SAMPLE, FORMATS, MP3_FORMATS, OPUS_FORMATS, PACKET_FORMATS

SOURCE_RATE = 24_000


def encoder_for(fmt: str, chunk_ms: int, speed: float = 1.0) -> AudioEncoder:
    """The encoder of a format name: raw PCM/G.711/G.722 here, MP3 in mp3.py, Ogg Opus in opus.py,
    AAC and FLAC in packets.py; at a `speed` other than 1, wrapped in a SpeedEncoder."""
    if speed != 1:
        return SpeedEncoder(encoder_for(fmt, chunk_ms), speed)
    if fmt in MP3_FORMATS:
        from .mp3 import Mp3Encoder

        return Mp3Encoder(fmt, chunk_ms)
    if fmt in OPUS_FORMATS:
        from .opus import OpusEncoder

        return OpusEncoder(fmt, chunk_ms)
    if fmt in PACKET_FORMATS:
        from .packets import AacEncoder, FlacEncoder

        return (AacEncoder if PACKET_FORMATS[fmt][1] == "aac" else FlacEncoder)(fmt, chunk_ms)
    return AudioEncoder(fmt, chunk_ms)


class TimedChunk(bytes):
    """A chunk that says how much audio it holds (`ms`), for formats whose byte count does not."""

    ms: float = 0.0


class AudioEncoder:
    # encode on a codec thread, not the event loop: for a codec that costs real CPU and releases the
    # GIL while it works (LAME: ~0.2 ms a 100 ms chunk, against 0.02 ms for G.711)
    offload = False
    resamples = True  # to the format's rate; codecs that take 24 kHz themselves (Opus, AAC, FLAC) do not

    def __init__(self, fmt: str, chunk_ms: int) -> None:
        rate, enc = ALL_FORMATS[fmt]
        self.rate, self.encoding = rate, enc
        self.resampler = Resampler(SOURCE_RATE, rate) if rate != SOURCE_RATE and self.resamples else None
        self.chunk_in = SOURCE_RATE * chunk_ms // 1000  # source samples per chunk
        # raw formats: chunks of exactly chunk_ms (whole bytes: chunk_ms is an integer); the compressed
        # ones cut whole frames or pages instead
        self.chunk_bytes = int(rate * chunk_ms // 1000 * BYTES_PER_SAMPLE[enc]) if enc in BYTES_PER_SAMPLE else 0
        self._g722 = G722Encoder() if enc == "g722" else None
        self._pending = bytearray()
        self.bytes_out = 0
        self.delay_ms = 0.0  # how far the encoded audio lags the PCM (a codec's priming samples)

    def _encode(self, pcm: np.ndarray) -> bytes:
        return self._bytes(self.resampler.process(pcm) if self.resampler is not None else pcm)

    def _bytes(self, pcm: np.ndarray) -> bytes:
        if self.encoding == "ulaw":
            return ulaw_encode(pcm).tobytes()
        if self.encoding == "alaw":
            return alaw_encode(pcm).tobytes()
        if self._g722 is not None:
            return self._g722.encode(pcm).tobytes()
        return pcm.astype("<i2", copy=False).tobytes()

    def feed(self, pcm: np.ndarray) -> list[bytes]:
        """Source samples in; whole chunks out (possibly none)."""
        self._pending += self._encode(pcm)
        return self._cut()

    async def feed_async(self, pcm: np.ndarray) -> list[bytes]:
        """feed(), on a codec thread when this encoder offloads (the caller awaits each call before
        the next, so one encoder is never used by two threads at once)."""
        if not self.offload:
            return self.feed(pcm)
        return await handoff(self.feed, pcm)

    def finish(self) -> list[bytes]:
        """Flush the resampler; the remaining whole chunks and then the short last one."""
        if self.resampler is not None:
            tail = self.resampler.flush()
            self._pending += self._bytes(tail)
        if self._g722 is not None:
            self._pending += self._g722.flush().tobytes()
        out = self._cut()
        if self._pending:
            out.append(bytes(self._pending))
            self.bytes_out += len(self._pending)
            self._pending.clear()
        return out

    def _cut(self) -> list[bytes]:
        out = []
        n = self.chunk_bytes
        while len(self._pending) >= n:
            out.append(bytes(self._pending[:n]))
            del self._pending[:n]
            self.bytes_out += n
        return out

    def close(self) -> None:
        """The request is over: free the codec's native state (FFmpeg's FLAC encoder alone holds
        ~7.4 MB) now, not when the last reference to this object goes -- the server keeps its
        latest requests for inspection. The counters (audio_ms) stay; feeding it again is an error."""
        self._pending = bytearray()

    def ms_of(self, nbytes: int) -> float:
        """How much audio `nbytes` of this encoder's output hold, in milliseconds."""
        return 1000.0 * nbytes / (self.rate * BYTES_PER_SAMPLE[self.encoding])

    def duration_ms(self, chunk: bytes) -> float:
        """How much audio one chunk of this encoder's output holds, in milliseconds."""
        return chunk.ms if isinstance(chunk, TimedChunk) else self.ms_of(len(chunk))

    @property
    def audio_ms(self) -> float:
        return self.ms_of(self.bytes_out)


class SpeedEncoder:
    """An encoder fed through a TimeStretcher (kernels/stretch.py): the PCM is played at `speed`
    (pitch kept) before it is resampled and encoded. Everything else is the wrapped encoder's: its
    chunks, their durations (of the audio as sent, at the new speed), audio_ms."""

    def __init__(self, inner: AudioEncoder, speed: float) -> None:
        self.inner, self.speed = inner, speed
        self.stretcher = TimeStretcher(speed)
        # until the first chunk is out the PCM is read in pieces of at most 40 ms, not a whole
        # chunk's worth: a chunk of output takes speed x chunk_ms of input (plus the search's 28 ms),
        # and reading it a chunk's input at a time would wait for a whole further chunk before the
        # first went out. After it, a chunk's worth at a time, as at speed 1: every piece is a
        # hand-off to a codec thread and a turn of the stream's task on the loop (the gain next to
        # the batched hand-offs' is small: bench/test_server.py, README "Speaking rate")
        self._first_piece = min(inner.chunk_in, SOURCE_RATE // 25)

    @property
    def chunk_in(self) -> int:
        """Source samples to read next (what `Connection.source` asks before each piece)."""
        return self.inner.chunk_in if self.inner.bytes_out else self._first_piece

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def feed(self, pcm: np.ndarray) -> list[bytes]:
        return self.inner.feed(self.stretcher.process(pcm))

    async def feed_async(self, pcm: np.ndarray) -> list[bytes]:
        """feed() on a codec thread, always: the stretcher's kernel holds no GIL, so hundreds of
        streams at a speed cost the event loop a share of a batched hand-off each (codec_threads.py),
        not their CPU."""
        return await handoff(self.feed, pcm)

    def finish(self) -> list[bytes]:
        return self.inner.feed(self.stretcher.flush()) + self.inner.finish()


def warm_codecs() -> list[str]:
    """Encode a short tone in every format (and decode the raw ones, as a phone call's caller audio
    is; and stretch it, as a request's speed does), so that no first request compiles a kernel or
    imports a codec library on the event loop: with numba's cache cold (a fresh install or
    container) that took seconds, during which every other stream stalled. Returns the formats
    whose codec library is not installed."""
    t = np.arange(4800) / SOURCE_RATE
    tone = (3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    missing = []
    for fmt in ALL_FORMATS:
        try:
            enc = encoder_for(fmt, 100)
        except (ImportError, RuntimeError):  # PyAV / lameenc not installed (each says so when asked for)
            missing.append(fmt)
            continue
        out = enc.feed(tone[:2400]) + enc.feed(np.frombuffer(tone[2400:].tobytes(), np.int16))  # writable, read-only
        out += enc.finish()
        if fmt in FORMATS:
            data = b"".join(out)
            AudioDecoder(fmt).decode(data)
            AudioDecoder(fmt).decode(np.frombuffer(data, np.uint8))
    stretcher = TimeStretcher(1.25)  # and the speaking rate's kernel (a request's `speed`)
    stretcher.process(tone)
    stretcher.flush()
    return missing
