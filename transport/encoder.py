"""24 kHz int16 PCM -> the client's format, chunk by chunk, with exact chunk sizes.

One AudioEncoder per request: it resamples (stateful, flushed at the end) and encodes, and cuts
the result into chunks of exactly `chunk_bytes`; `finish()` returns the rest (the one short chunk).
"""

from __future__ import annotations

import numpy as np

from ..kernels.g711 import alaw_encode, ulaw_encode
from ..kernels.resample import Resampler
from .protocol import FORMATS

SOURCE_RATE = 24_000


class AudioEncoder:
    def __init__(self, fmt: str, chunk_ms: int) -> None:
        rate, enc = FORMATS[fmt]
        self.rate, self.encoding = rate, enc
        self.resampler = Resampler(SOURCE_RATE, rate) if rate != SOURCE_RATE else None
        self.chunk_in = SOURCE_RATE * chunk_ms // 1000  # source samples per chunk
        self.chunk_bytes = rate * chunk_ms // 1000 * (2 if enc == "pcm" else 1)
        self._pending = bytearray()
        self.bytes_out = 0

    def _encode(self, pcm: np.ndarray) -> bytes:
        return self._bytes(self.resampler.process(pcm) if self.resampler is not None else pcm)

    def _bytes(self, pcm: np.ndarray) -> bytes:
        if self.encoding == "ulaw":
            return ulaw_encode(pcm).tobytes()
        if self.encoding == "alaw":
            return alaw_encode(pcm).tobytes()
        return pcm.astype("<i2", copy=False).tobytes()

    def feed(self, pcm: np.ndarray) -> list[bytes]:
        """Source samples in; whole chunks out (possibly none)."""
        self._pending += self._encode(pcm)
        return self._cut()

    def finish(self) -> list[bytes]:
        """Flush the resampler; the remaining whole chunks and then the short last one."""
        if self.resampler is not None:
            tail = self.resampler.flush()
            self._pending += self._bytes(tail)
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

    def ms_of(self, nbytes: int) -> float:
        """How much audio `nbytes` of this encoder's output hold, in milliseconds."""
        return 1000.0 * nbytes / (self.rate * (2 if self.encoding == "pcm" else 1))

    @property
    def audio_ms(self) -> float:
        return self.ms_of(self.bytes_out)
