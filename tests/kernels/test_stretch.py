"""kernels/stretch.py: WSOLA speaking rate. The streaming stretcher equals the whole-signal
reference sample for sample however its input is cut; and against expectations that do not come
from either: the pitch stays, the level stays (frames add in phase), events move to t / speed, the
length is round(n / speed), silence stays silence."""

import numpy as np
import pytest

from csmstream.kernels.stretch import FRAME, HOP, TOLERANCE, TimeStretcher, out_length, stretch_ref

RATE = 24_000
SPEEDS = [0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0]


def _voiced(seconds: float, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """Speech-like: a gliding harmonic tone, its level moving, with breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 1.5 * t))) / RATE
    tone = sum(np.sin(h * phase) / h for h in range(1, 6))
    level = 0.6 + 0.4 * np.sin(2 * np.pi * 2 * t)
    return (5000 * tone * level + rng.normal(0, 300, len(t))).astype(np.int16)


def _streamed(x: np.ndarray, speed: float, cuts) -> np.ndarray:
    st, out, i = TimeStretcher(speed), [], 0
    for n in cuts:
        out.append(st.process(x[i:i + n]))
        i += n
    out.append(st.process(x[i:]))
    out.append(st.flush())
    assert st.flush().size == 0  # a second flush adds nothing
    return np.concatenate(out)


@pytest.mark.parametrize("speed", SPEEDS)
def test_streaming_equals_the_reference_however_the_input_is_cut(speed):
    x = _voiced(1.5, seed=int(speed * 100))
    ref = stretch_ref(x, speed)
    assert len(ref) == out_length(len(x), speed) == round(len(x) / speed)
    rng = np.random.default_rng(7)
    for cuts in ([len(x)], [1] * 50 + [1919] * 5, list(rng.integers(0, 3000, 40)), [2400] * 30):
        y = _streamed(x, speed, cuts)
        assert y.dtype == np.int16 and np.array_equal(y, ref), cuts[:5]


def test_output_comes_as_the_input_does_not_all_at_the_end():
    """A stream's audio must flow: each 100 ms in gives its share out, ~36 ms behind at most."""
    x, st, got = _voiced(1.0), TimeStretcher(1.25), 0
    for i in range(0, len(x), 2400):
        got += len(st.process(x[i:i + 2400]))
        behind = (i + 2400) / 1.25 - got
        assert 0 <= behind <= (2 * TOLERANCE + FRAME + HOP) / 1.25 + HOP
    assert got + len(st.flush()) == out_length(len(x), 1.25)


def _peak_hz(y: np.ndarray) -> float:
    """The strongest frequency, to a fraction of a bin (a Hann window, parabolic interpolation)."""
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y)), 8 * len(y)))
    i = int(np.argmax(spec[1:])) + 1
    a, b, c = np.log(spec[i - 1:i + 2])
    return (i + 0.5 * (a - c) / (a - 2 * b + c)) * RATE / (8 * len(y))


@pytest.mark.parametrize("speed", [0.5, 0.8, 1.25, 2.0])
@pytest.mark.parametrize("f0", [110.0, 220.0, 440.0])
def test_pitch_and_level_stay(speed, f0):
    """A steady tone keeps its frequency (a resampler would move it by `speed`) and its level:
    frames that overlapped out of phase would cancel, dipping the level every 10 ms."""
    t = np.arange(RATE) / RATE
    x = (8000 * np.sin(2 * np.pi * f0 * t)).astype(np.int16)
    y = stretch_ref(x, speed).astype(np.float64)
    mid = y[len(y) // 4: 3 * len(y) // 4]
    assert abs(_peak_hz(mid) / f0 - 1) < 0.005
    rms = np.sqrt(np.mean(mid[: len(mid) // HOP * HOP].reshape(-1, HOP) ** 2, axis=1))  # each 10 ms
    assert rms.min() > 0.9 * 8000 / np.sqrt(2) and rms.max() < 1.1 * 8000 / np.sqrt(2)


@pytest.mark.parametrize("speed", [0.5, 1.25, 2.0])
def test_events_move_to_their_time_over_speed(speed):
    """Clicks at known times come out at time / speed, give or take the search's tolerance."""
    x = np.zeros(2 * RATE, np.int16)
    times = [0.3, 0.7, 1.1, 1.5]
    for s in times:
        i = int(s * RATE)
        x[i:i + 96] = (12000 * np.hanning(96)).astype(np.int16)  # a 4 ms burst
    y = np.abs(stretch_ref(x, speed).astype(np.float64))
    for s in times:
        want = int(s * RATE / speed)
        lo, hi = want - TOLERANCE - FRAME, want + TOLERANCE + FRAME
        assert y[lo:hi].max() > 5000, s  # the burst is there
    quiet = np.ones(len(y), bool)
    for s in times:
        want = int(s * RATE / speed)
        quiet[max(0, want - TOLERANCE - FRAME):want + TOLERANCE + FRAME] = False
    assert y[quiet].max() == 0  # and nowhere else


def test_silence_stays_silence_and_tiny_inputs_work():
    assert not stretch_ref(np.zeros(5000, np.int16), 1.5).any()
    for n in (0, 1, 7, HOP, FRAME + 3):
        x = _voiced(0.1)[:n]
        assert len(_streamed(x, 1.3, [n])) == out_length(n, 1.3)
        assert np.array_equal(_streamed(x, 0.7, [1] * n), stretch_ref(x, 0.7))


@pytest.mark.parametrize("speed", [3.0, 4.0])
def test_fast_speeds_never_send_past_the_end_whatever_the_length(speed):
    """At high speed a frame's search ends well before its output does: what is sent before the
    end must still fit inside the output of any longer input (round(n / speed))."""
    x = _voiced(0.5)
    for n in range(3000, 3000 + 4 * FRAME, 29):
        assert np.array_equal(_streamed(x[:n], speed, [n]), stretch_ref(x[:n], speed)), n


def test_the_start_is_not_faded_in():
    x = np.full(RATE // 2, 10000, np.int16)  # a DC level: each output sample must be 10000
    y = stretch_ref(x, 1.5)
    assert np.abs(y[: len(y) - FRAME].astype(int) - 10000).max() <= 1


@pytest.mark.parametrize("bad", [0.2, 4.5, 0, -1, float("nan"), True, "1.2", None])
def test_a_bad_speed_says_what_is_allowed(bad):
    with pytest.raises(ValueError, match=r"speed must be a number in 0\.25\.\.4"):
        TimeStretcher(bad)


def test_bad_use_is_refused():
    st = TimeStretcher(1.5)
    with pytest.raises(ValueError, match="one channel"):
        st.process(np.zeros((2, 10), np.int16))
    st.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        st.process(np.zeros(10, np.int16))
