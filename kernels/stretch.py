"""Speaking rate for streamed speech: time-scale modification by WSOLA, pitch kept.

CSM speaks at one rate. `speed` (OpenAI's field, ElevenLabs' voice_settings.speed) is applied to
its 24 kHz PCM afterwards: speed 1.25 plays the same words in 1 / 1.25 of the time at the same
pitch. WSOLA (waveform-similarity overlap-add) cuts the input into 20 ms Hann-windowed frames
taken every `HOP * speed` input samples and lays them down every `HOP` output samples (half a
frame: the windows add up to exactly one). Each frame's start may move up to `TOLERANCE` samples
(8 ms, more than half the longest pitch period of speech) from its nominal place, to where it best
continues the frame before it (the cross-correlation with what followed that frame in the input is
highest), so overlapping frames add in phase: no echo, no warble, no cancelled periods.

`TimeStretcher` is the streaming form: `process(pcm)` takes int16 PCM cut anywhere and returns
what is final so far (frames wait for the input their search needs: ~36 ms behind, at most);
`flush()` returns the rest. The output holds exactly round(len(input) / speed) samples, and how the
input was cut never changes it. The first frame's rising half is flat (the audio starts at full
level, not faded in); the search correlates by FFT.

`stretch_ref` is the plain whole-signal reference: the same frames, positions and windows, laid
out in one pass, its search by direct correlation (`np.correlate`).
"""

from __future__ import annotations

import numpy as np

FRAME = 480  # samples a frame at 24 kHz: 20 ms
HOP = FRAME // 2  # output samples between frames (Hann windows at half overlap sum to one)
TOLERANCE = 192  # how far a frame may move from its nominal input position: 8 ms
SPEED_RANGE = (0.25, 4.0)  # OpenAI's range for `speed`
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / FRAME)  # periodic Hann: w[n] + w[n + HOP] = 1
_FIRST = np.concatenate([np.ones(HOP), _WINDOW[HOP:]])  # the first frame: no fade-in
# the search's FFT size: the region's 2 * TOLERANCE + FRAME samples; a circular correlation at the
# 2 * TOLERANCE + 1 shifts wanted reads no sample past the region, so nothing wraps
_NFFT = 1 << int(np.ceil(np.log2(2 * TOLERANCE + FRAME)))


def check_speed(speed: float) -> float:
    """`speed` as a float, or ValueError saying what is allowed."""
    lo, hi = SPEED_RANGE
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not lo <= speed <= hi:
        raise ValueError(f"speed must be a number in {lo:g}..{hi:g} (1 is CSM's own rate; 1.25 is 25% "
                         f"faster), got {speed!r:.40}")
    return float(speed)


def out_length(n_in: int, speed: float) -> int:
    """Output samples for `n_in` input samples: round(n_in / speed)."""
    return int(n_in / speed + 0.5)


def _nominal(k: int, speed: float) -> int:
    """Frame k's nominal input position."""
    return int(k * HOP * speed + 0.5)


