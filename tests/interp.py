"""Triton's interpreter (TRITON_INTERPRET=1: how the CPU tests run the GPU kernels) redoes every
integer add, subtract and multiply in int64 to check it for int32 overflow, then hands the check
to a device assert that it drops unless its `debug` option is on, which nothing turns on (Triton
3.9). A quarter of the time of an interpreted frame went to checks that could never fail; the
tests run without them (tests/conftest.py). tests/kernels/test_interpreter.py shows that nothing
was checked: an overflowing multiply wraps with the checks on as with them off."""

from __future__ import annotations

import dataclasses


def overflow_checks() -> bool | None:
    """Whether the interpreter computes its overflow checks now (None: an interpreter whose options
    are not where Triton 3.9 keeps them)."""
    builder = _builder()
    return None if builder is None else builder.options.sanitize_overflow


def set_overflow_checks(on: bool) -> bool | None:
    """Turn them on or off; returns the setting before (None, changing nothing: see above)."""
    builder = _builder()
    if builder is None:
        return None
    before = builder.options.sanitize_overflow
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=on)
    return before


def _builder():
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or not hasattr(options, "sanitize_overflow"):
        return None
    return builder
