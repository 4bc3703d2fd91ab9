"""Measured GEMV tiles (kernels/gemv_tiles.py): a gemv_sweep JSON named by CSM_GEMV_TILES, or the
built-in table of the GPU model, replaces pick_tiles' guess for the shapes it measured, and a bad
file is a clear error."""

import json
from pathlib import Path

import pytest
import torch

from bench.gemv_sweep import sweep
from csmstream.kernels import gemv_tiles, triton_gemv as gv
from csmstream.kernels.int8 import quantize_int8

ROOT = Path(__file__).resolve().parents[2]

SHAPES = [dict(name="depth.w13", kind="swiglu", N=24, K=40, calls=3),
          dict(name="backbone.wqkv", kind="rope", N=32, K=40, calls=2, heads=(2, 1, 8))]


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A real (CPU, interpreted) sweep's JSON, named by the env var; the reader's cache emptied."""
    monkeypatch.setattr(gemv_tiles, "_loaded", {})
    grid = [(4, 16, 1), (8, 32, 2), (16, 64, 4)]
    res = sweep(SHAPES, [1, 8], torch.float32, "cpu", grid=grid, copies=2, log=lambda *a: None, reps=1)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(res))
    monkeypatch.setenv("CSM_GEMV_TILES", str(path))
    return res


def test_the_sweeps_best_tiles_replace_the_guess_for_the_shapes_it_measured(table, monkeypatch):
    for c in table["cases"]:
        assert c["tiles"][str(tuple(c["best_tiles"]))] == c["best_us"]  # the fastest of its candidates
        got = gv.pick_tiles(c["rows"], c["K"], c["cols"], c["mats"], c["int8"])
        assert got == tuple(c["best_tiles"])
    c = next(c for c in table["cases"] if c["rows"] == 8 and not c["int8"] and c["name"] == "depth.w13")
    assert (c["K"], c["cols"], c["mats"]) == (40, 24, 2)
    for rows in (5, 6, 7):  # the kernels round rows up to 8 too
        assert gv.pick_tiles(rows, 40, 24, 2) == tuple(c["best_tiles"])
    unmeasured = [(4, 40, 24, 2, False), (16, 40, 24, 2, False), (1, 40, 24, 1, False), (1, 64, 24, 2, False)]
    guesses = [gv.pick_tiles(*k) for k in unmeasured]
    monkeypatch.delenv("CSM_GEMV_TILES")
    assert guesses == [gv.pick_tiles(*k) for k in unmeasured]  # the shape's guess, as with no table


def test_the_kernels_ask_for_int8_tiles_only_with_int8_weights(monkeypatch):
    asked = []

    def spy(x, K, N, mats=1, int8=False):
        asked.append((K, N, mats, int8))
        return 32, 64, 4

    monkeypatch.setattr(gv, "_tiles", spy)
    x, nw, a = torch.randn(2, 40), torch.ones(40), torch.randn(2, 24)
    w13, w2 = torch.randn(48, 40), torch.randn(40, 24)
    q13, q2 = quantize_int8(w13), quantize_int8(w2)
    gv.norm_matvec(x, nw, w13, 1e-5, swiglu=True)
    gv.norm_matvec(x, nw, q13.q, 1e-5, swiglu=True, scale=q13.scale)
    gv.matvec_add_(x.clone(), w2, a)
    gv.matvec_add_(x.clone(), q2.q, a, scale=q2.scale)
    assert asked == [(40, 24, 2, False), (40, 24, 2, True), (24, 40, 1, False), (24, 40, 1, True)]


@pytest.mark.parametrize("content, says", [
    (None, "cannot read the file"),
    ("{not json", "not JSON"),
    ('[1, 2]', "expected bench/gemv_sweep.py's JSON"),
    ('{"cases": []}', "the file has no cases"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false}]}', "case 0 lacks one of"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false, "best_tiles": [4, 24, 4]}]}',
     "has best_tiles [4, 24, 4]; expected three powers of two"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false, "best_tiles": [4, true, 4]}]}',
     "expected three powers of two"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false, "best_tiles": [4, 8, 4, 0]}]}',
     "optionally then stages 1..8"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false, "best_tiles": [4, 8, 4, 3, 17]}]}',
     "then splits 1..16"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false, "best_tiles": [4, 8, 4, 1, 2, 1]}]}',
     "then dot 0 or 1 (1: BLOCK_N and BLOCK_K >= 16)"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false, "best_tiles": [16, 16, 4, 1, 2, 2]}]}',
     "has best_tiles"),
    ('{"cases": [{"rows": 1, "K": 8, "cols": 8, "mats": 1, "int8": false, "best_tiles": [16, 16, 4, 1, 2, 1, 1]}]}',
     "has best_tiles"),
])
def test_a_bad_table_is_an_error_naming_the_variable_and_the_file(tmp_path, monkeypatch, content, says):
    monkeypatch.setattr(gemv_tiles, "_loaded", {})
    path = tmp_path / "tiles.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("CSM_GEMV_TILES", str(path))
    with pytest.raises(ValueError, match="CSM_GEMV_TILES=") as err:
        gv.pick_tiles(1, 8, 8)
    assert says in str(err.value) and str(path) in str(err.value)


def test_unset_or_blank_means_the_guess(monkeypatch):
    monkeypatch.setenv("CSM_GEMV_TILES", "  ")
    assert gemv_tiles.measured(1, 2048, 2048, 1, False) is None
    monkeypatch.delenv("CSM_GEMV_TILES")
    assert gemv_tiles.measured(1, 2048, 2048, 1, False) is None


def test_staged_tiles_from_the_table_are_picked_and_run(tmp_path, monkeypatch):
    """A sweep that found a software-pipelined K loop fastest records its stages as a fourth entry
    (3 need not be a power of two); pick_tiles hands it on and the kernels take it: the reference's
    result (interpreted; stages only change how a GPU issues the loads, tests/bench/test_kernel_report)."""
    monkeypatch.setattr(gemv_tiles, "_loaded", {})
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"cases": [dict(rows=2, K=40, cols=24, mats=1, int8=False, best_tiles=[8, 16, 4, 3])]}))
    monkeypatch.setenv("CSM_GEMV_TILES", str(path))
    assert gv.pick_tiles(2, 40, 24) == (8, 16, 4, 3)
    assert gv.tile_args(gv.pick_tiles(2, 40, 24)) == (8, 16, 4, 3, 1, 0)
    assert gv.tile_args((8, 16, 4)) == (8, 16, 4, 1, 1, 0)
    g = torch.Generator().manual_seed(3)
    x, a, w = torch.randn(2, 24, generator=g), torch.randn(2, 40, generator=g), torch.randn(24, 40, generator=g)
    torch.testing.assert_close(gv.matvec_add_(x.clone(), w, a, tiles=gv.pick_tiles(2, 40, 24)),
                               gv.matvec_add_ref(x.clone(), w, a),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"tiles must be \(BLOCK_N, BLOCK_K, num_warps\[, stages\[, splits\[, dot"):
        gv.matvec_add_(x.clone(), w, a, tiles=(8, 16))


def test_split_tiles_from_the_table_are_picked_and_run(tmp_path, monkeypatch):
    """A sweep that found split K fastest records the splits as a fifth entry; pick_tiles hands it
    on and both kernels split their K loops: the reference's result, with the scratch's counters
    left at zero (the next launch, or the next replay of a graph, starts from them)."""
    monkeypatch.setattr(gemv_tiles, "_loaded", {})
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"cases": [
        dict(rows=2, K=40, cols=24, mats=1, int8=False, best_tiles=[8, 8, 4, 1, 4]),
        dict(rows=2, K=40, cols=12, mats=2, int8=False, best_tiles=[4, 16, 4, 2, 3])]}))
    monkeypatch.setenv("CSM_GEMV_TILES", str(path))
    assert gv.pick_tiles(2, 40, 24) == (8, 8, 4, 1, 4) and gv.pick_tiles(2, 40, 12, 2) == (4, 16, 4, 2, 3)
    g = torch.Generator().manual_seed(5)
    x, a, w = torch.randn(2, 24, generator=g), torch.randn(2, 40, generator=g), torch.randn(24, 40, generator=g)
    work = gv.SplitWork()
    torch.testing.assert_close(gv.matvec_add_(x.clone(), w, a, tiles=gv.pick_tiles(2, 40, 24), work=work),
                               gv.matvec_add_ref(x.clone(), w, a), rtol=1e-5, atol=1e-5)
    assert work.parts.numel() == 3 * 2 * 24  # five K tiles split four ways: 2 + 2 + 1, three programs
    nw = torch.rand(40, generator=g) + 0.5
    torch.testing.assert_close(gv.norm_matvec(a, nw, w, 1e-5, swiglu=True, tiles=gv.pick_tiles(2, 40, 12, 2),
                                              work=work),
                               gv.norm_matvec_ref(a, nw, w, 1e-5, swiglu=True), rtol=1e-5, atol=1e-5)
    assert not work.counts.any()


# -- built-in tables: a sweep's best tiles shipped for its GPU model ------------------------------
H200_SWEEP = ROOT / "bench" / "results" / "h200" / "gemv_sweep_rows1_2026-12-04.json"


@pytest.fixture
def builtin_dir(tmp_path, monkeypatch):
    """kernels/tiles/ replaced by an empty folder, CSM_GEMV_TILES unset, the readers' caches emptied."""
    monkeypatch.setattr(gemv_tiles, "BUILTIN", tmp_path)
    monkeypatch.setattr(gemv_tiles, "_builtin", None)
    monkeypatch.setattr(gemv_tiles, "_loaded", {})
    monkeypatch.delenv("CSM_GEMV_TILES", raising=False)
    return tmp_path


