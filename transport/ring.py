"""A single-producer / single-consumer ring of int16 samples, preallocated, with no locks.

The producer (the engine thread) owns `_written`, the consumer (the event loop) owns `_read`;
each only ever stores its own counter, after the data it covers is in place, and only reads the
other's. Counters are unbounded Python ints (total samples), so full and empty never alias and
no index wraps. Under CPython a counter store is a single atomic reference store, and the data
copy completes before it in program order, so the consumer never sees an index ahead of its data.
"""

from __future__ import annotations

import numpy as np


class PcmRing:
    __slots__ = ("_read", "_written", "buf", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity must be >= 1 sample, got {capacity}")
        self.buf = np.zeros(capacity, dtype=np.int16)
        self.capacity = capacity
        self._written = 0
        self._read = 0

    # -- producer ------------------------------------------------------------------------------
    def write(self, samples: np.ndarray) -> int:
        """Append as many samples as fit; returns how many were written (never blocks)."""
        w = self._written
        n = min(len(samples), self.capacity - (w - self._read))
        if n <= 0:
            return 0
        at = w % self.capacity
        first = min(n, self.capacity - at)
        self.buf[at : at + first] = samples[:first]
        if n > first:
            self.buf[: n - first] = samples[first:n]
        self._written = w + n  # publish after the data is in place
        return n

    def free(self) -> int:
        return self.capacity - (self._written - self._read)

    # -- consumer ------------------------------------------------------------------------------
    def available(self) -> int:
        return self._written - self._read

    def read(self, n: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Take exactly n samples if that many are there, else None (nothing consumed)."""
        r = self._read
        if n <= 0 or self._written - r < n:
            return None
        if out is None:
            out = np.empty(n, dtype=np.int16)
        at = r % self.capacity
        first = min(n, self.capacity - at)
        out[:first] = self.buf[at : at + first]
        if n > first:
            out[first:n] = self.buf[: n - first]
        self._read = r + n  # release the space after the copy
        return out

    def read_all(self) -> np.ndarray:
        """Take whatever is there (possibly nothing)."""
        return self.read(self.available()) if self.available() else np.empty(0, dtype=np.int16)

    @property
    def total_written(self) -> int:
        return self._written

    @property
    def total_read(self) -> int:
        return self._read
