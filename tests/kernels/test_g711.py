"""G.711 against CPython's audioop over all 65,536 inputs, plus PROTOCOLS.md's hand vectors."""

import hashlib
import warnings

import numpy as np
import pytest

from csmstream.kernels import g711

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop")  # the standard library through Python 3.12

ALL = np.arange(-32768, 32768, dtype=np.int16)
ALL_BYTES = ALL.astype("<i2").tobytes()


@pytest.mark.parametrize("enc,ref,lin2", [
    (g711.ulaw_encode, g711.ulaw_encode_ref, "lin2ulaw"),
    (g711.alaw_encode, g711.alaw_encode_ref, "lin2alaw"),
])
def test_encoders_bit_exact_with_audioop(enc, ref, lin2):
    want = getattr(audioop, lin2)(ALL_BYTES, 2)
    assert ref(ALL).tobytes() == want
    assert enc(ALL).tobytes() == want


@pytest.mark.parametrize("dec,ref,to_lin", [
    (g711.ulaw_decode, g711.ulaw_decode_ref, "ulaw2lin"),
    (g711.alaw_decode, g711.alaw_decode_ref, "alaw2lin"),
])
def test_decoders_bit_exact_with_audioop(dec, ref, to_lin):
    codes = bytes(range(256))
    want = np.frombuffer(getattr(audioop, to_lin)(codes, 2), "<i2")
    np.testing.assert_array_equal(ref(np.arange(256)), want)
    np.testing.assert_array_equal(dec(codes), want)


def test_protocol_vectors_and_hash():
    vec = {0: 0xFF, 3: 0xFF, 4: 0xFE, -1: 0x7E, 100: 0xF2, -100: 0x72, 1000: 0xCE, -1000: 0x4E,
           4000: 0xAF, 16000: 0x90, 32767: 0x80, -32768: 0x00}
    got = g711.ulaw_encode(np.array(list(vec), np.int16))
    assert got.tolist() == list(vec.values())
    assert hashlib.sha256(g711.ulaw_encode(ALL).tobytes()).hexdigest() == \
        "81d633c9e6972a18c74a58720b96cb8ca0bdd096d4060b646dd708c3b846019a"
    assert g711.ulaw_decode(bytes([0x00, 0x80, 0x7F, 0xFF])).tolist() == [-32124, 32124, 0, 0]
    assert g711.alaw_encode(np.zeros(1, np.int16))[0] == g711.ALAW_SILENCE == 0xD5


def test_round_trip_error_is_bounded():
    """Decode(encode(x)) stays within the codec's step: 1/16 of the segment, i.e. < 3.2 % + 8."""
    for enc, dec in [(g711.ulaw_encode, g711.ulaw_decode), (g711.alaw_encode, g711.alaw_decode)]:
        back = dec(enc(ALL)).astype(np.int32)
        err = np.abs(back - ALL.astype(np.int32))
        assert (err <= np.abs(ALL.astype(np.int32)) * 0.032 + 132).all()
