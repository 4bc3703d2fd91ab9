"""The GPU frame step (engine/cuda_step.py) run eagerly on CPU, Triton interpreted: it must give the
eager PyTorch step's frames, row for row, and keep idle rows' state where it was. An interpreted
frame is almost all depth steps, so the variants run on tiny cut to 4 codebooks (short_engine in
tests/conftest.py; the same kernels over a shorter depth loop) and one test runs the whole 32."""

import pytest
import torch

from csmstream.engine.cuda_step import FastFrameStep, buckets_for, fused_setting, graphs_enabled
from csmstream.engine.generator import FrameGenerator
from csmstream.engine.prompt import build_prompt


def _prefilled(engine, fast, rows, topk, max_seq_len=None):
    g = FrameGenerator(engine.model, rows=4, fast=fast, max_seq_len=max_seq_len)
    g.cpu = None  # the reference: the eager PyTorch step
    for i, r in enumerate(rows):
        tok, mask = build_prompt(engine.tokenizer, ["Hello there.", "A longer line of text."][i % 2], 0, [],
                                 engine.model.cfg.num_codebooks)
        g.prefill(r, torch.from_numpy(tok), torch.from_numpy(mask), seed=5 + i, temperature=0.9, topk=topk)
    return g


@pytest.mark.parametrize(("model", "topk"), [("tiny_engine", 50), ("short_engine", 1)])
def test_fast_step_gives_the_eager_steps_frames(request, model, topk):
    """Over tiny's whole 32 codebooks once (every depth position the GPU runs); the other tests
    here run tiny cut to 4 (short_engine: the same kernels, a depth loop of 3 steps)."""
    engine = request.getfixturevalue(model)
    ref, fast = _prefilled(engine, False, [0, 1], topk), _prefilled(engine, True, [0, 1], topk)
    assert isinstance(fast.fast, FastFrameStep) and fast.fast.graphs == {}  # CPU: no graphs
    pattern = [None, [True, False], None]  # frame 2: row 1 idles
    for active in pattern:
        a, b = ref.step(0, 2, topk, active), fast.step(0, 2, topk, active)
        live = [0, 1] if active is None else [0]
        assert torch.equal(a[live], b[live])
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)
    assert fast.pos.tolist() == ref.pos.tolist() and fast.frame.tolist() == ref.frame.tolist()
    assert fast.host_pos == ref.host_pos


@pytest.mark.parametrize(("fused", "grouped"), [("off", "0"), ("on", "0"), ("off", "1")])
def test_late_in_a_call_the_split_attention_gives_the_eager_steps_frames(short_engine, monkeypatch, fused, grouped):
    """Rows moved 150 and 200 positions into a 256-position window, over the same cache in both
    generators (past its prompt a row's cache holds whatever its prefill left, padded or not: the
    fast one's is made the eager one's): the backbone's attention then spans 3 and 4 of its 4 key
    splits, and the merged result gives the eager step's frames; also with a program per kv head."""
    from csmstream.kernels.triton_attn import pick_splits

    monkeypatch.setenv("CSM_FUSED_GEMV", fused)
    monkeypatch.setenv("CSM_ATTN_GROUPED", grouped)
    ref, fast = (_prefilled(short_engine, f, [0, 1], 50, max_seq_len=256) for f in (False, True))
    bb = short_engine.model.cfg.backbone
    assert fast.fast.attn_grouped == (grouped == "1")
    assert pick_splits(2, bb.n_kv_heads if grouped == "1" else bb.n_heads, 256, bb.head_dim) == 4  # of 64 keys
    fast.bb_cache.copy_(ref.bb_cache)
    for g in (ref, fast):
        g.pos[:2] = torch.tensor([150, 200])
        g.host_pos[:2] = [150, 200]
    for _ in range(2):
        assert torch.equal(ref.step(0, 2, 50), fast.step(0, 2, 50))
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)
    assert not fast.fast.attn_counts.any()  # every merge put its counter back


def test_attention_folded_into_the_qkv_kernel_gives_the_eager_steps_frames(short_engine, monkeypatch):
    """CSM_ATTN_FOLD=on: at batch 1 the fused step runs the depth decoder's attention in its qkv
    kernels (no attention launch of its own: only the backbone's remain) and gives the eager
    step's frames; other buckets and the backbone are as before."""
    from csmstream.kernels import triton_attn

    monkeypatch.setenv("CSM_FUSED_GEMV", "on")
    monkeypatch.setenv("CSM_ATTN_FOLD", "on")
    ref, fast = _prefilled(short_engine, False, [0], 50), _prefilled(short_engine, True, [0], 50)
    assert fast.fast.fold_buckets == {1} and fast.fast.kept(1) == "fused+fold"
    calls, plain = [], triton_attn.decode_attention
    monkeypatch.setattr(triton_attn, "decode_attention", lambda *a, **k: calls.append(a[1].shape) or plain(*a, **k))
    for _ in range(3):
        assert torch.equal(ref.step(0, 1, 50), fast.step(0, 1, 50))
    cfg = short_engine.model.cfg
    assert len(calls) == 3 * cfg.backbone.n_layers  # the depth decoder's attention all ran folded
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)
    assert int(fast.fast.fold_count) == 0


