"""bench/gemv_sweep.py on CPU (interpreted kernels, wall-clock times): every tile it would time on
a GPU gives the reference's result, and the per-frame totals add up its own cases."""

import pytest
import torch
from transformers import CsmConfig

from bench.gemv_sweep import frame_totals, shapes, sweep
from csmstream.engine.config import CsmModelConfig
from csmstream.engine.tiny import tiny_config


def test_shapes_are_a_frames_projections():
    cfg = tiny_config(100)
    got = {s["name"]: s for s in shapes(cfg)}
    assert set(got) == {f"{t}.{m}" for t in ("backbone", "depth") for m in ("wqkv", "wo", "w13", "w2")} | {"depth.head"}
    assert got["depth.head"] == dict(name="depth.head", kind="norm", N=cfg.codebook_size, K=cfg.depth.dim,
                                     calls=cfg.num_codebooks - 1, int8=False)
    d = cfg.depth
    assert got["depth.wqkv"]["N"] == (d.n_heads + 2 * d.n_kv_heads) * d.head_dim
    assert got["depth.w2"]["K"] == d.ffn_dim and got["backbone.w13"]["N"] == cfg.backbone.ffn_dim
    assert got["depth.wo"]["calls"] == d.n_layers * 31 and got["backbone.wo"]["calls"] == cfg.backbone.n_layers
    assert isinstance(cfg, CsmModelConfig)


def test_every_tile_is_checked_and_the_totals_add_up():
    small = [dict(name="depth.w13", kind="swiglu", N=24, K=40, calls=3),
             dict(name="depth.w2", kind="add", N=40, K=24, calls=3),
             dict(name="backbone.wqkv", kind="rope", N=32, K=40, calls=2, heads=(2, 1, 8)),
             dict(name="heads", kind="norm", N=20, K=40, calls=2)]
    grid = [(4, 16, 1), (8, 32, 2)]
    saved = []  # the cases done so far, after each one (main writes them to the JSON)
    res = sweep(small, [1, 3], torch.float32, "cpu", grid=grid, copies=2, log=lambda *a: None,
                reps=1, save=lambda cases: saved.append([c["name"] for c in cases]))
    assert len(res["cases"]) == 2 * 4 * 2  # rows x shapes x formats
    assert [len(s) for s in saved] == list(range(1, 17)) and saved[-1] == [c["name"] for c in res["cases"]]
    # the projections called most often a frame are timed first (a sweep cut short has them)
    assert saved[-1][:8] == ["depth.w13"] * 2 + ["depth.w2"] * 2 + ["backbone.wqkv"] * 2 + ["heads"] * 2
    for case in res["cases"]:
        assert set(case["tiles"]) >= {str(t) for t in grid} and case["best_us"] == min(case["tiles"].values())
        assert (case["cublas_us"] is None) == case["int8"]
    one = [c for c in res["cases"] if c["rows"] == 1]
    want = sum(c["cublas_us"] * c["calls"] for c in one if not c["int8"]) / 1e3
    assert abs(frame_totals(res["cases"])["1"]["cublas_ms"] - round(want, 3)) < 1e-9


def test_bad_rows_are_one_clear_line(capsys):
    from bench.gemv_sweep import main

    for bad in ("a", "0,4", "17", ""):
        assert main(["--rows", bad]) == 2
        assert "--rows must be comma-separated batch sizes in 1..16" in capsys.readouterr().err


def test_precompile_runs_every_candidate_once_in_worker_processes():
    """Spawned processes (interpreted here; on a GPU they fill Triton's on-disk cache) run each
    case's candidates: all of them, none twice, across the workers."""
    from bench.gemv_sweep import candidates, precompile

    small = [dict(name="depth.w2", kind="add", N=40, K=24, calls=3),
             dict(name="backbone.wqkv", kind="rope", N=32, K=40, calls=2, heads=(2, 1, 8))]
    grid = [(4, 16, 1), (8, 32, 2)]
    want = sum(len(candidates(s, r, q, grid)[3]) for s in small for r in (1, 3) for q in (False, True))
    lines = []
    assert precompile(small, [1, 3], torch.float32, "cpu", 2, grid, log=lines.append) == want
    assert lines and f"ran {want} candidate kernels once in 2 processes" in lines[0]


