"""CPU audio conversions: float PCM -> int16 (numba kernel beside its NumPy reference)."""

from __future__ import annotations

import numpy as np
from numba import njit


def float_to_int16_ref(x: np.ndarray) -> np.ndarray:
    """Float PCM in [-1, 1] to int16, rounding to nearest (ties to even) and clipping (never
    wrapping). NaN becomes 0. Random-weight codecs reach well past ±1, so the clip matters."""
    y = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=2.0, neginf=-2.0) * 32768.0
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


@njit(nogil=True, cache=True)
def _float_to_int16(x, out):
    for i in range(x.shape[0]):
        v = x[i]
        if v != v:  # NaN
            out[i] = 0
            continue
        y = np.rint(v * np.float32(32768.0))
        out[i] = 32767 if y > 32767.0 else (-32768 if y < -32768.0 else np.int16(y))


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """As float_to_int16_ref, one pass, no temporaries (the per-frame path of the engine thread)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(x.shape[0], np.int16)
    _float_to_int16(x, out)
    return out
