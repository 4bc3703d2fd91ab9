"""ITU-T G.722 at 64 kbit/s (mode 1): wideband (16 kHz) telephone audio, one byte per two samples.

Telnyx, SIP trunks and PBXs call it "HD voice": twice the bandwidth of G.711 for the same 64 kbit/s,
which matters for CSM's 24 kHz speech, whose consonants G.711's 4 kHz cut muffles.

How it works (the block names are the Recommendation's): a 24-tap quadrature mirror filter splits
each pair of 16 kHz samples into a low band (0-4 kHz) and a high band (4-8 kHz) sample at 8 kHz;
each band is coded by adaptive differential PCM, the low band with 6 bits (a 60-level quantizer),
the high band with 2. Each band predicts its next sample from its past (a 2-pole, 6-zero adaptive
predictor: block 4) and codes the difference relative to an adaptive step size (blocks 1-3). The
decoder runs the same predictor on the same codes, so both ends stay in step without side
information; the arithmetic is fixed-point and defined to the bit, which is what the tests check
(against FFmpeg's independent implementation, in both directions).

Samples are 16-bit (the QMF's 2^-14 scaling halves them into 15-bit sub-band signals and the
receive QMF's 2^-11 restores them), the convention of FFmpeg's and spandsp's codecs. State is
kept across calls, so a stream may be fed in pieces of any length (an odd sample waits for its
partner). The loops are numba, without the GIL.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# transmit/receive QMF: h0..h11, and h23..h12 mirror them
QMF = np.array([3, -11, -11, 53, 12, -156, 32, 362, -210, -805, 951, 3876], np.int64)
H = np.concatenate([QMF, QMF[::-1]])
# low band: decision levels of the 6-bit quantizer (Q6, x 2^-12 of the step), and the codes of
# interval i for a positive (ILP) and a negative (ILN) difference
Q6 = np.array([0, 35, 72, 110, 150, 190, 233, 276, 323, 370, 422, 473, 530, 587, 650, 714, 786, 858, 940,
               1023, 1121, 1219, 1339, 1458, 1612, 1765, 1980, 2195, 2557, 2919], np.int64)
ILP = np.array([0] + list(range(61, 31, -1)), np.int64)  # interval 1 -> 61 ... interval 30 -> 32
ILN = np.array([0, 63, 62] + list(range(31, 3, -1)), np.int64)  # 1 -> 63, 2 -> 62, 3 -> 31 ... 30 -> 4
# inverse quantizers: 4-bit (what the predictors see) and 6-bit (what the decoder outputs)
QM4 = np.array([0, -20456, -12896, -8968, -6288, -4240, -2584, -1200,
                20456, 12896, 8968, 6288, 4240, 2584, 1200, 0], np.int64)
QM6 = np.array([-136, -136, -136, -136, -24808, -21904, -19008, -16704, -14984, -13512, -12280, -11192,
                -10232, -9360, -8576, -7856, -7192, -6576, -6000, -5456, -4944, -4464, -4008, -3576,
                -3168, -2776, -2400, -2032, -1688, -1360, -1040, -728,
                24808, 21904, 19008, 16704, 14984, 13512, 12280, 11192, 10232, 9360, 8576, 7856,
                7192, 6576, 6000, 5456, 4944, 4464, 4008, 3576, 3168, 2776, 2400, 2032,
                1688, 1360, 1040, 728, 432, 136, -432, -136], np.int64)
# log step-size adaptation: low band (WL, indexed through RL42 by the 4-bit code) and high band
WL = np.array([-60, -30, 58, 172, 334, 538, 1198, 3042], np.int64)
RL42 = np.array([0, 7, 6, 5, 4, 3, 2, 1, 7, 6, 5, 4, 3, 2, 1, 0], np.int64)
WH = np.array([0, -214, 798], np.int64)
RH2 = np.array([2, 1, 2, 1], np.int64)
QM2 = np.array([-7408, -1616, 7408, 1616], np.int64)  # high band inverse quantizer
IHN = np.array([0, 1, 0], np.int64)  # high band codes by magnitude interval, negative / positive
IHP = np.array([0, 3, 2], np.int64)
# 2^(i/32) x 2048: the log-to-linear step table (ILB)
ILB = np.array([round(2048 * 2 ** (i / 32)) for i in range(32)], np.int64)

# one band's state, one row of an int64 array
S, SP, SZ, NB, DET = 0, 1, 2, 3, 4
R = 5  # r(0..2): reconstructed signal
P = 8  # p(0..2): partially reconstructed signal
A = 11  # a(1..2) at A+1, A+2: pole coefficients
D = 14  # d(0..6): quantized differences
B = 21  # b(1..6) at B+1..B+6: zero coefficients
BAND_FIELDS = 28
DET_LOW, DET_HIGH = 32, 8  # initial step sizes


@njit(inline="always")
def _sat(x):
    return min(max(x, -32768), 32767)


@njit(inline="always")
def _adapt(st, dq):
    """Block 4: reconstruct, adapt the pole and zero predictor coefficients to the new quantized
    difference dq, and predict the band's next sample (st[S])."""
    st[D] = dq
    st[R] = _sat(st[S] + dq)  # RECONS
    st[P] = _sat(st[SZ] + dq)  # PARREC
    sg0, sg1, sg2 = st[P] >> 15, st[P + 1] >> 15, st[P + 2] >> 15
    # UPPOL2: the second pole coefficient
    w = _sat(st[A + 1] << 2)
    w = -w if sg0 == sg1 else w
    w = min(w, 32767)
    a2 = (w >> 7) + (128 if sg0 == sg2 else -128) + ((st[A + 2] * 32512) >> 15)
    a2 = min(max(a2, -12288), 12288)
    # UPPOL1: the first, bounded by the second
    a1 = _sat((192 if sg0 == sg1 else -192) + ((st[A + 1] * 32640) >> 15))
    lim = _sat(15360 - a2)
    a1 = min(max(a1, -lim), lim)
    # UPZERO: the six zero coefficients follow the signs of the last differences; DELAYA shifts
    step = 0 if dq == 0 else 128
    sgd = dq >> 15
    for i in range(6, 0, -1):
        bi = ((st[B + i] * 32640) >> 15) + (step if (st[D + i] >> 15) == sgd else -step)
        st[B + i] = _sat(bi)
    for i in range(6, 0, -1):
        st[D + i] = st[D + i - 1]
    for i in range(2, 0, -1):
        st[R + i] = st[R + i - 1]
        st[P + i] = st[P + i - 1]
    st[A + 1], st[A + 2] = a1, a2
    # FILTEP, FILTEZ, PREDIC
    sp = _sat(((st[A + 1] * _sat(st[R + 1] * 2)) >> 15) + ((st[A + 2] * _sat(st[R + 2] * 2)) >> 15))
    sz = 0
    for i in range(6, 0, -1):
        sz += (st[B + i] * _sat(st[D + i] * 2)) >> 15
    st[SP], st[SZ] = sp, _sat(sz)
    st[S] = _sat(sp + st[SZ])