def test_the_candidates_are_dealt_evenly_to_the_compiling_processes():
    """Every candidate of every case goes to exactly one process, and the processes' shares differ
    by one at most (by whole cases the biggest would hold several cases' worth)."""
    from bench.gemv_sweep import GRID, candidates, cases, deal

    cfg = CsmModelConfig.from_hf(CsmConfig())
    every = cases(shapes(cfg), [1])
    assert len(every) == 17  # nine projections, eight of them in both formats
    want = sorted((s["name"], q, str(t)) for r, s, q in every for t in candidates(s, r, q, GRID)[3])
    shares = deal(shapes(cfg), [1], 16, GRID)
    got = sorted((s["name"], q, str(t)) for share in shares for s, r, q, tiles in share for t in tiles)
    assert len(shares) == 16 and got == want
    sizes = [sum(len(tiles) for *_, tiles in share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    assert deal(shapes(cfg), [1], 10 ** 6, [])[-1] and len(deal(shapes(cfg), [1], 10 ** 6, [])) == 17  # no idle process


def test_bad_jobs_is_one_clear_line(capsys):
    from bench.gemv_sweep import main

    assert main(["--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_a_failing_candidate_is_recorded_and_the_sweep_goes_on():
    """On a GPU a candidate may fail to compile (shared memory, a compiler error): one device session
    must not lose the rest of its sweep to it. The failure is recorded with its reason, the best
    is chosen from the candidates that ran, and the next cases are still timed."""
    small = [
        dict(name="depth.w2", kind="add", N=40, K=24, calls=3),
        dict(name="depth.wo", kind="add", N=24, K=40, calls=3),
    ]
    lines = []
    res = sweep(small, [1], torch.float32, "cpu", grid=[(4, 16, 1), (4, 16)], copies=2, log=lines.append, reps=1)
    assert len(res["cases"]) == 4
    for case in res["cases"]:
        assert list(case["failed"]) == ["(4, 16)"] and "tiles must be" in case["failed"]["(4, 16)"]
        assert "(4, 16)" not in case["tiles"] and case["best"] != "(4, 16)"
        assert case["best_us"] == min(case["tiles"].values())
    assert sum("FAILED" in line for line in lines) == 4
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=f"reps must be an int >= 1, got {bad!r}"):
            sweep(small, [1], torch.float32, "cpu", grid=[(4, 16, 1)], copies=1, reps=bad)


def test_split_k_candidates_only_where_they_divide_k():
    """Split tiles (a fifth entry) are timed where the K tiles fall evenly to the splits (another
    count would run as one of those); the sweep checks and times them like any tile, the qkv
    projection's rope form included (the reference's result, interpreted)."""
    from bench.gemv_sweep import candidates

    w13 = dict(name="depth.w13", kind="swiglu", N=24, K=40, calls=3)
    w2 = dict(name="depth.w2", kind="add", N=40, K=32, calls=3)
    qkv = dict(name="backbone.wqkv", kind="rope", N=32, K=32, calls=2, heads=(2, 1, 8))
    grid = [(4, 16, 1), (8, 8, 2, 1, 5), (4, 8, 4, 1, 2), (4, 8, 4, 1, 4)]
    assert candidates(w13, 1, False, grid)[3][1:] == [(4, 16, 1), (8, 8, 2, 1, 5)]  # 5 K tiles of 8
    assert candidates(w2, 1, False, grid)[3][1:] == [(4, 16, 1), (4, 8, 4, 1, 2), (4, 8, 4, 1, 4)]  # 4 of 8
    assert candidates(qkv, 1, False, grid)[3][1:] == [(4, 16, 1), (4, 8, 4, 1, 2), (4, 8, 4, 1, 4)]
    res = sweep([w13, qkv], [1], torch.float32, "cpu", grid=[(8, 8, 2, 1, 5), (4, 8, 4, 1, 4)], copies=1,
                log=lambda *a: None, reps=1)
    timed = {c["name"]: set(c["tiles"]) for c in res["cases"]}
    assert "(8, 8, 2, 1, 5)" in timed["depth.w13"] and "(4, 8, 4, 1, 4)" in timed["backbone.wqkv"]
    assert not any(c.get("failed") for c in res["cases"])


def test_frame_totals_by_hand_the_int8_frame_keeps_the_heads_dense():
    """A frame's GEMV time is each case's time by its calls; with an int8 depth decoder its layers
    take their int8 times and everything without an int8 form (backbone, heads) its dense one."""
    def case(name, int8, calls, cublas, picked, best):
        return dict(rows=1, name=name, int8=int8, calls=calls, cublas_us=cublas, picked_us=picked, best_us=best)

    res = [case("backbone.w2", False, 2, 10, 8, 6), case("depth.w2", False, 3, 5, 4, 3),
           case("depth.w2", True, 3, None, 3, 2), case("depth.head", False, 4, 1, 1, 0.5)]
    want = dict(cublas_ms=0.039, picked_ms=0.032, best_ms=0.023, int8_depth_picked_ms=0.029,
                int8_depth_best_ms=0.02)
    assert frame_totals(res) == {"1": want}