def _to_int16(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


class TimeStretcher:
    """Streaming WSOLA at a fixed `speed` (see the module's docstring). One per stream."""

    def __init__(self, speed: float) -> None:
        self.speed = check_speed(speed)
        self._x = np.zeros(0)  # input not yet behind every future frame; _x[0] is input sample _x0
        self._x0 = 0
        self._n_in = 0  # input samples taken
        self._k = 0  # the next frame to lay down
        self._prev = 0  # the last frame's input position
        self._acc = np.zeros(FRAME)  # output from sample _y0 on, still being added to
        self._y0 = 0  # output samples returned
        self._done = False

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """int16 PCM in (any length); the int16 output that is final so far."""
        if self._done:
            raise RuntimeError("this TimeStretcher was flushed; make a new one for the next stream")
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise ValueError(f"pcm must be one channel (a 1-D array), got shape {pcm.shape}")
        self._x = np.concatenate([self._x, pcm.astype(np.float64)])
        self._n_in += len(pcm)
        while self._need(self._k) <= self._n_in:
            self._lay(self._k)
        return self._emit(min(self._k * HOP, int(self._n_in / self.speed)))

    def flush(self) -> np.ndarray:
        """The input has ended: the rest of the output (frames past the input read zeros)."""
        if self._done:
            return np.zeros(0, np.int16)
        self._done = True
        total = out_length(self._n_in, self.speed)
        while self._k * HOP < total:
            self._lay(self._k)
        return self._emit(total)

    # -- internals ---------------------------------------------------------------------------------
    def _need(self, k: int) -> int:
        """Input samples frame k's search (or, for frame 0, its copy) needs."""
        if k == 0:
            return FRAME
        return max(_nominal(k, self.speed) + TOLERANCE, self._prev + HOP) + FRAME

    def _take(self, start: int, n: int) -> np.ndarray:
        """Input samples [start, start + n): zeros before 0 and past what was taken."""
        out = np.zeros(n)
        lo, hi = max(start, self._x0), min(start + n, self._x0 + len(self._x))
        if lo < hi:
            out[lo - start:hi - start] = self._x[lo - self._x0:hi - self._x0]
        return out

    def _lay(self, k: int) -> None:
        if k == 0:
            pos, window = 0, _FIRST
        else:
            a = _nominal(k, self.speed)
            template = self._take(self._prev + HOP, FRAME) * _WINDOW
            region = self._take(a - TOLERANCE, 2 * TOLERANCE + FRAME)
            spec = np.fft.rfft(region, _NFFT) * np.conj(np.fft.rfft(template, _NFFT))
            pos = a + best_shift(np.fft.irfft(spec, _NFFT)[: 2 * TOLERANCE + 1], a)
            window = _WINDOW
        at = k * HOP - self._y0
        if at + FRAME > len(self._acc):
            self._acc = np.concatenate([self._acc, np.zeros(at + FRAME - len(self._acc))])
        self._acc[at:at + FRAME] += self._take(pos, FRAME) * window
        self._prev, self._k = pos, k + 1
        keep = min(self._prev + HOP, _nominal(self._k, self.speed) - TOLERANCE)  # the next frame reads from here
        if keep - self._x0 > 4 * FRAME:
            self._x = self._x[keep - self._x0:]
            self._x0 = keep

    def _emit(self, upto: int) -> np.ndarray:
        n = max(0, upto - self._y0)
        out = _to_int16(self._acc[:n])
        self._acc = self._acc[n:]
        self._y0 += n
        return out


def best_shift(corr: np.ndarray, nominal: int) -> int:
    """The shift in [-TOLERANCE, TOLERANCE] with the highest correlation (corr[j] is shift
    j - TOLERANCE; the first of equal ones), never to before the input's start."""
    lo = max(0, TOLERANCE - nominal)
    return int(np.argmax(corr[lo:])) + lo - TOLERANCE


def stretch_ref(pcm: np.ndarray, speed: float) -> np.ndarray:
    """The reference: the whole int16 signal at once, frames found by direct correlation."""
    speed = check_speed(speed)
    x = np.asarray(pcm).astype(np.float64)
    total = out_length(len(x), speed)
    n_frames = -(-total // HOP)
    pad = np.concatenate([np.zeros(TOLERANCE), x, np.zeros(_nominal(n_frames, speed) + 4 * FRAME)])

    def at(start: int, n: int) -> np.ndarray:  # input [start, start + n), zeros outside
        return pad[start + TOLERANCE:start + TOLERANCE + n]

    y = np.zeros(n_frames * HOP + FRAME)
    y[:FRAME] += at(0, FRAME) * _FIRST
    prev = 0
    for k in range(1, n_frames):
        a = _nominal(k, speed)
        corr = np.correlate(at(a - TOLERANCE, 2 * TOLERANCE + FRAME), at(prev + HOP, FRAME) * _WINDOW, "valid")
        prev = a + best_shift(corr, a)
        y[k * HOP:k * HOP + FRAME] += at(prev, FRAME) * _WINDOW
    return _to_int16(y[:total])