@njit(inline="always")
def _step_size(nb, shift_base):
    """SCALEL/SCALEH: the linear step size from the log one."""
    wd2 = shift_base - (nb >> 11)
    lin = ILB[(nb >> 6) & 31]
    return (lin << -wd2 if wd2 < 0 else lin >> wd2) << 2


@njit(inline="always")
def _low_update(st, ilow):
    """The low band after a 6-bit code: its 4-bit inverse quantization feeds the predictor;
    LOGSCL/SCALEL adapt the step."""
    r4 = ilow >> 2
    dq = (st[DET] * QM4[r4]) >> 15
    st[NB] = min(max(((st[NB] * 127) >> 7) + WL[RL42[r4]], 0), 18432)
    st[DET] = _step_size(st[NB], 8)
    _adapt(st, dq)


@njit(inline="always")
def _high_update(st, ihigh):
    dq = (st[DET] * QM2[ihigh]) >> 15
    st[NB] = min(max(((st[NB] * 127) >> 7) + WH[RH2[ihigh]], 0), 22528)
    st[DET] = _step_size(st[NB], 10)
    _adapt(st, dq)
    return dq


@njit(nogil=True, cache=True)
def _encode(x, low, high, out):
    """x: the transmit QMF's last 22 inputs, then the new samples (an even number of them)."""
    for n in range(out.shape[0]):
        j = 23 + 2 * n  # x(j), the newest sample of this pair
        xa = 0  # even taps on x(j - 2i)
        xb = 0  # odd taps on x(j - 2i - 1)
        for i in range(12):
            xa += H[2 * i] * x[j - 2 * i]
            xb += H[2 * i + 1] * x[j - 2 * i - 1]
        xlow = (xa + xb) >> 14
        xhigh = (xa - xb) >> 14
        # low band: quantize the prediction error to one of 60 levels (blocks 1L-3L)
        el = _sat(xlow - low[S])
        mag = el if el >= 0 else -(el + 1)
        i = 1
        while i < 30 and mag >= (Q6[i] * low[DET]) >> 12:
            i += 1
        ilow = ILN[i] if el < 0 else ILP[i]
        _low_update(low, ilow)
        # high band: two levels each side (blocks 1H-3H)
        eh = _sat(xhigh - high[S])
        mag = eh if eh >= 0 else -(eh + 1)
        mih = 2 if mag >= (564 * high[DET]) >> 12 else 1
        ihigh = IHN[mih] if eh < 0 else IHP[mih]
        _high_update(high, ihigh)
        out[n] = (ihigh << 6) | ilow