def test_the_fused_five_kernel_layers_give_the_eager_steps_frames(short_engine, monkeypatch):
    monkeypatch.setenv("CSM_FUSED_GEMV", "on")
    ref, fast = _prefilled(short_engine, False, [0, 1], 50), _prefilled(short_engine, True, [0, 1], 50)
    assert fast.fast.fused_buckets == {1, 2, 4}  # every bucket of 4 slots is small enough
    for active in (None, [True, False]):
        a, b = ref.step(0, 2, 50, active), fast.step(0, 2, 50, active)
        live = [0, 1] if active is None else [0]
        assert torch.equal(a[live], b[live])
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)
    assert fast.pos.tolist() == ref.pos.tolist()


def test_split_k_tiles_in_the_fused_step_give_the_eager_steps_frames(short_engine, monkeypatch):
    """Every fused GEMV of the step with tiles that split K two ways (as a measured table may ask),
    the depth decoder's attention folded into its split qkv kernels too: the eager step's frames,
    the step's one split scratch used by them all and its counters back at zero."""
    import triton

    from csmstream.kernels import triton_gemv

    def split_tiles(x, K, N, mats=1, int8=False):  # one wide output tile, K in two tiles, two splits
        return min(1024, triton.next_power_of_2(N)), max(16, triton.next_power_of_2(K) // 2), 4, 1, 2

    monkeypatch.setenv("CSM_FUSED_GEMV", "on")
    monkeypatch.setenv("CSM_ATTN_FOLD", "on")
    monkeypatch.setattr(triton_gemv, "_tiles", split_tiles)
    ref, fast = _prefilled(short_engine, False, [0], 50), _prefilled(short_engine, True, [0], 50)
    assert fast.fast.kept(1) == "fused+fold"
    assert torch.equal(ref.step(0, 1, 50), fast.step(0, 1, 50))
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)
    work = fast.fast.gemv_work
    assert work.parts is not None and not work.counts.any() and int(fast.fast.fold_count) == 0


