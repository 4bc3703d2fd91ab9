import numpy as np
import pytest

import csmstream


@pytest.mark.parametrize("kwargs,match", [
    (dict(text=""), "text must be a non-empty string"),
    (dict(text="   "), "text must be a non-empty string"),
    (dict(text=None), "text must be a non-empty string"),
    (dict(text="x" * 5001), "at most 5000"),
    (dict(speaker_id=1.5), "speaker_id must be an integer >= 0"),
    (dict(speaker_id=-1), "speaker_id must be an integer >= 0"),
    (dict(speaker_id=True), "speaker_id must be an integer"),
    (dict(topk=0), r"topk must be an integer in 1\.\.2048"),
    (dict(topk=5000), r"topk must be an integer in 1\.\.2048"),
    (dict(temperature=0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(seed="abc"), "seed must be an integer or None"),
    (dict(max_frames=0), "max_frames must be an integer >= 1"),
    (dict(context=["not a segment"]), r"context\[0\] must be a csmstream.Segment"),
    (dict(text="caf\u00e9 \ud800"), r"text is not valid Unicode: .* U\+D800 at character 5"),
    (dict(context=[csmstream.Segment(0, "\udc00", codes=np.zeros((2, 32), np.int64))]),
     r"context\[0\]\.text is not valid Unicode: .* U\+DC00 at character 0"),
])
def test_bad_arguments_raise_clear_errors(tiny_engine, kwargs, match):
    args = dict(text="Hello.", speaker_id=0)
    args.update(kwargs)
    text, spk = args.pop("text"), args.pop("speaker_id")
    with pytest.raises(ValueError, match=match):
        tiny_engine.frames(text, spk, **args)  # raised at the call, before iteration


def test_any_valid_unicode_is_spoken(tiny_engine):
    """Surrogate pairs (an emoji), non-Latin scripts and control characters are text like any other:
    only an unpaired surrogate, which has no UTF-8 form, is refused."""
    for text in ("Smile \U0001F600.", "\u4f60\u597d\u3002", "tab\there\x00."):
        assert len(list(tiny_engine.frames(text, max_frames=2, seed=3))) >= 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(device="tpu"), "device 'tpu' is not supported"),
    (dict(device="cuda:0"), "no CUDA GPU is available"),
    (dict(dtype="int8"), "dtype 'int8' is not supported"),
    (dict(max_streams=0), "max_streams must be an integer"),
    (dict(cuda_graphs="yes"), "cuda_graphs must be True, False or None"),
    (dict(dtype="bf16"), "dtype 'bf16' is not supported; allowed: 'auto', 'float32', 'bfloat16', 'float16'"),
])
def test_bad_load_arguments(kwargs, match):
    pytest.importorskip("torch")
    import torch

    if "cuda" in str(kwargs.get("device", "")) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=match):
        csmstream.load("tiny", **kwargs)


def test_torch_devices_and_dtypes_are_taken_as_their_names():
    torch = pytest.importorskip("torch")
    eng = csmstream.load("tiny", device=torch.device("cpu"), dtype=torch.float32, max_streams=1)
    named = csmstream.load("tiny", device="cpu", dtype="float32", max_streams=1)
    assert (eng.device, eng.dtype) == (named.device, named.dtype) == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="dtype 'torch.int8' is not supported"):
        csmstream.load("tiny", device="cpu", dtype=torch.int8)


def test_frames_are_int64_32_codes_and_capped(tiny_engine):
    frames = list(tiny_engine.frames("A short test.", max_frames=7, seed=1))
    assert 1 <= len(frames) <= 7
    for f in frames:
        assert f.dtype == np.int64 and f.shape == (32,) and 0 <= f.min() and f.max() < 2048


def test_default_cap_scales_with_text(tiny_engine):
    cfg = tiny_engine.config
    assert cfg.default_max_frames(10) < cfg.default_max_frames(200)
    n = len(list(tiny_engine.frames("Hi.", seed=2)))
    assert n <= cfg.default_max_frames(3)


def test_slots_are_released_when_iterators_close(tiny_engine):
    its = [tiny_engine.frames("Hello.", seed=i, max_frames=50) for i in range(tiny_engine.max_streams)]
    for it in its:
        next(it)
    extra = tiny_engine.frames("Hello.", seed=9)
    with pytest.raises(RuntimeError, match="busy"):
        next(extra)
    for it in its:
        it.close()
    assert len(list(tiny_engine.frames("Hello.", seed=9, max_frames=3))) <= 3


def test_import_is_light():
    from tests.fresh import last_line

    assert last_line("import sys, csmstream; print('torch' in sys.modules)") == "False"


def test_temperatures_float32_cannot_hold_are_clamped_not_a_crash(tiny_engine):
    """Every step keeps temperatures in float32. 1e-50 is 0 there (the CPU step raised
    ZeroDivisionError), 1e-40 is subnormal (scores overflowed to inf: not the greedy draw it should
    be near), 1e300 overflows (the prefill raised). As the temperature falls the draw must become the
    greedy one (topk=1), whatever the seed; past float32's top it is the draw at 1e30."""
    def run(**kw):
        return np.stack(list(tiny_engine.frames("Near zero and past the top.", seed=5, max_frames=6, **kw)))

    greedy = run(topk=1)
    for t in (1e-6, 1e-40, 1e-50, 5e-324):
        assert np.array_equal(run(temperature=t), greedy), t
    assert not np.array_equal(run(temperature=1e-3), greedy)  # (the check can see a non-greedy draw)
    assert np.array_equal(run(temperature=1e300), run(temperature=1e30))
    assert np.array_equal(run(temperature=10**400), run(temperature=1e30))  # (an int past float's range)
    from fractions import Fraction

    assert np.array_equal(run(temperature=Fraction(9, 10)), run(temperature=0.9))  # any Real
    assert not np.array_equal(run(temperature=1e30), greedy)


def test_no_context_may_be_given_as_none(tiny_engine):
    frames = lambda ctx: list(tiny_engine.frames("Nothing before this.", context=ctx, seed=2, max_frames=3))  # noqa: E731
    assert np.array_equal(np.stack(frames(None)), np.stack(frames(())))
    with pytest.raises(ValueError, match="context must be a sequence of csmstream.Segment, got int"):
        tiny_engine.frames("Hello.", context=3)
