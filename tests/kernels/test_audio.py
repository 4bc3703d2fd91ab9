import numpy as np

from csmstream.kernels.audio import float_to_int16


def test_clips_never_wraps_and_rounds():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.5, -3.0, 1e9, np.nan, 1 / 32768, -1.4 / 32768], dtype=np.float32)
    y = float_to_int16(x)
    assert y.dtype == np.int16
    assert y.tolist() == [0, 16384, -16384, 32767, -32768, 32767, -32768, 32767, 0, 1, -1]


def test_kernel_matches_reference_on_random_and_edge_values():
    from csmstream.kernels.audio import float_to_int16_ref

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(scale=1.5, size=100_000).astype(np.float32),
                        np.array([np.inf, -np.inf, np.nan, 0.5 / 32768, 1.5 / 32768, -2.5 / 32768,
                                  32767.5 / 32768, -32768.5 / 32768], np.float32)])
    np.testing.assert_array_equal(float_to_int16(x), float_to_int16_ref(x))
