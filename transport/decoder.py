"""What a client of a raw format hears: its bytes, in order and cut anywhere, back to int16 PCM at
the format's rate (G.711 and G.722 decoded; G.722 statefully, like a phone would).

Apart from encoder.py, and importing the codec kernels only for a format that needs them, so a
client of PCM (`csm-stream say`) does not load numba: 0.3 s of its start-up on a 2-core machine.
"""

from __future__ import annotations

import numpy as np

from .protocol import FORMATS


class AudioDecoder:
    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"a raw format is decoded here ({', '.join(FORMATS)}), got {fmt!r:.40}")
        self.rate, self.encoding = FORMATS[fmt]
        self._codec = None  # a stateless function (G.711) or a stateful decoder's method (G.722)
        if self.encoding in ("ulaw", "alaw"):
            from ..kernels import g711

            self._codec = g711.ulaw_decode if self.encoding == "ulaw" else g711.alaw_decode
        elif self.encoding == "g722":
            from ..kernels.g722 import G722Decoder

            self._codec = G722Decoder().decode
        self._odd = b""  # a 16-bit sample cut in two

    def decode(self, data: bytes) -> np.ndarray:
        if self._codec is not None:
            return self._codec(data)
        data = self._odd + bytes(data)
        whole = len(data) // 2 * 2
        self._odd = data[whole:]
        return np.frombuffer(data[:whole], "<i2").astype(np.int16)