@pytest.mark.parametrize("rows", [1, 3])
def test_dot_tiles_in_the_fused_step_give_the_eager_steps_frames(short_engine, monkeypatch, rows):
    """Every fused GEMV of the step on the dot path (tl.dot over the rows padded to 16, as the guess
    runs 2..16 rows on a GPU), K split two ways: the eager step's frames, at one row with the
    depth decoder's attention folded into its qkv kernels, and at three rows in bucket 4 (13
    padded rows that must change nothing)."""
    import triton

    from csmstream.kernels import triton_gemv

    def dot_tiles(x, K, N, mats=1, int8=False):  # one wide output tile, K in two tiles, two splits, tl.dot
        return max(16, min(1024, triton.next_power_of_2(N))), max(16, triton.next_power_of_2(K) // 2), 4, 1, 2, 1

    monkeypatch.setenv("CSM_FUSED_GEMV", "on")
    monkeypatch.setenv("CSM_ATTN_FOLD", "on")
    monkeypatch.setattr(triton_gemv, "_tiles", dot_tiles)
    live = list(range(rows))
    ref, fast = _prefilled(short_engine, False, live, 50), _prefilled(short_engine, True, live, 50)
    assert fast.fast.kept(fast.fast.bucket(rows)) == ("fused+fold" if rows == 1 else "fused")
    assert torch.equal(ref.step(0, rows, 50), fast.step(0, rows, 50))
    torch.testing.assert_close(fast.h[:rows], ref.h[:rows], rtol=1e-4, atol=1e-5)
    assert not fast.fast.gemv_work.counts.any()


def test_fused_setting(monkeypatch):
    monkeypatch.delenv("CSM_FUSED_GEMV", raising=False)
    assert fused_setting() == "auto" and fused_setting("1") == "on" and fused_setting("OFF") == "off"
    monkeypatch.setenv("CSM_FUSED_GEMV", "no")
    assert fused_setting() == "off" and fused_setting("auto") == "auto"
    monkeypatch.setenv("CSM_FUSED_GEMV", "sometimes")
    with pytest.raises(ValueError, match="CSM_FUSED_GEMV must be auto, on or off, got 'sometimes'"):
        fused_setting()


def test_rows_outside_the_range_keep_their_state(short_engine):
    fast = _prefilled(short_engine, True, [0, 1, 2], 1)
    h, pos = fast.h.clone(), fast.pos.clone()
    fast.step(1, 2, 1)  # bucket 2 computes rows 0 and 1; only row 1 advances
    assert torch.equal(fast.h[0], h[0]) and torch.equal(fast.h[2], h[2]) and not torch.equal(fast.h[1], h[1])
    assert (fast.pos - pos).tolist() == [0, 1, 0, 0]


def test_any_topk_runs_in_the_fast_step(short_engine):
    """The one-kernel draw has no top-k bound (the old graphs drew from the top 64 and sent a larger
    k to the eager step): rows with k = 300 and k = 2048 step together and give the eager frames."""
    ref, fast = _prefilled(short_engine, False, [0, 1], 300), _prefilled(short_engine, True, [0, 1], 300)
    for g in (ref, fast):
        g.topk[1] = 2048
    for _ in range(2):
        a, b = ref.step(0, 2, 2048), fast.step(0, 2, 2048)
        assert torch.equal(a, b)
        assert fast.fast.active[:2].all()  # the fast step ran them
    assert fast.frame.tolist()[:2] == [2, 2]


def test_the_window_end_is_a_clear_error(short_engine):
    fast = _prefilled(short_engine, True, [0], 1)
    fast.host_pos[0] = fast.max_seq_len
    with pytest.raises(ValueError, match="past the model's window"):
        fast.step(0, 1, 1)


def test_buckets_and_the_graphs_switch(monkeypatch):
    assert buckets_for(1) == [1]
    assert buckets_for(8) == [1, 2, 4, 8]
    assert buckets_for(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert graphs_enabled(False) is False and graphs_enabled(True) is True
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("CSM_CUDA_GRAPHS", off)
        assert graphs_enabled(None) is False and graphs_enabled(True) is True
    monkeypatch.delenv("CSM_CUDA_GRAPHS")
    assert graphs_enabled(None) is True


def test_cpu_float32_keeps_the_numba_step_unless_asked(short_engine):
    g = FrameGenerator(short_engine.model, rows=2)
    assert g.cpu is not None and g.fast is None
    with pytest.raises(ValueError, match="exceed"):
        FrameGenerator(short_engine.model, rows=2, fast=True).fast.bucket(3)


def test_a_fast_step_that_cannot_build_falls_back_unless_required(short_engine, monkeypatch, caplog):
    """On CUDA the fast step is the default; if it cannot be built (say a kernel does not compile
    for that GPU), the generator says why and runs the eager step, unless fast=True asked for it."""
    from csmstream.engine import cuda_step
    from csmstream.engine.generator import build_fast_step

    def broken(self, gen, *, graphs, fused=None):
        raise RuntimeError("PTX for sm_00 failed")

    monkeypatch.setattr(cuda_step.FastFrameStep, "__init__", broken)
    g = _prefilled(short_engine, False, [0], 1)
    with caplog.at_level("WARNING", logger="csmstream.engine"):
        assert build_fast_step(g, None, required=False) is None
    assert "fast GPU step could not be built (RuntimeError: PTX for sm_00 failed)" in caplog.text
    assert "CSM_FAST_STEP=0" in caplog.text
    with pytest.raises(RuntimeError, match="sm_00"):
        build_fast_step(g, None, required=True)
    with pytest.raises(RuntimeError, match="sm_00"):
        FrameGenerator(short_engine.model, rows=2, fast=True)


@pytest.mark.parametrize("fused", ["off", "on"])
def test_depth_positions_0_and_1_run_as_one_pass_and_give_the_same_frames(short_engine, monkeypatch, fused):
    """Positions 0 and 1 of the depth decoder go through together (rows 2b, 2b + 1 sharing cache
    row b) while the fused kernels take 2B rows; past that (here: MAX_ROWS cut to 2, so bucket 2)
    one position at a time. Either way the eager step's frames, and one stack pass fewer a frame."""
    from csmstream.kernels import triton_gemv

    monkeypatch.setenv("CSM_FUSED_GEMV", fused)
    monkeypatch.setattr(triton_gemv, "MAX_ROWS", 2)
    ref, fast = _prefilled(short_engine, False, [0, 1], 50), _prefilled(short_engine, True, [0, 1], 50)
    step = fast.fast
    passes = []
    for name in ("_stack", "_stack_fused"):
        inner = getattr(step, name)
        monkeypatch.setattr(step, name, lambda x, *a, _f=inner, **k: passes.append(x.shape[0]) or _f(x, *a, **k))
    n = short_engine.model.cfg.num_codebooks
    for hi, merged in ((1, True), (2, fused == "off")):  # bucket 1, then bucket 2 (fused: 4 rows > 2)
        passes.clear()
        a, b = ref.step(0, hi, 50, None), fast.step(0, hi, 50, None)
        assert torch.equal(a, b)
        # depth passes + the backbone's: n + 1 one at a time, n with positions 0 and 1 together
        assert len(passes) == (n if merged else n + 1)
        assert passes[0] == (2 * hi if merged else hi) and passes[-1] == hi
    torch.testing.assert_close(fast.h, ref.h, rtol=1e-4, atol=1e-5)
