"""Formats coded by FFmpeg's encoders (through PyAV) in packets, in a container that streams:
the base class, and AAC (ADTS) and FLAC (native FLAC stream); Ogg Opus is in opus.py.

A PacketEncoder feeds the 24 kHz PCM to the codec in its own frame size, collects the packets, and
hands them on wrapped by the container: the first chunk as soon as there is a packet (time to
first audio stays that of raw PCM), then one chunk per `chunk_ms` of packets, the rest at the end.
Chunks are TimedChunks: container bytes say nothing linear about time, so each carries how much
audio it decodes to (the playback clock and the alignment use it). The codecs release the GIL
while they work: these encoders run on the codec threads.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .encoder import AudioEncoder, TimedChunk

SOURCE_RATE = 24_000


def _av():
    try:
        import av
    except ImportError as e:  # a dependency; reached only where it was removed by hand
        raise RuntimeError("aac, flac and opus output need PyAV (pip install av)") from e
    return av


class PacketEncoder(AudioEncoder):
    offload = True
    resamples = False  # these codecs take the 24 kHz as it is (Opus's format says 48 kHz: what decoders play)
    codec = ""  # FFmpeg's encoder
    sample_format = "s16"  # what it takes
    options: ClassVar[dict[str, str]] = {}

    def __init__(self, fmt: str, chunk_ms: int) -> None:
        super().__init__(fmt, chunk_ms)
        self.kbps = int(fmt.rsplit("_", 1)[1]) if fmt.count("_") == 2 else 0  # codec_rate_kbps; flac_24000
        self._av = _av()
        ctx = self._av.CodecContext.create(self.codec, "w")
        ctx.sample_rate, ctx.layout, ctx.format = SOURCE_RATE, "mono", self.sample_format
        if self.kbps:
            ctx.bit_rate = 1000 * self.kbps
        ctx.options = dict(self.options)
        ctx.open()
        self._ctx = ctx
        self.frame = ctx.frame_size or 1024
        self.chunk_samples = SOURCE_RATE * chunk_ms // 1000
        self._pcm = np.zeros(0, np.int16)  # samples short of a whole codec frame
        self._packets: list[tuple[bytes, int]] = []  # (packet, samples it decodes to), not yet sent
        self._fed = 0  # 24 kHz samples in
        self._chunks = 0
        self._sent_ms = 0.0

    def _code(self, pcm: np.ndarray | None) -> None:
        if pcm is None:
            out = self._ctx.encode(None)
        else:
            x = pcm.reshape(1, -1)
            if self.sample_format == "fltp":
                x = x.astype(np.float32) / 32768
            frame = self._av.AudioFrame.from_ndarray(x, format=self.sample_format, layout="mono")
            frame.sample_rate = SOURCE_RATE
            out = self._ctx.encode(frame)
        self._packets += [(bytes(p), p.duration or 0) for p in out if p.size]

    def feed(self, pcm: np.ndarray) -> list[bytes]:
        pcm = np.asarray(pcm, np.int16)
        self._fed += len(pcm)
        buf = np.concatenate([self._pcm, pcm])
        whole = len(buf) // self.frame * self.frame
        for i in range(0, whole, self.frame):
            self._code(buf[i : i + self.frame])
        self._pcm = buf[whole:].copy()
        due = sum(n for _, n in self._packets) >= self.chunk_samples
        return [self._chunk(eos=False)] if self._packets and (self._chunks == 0 or due) else []

    def finish(self) -> list[bytes]:
        """The last samples (a short last frame), the codec's tail, the container's end; nothing
        for no audio."""
        if not self._fed:
            return []
        if len(self._pcm):
            self._code(self._pcm)
            self._pcm = self._pcm[:0]
        self._code(None)
        return [self._chunk(eos=True)]

    def _chunk(self, eos: bool) -> TimedChunk:
        packets, self._packets = self._packets, []
        chunk = TimedChunk(self._wrap(packets, first=self._chunks == 0, eos=eos))
        chunk.ms = self._ms(packets, eos)
        self._chunks += 1
        self._sent_ms += chunk.ms
        self.bytes_out += len(chunk)
        return chunk

    def _wrap(self, packets: list[tuple[bytes, int]], first: bool, eos: bool) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        super().close()
        self._ctx = None  # (PyAV frees the codec context with its last reference; a call still
        self._packets = []  # running on a codec thread holds one until it returns)

    def _ms(self, packets: list[tuple[bytes, int]], eos: bool) -> float:
        """The audio these packets decode to."""
        return 1000.0 * sum(n for _, n in packets) / SOURCE_RATE

    @property
    def audio_ms(self) -> float:
        return self._sent_ms


class AacEncoder(PacketEncoder):
    """AAC-LC in ADTS frames (a 7-byte header before each packet), as OpenAI's `aac`. FFmpeg's
    encoder primes with one frame of 1,024 samples (42.7 ms), which decoders play: delay_ms."""

    codec, sample_format = "aac", "fltp"

    def __init__(self, fmt: str, chunk_ms: int) -> None:
        super().__init__(fmt, chunk_ms)
        asc = bytes(self._ctx.extradata)  # AudioSpecificConfig: object type, rate index, channels
        self._profile = (asc[0] >> 3) - 1
        self._rate_index = ((asc[0] & 7) << 1) | (asc[1] >> 7)
        self._channels = (asc[1] >> 3) & 15
        self.delay_ms = 1000.0 * self.frame / SOURCE_RATE

    def adts(self, payload: bytes) -> bytes:
        n = 7 + len(payload)
        return bytes([0xFF, 0xF1, (self._profile << 6) | (self._rate_index << 2) | (self._channels >> 2),
                      ((self._channels & 3) << 6) | (n >> 11), (n >> 3) & 0xFF, ((n & 7) << 5) | 0x1F, 0xFC]) + payload

    def _wrap(self, packets, first, eos):
        return b"".join(self.adts(p) for p, _ in packets)

    def _ms(self, packets, eos):
        return 1000.0 * len(packets) * self.frame / SOURCE_RATE  # every ADTS frame decodes to a whole frame


class FlacEncoder(PacketEncoder):
    """Lossless FLAC, as OpenAI's `flac`: the stream marker and STREAMINFO (total length unknown,
    as a stream allows) in the first chunk, then FLAC frames of 2,304 samples (96 ms)."""

    codec = "flac"

    def _wrap(self, packets, first, eos):
        head = b""
        if first:
            info = bytes(self._ctx.extradata)[:34]
            head = b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info  # the last metadata block
        return head + b"".join(p for p, _ in packets)