@njit(nogil=True, cache=True)
def _decode(b, low, high, y, out):
    """b: codes; y: the receive QMF's last 11 (xd, xs) pairs, then room for one pair per code."""
    for n in range(b.shape[0]):
        code = np.int64(b[n])
        ilow = code & 63
        ihigh = code >> 6
        rlow = min(max(low[S] + ((low[DET] * QM6[ilow]) >> 15), -16384), 16383)
        _low_update(low, ilow)
        s_high = high[S]
        rhigh = min(max(s_high + _high_update(high, ihigh), -16384), 16383)
        j = 22 + 2 * n
        y[j], y[j + 1] = rlow - rhigh, rlow + rhigh  # xd(j), xs(j)
        y1 = 0
        y2 = 0
        for m in range(12):  # x_out1 = sum h(2m) xd(j - m); x_out2 = sum h(2m + 1) xs(j - m)
            y1 += H[2 * m] * y[j - 2 * m]
            y2 += H[2 * m + 1] * y[j + 1 - 2 * m]
        out[2 * n] = _sat(y1 >> 11)
        out[2 * n + 1] = _sat(y2 >> 11)


def _new_bands() -> np.ndarray:
    bands = np.zeros((2, BAND_FIELDS), np.int64)
    bands[0, DET], bands[1, DET] = DET_LOW, DET_HIGH
    return bands


class G722Encoder:
    """16 kHz int16 PCM -> G.722 bytes (64 kbit/s), stateful across calls."""

    SAMPLE_RATE = 16_000

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._hist = np.zeros(22, np.int16)  # the transmit QMF's last inputs
        self._bands = _new_bands()
        self._held = np.zeros(0, np.int16)  # an odd sample waiting for its partner

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """Any number of samples -> one byte per whole pair so far."""
        x = np.asarray(pcm)
        if x.ndim != 1 or x.dtype != np.int16:
            raise ValueError(f"G.722 encodes 1-D int16 PCM at 16 kHz, got {x.dtype} of shape {x.shape}")
        buf = np.concatenate([self._hist, self._held, x])
        n = (buf.shape[0] - 22) // 2
        self._held = buf[22 + 2 * n :].copy()
        out = np.empty(n, np.uint8)
        if n:
            _encode(buf, self._bands[0], self._bands[1], out)
            self._hist = buf[2 * n : 22 + 2 * n].copy()
        return out

    def flush(self) -> np.ndarray:
        """The end of the stream: a held odd sample is completed with a zero."""
        if not self._held.size:
            return np.zeros(0, np.uint8)
        return self.encode(np.zeros(1, np.int16))


class G722Decoder:
    """G.722 bytes (64 kbit/s) -> 16 kHz int16 PCM, two samples a byte, stateful across calls."""

    SAMPLE_RATE = 16_000

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._hist = np.zeros(22, np.int64)  # the receive QMF's last 11 (xd, xs) pairs
        self._bands = _new_bands()

    def decode(self, data) -> np.ndarray:
        b = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
        if b.ndim != 1 or b.dtype != np.uint8:
            raise ValueError(f"G.722 decodes bytes (or a 1-D uint8 array), got {b.dtype} of shape {b.shape}")
        n = b.shape[0]
        out = np.empty(2 * n, np.int16)
        if n:
            y = np.empty(22 + 2 * n, np.int64)
            y[:22] = self._hist
            _decode(np.ascontiguousarray(b), self._bands[0], self._bands[1], y, out)
            self._hist = y[2 * n :].copy()
        return out


def g722_encode(pcm: np.ndarray) -> np.ndarray:
    """A whole 16 kHz int16 signal -> G.722 bytes (a fresh encoder; an odd last sample is padded)."""
    enc = G722Encoder()
    return np.concatenate([enc.encode(pcm), enc.flush()])


def g722_decode(data) -> np.ndarray:
    """A whole G.722 stream -> 16 kHz int16 PCM (a fresh decoder)."""
    return G722Decoder().decode(data)
