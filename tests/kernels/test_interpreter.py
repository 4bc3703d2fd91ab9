"""The tests run Triton's interpreter without its int32 overflow checks (tests/conftest.py), which
were never asserted: an overflowing multiply wraps with them on as with them off."""

import os

import pytest
import torch
import triton
import triton.language as tl

from tests.interp import overflow_checks, set_overflow_checks

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter")


@triton.jit
def _mul_kernel(a_ptr, b_ptr, out_ptr):
    tl.store(out_ptr, tl.load(a_ptr) * tl.load(b_ptr))


def _mul(a: int, b: int) -> int:
    x, y = torch.tensor([a], dtype=torch.int32), torch.tensor([b], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    _mul_kernel[(1,)](x, y, out)
    return int(out[0])


def test_the_overflow_checks_are_off_and_never_asserted_when_on():
    assert overflow_checks() is False  # tests/conftest.py
    wrapped = 46_341 ** 2 - 2 ** 32  # 46,341 squared is just past 2**31: int32 wraps, as compiled code does
    assert _mul(46_340, 46_340) == 46_340 ** 2 and _mul(46_341, 46_341) == wrapped
    assert set_overflow_checks(True) is False
    try:
        assert overflow_checks() is True
        # the interpreter's default: the product redone in int64 and compared, and the assert dropped
        assert _mul(46_341, 46_341) == wrapped
    finally:
        set_overflow_checks(False)
    assert overflow_checks() is False
