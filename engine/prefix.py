"""Prefix cache for named voices: the backbone KV of a voice's context turn, computed once.

A voice prompt (its transcript + its audio codes) is the first context turn of every request that
uses the voice, so its KV is the same every time (attention is causal: later positions never
change earlier ones). The first request with a pinned voice prefills as usual and the cache keeps a
copy of the KV of the voice's positions; later requests copy that KV into their slot and prefill
only what follows (earlier sentences, the new text). The key includes the speaker id, since the
voice turn is written as `[speaker]text`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def digest(text: str, codes: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(text.encode("utf-8"))
    h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    h.update(str(codes.shape).encode())
    return h.digest()


@dataclass
class PrefixUse:
    """How one prepared request uses the cache: `kv` set means copy it in and prefill only the
    tokens after `length`; `kv` None means prefill everything and store the first `length`
    positions under `key` afterwards."""

    key: tuple
    length: int
    kv: object = None  # torch.Tensor [layers, length, 2 * kv_heads, head_dim] on the engine's device


class PrefixCache:
    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._pinned: set[bytes] = set()
        self._kv: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def pin(self, text: str, codes: np.ndarray) -> None:
        """Mark a (transcript, codes) turn as worth caching when it opens a request's context."""
        with self._lock:
            self._pinned.add(digest(text, codes))

    def unpin(self, text: str, codes: np.ndarray) -> None:
        """No longer cache that turn, and free the KV kept for it (a voice removed or changed)."""
        d = digest(text, codes)
        with self._lock:
            self._pinned.discard(d)
            for key in [k for k in self._kv if k[1] == d]:
                del self._kv[key]

    def lookup(self, speaker_id: int, text: str, codes: np.ndarray | None, length: int) -> PrefixUse | None:
        if codes is None or not self._pinned:
            return None
        d = digest(text, codes)
        if d not in self._pinned:
            return None
        key = (int(speaker_id), d)
        with self._lock:
            kv = self._kv.get(key)
            if kv is not None:
                self._kv.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        return PrefixUse(key, length, kv)

    def store(self, key: tuple, kv) -> None:
        with self._lock:
            self._kv[key] = kv
            self._kv.move_to_end(key)
            while len(self._kv) > self.max_entries:
                self._kv.popitem(last=False)

    def __len__(self) -> int:
        return len(self._kv)
