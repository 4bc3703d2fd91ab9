"""FFmpeg's G.722 codec (through PyAV): the independent implementation that csm-stream's G.722
(kernels/g722.py) is checked against, bit for bit."""

from __future__ import annotations

import av
import numpy as np

RATE = 16_000


def _context(mode: str) -> av.CodecContext:
    ctx = av.CodecContext.create("g722", mode)
    ctx.sample_rate = RATE
    ctx.layout = "mono"
    if mode == "w":
        ctx.format = "s16"
    return ctx


def g722_encode(pcm: np.ndarray, frame: int = 320) -> np.ndarray:
    """16 kHz int16 -> G.722 bytes, FFmpeg's encoder (no trellis search: the Recommendation's coder)."""
    ctx = _context("w")
    ctx.open()
    out = bytearray()
    pcm = np.ascontiguousarray(pcm, np.int16)
    for i in range(0, len(pcm), frame):
        f = av.AudioFrame.from_ndarray(pcm[i : i + frame].reshape(1, -1), format="s16", layout="mono")
        f.sample_rate = RATE
        for p in ctx.encode(f):
            out += bytes(p)
    for p in ctx.encode(None):
        out += bytes(p)
    return np.frombuffer(bytes(out), np.uint8)


def g722_decode(data, packet: int = 160) -> np.ndarray:
    """G.722 bytes -> 16 kHz int16, FFmpeg's decoder."""
    ctx = _context("r")
    data = bytes(data)
    out = [np.zeros(0, np.int16)]
    for i in range(0, len(data), packet):
        for f in ctx.decode(av.Packet(data[i : i + packet])):
            out.append(f.to_ndarray().reshape(-1).astype(np.int16))
    return np.concatenate(out)
