import wave

import numpy as np
import pytest

from csmstream.wav import WavWriter, read_wav, write_wav


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


def test_a_writer_left_by_an_error_keeps_a_playable_file_of_what_arrived(tmp_path):
    path = tmp_path / "cut.wav"
    chunk = np.arange(100, dtype=np.int16)
    with pytest.raises(KeyboardInterrupt), WavWriter(path, 8000) as w:
        w.write(chunk)
        w.write(chunk[::-1].copy())
        raise KeyboardInterrupt
    data, rate = read_wav(path)
    assert rate == 8000 and w.samples == 200 and w.seconds == 0.025
    assert np.array_equal(data, np.concatenate([chunk, chunk[::-1]]))


def test_a_path_that_cannot_be_written_is_a_clear_error_at_open(tmp_path):
    with pytest.raises(ValueError, match=f"cannot write {str(tmp_path)!r}: Is a directory"):
        WavWriter(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot write .*: a file is in the way of its folder .*file'"):
        WavWriter(tmp_path / "file" / "x.wav")
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        WavWriter(tmp_path / "ok.wav", 0)


def test_a_folder_path_or_another_formats_name_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"it names a folder; give a file name such as .*new/out\.wav"):
        WavWriter(f"{tmp_path}/new/")
    for name in ("x.mp3", "x.OPUS", "x.flac"):
        with pytest.raises(ValueError, match=r"this writes a WAV file, and '\.\w+' names another format; use a .wav"):
            WavWriter(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither a file named 'new' nor an empty x.mp3
    w = WavWriter(tmp_path / "plain")  # no suffix at all is the caller's choice
    w.close()
    data, rate = read_wav(tmp_path / "plain")
    assert rate == 24000 and data.size == 0


def test_the_file_appears_whole_at_close_and_a_run_with_nothing_leaves_an_earlier_file_alone(tmp_path):
    path = tmp_path / "say.wav"
    write_wav(path, [np.arange(100, dtype=np.int16)])
    earlier = path.read_bytes()
    w = WavWriter(path, 8000)
    w.write(np.ones(50, np.int16))
    assert path.read_bytes() == earlier  # while writing, readers still see the earlier, whole file
    w.close()
    data, rate = read_wav(path)
    assert rate == 8000 and np.array_equal(data, np.ones(50, np.int16))
    again = path.read_bytes()
    WavWriter(path).discard()  # (a writability check, as `demo` makes one)
    with pytest.raises(ConnectionError), WavWriter(path) as w:
        raise ConnectionError("the server went away before any audio")
    assert path.read_bytes() == again  # neither emptied it
    with pytest.raises(ConnectionError), WavWriter(path) as w:
        w.write(np.full(7, 3, np.int16))
        raise ConnectionError("after some audio")
    assert np.array_equal(read_wav(path)[0], np.full(7, 3, np.int16))  # what arrived is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["say.wav"]  # no .part left behind
