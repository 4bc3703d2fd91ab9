"""CPU audio conversions (plain NumPy references; numba kernels join them where they pay off)."""

from __future__ import annotations

import numpy as np


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """Float PCM in [-1, 1] to int16, rounding to nearest and clipping (never wrapping).
    NaN becomes 0. Random-weight codecs reach well past ±1, so the clip matters."""
    y = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0) * 32768.0
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)
