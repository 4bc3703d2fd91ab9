"""The SPSC ring: semantics, wrap-around, and a threaded stress test of order and completeness."""

import threading

import numpy as np
import pytest

from csmstream.transport.ring import PcmRing


def test_exact_chunks_wrap_and_capacity():
    r = PcmRing(10)
    assert r.write(np.arange(7, dtype=np.int16)) == 7
    assert r.read(8) is None and r.available() == 7  # not enough: nothing consumed
    assert r.read(4).tolist() == [0, 1, 2, 3]
    assert r.write(np.arange(7, 20, dtype=np.int16)) == 7  # only 7 free
    assert r.free() == 0 and r.write(np.ones(3, np.int16)) == 0
    assert r.read(10).tolist() == list(range(4, 14))  # across the wrap
    assert r.available() == 0 and r.read_all().size == 0
    with pytest.raises(ValueError, match="capacity"):
        PcmRing(0)


def test_threaded_stress_every_sample_once_in_order():
    total = 3_000_000
    ring = PcmRing(4096)
    rng = np.random.default_rng(0)
    src = (np.arange(total) % 65536 - 32768).astype(np.int16)
    got = np.empty(total, np.int16)
    errors = []

    def produce():
        i, prng = 0, np.random.default_rng(1)
        while i < total:
            n = int(prng.integers(1, 3000))
            i += ring.write(src[i : i + n])

    def consume():
        i = 0
        while i < total:
            n = min(int(rng.integers(1, 2500)), total - i)
            chunk = ring.read(n)
            if chunk is not None:
                if len(chunk) != n:
                    errors.append(("short read", i, len(chunk)))
                got[i : i + n] = chunk
                i += n

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    np.testing.assert_array_equal(got, src)
    assert ring.total_written == ring.total_read == total
