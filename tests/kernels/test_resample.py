"""Streaming polyphase resampler: the filter spec, the NumPy reference, chunking invariance."""

import numpy as np
import pytest

from csmstream.kernels.resample import Resampler, design, resample_ref

RATES = [8000, 16000]


@pytest.mark.parametrize("fs_out", RATES)
def test_filter_has_80db_stopband_and_flat_passband(fs_out):
    L, M, h = design(24000, fs_out)
    H = np.abs(np.fft.rfft(h / L, 1 << 18))
    f = np.fft.rfftfreq(1 << 18, 1 / (24000 * L))
    nyq = fs_out / 2
    assert 20 * np.log10(H[f >= nyq].max()) <= -80
    passband = 20 * np.log10(H[f <= 0.85 * nyq])
    assert np.abs(passband).max() < 0.01  # dB


@pytest.mark.parametrize("fs_out", RATES)
def test_streaming_in_random_chunks_equals_reference(fs_out):
    rng = np.random.default_rng(fs_out)
    x = rng.normal(scale=0.3, size=30_000).astype(np.float32)
    r = Resampler(24000, fs_out)
    parts, i = [], 0
    while i < len(x):
        c = int(rng.integers(1, 2000))
        parts.append(r.process_float(x[i : i + c]))
        i += c
    y = np.concatenate(parts)
    ref = resample_ref(x, 24000, fs_out)
    assert len(y) == len(ref) == len(x) * fs_out // 24000
    np.testing.assert_allclose(y, ref, atol=2e-6)


@pytest.mark.parametrize("fs_out", RATES)
@pytest.mark.parametrize("chunk_ms", [20, 100, 1000])
def test_exact_output_per_chunk_and_flush(fs_out, chunk_ms):
    r = Resampler(24000, fs_out)
    n_in, n_out = 24 * chunk_ms, fs_out * chunk_ms // 1000
    for _ in range(3):
        assert len(r.process(np.ones(n_in, np.int16))) == n_out
    tail = r.flush()
    assert 0 < len(tail) <= 0.006 * fs_out  # the filter's delay, a few ms
    # after a flush the state is fresh: same input, same output as a new resampler
    x = (np.sin(np.arange(n_in) * 0.05) * 10000).astype(np.int16)
    np.testing.assert_array_equal(r.process(x), Resampler(24000, fs_out).process(x))


def test_tones_pass_and_alias_is_suppressed():
    t = np.arange(48_000) / 24000
    r = Resampler(24000, 8000)
    low = r.process_float(np.sin(2 * np.pi * 1000 * t).astype(np.float32))[500:]
    r.reset()
    high = r.process_float(np.sin(2 * np.pi * 6000 * t).astype(np.float32))[500:]  # would alias to 2 kHz
    rms = lambda v: np.sqrt(np.mean(v.astype(np.float64) ** 2))  # noqa: E731
    assert abs(20 * np.log10(rms(low) / np.sqrt(0.5))) < 0.05
    assert 20 * np.log10(rms(high) / np.sqrt(0.5)) < -80


def test_int16_output_clips():
    r = Resampler(24000, 8000)
    y = r.process(np.full(4800, 32767, np.int16))  # ringing on a full-scale step overshoots
    assert y.dtype == np.int16 and y.max() == 32767