def test_a_gpus_builtin_table_replaces_the_guess_there_and_only_there(builtin_dir, tmp_path_factory, monkeypatch):
    from bench.gemv_sweep import install_builtin

    sweep_json = tmp_path_factory.mktemp("sweep") / "sweep.json"
    sweep_json.write_text(json.dumps({"device": "Test GPU 9000", "date": "2026-12-05", "cases": [
        dict(name="depth.w2", rows=1, K=40, cols=24, mats=1, int8=False, best_tiles=[8, 8, 4, 1, 5], best_us=1.0)]}))
    assert install_builtin(str(sweep_json), builtin_dir) == builtin_dir / "test_gpu_9000.json"
    guess = gv.pick_tiles(1, 40, 24)
    assert gv.pick_tiles(1, 40, 24, device="Test GPU 9000") == (8, 8, 4, 1, 5) != guess
    assert gv.pick_tiles(1, 40, 24, device="Other GPU") == guess  # no table for it
    assert gv.pick_tiles(2, 40, 24, device="Test GPU 9000") == gv.pick_tiles(2, 40, 24)  # a shape it lacks
    assert "built-in table for Test GPU 9000 (test_gpu_9000.json)" in gemv_tiles.source("Test GPU 9000")
    assert "no built-in table for Other GPU" in gemv_tiles.source("Other GPU")
    monkeypatch.setenv("CSM_GEMV_TILES", "guess")  # the guess everywhere
    assert gv.pick_tiles(1, 40, 24, device="Test GPU 9000") == guess and "guessed" in gemv_tiles.source("Test GPU 9000")
    other = tmp_path_factory.mktemp("env") / "mine.json"  # a named file wins over the built-in table
    other.write_text(json.dumps({"cases": [dict(rows=1, K=40, cols=24, mats=1, int8=False, best_tiles=[4, 8, 2])]}))
    monkeypatch.setenv("CSM_GEMV_TILES", str(other))
    assert gv.pick_tiles(1, 40, 24, device="Test GPU 9000") == (4, 8, 2)


