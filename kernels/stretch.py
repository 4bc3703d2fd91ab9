"""Speaking rate for streamed speech: time-scale modification by WSOLA, pitch kept.

CSM speaks at one rate. `speed` (OpenAI's field, ElevenLabs' voice_settings.speed) is applied to
its 24 kHz PCM afterwards: speed 1.25 plays the same words in 1 / 1.25 of the time at the same
pitch. WSOLA (waveform-similarity overlap-add) cuts the input into 20 ms Hann-windowed frames
taken every `HOP * speed` input samples and lays them down every `HOP` output samples (half a
frame: the windows add up to exactly one). Each frame's start may move up to `TOLERANCE` samples
(8 ms, more than half the longest pitch period of speech) from its nominal place, to where it best
continues the frame before it (the cross-correlation with what followed that frame in the input is
highest), so overlapping frames add in phase: no echo, no warble, no cancelled periods.

The search runs in two passes: on both signals summed in fours (6 kHz: enough to find the right
pitch period, at a sixteenth of the work), then sample by sample within 3 of the best coarse shift.

`TimeStretcher` is the streaming form: `process(pcm)` takes int16 PCM cut anywhere and returns
what is final so far (a frame waits for the input its search needs: at most the last 28 ms of
input are held back); `flush()` returns the rest. The output holds exactly round(len(input) /
speed) samples, and how the input was cut never changes it. The first frame's rising half is flat
(the audio starts at full level, not faded in). Its frames are laid by a numba kernel that holds
no GIL: ~2 ms of CPU a second of audio at speed 1.25 (the resampler to 8 kHz: 0.25 ms).

`stretch_ref` is the plain NumPy reference: the whole signal at once, the same frames, positions
and windows, its searches by np.correlate and np.dot.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .speed import SPEED_RANGE, check_speed  # noqa: F401 - the setting this module applies, re-exported

FRAME = 480  # samples a frame at 24 kHz: 20 ms
HOP = FRAME // 2  # output samples between frames (Hann windows at half overlap sum to one)
TOLERANCE = 192  # how far a frame may move from its nominal input position: 8 ms
DECIMATE = 4  # the search's first pass runs on the signals summed in fours (6 kHz)
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / FRAME)  # periodic Hann: w[n] + w[n + HOP] = 1
_FIRST = np.concatenate([np.ones(HOP), _WINDOW[HOP:]])  # the first frame: no fade-in


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
        self._k = 0  # the next frame to lay down
        self._prev = 0  # the last frame's input position
        self._acc = np.zeros(FRAME)  # output from sample _y0 on, still being added to
        self._y0 = 0  # output samples returned
        self._done = False

    @property
    def _n_in(self) -> int:
        return self._x0 + len(self._x)

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """int16 PCM in (any length); the int16 output that is final so far."""
        if self._done:
            raise RuntimeError("this TimeStretcher was flushed; make a new one for the next stream")
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise ValueError(f"pcm must be one channel (a 1-D array), got shape {pcm.shape}")
        self._x = np.concatenate([self._x, pcm.astype(np.float64)])
        self._lay(-1)
        return self._emit(min(self._k * HOP, int(self._n_in / self.speed)))

    def flush(self) -> np.ndarray:
        """The input has ended: the rest of the output (frames past the input read zeros)."""
        if self._done:
            return np.zeros(0, np.int16)
        self._done = True
        total = out_length(self._n_in, self.speed)
        self._lay(total)
        return self._emit(total)

    def _lay(self, total: int) -> None:
        """Lay every frame whose input is in (total < 0), or every frame up to output `total`."""
        last = -(-total // HOP) if total >= 0 else int(self._n_in / (HOP * self.speed)) + 2  # frames, at most
        room = last * HOP + FRAME - self._y0
        if room > len(self._acc):  # (with room to spare: not a copy every chunk)
            self._acc = np.concatenate([self._acc, np.zeros(room - len(self._acc) + 8 * FRAME)])
        self._k, self._prev = _lay_frames(self._x, self._x0, self.speed, self._k, self._prev, self._acc, self._y0,
                                          total)
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


@njit(nogil=True, cache=True)
def _at(x, x0, i):
    """Input sample i: zero before the input and past what was taken."""
    j = i - x0
    return x[j] if 0 <= j < x.shape[0] and i >= 0 else 0.0


@njit(nogil=True, cache=True)
def _lay_frames(x, x0, speed, k, prev, acc, y0, total):
    """Lay frames k, k + 1, ... into acc (output from y0 on): while their search's input is all
    in (total < 0), or while they start before output sample `total` (the input has ended).
    Returns (the next frame, the last frame's input position)."""
    n_in = x0 + x.shape[0]
    w = _WINDOW
    t = np.empty(FRAME)
    r = np.empty(2 * TOLERANCE + FRAME)
    while True:
        a = int(k * HOP * speed + 0.5)
        if total >= 0:
            if k * HOP >= total:
                break
        elif (FRAME if k == 0 else max(a + TOLERANCE, prev + HOP) + FRAME) > n_in:
            break
        if k == 0:
            pos = 0
        else:
            for i in range(FRAME):
                t[i] = _at(x, x0, prev + HOP + i) * w[i]
            for i in range(r.shape[0]):
                r[i] = _at(x, x0, a - TOLERANCE + i)
            pos = a + _search(r, t, max(0, TOLERANCE - a)) - TOLERANCE
        base = k * HOP - y0
        for i in range(FRAME):
            acc[base + i] += _at(x, x0, pos + i) * (_FIRST[i] if k == 0 else w[i])
        prev = pos
        k += 1
    return k, prev


@njit(nogil=True, cache=True)
def _search(r, t, lo):
    """The shift j in [lo, 2 * TOLERANCE] where r[j:j + FRAME] best matches the template t: first
    on both signals summed in fours (a quarter of the work: the search for the right pitch period),
    then sample by sample within 3 of the best coarse shift (the first of equal ones each time)."""
    nt, nc = FRAME // DECIMATE, 2 * TOLERANCE // DECIMATE + 1
    td = np.zeros(nt)
    rd = np.zeros(r.shape[0] // DECIMATE)
    for i in range(nt * DECIMATE):
        td[i // DECIMATE] += t[i]
    for i in range(rd.shape[0] * DECIMATE):
        rd[i // DECIMATE] += r[i]
    best, best_j = -np.inf, -1
    for j in range(lo // DECIMATE, nc):  # (a coarse shift whose fine range reaches lo)
        c = 0.0
        for i in range(nt):
            c += rd[j + i] * td[i]
        if c > best:
            best, best_j = c, j
    best, shift = -np.inf, lo
    for j in range(max(lo, best_j * DECIMATE - DECIMATE + 1), min(2 * TOLERANCE, best_j * DECIMATE + DECIMATE - 1) + 1):
        c = 0.0
        for i in range(FRAME):
            c += r[j + i] * t[i]
        if c > best:
            best, shift = c, j
    return shift


def search_ref(region: np.ndarray, template: np.ndarray, lo: int) -> int:
    """`_search` in NumPy: coarse by np.correlate on the signals summed in fours, then fine."""
    td = template.reshape(-1, DECIMATE).sum(axis=1)
    rd = region[: len(region) // DECIMATE * DECIMATE].reshape(-1, DECIMATE).sum(axis=1)
    coarse = np.correlate(rd, td, "valid")[: 2 * TOLERANCE // DECIMATE + 1]
    first = max(0, -(-(lo - DECIMATE + 1) // DECIMATE))
    j = first + int(np.argmax(coarse[first:]))
    fine = range(max(lo, DECIMATE * j - DECIMATE + 1), min(2 * TOLERANCE, DECIMATE * j + DECIMATE - 1) + 1)
    return fine[int(np.argmax([np.dot(region[f:f + FRAME], template) for f in fine]))]


def stretch_ref(pcm: np.ndarray, speed: float) -> np.ndarray:
    """The reference: the whole int16 signal at once, in plain NumPy."""
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
        shift = search_ref(at(a - TOLERANCE, 2 * TOLERANCE + FRAME), at(prev + HOP, FRAME) * _WINDOW,
                           max(0, TOLERANCE - a))
        prev = a + shift - TOLERANCE
        y[k * HOP:k * HOP + FRAME] += at(prev, FRAME) * _WINDOW
    return _to_int16(y[:total])
