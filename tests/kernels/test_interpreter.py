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


@triton.jit
def _scaled(x, s):
    return x * s  # a helper: each call inside a launch used to patch the language again


@triton.jit
def _rowmax_kernel(x_ptr, out_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * N + tl.arange(0, N))
    y = _scaled(_scaled(x, 2.0), 0.5)  # two helper calls a program
    best = tl.argmax(y, axis=0)  # a reduction with a @triton.jit combine function (triton.language.standard)
    tl.store(out_ptr + row, tl.max(y, axis=0) + tl.where(best >= 0, best, 0).to(tl.float32))


def _rowmax(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0])
    _rowmax_kernel[(x.shape[0],)](x, out, N=x.shape[1])
    return out


def test_a_launch_patches_the_language_once_and_computes_what_it_did():
    """tests/interp.patch_once: one `_patch_lang` walk a launch (Triton's own: one more for every
    helper and combine-function call of every program), the same results, and triton.language and
    its core module as they were once the launch is over (Triton's own leaves the patches of a
    helper's walk behind, which this test then puts back)."""
    from triton.runtime import interpreter

    from tests.interp import patch_every_time, patch_once

    x = torch.randn(6, 16)
    want = x.max(dim=1).values + x.argmax(dim=1).float()
    assert getattr(interpreter._patch_lang, "patches_once", False)  # tests/conftest.py
    patch_every_time()
    original, walks = interpreter._patch_lang, []
    modules = (tl, tl.core, tl.math, tl.core.tensor)
    before = [dict(vars(m)) for m in modules]

    def counted(fn):
        walks.append(fn)
        return original(fn)

    try:
        interpreter._patch_lang = counted
        assert patch_once() is True
        once = _rowmax(x)
        assert len(walks) == 1
        changed = [{k for k, v in vars(m).items() if b.get(k) is not v} for m, b in zip(modules, before, strict=True)]
        assert changed == [set()] * 4
        patch_every_time()  # back to `counted` over Triton's own
        walks.clear()
        every = _rowmax(x)
        assert len(walks) > 6 * 3  # the launch, then each of six programs' helper and combine calls
    finally:
        for m, b in zip(modules, before, strict=True):
            for k, v in b.items():
                if vars(m).get(k) is not v:
                    setattr(m, k, v)
        interpreter._patch_lang = original
        patch_once()
    torch.testing.assert_close(once, want)
    assert torch.equal(once, every)


def test_the_tabled_dtype_lookup_gives_the_originals_answer_for_every_type():
    """tests/interp.table_np_dtypes: the same numpy dtype as Triton's own `_get_np_dtype` for every
    scalar type, block of it and pointer (and the same error for what neither knows), asked of
    both side by side."""
    from triton.runtime import interpreter

    from tests.interp import SCALARS

    tabled = interpreter._get_np_dtype
    assert getattr(tabled, "tabled", False)  # tests/conftest.py
    original = tabled.original
    types = [getattr(tl, n) for n in SCALARS]
    types += [tl.block_type(t, [4, 8]) for t in types] + [tl.pointer_type(tl.float32),
                                                          tl.block_type(tl.pointer_type(tl.bfloat16), [16])]
    assert len(types) == 2 * len(SCALARS) + 2
    for t in types:
        assert tabled(t) == original(t), t
    for t in (tl.void, tl.block_type(tl.void, [2])):
        with pytest.raises(KeyError):
            original(t)
        with pytest.raises(KeyError):
            tabled(t)
