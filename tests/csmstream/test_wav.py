import wave

import numpy as np
import pytest

from csmstream.wav import read_wav, write_wav


def test_roundtrip_standard_wav(tmp_path):
    chunks = [np.arange(-5, 5, dtype=np.int16) * 1000, np.array([32767, -32768], dtype=np.int16)]
    n = write_wav(tmp_path / "a.wav", iter(chunks))
    assert n == 12
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 24000, 12)
    data, rate = read_wav(tmp_path / "a.wav")
    assert rate == 24000 and np.array_equal(data, np.concatenate(chunks))


def test_rejects_non_int16(tmp_path):
    with pytest.raises(ValueError, match="1-D int16"):
        write_wav(tmp_path / "b.wav", [np.zeros(4, dtype=np.float32)])
