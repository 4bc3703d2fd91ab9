"""The Ogg page checksum: CRC-32 with polynomial 0x04C11DB7, MSB first, initial value 0 and no
final XOR (RFC 3533) -- not zlib's reflected CRC-32, so zlib.crc32 cannot compute it. A 256-entry
table built from the definition, applied by numba (a page is up to ~64 KB; Python's own loop
would cost ~0.1 us a byte on the codec threads)."""

from __future__ import annotations

import numpy as np
from numba import njit

POLY = 0x04C11DB7


def _table() -> np.ndarray:
    t = np.zeros(256, np.uint32)
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ POLY) if r & 0x80000000 else (r << 1)
        t[i] = r & 0xFFFFFFFF
    return t


TABLE = _table()


@njit(nogil=True, cache=True)
def _crc(data, table):
    crc = np.uint32(0)
    for i in range(data.shape[0]):
        crc = np.uint32((crc << np.uint32(8)) ^ table[np.uint32((crc >> np.uint32(24)) ^ data[i])])
    return crc


def ogg_crc32(data: bytes) -> int:
    """The checksum of an Ogg page whose CRC field holds zeros."""
    return int(_crc(np.frombuffer(data, np.uint8), TABLE))
