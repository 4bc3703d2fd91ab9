"""G.711 mu-law and A-law, bit-exact with CPython's audioop (lin2ulaw / lin2alaw / ulaw2lin /
alaw2lin), which is what telephony stacks compare against (../shared/PROTOCOLS.md §2).

audioop's mu-law encoder works on the 14-bit value (sample >> 2, floor) with bias 33 and clip
8159; its A-law encoder on the 13-bit value (sample >> 3) with one's-complement-style magnitude
for negatives. The NumPy functions below state those rules directly (the reference); the kernels
are 64 K-entry lookup tables built from them once, applied by numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ULAW_SILENCE = 0xFF
ALAW_SILENCE = 0xD5


def _segment(mag: np.ndarray, ends: tuple[int, ...]) -> np.ndarray:
    """Index of the first segment end >= mag (len(ends) when beyond the last)."""
    return np.searchsorted(np.asarray(ends), mag, side="left")


def ulaw_encode_ref(x: np.ndarray) -> np.ndarray:
    """int16 -> mu-law bytes, written from the rules (the reference for the table kernel)."""
    v = np.asarray(x, dtype=np.int16).astype(np.int32) >> 2  # 14-bit, floor
    neg = v < 0
    mag = np.minimum(np.where(neg, -v, v), 8159) + 33
    seg = _segment(mag, (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF))
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0xF))
    return (code ^ np.where(neg, 0x7F, 0xFF)).astype(np.uint8)


def alaw_encode_ref(x: np.ndarray) -> np.ndarray:
    """int16 -> A-law bytes (even-bit inverted), from the rules."""
    v = np.asarray(x, dtype=np.int16).astype(np.int32) >> 3  # 13-bit, floor
    neg = v < 0
    mag = np.where(neg, -v - 1, v)
    seg = _segment(mag, (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF))
    s7 = np.minimum(seg, 7)
    quant = np.where(s7 < 2, mag >> 1, mag >> s7) & 0xF
    code = np.where(seg >= 8, 0x7F, (s7 << 4) | quant)
    return (code ^ np.where(neg, 0x55, 0xD5)).astype(np.uint8)


def ulaw_decode_ref(b: np.ndarray) -> np.ndarray:
    """mu-law bytes -> int16 (audioop.ulaw2lin: 0x00 -> -32124, 0x80 -> 32124, 0x7F/0xFF -> 0)."""
    u = ~np.asarray(b, dtype=np.uint8).astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def alaw_decode_ref(b: np.ndarray) -> np.ndarray:
    """A-law bytes -> int16 (audioop.alaw2lin)."""
    a = np.asarray(b, dtype=np.uint8).astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_tables: dict[str, np.ndarray] = {}


def _table(name: str) -> np.ndarray:
    if name not in _tables:
        if name == "ulaw_enc":
            _tables[name] = ulaw_encode_ref(np.arange(-32768, 32768))
        elif name == "alaw_enc":
            _tables[name] = alaw_encode_ref(np.arange(-32768, 32768))
        elif name == "ulaw_dec":
            _tables[name] = ulaw_decode_ref(np.arange(256))
        else:
            _tables[name] = alaw_decode_ref(np.arange(256))
    return _tables[name]


@njit(nogil=True, cache=True)
def _encode(x, table, out):
    for i in range(x.shape[0]):
        out[i] = table[np.int32(x[i]) + 32768]


@njit(nogil=True, cache=True)
def _decode(b, table, out):
    for i in range(b.shape[0]):
        out[i] = table[b[i]]


def ulaw_encode(x: np.ndarray) -> np.ndarray:
    """int16 PCM -> mu-law bytes (uint8), one per sample."""
    x = np.ascontiguousarray(x, dtype=np.int16)
    out = np.empty(x.shape[0], np.uint8)
    _encode(x, _table("ulaw_enc"), out)
    return out


def alaw_encode(x: np.ndarray) -> np.ndarray:
    """int16 PCM -> A-law bytes (uint8), one per sample."""
    x = np.ascontiguousarray(x, dtype=np.int16)
    out = np.empty(x.shape[0], np.uint8)
    _encode(x, _table("alaw_enc"), out)
    return out


def ulaw_decode(b) -> np.ndarray:
    """mu-law bytes (bytes or uint8 array) -> int16 PCM."""
    b = np.frombuffer(b, np.uint8) if isinstance(b, (bytes, bytearray, memoryview)) else np.asarray(b, np.uint8)
    out = np.empty(b.shape[0], np.int16)
    _decode(np.ascontiguousarray(b), _table("ulaw_dec"), out)
    return out


def alaw_decode(b) -> np.ndarray:
    """A-law bytes (bytes or uint8 array) -> int16 PCM."""
    b = np.frombuffer(b, np.uint8) if isinstance(b, (bytes, bytearray, memoryview)) else np.asarray(b, np.uint8)
    out = np.empty(b.shape[0], np.int16)
    _decode(np.ascontiguousarray(b), _table("alaw_dec"), out)
    return out
