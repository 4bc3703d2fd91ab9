"""The speaking-rate setting (OpenAI's `speed`, ElevenLabs' voice_settings.speed): its range and
its check, in plain Python. Clients and the request parsers check a speed here without importing
numba (~0.5 s: `csm-stream say` checks --speed before it connects); kernels/stretch.py applies it."""

from __future__ import annotations

from numbers import Real

SPEED_RANGE = (0.25, 4.0)  # OpenAI's range for `speed`


def check_speed(speed: float) -> float:
    """`speed` as a float, or ValueError saying what is allowed."""
    lo, hi = SPEED_RANGE
    if isinstance(speed, bool) or not isinstance(speed, Real) or not lo <= speed <= hi:
        raise ValueError(f"speed must be a number in {lo:g}..{hi:g} (1 is CSM's own rate; 1.25 is 25% "
                         f"faster), got {speed!r:.40}")
    return float(speed)
