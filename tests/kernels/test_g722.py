"""G.722 (kernels/g722.py) bit for bit against FFmpeg's independent codec, both directions."""

import numpy as np
import pytest

from csmstream.kernels import g722
from tests import ffmpeg

RATE = 16_000


def _signals():
    rng = np.random.default_rng(722)
    t = np.arange(RATE) / RATE
    env = 0.5 - 0.5 * np.cos(2 * np.pi * 3 * t)
    chirp = np.sin(2 * np.pi * (100 + 3900 * t) * t)  # sweeps through both bands
    speechlike = (9000 * env * chirp + rng.normal(0, 800, t.size))
    return {
        "speechlike": speechlike,
        "full_scale_square": np.where(np.sin(2 * np.pi * 300 * t) >= 0, 32767, -32768),  # saturation paths
        "white_noise_full_range": rng.integers(-32768, 32768, t.size),
        "silence_then_burst": np.concatenate([np.zeros(RATE // 2), rng.normal(0, 12000, RATE // 2)]),
        "impulses": (np.arange(t.size) % 397 == 0) * 30000,
        "high_band_tone": 12000 * np.sin(2 * np.pi * 6000 * t),
    }


@pytest.mark.parametrize("name", list(_signals()))
def test_encoder_matches_ffmpeg(name):
    x = np.clip(_signals()[name], -32768, 32767).astype(np.int16)
    want = ffmpeg.g722_encode(x)
    got = g722.g722_encode(x)
    assert got.dtype == np.uint8 and got.size == x.size // 2
    np.testing.assert_array_equal(got, want)
    assert len(set(got.tolist())) > 8  # the signal exercised the quantizers, not one code


@pytest.mark.parametrize("name", ["speechlike", "full_scale_square", "high_band_tone"])
def test_decoder_matches_ffmpeg(name):
    x = np.clip(_signals()[name], -32768, 32767).astype(np.int16)
    codes = ffmpeg.g722_encode(x)
    np.testing.assert_array_equal(g722.g722_decode(codes), ffmpeg.g722_decode(codes))


def test_decoder_matches_ffmpeg_on_arbitrary_codes():
    """Every code, in random order (a corrupted or hostile stream): the same saturation as FFmpeg."""
    codes = np.random.default_rng(1).integers(0, 256, 20_000).astype(np.uint8)
    np.testing.assert_array_equal(g722.g722_decode(codes.tobytes()), ffmpeg.g722_decode(codes))


def test_pieces_of_any_length_give_the_whole_streams_bytes():
    x = np.clip(_signals()["speechlike"], -32768, 32767).astype(np.int16)
    whole = g722.g722_encode(x)
    enc, dec = g722.G722Encoder(), g722.G722Decoder()
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, x.size), 60, replace=False))  # odd lengths included
    parts = [enc.encode(p) for p in np.split(x, cuts)] + [enc.flush()]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    pcm = np.concatenate([dec.decode(p.tobytes()) for p in np.array_split(whole, 37)])
    np.testing.assert_array_equal(pcm, g722.g722_decode(whole))


def test_round_trip_keeps_a_wideband_signal():
    """Decoded audio is the input, delayed by the two QMFs (about 1.5 ms), to within ADPCM's noise:
    a 1 kHz and a 5 kHz tone (one per band) both come back, > 20 dB SNR."""
    t = np.arange(RATE) / RATE
    x = (6000 * np.sin(2 * np.pi * 1000 * t) + 3000 * np.sin(2 * np.pi * 5000 * t)).astype(np.int16)
    y = g722.g722_decode(g722.g722_encode(x)).astype(np.float64)
    lag = int(np.argmax([np.dot(x[2000:-100], y[2000 + k : y.size - 100 + k]) for k in range(64)]))
    assert 16 <= lag <= 30, lag
    ref, out = x[2000:-100].astype(np.float64), y[2000 + lag : y.size - 100 + lag]
    snr = 10 * np.log10(np.sum(ref**2) / np.sum((out - ref) ** 2))
    assert snr > 20, snr
    spec = np.abs(np.fft.rfft(out[:8000]))
    assert spec[2500] > 0.3 * spec[500]  # 5 kHz (bin 2500 of 8,000 samples) survives, not only 1 kHz


def test_odd_sample_waits_for_its_partner_and_flush_pads_it():
    enc = g722.G722Encoder()
    assert enc.encode(np.array([1000], np.int16)).size == 0
    assert enc.encode(np.array([2000, 3000], np.int16)).size == 1
    tail = enc.flush()
    assert tail.size == 1
    np.testing.assert_array_equal(np.concatenate([g722.g722_encode(np.array([1000, 2000], np.int16)), tail]),
                                  g722.g722_encode(np.array([1000, 2000, 3000, 0], np.int16)))
    assert enc.flush().size == 0
    enc.reset()
    np.testing.assert_array_equal(enc.encode(np.full(40, 500, np.int16)), g722.g722_encode(np.full(40, 500, np.int16)))


def test_tables_follow_their_definitions():
    assert g722.ILB[0] == 2048 and g722.ILB[1] == 2093 and g722.ILB[31] == 4008
    assert g722.QMF.sum() * 2 == 8192  # unit gain at DC after the 2^-14 and 2^-11 scalings with 2 bands
    assert sorted(g722.ILP[1:].tolist() + g722.ILN[1:].tolist()) == list(range(4, 64))  # 60 levels, each once


@pytest.mark.parametrize("bad", [np.zeros(4, np.float32), np.zeros((2, 4), np.int16), np.zeros(4, np.int32)])
def test_encoder_refuses_what_is_not_16_bit_mono(bad):
    with pytest.raises(ValueError, match="1-D int16"):
        g722.G722Encoder().encode(bad)


def test_decoder_refuses_what_is_not_bytes():
    with pytest.raises(ValueError, match="bytes"):
        g722.G722Decoder().decode(np.zeros(4, np.int16))
