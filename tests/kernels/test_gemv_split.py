"""Split K (kernels/gemv_split.py): the fused GEMVs with tiles' fifth entry against their
references, the launch plan, the scratch, and the per-device check that falls back to unsplit
tiles. Interpreted on CPU; compiled on a GPU (bench/gpu_session.sh), where programs really hand
their sums to each other through memory."""

import pytest
import torch

from csmstream.kernels import gemv_split
from csmstream.kernels.gemv_split import SplitWork, split_plan, splits_ok, unsplit_if_unsafe
from csmstream.kernels.int8 import quantize_int8
from csmstream.kernels.triton_gemv import (
    matvec_add_,
    matvec_add_ref,
    norm_matvec,
    norm_matvec_ref,
    tile_args,
)
from tests.kernels.test_triton_gemv import _on_the_kernels_device, gen  # noqa: F401 - the autouse fixture


@pytest.mark.parametrize("tiles", [(8, 32, 4, 1, 3), (4, 64, 2, 2, 2), (16, 32, 4, 1, 7)])
@pytest.mark.parametrize("int8", [False, True])
def test_split_k_gives_the_reference_and_leaves_its_counters_at_zero(tiles, int8):
    """Tiles' fifth entry splits the K loop: programs (output tile, split) each sum their share of K,
    and the last of an output tile's programs to finish adds the fp32 partials and runs the epilogue
    (SwiGLU, the int8 scale, the residual add). Ragged K (200 is no multiple of any tile) and N, a
    second launch on the same scratch (its counters left at zero), and rows past B untouched."""
    g = gen(17)
    B, K, N = 3, 200, 37
    x, nw = torch.randn(B, K, generator=g), torch.rand(K, generator=g) + 0.5
    w = torch.randn(2 * N, K, generator=g) / K ** 0.5
    scale = None
    if int8:
        qw = quantize_int8(w)
        w, scale = qw.q, qw.scale
    work = SplitWork()
    for _ in range(2):
        torch.testing.assert_close(norm_matvec(x, nw, w, 1e-5, swiglu=True, scale=scale, tiles=tiles, work=work),
                                   norm_matvec_ref(x, nw, w, 1e-5, swiglu=True, scale=scale), rtol=1e-5, atol=1e-5)
        assert not work.counts.any()
    w1, s1 = w[:N].contiguous(), None if scale is None else scale[:N].contiguous()
    torch.testing.assert_close(norm_matvec(x, nw, w1, 1e-5, scale=s1, tiles=tiles, work=work),
                               norm_matvec_ref(x, nw, w1, 1e-5, scale=s1), rtol=1e-5, atol=1e-5)
    a, big = torch.randn(B, K, generator=g), torch.randn(B + 2, N, generator=g)
    want = big.clone()
    matvec_add_ref(want[:B], w1, a, scale=s1)
    for _ in range(2):
        got = big.clone()
        matvec_add_(got[:B], w1, a, scale=s1, tiles=tiles, work=work)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[B:], big[B:]) and not work.counts.any()


def test_split_plans_give_every_program_some_k():
    # (K range a program, splits used): whole K tiles each, none empty
    assert split_plan(8192, 512, 4) == (2048, 4)
    assert split_plan(1024, 512, 4) == (512, 2)  # two K tiles: two splits at most
    assert split_plan(200, 32, 3) == (96, 3)  # seven tiles: 3 + 3 + 1
    assert split_plan(200, 32, 1) == (224, 1)
    assert tile_args((4, 512, 8, 1, 4)) == (4, 512, 8, 1, 4, 0)
    with pytest.raises(ValueError, match="split K at most 16 ways"):
        tile_args((4, 512, 8, 1, 32))


def test_split_scratch_must_grow_before_a_graph_capture(monkeypatch):
    """Memory zeroed inside a CUDA graph capture is zero only when the graph replays: the counters
    must exist before the step is captured (it runs eagerly first), so growing during one is refused."""
    work = SplitWork()
    parts, counts = work.take(64, 4, "cpu")
    assert parts.numel() == 64 and counts.numel() == 4 and not counts.any()
    assert work.take(32, 2, "cpu")[0] is parts  # smaller fits: the same scratch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert work.take(64, 4, "cpu")[1] is counts
    with pytest.raises(RuntimeError, match="must grow before a CUDA graph capture"):
        work.take(128, 4, "cpu")


@pytest.fixture
def small_check(monkeypatch):
    """splits_ok on a shape the interpreter runs in a moment, its per-device answers forgotten."""
    monkeypatch.setattr(gemv_split, "CHECK_SHAPE", (96, 40, 16, 3))
    monkeypatch.setattr(gemv_split, "_checked", {})


def test_split_k_that_gives_the_unsplit_sums_is_kept(small_check):
    assert splits_ok("cpu") and gemv_split._checked == {"cpu": True}
    assert unsplit_if_unsafe((4, 16, 4, 1, 3), "cpu") == (4, 16, 4, 1, 3)


def test_a_device_where_split_k_sums_wrong_runs_every_gemv_unsplit(small_check, monkeypatch, caplog):
    """A fault that loses part of K (here: each split given one K tile too few, as a partial lost to
    a memory-ordering bug would be) is caught once per device, logged, and the tiles lose their
    splits; tiles without splits pass through untouched."""
    real = gemv_split.split_plan
    monkeypatch.setattr(gemv_split, "split_plan", lambda K, bk, s: (real(K, bk, s)[0] - bk, real(K, bk, s)[1]))
    with caplog.at_level("WARNING", logger="csmstream.kernels.gemv_split"):
        assert unsplit_if_unsafe((4, 16, 4, 2, 3), "cpu") == (4, 16, 4, 2)
        assert unsplit_if_unsafe((4, 16, 4, 1, 5), "cpu") == (4, 16, 4, 1)
    assert sum("split-K GEMV tiles give wrong sums on cpu" in r.message for r in caplog.records) == 1
    assert unsplit_if_unsafe((8, 32, 2), "cpu") == (8, 32, 2)
    assert unsplit_if_unsafe((8, 32, 2, 1, 1), "cpu") == (8, 32, 2, 1, 1)
