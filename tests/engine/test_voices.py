"""Named voices' transcripts: read as the UTF-8 text they are, or refused with the file named."""

import pytest

from tests.transport.test_text_stream import _write_voice


@pytest.fixture(scope="module")
def eng():
    import csmstream

    return csmstream.load("tiny", device="cpu", max_streams=1)


def test_a_byte_order_mark_is_not_part_of_the_transcript(tmp_path, eng):
    from csmstream.engine.voices import load_voices

    _write_voice(tmp_path, "zoe", None)
    (tmp_path / "zoe.txt").write_bytes("\ufeffZoë speaks.\n".encode("utf-8"))  # as Notepad saves UTF-8
    assert load_voices(tmp_path, eng)["zoe"].text == "Zoë speaks."


def test_a_transcript_that_is_not_utf8_is_refused_naming_the_file(tmp_path, eng):
    from csmstream.engine.voices import load_voices

    _write_voice(tmp_path, "zoe", None)
    (tmp_path / "zoe.txt").write_bytes("Zoë speaks.".encode("latin-1"))
    with pytest.raises(ValueError, match=r"zoe\.txt: not UTF-8 text \(invalid continuation byte at byte 2\)"):
        load_voices(tmp_path, eng)


def test_extensions_in_capitals_are_voices_too(tmp_path, eng):
    """NAME.WAV / NAME.TXT, as some recorders and Windows tools name them, were passed over: a
    folder of them was "no NAME.wav files", and one beside lower-case ones went missing."""
    from csmstream.engine.voices import load_voices

    _write_voice(tmp_path, "ada", "Ada speaks.")
    _write_voice(tmp_path, "bob", None)
    (tmp_path / "bob.wav").rename(tmp_path / "bob.WAV")
    (tmp_path / "bob.TXT").write_text("Bob speaks.")
    voices = load_voices(tmp_path, eng)
    assert {n: v.text for n, v in voices.items()} == {"ada": "Ada speaks.", "bob": "Bob speaks."}
    assert voices["bob"].codes.shape == voices["ada"].codes.shape  # (the same tone and length)
    (tmp_path / "bob.TXT").unlink()
    with pytest.raises(ValueError, match=r"bob\.WAV: missing transcript bob\.txt"):
        load_voices(tmp_path, eng)
