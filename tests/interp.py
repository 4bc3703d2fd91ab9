"""Three costs of Triton's interpreter (TRITON_INTERPRET=1: how the CPU tests run the GPU kernels)
that buy nothing, and the tests' way around each (`speed_up()` turns all three on: tests/conftest.py
for the test processes, tests/bench/test_gpu_session.py for the dry run's; Triton 3.9):

- It redoes every integer add, subtract and multiply in int64 to check it for int32 overflow, then
  hands the check to a device assert that it drops unless its `debug` option is on, which nothing
  turns on. A quarter of the time of an interpreted frame went to checks that could never fail;
  `set_overflow_checks(False)`. tests/kernels/test_interpreter.py shows that nothing was checked:
  an overflowing multiply wraps with the checks on as with them off.
- A launch swaps `triton.language`'s functions for interpreted ones for its run (`_patch_lang`,
  which walks the modules' members with `inspect.getmembers`), and every call of a `@triton.jit`
  helper inside the kernel (ours, and the combine functions of `tl.max`, `tl.sum`, ...) walks them
  again, once per program: ~60,000 walks, about half the time of an interpreted frame step, to
  patch what the launch had patched already. `patch_once()`: a launch patches `triton.language`
  and `triton.language.core` both (all the interpreter ever patches), and the helper calls inside
  it patch nothing more. The kernels compute exactly what they did (the test file above checks).
- Its `_get_np_dtype` (a Triton type's numpy dtype, asked for on every load, store, cast and
  constant) builds its 19-entry table anew on every call: ~40 type hashes a call. An interpreted
  fast-step test took 26.0-26.2 s with the table built once against 27.1-29.1 s (2 cores,
  2026-12-07). `table_np_dtypes()`: the same function over a table built once (the answers are
  the original's own, asked once per type, and checked equal for every type).
"""

from __future__ import annotations

import dataclasses
import threading
import types


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


_state = threading.local()  # .covered: a launch on this thread has patched the language modules


def speed_up() -> None:
    """All three (below): the interpreter's overflow checks off, its language patched once a
    launch, its dtype table built once. The kernels compute exactly what they did."""
    set_overflow_checks(False)
    patch_once()
    table_np_dtypes()


def patch_once() -> bool:
    """Make a launch's `_patch_lang` cover the helpers it calls (above). Returns whether it is on
    (False: an interpreter without `_patch_lang`, left as it is). Idempotent."""
    found = _replaceable("_patch_lang", "patches_once")
    if not isinstance(found, tuple):
        return found
    tl, interpreter, patch = found
    both = types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})  # what a helper may see

    class Covered:  # a helper's call inside a launch: nothing to undo
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        if getattr(_state, "covered", False):
            return Covered()
        scope = patch(both)
        _state.covered = True
        restore = scope.restore

        def restore_and_leave() -> None:
            _state.covered = False
            restore()

        scope.restore = restore_and_leave
        return scope

    patch_lang.patches_once, patch_lang.original = True, patch
    interpreter._patch_lang = patch_lang
    return True


def patch_every_time() -> None:
    """Back to Triton's own `_patch_lang` (for the test that compares the two)."""
    from triton.runtime import interpreter

    interpreter._patch_lang = getattr(interpreter._patch_lang, "original", interpreter._patch_lang)


SCALARS = ("int1", "float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
           "int64", "uint64", "float8e5", "float8e5b16", "float8e4nv", "float8e4b8", "float8e4b15")


def table_np_dtypes() -> bool:
    """Swap the interpreter's `_get_np_dtype` for one over a table built once (above); returns
    whether it is on (False: an interpreter without the function, left as it is). Idempotent."""
    found = _replaceable("_get_np_dtype", "tabled")
    if not isinstance(found, tuple):
        return found
    tl, interpreter, original = found
    table = {}
    for name in SCALARS:
        ty = getattr(tl, name, None)
        if ty is not None:
            table[ty] = original(ty)  # the original's own answer
    pointer, block = tl.pointer_type, tl.block_type

    def get_np_dtype(tt_dtype):
        if isinstance(tt_dtype, block):
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, pointer):
            return table_pointer
        found = table.get(tt_dtype)
        return original(tt_dtype) if found is None else found  # a type not in the table: as before

    table_pointer = original(tl.pointer_type(tl.int8))
    get_np_dtype.tabled, get_np_dtype.original = True, original
    interpreter._get_np_dtype = get_np_dtype
    return True


def _replaceable(name: str, mark: str):
    """(triton.language, the interpreter module, its function `name`) for a patch to replace it;
    False: nothing to replace (no Triton, or an interpreter without it); True: `mark` says the
    function there is a replacement already."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    fn = getattr(interpreter, name, None)
    if fn is None:
        return False
    return True if getattr(fn, mark, False) else (tl, interpreter, fn)

