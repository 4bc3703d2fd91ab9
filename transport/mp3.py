"""MP3 output (ElevenLabs' mp3_RATE_KBPS formats; OpenAI's "mp3"), streamed frame by frame.

LAME (the `lameenc` package) encodes constant-bitrate mono MP3 from the resampled PCM. What LAME
returns after a call is not cut at frame boundaries, so its output is scanned for frame headers
and handed on in whole frames only: every chunk starts with a frame header, and the chunks
concatenate into one valid stream (as ElevenLabs' own mp3 chunks do; a frame may borrow bits from
the frames before it -- MP3's bit reservoir -- so a chunk is not meant to be decoded alone). A
chunk holds the whole frames ready once at least chunk_ms minus a frame are (a frame is 576
samples below 32 kHz, 1152 above: 24 ms at 24 kHz, 26.1 ms at 44.1 kHz), so every 100 ms of PCM
gives one chunk; the first chunk goes out with the first whole frames, to keep the time to first
audio that of the raw formats.

Timing: LAME delays the audio by 1,105 samples (its look-ahead; 46 ms at 24 kHz) and pads
the end to a whole frame, so the decoded stream is slightly longer than the speech in it; a
chunk's duration (`ms_of`) is that of its frames, which is what a client plays.
"""

from __future__ import annotations

import math

import numpy as np

from .encoder import AudioEncoder

LAME_DELAY = 1105  # samples of priming silence before the audio in the decoded stream (576 + 529)
QUALITY = 5  # LAME's algorithm quality (0 best .. 9 fastest); 5 is its own default: ~0.2 ms per 100 ms at 24 kHz
# Layer III bitrates (kbps) by index: MPEG-1, then MPEG-2/2.5; sample rates by index per version
_KBPS = {3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
         2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def frame_length(header: bytes) -> int:
    """The length in bytes of the MPEG Layer III frame starting with these 4 bytes, or 0 when
    they are not a valid frame header."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return 0
    version, layer = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    bitrate_idx, rate_idx, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or layer != 1 or bitrate_idx in (0, 15) or rate_idx == 3:
        return 0
    kbps = _KBPS[3 if version == 3 else 2][bitrate_idx]
    rate = _RATES[version][rate_idx]
    per_frame = 144 if version == 3 else 72  # samples per frame / 8
    return per_frame * kbps * 1000 // rate + padding


def samples_per_frame(rate: int) -> int:
    return 1152 if rate >= 32000 else 576


def _lame(rate: int, kbps: int):
    try:
        import lameenc
    except ImportError:  # a dependency of csm-stream; only a broken install lacks it
        raise RuntimeError("mp3 output needs the lameenc package (pip install lameenc)") from None
    enc = lameenc.Encoder()
    enc.set_channels(1)
    enc.set_in_sample_rate(rate)
    enc.set_out_sample_rate(rate)
    enc.set_bit_rate(kbps)
    enc.set_quality(QUALITY)
    return enc


class Mp3Encoder(AudioEncoder):
    """AudioEncoder for an mp3_RATE_KBPS format: resample, LAME, whole frames per chunk."""

    offload = True  # LAME releases the GIL: the event loop pays ~20 us a chunk instead of ~180

    def __init__(self, fmt: str, chunk_ms: int) -> None:
        super().__init__(fmt, chunk_ms)
        self.kbps = int(fmt.rsplit("_", 1)[1])
        self._lame = _lame(self.rate, self.kbps)
        frame_ms = 1000 * samples_per_frame(self.rate) / self.rate
        self.chunk_frames = max(1, math.floor(chunk_ms / frame_ms + 1e-9))
        self.delay_ms = 1000 * LAME_DELAY / self.rate
        self._fed = False  # any audio in yet
        self._scanned = 0  # bytes of _pending that are whole frames
        self._frames = 0  # how many whole frames those are

    def _encode(self, pcm: np.ndarray) -> bytes:
        self._fed = self._fed or len(pcm) > 0
        return super()._encode(pcm)

    def _bytes(self, pcm: np.ndarray) -> bytes:
        return bytes(self._lame.encode(pcm.astype("<i2", copy=False).tobytes())) if len(pcm) else b""

    def _scan(self) -> None:
        buf = self._pending
        while True:
            n = frame_length(bytes(buf[self._scanned:self._scanned + 4]))
            if n == 0 or self._scanned + n > len(buf):
                return
            self._scanned += n
            self._frames += 1

    def _take(self, nbytes: int) -> bytes:
        out = bytes(self._pending[:nbytes])
        del self._pending[:nbytes]
        self.bytes_out += nbytes
        self._scanned, self._frames = 0, 0
        return out

    def _cut(self) -> list[bytes]:
        self._scan()
        first = self.bytes_out == 0 and self._frames > 0
        return [self._take(self._scanned)] if first or self._frames >= self.chunk_frames else []

    def finish(self) -> list[bytes]:
        """The resampler's and LAME's last samples: the rest of the frames, as one last chunk."""
        if not self._fed:
            return []  # no audio at all: no frames (LAME would still make one)
        if self.resampler is not None:
            self._pending += self._bytes(self.resampler.flush())
        self._pending += bytes(self._lame.flush())
        return [self._take(len(self._pending))] if self._pending else []

    def close(self) -> None:
        super().close()
        self._lame = None

    def ms_of(self, nbytes: int) -> float:
        # constant bitrate: a frame of B kbps holds exactly 8 * its bytes / B milliseconds (44.1 kHz
        # frames alternate padding bytes, so there it is exact on average, to a fraction of a ms)
        return 8.0 * nbytes / self.kbps
