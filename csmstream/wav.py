"""Standard 16-bit mono WAV files (stdlib wave), written as audio arrives."""

from __future__ import annotations

import wave
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def write_wav(path: str | Path, chunks: Iterable[np.ndarray], sample_rate: int = 24_000) -> int:
    """Write int16 mono chunks to a WAV file as they arrive; returns the number of samples.

    Raises:
        ValueError: a chunk is not 1-D int16, or the sample rate is not a positive integer.
    """
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.dtype != np.int16 or chunk.ndim != 1:
                raise ValueError(f"WAV chunks must be 1-D int16 arrays, got {chunk.dtype}{list(chunk.shape)}")
            w.writeframes(chunk.astype("<i2", copy=False).tobytes())
            total += len(chunk)
    return total


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV: (int16 samples [n] or [n, channels], sample_rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit WAV; only 16-bit PCM is supported")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
        ch = w.getnchannels()
        return (data if ch == 1 else data.reshape(-1, ch)), w.getframerate()
