import subprocess
import sys
import wave


def run(*args):
    return subprocess.run([sys.executable, "-m", "csmstream", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0 and "say" in out.stdout and "demo" in out.stdout


def test_say_writes_a_playable_wav(tmp_path):
    path = tmp_path / "hello.wav"
    out = run("say", "Hello there.", "--out", str(path), "--device", "cpu", "--seed", "3", "--max-frames", "6")
    assert out.returncode == 0, out.stderr
    assert "noise-like" in out.stderr  # the tiny model says what it is
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() > 0 and w.getnframes() % 1920 == 0


def test_bad_argument_is_one_clear_line():
    out = run("say", "hi", "--topk", "0", "--device", "cpu")
    assert out.returncode == 2
    assert "error: topk must be an integer" in out.stderr and "Traceback" not in out.stderr