def test_a_builtin_table_without_a_device_or_with_bad_tiles_is_an_error_naming_it(builtin_dir):
    (builtin_dir / "nameless.json").write_text(json.dumps({"cases": []}))
    with pytest.raises(ValueError, match="built-in GEMV tile table nameless.json: names no device"):
        gv.pick_tiles(1, 40, 24, device="Test GPU 9000")
    (builtin_dir / "nameless.json").unlink()
    gemv_tiles._builtin = None
    (builtin_dir / "bad.json").write_text(json.dumps({"device": "Bad GPU", "cases": [
        dict(rows=1, K=40, cols=24, mats=1, int8=False, best_tiles=[3, 8, 4])]}))
    with pytest.raises(ValueError, match=r"built-in GEMV tile table bad.json: case 0 has best_tiles \[3, 8, 4\]"):
        gv.pick_tiles(1, 40, 24, device="Bad GPU")


def test_the_shipped_h200_table_is_the_committed_h200_sweeps_best(monkeypatch):
    """kernels/tiles/nvidia_h200.json holds what the H200 sweep (bench/results/h200/) measured
    fastest, and pick_tiles hands exactly those tiles out on an H200 (at one row: all it timed)."""
    from bench.gemv_sweep import builtin_table

    monkeypatch.setattr(gemv_tiles, "_builtin", None)
    monkeypatch.setattr(gemv_tiles, "_loaded", {})
    monkeypatch.delenv("CSM_GEMV_TILES", raising=False)
    sweep = json.loads(H200_SWEEP.read_text())
    shipped = json.loads((ROOT / "kernels" / "tiles" / "nvidia_h200.json").read_text())
    assert shipped == builtin_table(sweep, H200_SWEEP.name)
    assert gemv_tiles.builtin_tables()["NVIDIA H200"].name == "nvidia_h200.json"
    for c in sweep["cases"]:
        assert gv.pick_tiles(1, c["K"], c["cols"], c["mats"], c["int8"], device="NVIDIA H200") == tuple(c["best_tiles"])


def test_the_builtin_tables_go_into_the_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "csmstream/kernels/tiles/nvidia_h200.json" in names


def test_builtin_from_a_file_that_is_no_sweep_is_one_clear_line(tmp_path, capsys):
    from bench.gemv_sweep import main

    bad = tmp_path / "x.json"
    bad.write_text("[]")
    assert main(["--builtin", str(bad)]) == 2
    assert f"--builtin {bad}: not a finished sweep's JSON" in capsys.readouterr().err
    assert main(["--builtin", str(tmp_path / "missing.json")]) == 2
