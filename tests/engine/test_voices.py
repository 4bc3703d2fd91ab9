"""Named voices' transcripts: read as the UTF-8 text they are, or refused with the file named."""

import numpy as np
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


def _wav(path, frames: bytes, width: int, rate: int = 16000, channels: int = 1, fmt: int = 1) -> None:
    """A WAV file by hand (the wave module writes PCM only): fmt 1 is PCM, 3 is IEEE float."""
    import struct

    block = width * channels
    head = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(frames), b"WAVE", b"fmt ", 16, fmt, channels, rate,
                       rate * block, block, 8 * width, b"data", len(frames))
    path.write_bytes(head + frames)


def test_8_24_and_32_bit_pcm_voices_read_as_the_same_samples(tmp_path, eng):
    """Recorders often write 24-bit (or 32-bit) PCM: such a voice was refused ("voices must be 16-bit
    PCM"). The same int16 tone stored at each width reads back as those samples exactly (8-bit: to
    what its 8 bits keep); a float WAV is refused saying what to export instead."""
    import numpy as np

    from csmstream.engine.voices import load_voices, read_wav_24k_mono

    t = np.arange(4000) / 16000
    x = (np.sin(2 * np.pi * 220 * t) * 9000).astype(np.int16)
    _wav(tmp_path / "w16.wav", x.astype("<i2").tobytes(), 2)
    _wav(tmp_path / "w32.wav", (x.astype(np.int64) << 16).astype("<i4").tobytes(), 4)
    v24 = (x.astype(np.int64) << 8) & 0xFFFFFF
    _wav(tmp_path / "w24.wav", np.stack([v24 & 255, (v24 >> 8) & 255, v24 >> 16], 1).astype(np.uint8).tobytes(), 3)
    _wav(tmp_path / "w8.wav", ((x.astype(np.int64) >> 8) + 128).astype(np.uint8).tobytes(), 1)
    want = read_wav_24k_mono(tmp_path / "w16.wav")
    for name in ("w24", "w32"):
        np.testing.assert_array_equal(read_wav_24k_mono(tmp_path / f"{name}.wav"), want)
    _wav(tmp_path / "w8as16.wav", ((x >> 8).astype(np.int16) << 8).astype("<i2").tobytes(), 2)  # what 8 bits keep
    np.testing.assert_array_equal(read_wav_24k_mono(tmp_path / "w8.wav"), read_wav_24k_mono(tmp_path / "w8as16.wav"))
    (tmp_path / "w8as16.wav").unlink()
    for name in ("w16", "w24", "w8"):
        (tmp_path / f"{name}.txt").write_text("A tone.")
    (tmp_path / "w32.wav").unlink()
    voices = load_voices(tmp_path, eng)
    np.testing.assert_array_equal(voices["w24"].codes, voices["w16"].codes)
    _wav(tmp_path / "f32.wav", (x / 32768).astype("<f4").tobytes(), 4, fmt=3)
    with pytest.raises(ValueError, match=r"f32\.wav: not a readable WAV file .*float WAVs are not read: export 16- or"):
        read_wav_24k_mono(tmp_path / "f32.wav")


def test_aliases_are_pairs_joined_by_commas_and_each_names_one_voice():
    from csmstream.engine.voices import Voice, parse_aliases, with_aliases

    assert parse_aliases(None) == {} and parse_aliases([]) == {}
    assert parse_aliases(["alloy=ada, nova = ben", "echo=ada", "alloy=ada"]) == {"alloy": "ada", "nova": "ben",
                                                                                  "echo": "ada"}
    for bad, msg in ((["alloy"], "write ALIAS=VOICE"), (["=ada"], "write ALIAS=VOICE"), (["alloy="], "ALIAS=VOICE"),
                     (["alloy=ada,"], "write ALIAS=VOICE"), (["alloy=ada", "alloy=ben"], "given twice")):
        with pytest.raises(ValueError, match=msg):
            parse_aliases(bad)
    ada = Voice("ada", "Hi.", np.zeros((2, 32), np.int64))
    both = with_aliases({"ada": ada}, {"alloy": "ada", "echo": "ada"}, "ada")
    assert list(both) == ["ada", "alloy", "echo"] and all(v is ada for v in both.values())
    with pytest.raises(ValueError, match="no such voice"):
        with_aliases({}, None, "ada")


def _window(eng, positions):
    """The engine as load_voices reads it, with a context window of `positions`."""
    from types import SimpleNamespace

    return SimpleNamespace(codec=eng.codec, tokenizer=eng.tokenizer, config=eng.config,
                           gen=SimpleNamespace(max_seq_len=positions))


def test_a_voice_that_leaves_no_room_is_refused_and_a_long_one_warned(tmp_path, eng, caplog):
    """A voice's turn opens each of its requests in the same window as the text and the speech (a
    frame a position); replies stop where the window ends, so one that fills it is refused and one
    that takes over half is warned of, with the figures."""
    from csmstream.engine.prompt import build_prompt, text_rows
    from csmstream.engine.voices import MIN_ROOM, load_voices

    _write_voice(tmp_path, "ada", "Ada speaks.", seconds=4.5)  # 57 frames (the last one partly)
    voice = load_voices(tmp_path, eng)["ada"]
    n = eng.config.num_codebooks
    request = "Hi."  # what a request adds after the voice's turn, counted by the prompt builder itself
    tokens, _ = build_prompt(eng.tokenizer, request, 0, [(0, voice.text, voice.codes)], n)
    used = len(tokens) - len(text_rows(eng.tokenizer, 0, request, n)[0])
    assert len(voice.codes) == 57 and used > MIN_ROOM  # (so that MIN_ROOM is under half the windows below)

    with caplog.at_level("WARNING", logger="csmstream.engine"):
        load_voices(tmp_path, _window(eng, 2 * used))  # exactly half: quiet
    assert "positions" not in caplog.text

    load_voices(tmp_path, _window(eng, used + MIN_ROOM))  # room for a short reply, but under half the window
    room = MIN_ROOM
    assert (f"voice 'ada': 4.6 s of audio with its transcript take {used} of the model's {used + MIN_ROOM} "
            f"positions; its replies stop after at most {room * 0.08:.0f} s of speech") in caplog.text

    half = ((used + MIN_ROOM - 1) // 2 - (used - 57)) * 0.08  # the frames half the window holds after the transcript
    with pytest.raises(ValueError, match=rf"ada\.wav: 4\.6 s of audio with its transcript take {used} of the "
                                         rf"model's {used + MIN_ROOM - 1} positions, leaving {MIN_ROOM - 1} for a "
                                         rf"request's text and speech \(at least {MIN_ROOM} needed\); under {half:.0f} "
                                         rf"s of audio leaves half the window$"):
        load_voices(tmp_path, _window(eng, used + MIN_ROOM - 1))
    (tmp_path / "ada.txt").write_text("Ada speaks. " * 12)  # the transcript alone is more than half of it
    with pytest.raises(ValueError, match=r"needed\); its transcript alone takes \d+ positions: shorten it$"):
        load_voices(tmp_path, _window(eng, 2 * used))
