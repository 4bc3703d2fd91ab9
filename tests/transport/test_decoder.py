"""transport/decoder.py: a client of PCM does not load the codec kernels (numba); the coded
formats decode with the kernels' own functions (their exactness is tested against FFmpeg and
audioop in tests/kernels, and the round trips in test_encoder.py)."""

import subprocess
import sys

import numpy as np
import pytest

from csmstream.kernels.g711 import alaw_decode, ulaw_decode
from csmstream.kernels.g722 import g722_decode
from csmstream.transport.decoder import AudioDecoder


def test_a_pcm_client_like_say_does_not_import_numba():
    code = ("import sys; from csmstream import say; from csmstream.transport.decoder import AudioDecoder; "
            "from csmstream.transport.client import SesameConnectionError; from csmstream.wav import WavWriter; "
            "d = AudioDecoder('pcm_16000'); d.decode(b'\\x01'); "
            "print(len(d.decode(b'\\x02\\x03')), 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False"]  # (the split sample put together: 0x0201 then a held 0x03)


@pytest.mark.parametrize("fmt,ref", [("ulaw_8000", ulaw_decode), ("alaw_8000", alaw_decode),
                                     ("g722_16000", g722_decode)])
def test_coded_formats_decode_in_pieces_as_the_kernels_do_whole(fmt, ref):
    data = np.random.default_rng(4).integers(0, 256, 1001, dtype=np.uint8).tobytes()
    dec = AudioDecoder(fmt)
    got = np.concatenate([dec.decode(data[i : i + 97]) for i in range(0, len(data), 97)])
    np.testing.assert_array_equal(got, ref(data))
    assert dec.rate == int(fmt.split("_")[1])


def test_pcm_keeps_a_sample_cut_in_two_and_refuses_what_is_not_raw():
    dec = AudioDecoder("pcm_24000")
    x = np.arange(-500, 500, 7, dtype=np.int16)
    raw = x.astype("<i2").tobytes()
    np.testing.assert_array_equal(np.concatenate([dec.decode(raw[:5]), dec.decode(raw[5:])]), x)
    with pytest.raises(ValueError, match="a raw format is decoded here"):
        AudioDecoder("mp3_44100_128")
