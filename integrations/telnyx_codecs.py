"""The codecs a Telnyx bidirectional RTP stream carries, both ways (PROTOCOLS.md §1).

- PCMU / PCMA: G.711 at 8 kHz, one byte a sample (bit-exact with audioop; kernels/g711.py).
- G722: G.722 at 16 kHz, 64 kbit/s, one byte per two samples ("HD voice"; kernels/g722.py): twice
  G.711's audio bandwidth at the same bit rate. Its ADPCM state runs on across the whole call, as
  the far end's decoder does.
- L16: linear 16-bit PCM at 8, 16, 22.05, 24 or 48 kHz, uncompressed. Telnyx does not document its
  byte order; the RTP standard's (RFC 3551: network order, big-endian) is the default, as in
  pipecat's Telnyx serializer, and `l16_byteorder="little"` is there should a deployment need it.

`MediaEncoder` turns PCM at the codec's rate into payload bytes and pads an utterance's tail to a
whole 20 ms frame with encoded silence; `MediaDecoder` turns the caller's payloads back into PCM.
"""

from __future__ import annotations

import numpy as np

from ..kernels.g711 import alaw_encode, ulaw_encode
from ..kernels.g722 import G722Encoder
from ..transport.decoder import AudioDecoder

RATES = {"PCMU": (8000,), "PCMA": (8000,), "G722": (16000,), "L16": (8000, 16000, 22050, 24000, 48000)}
DEFAULT_RATE = {"PCMU": 8000, "PCMA": 8000, "G722": 16000, "L16": 16000}
BYTES_PER_SAMPLE = {"PCMU": 1.0, "PCMA": 1.0, "G722": 0.5, "L16": 2.0}
BYTEORDERS = ("big", "little")
CODED_FORMATS = {"PCMU": "ulaw_8000", "PCMA": "alaw_8000", "G722": "g722_16000"}  # what a client of each hears
FRAME_MS = 20


def check(codec: str, rate: int | None = None, l16_byteorder: str = "big") -> int:
    """The stream's sample rate (the codec's default when rate is None), or ValueError saying
    what is allowed."""
    if codec not in RATES:
        raise ValueError(f"codec must be one of {', '.join(RATES)} (RTP mode; case-sensitive), got {codec!r}")
    rate = DEFAULT_RATE[codec] if rate is None else rate
    if rate not in RATES[codec]:
        raise ValueError(f"{codec} runs at {' or '.join(map(str, RATES[codec]))} Hz, got sampling rate {rate!r}")
    if l16_byteorder not in BYTEORDERS:
        raise ValueError(f"l16_byteorder must be 'big' or 'little', got {l16_byteorder!r}")
    return rate


def whole_frames(ms) -> bool:
    """Whether `ms` is a whole number of 20 ms frames, from one to a second's worth: the rule of
    how much audio a media message (media_ms) or a listener's frame (frame_ms) may hold."""
    return isinstance(ms, int) and FRAME_MS <= ms <= 1000 and ms % FRAME_MS == 0


def frame_bytes(codec: str, rate: int) -> int:
    """Payload bytes of one 20 ms media message."""
    return int(rate * FRAME_MS // 1000 * BYTES_PER_SAMPLE[codec])


class MediaEncoder:
    def __init__(self, codec: str, rate: int | None = None, l16_byteorder: str = "big") -> None:
        self.rate = check(codec, rate, l16_byteorder)
        self.codec = codec
        self.frame_bytes = frame_bytes(codec, self.rate)
        self._l16 = ">i2" if l16_byteorder == "big" else "<i2"
        self._g722 = G722Encoder() if codec == "G722" else None

    def encode(self, pcm: np.ndarray) -> bytes:
        """int16 PCM at the stream's rate -> payload bytes (G.722 holds an odd sample back)."""
        if self.codec == "PCMU":
            return ulaw_encode(pcm).tobytes()
        if self.codec == "PCMA":
            return alaw_encode(pcm).tobytes()
        if self._g722 is not None:
            return self._g722.encode(np.ascontiguousarray(pcm, np.int16)).tobytes()
        return np.asarray(pcm, np.int16).astype(self._l16).tobytes()

    def pad(self, pending: int) -> bytes:
        """The end of an utterance with `pending` payload bytes not yet sent: whatever the codec
        holds, then silence, encoded, up to a whole frame."""
        tail = self._g722.flush().tobytes() if self._g722 is not None else b""
        missing = -(pending + len(tail)) % self.frame_bytes
        return tail + self.encode(np.zeros(int(missing / BYTES_PER_SAMPLE[self.codec]), np.int16))


    def drop(self) -> None:
        """A clear: what the codec holds is not sent (G.722's state runs on, as the far end's does)."""
        if self._g722 is not None:
            self._g722.flush()


class MediaDecoder:
    def __init__(self, codec: str, rate: int | None = None, l16_byteorder: str = "big") -> None:
        self.rate = check(codec, rate, l16_byteorder)
        self.codec = codec
        self._l16 = ">i2" if l16_byteorder == "big" else "<i2"
        self._coded = AudioDecoder(CODED_FORMATS[codec]) if codec in CODED_FORMATS else None

    def decode(self, payload: bytes) -> np.ndarray:
        """Payload bytes -> int16 PCM at the stream's rate; ValueError for an L16 payload of odd length."""
        if self._coded is not None:
            return self._coded.decode(payload)
        if len(payload) % 2:
            raise ValueError(f"an L16 payload holds whole 16-bit samples; got {len(payload)} bytes")
        return np.frombuffer(payload, self._l16).astype(np.int16)
