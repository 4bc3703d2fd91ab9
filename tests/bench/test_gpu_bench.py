"""bench/gpu.py's measurements that run without a GPU (interpreted kernels, wall-clock times)."""

import pytest
import torch

from bench.gpu_measure import sample_us


def test_sample_us_checks_the_kernel_and_times_both_paths():
    rows = sample_us(batches=(1, 3), device="cpu", dtype=torch.float32, draws=2)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["one_kernel_us"] > 0 and r["topk_path_us"] > 0 for r in rows)
    timed = {"one_kernel_w1_us", "one_kernel_w2_us", "one_kernel_ways4_us", "one_kernel_ways8_us",
             "one_kernel_ways16_us", "one_kernel_ways16_w2_us"}
    assert all(timed <= set(r) and all(r[k] > 0 for k in timed) for r in rows)  # each checked, then timed
    for bad in (0, 33, 2.0):
        with pytest.raises(ValueError, match=f"draws must be an int in 1..32, got {bad!r}"):
            sample_us(batches=(1,), device="cpu", dtype=torch.float32, draws=bad)


def test_prefill_ms_times_the_padded_and_the_plain_prefill_and_restores_the_generator(tiny_engine):
    from bench.gpu_measure import prefill_ms, prompt
    from csmstream.engine.generator import FrameGenerator

    gen = FrameGenerator(tiny_engine.model, rows=2, fast=True)
    sp = gen.static_prefill
    prompts = {"text": prompt(tiny_engine), "long": prompt(tiny_engine, "Words. " * 120)}
    out = prefill_ms(gen, prompts, 2, sync=lambda: None)
    t = out["text"]["tokens"]
    assert out["text"]["bucket"] in sp.buckets and t <= out["text"]["bucket"] < 2 * t
    assert out["long"]["bucket"] == 512 and out["long"]["tokens"] > 512  # goes in as two pieces
    for row in out.values():
        assert row["graph_ms"] is None and row["padded_eager_ms"] > 0 and row["plain_eager_ms"] > 0
    assert gen.static_prefill is sp and sp.graphs == {} and gen.host_pos == [0, 0]


def test_the_kept_variant_and_its_table_row(tiny_engine):
    from bench.gpu_measure import kept_variant, variants_row
    from csmstream.engine.generator import FrameGenerator

    step = FrameGenerator(tiny_engine.model, rows=2, fast=True).fast
    res = kept_variant(step)  # CPU: nothing captured, the cuBLAS-path step
    assert res == {"variant": "cublas", "fused_gemv": False} and variants_row(res) == "kept cublas"
    step.fused_buckets, step.pdl_buckets = {1}, {1}
    step.timing[1] = {"cublas": 7.4, "fused": 6.12, "fused+pdl": 5.2}
    res = kept_variant(step)
    assert res["variant"] == "fused+pdl" and res["capture_fused+pdl_ms"] == 5.2
    assert variants_row(res) == "cublas 7.40 / fused 6.12 / fused+pdl 5.20 ms, kept fused+pdl"


# -- the stage runner (bench/gpu.py) ----------------------------------------------------------------
def _run(tmp_path, *args):
    import json

    from bench.gpu import main

    out = tmp_path / "gpu.json"
    rc = main(["--device", "cpu", "--config", "micro", "--json", str(out), *args])
    return rc, json.loads(out.read_text())


def test_a_spent_budget_starts_no_stage_and_still_writes_the_json(tmp_path, monkeypatch):
    monkeypatch.delenv("CSM_GEMV_TILES", raising=False)
    rc, res = _run(tmp_path, "--stages", "profile,sample", "--budget-s", "0")
    assert rc == 0 and res["skipped"] == ["profile", "sample"]
    assert "profile" not in res and "sample" not in res and res["errors"] == {}
    assert res["config"] == "micro" and res["device"] == "cpu (dry run)"
    assert res["gemv_tiles"].startswith("guessed from the shapes")  # the record says where tiles came from


def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    from bench.gpu import Bench

    def broken(self):
        raise RuntimeError("the draw kernel would not compile")

    monkeypatch.setattr(Bench, "sample", broken)
    rc, res = _run(tmp_path, "--stages", "sample,profile")
    assert rc == 1  # the session script sees it
    assert "RuntimeError: the draw kernel would not compile" in res["errors"]["sample"]
    assert "sample" not in res and res["profile"] == {"skipped": "the profile reads CUDA kernels"}
    assert set(res["stages"]) == {"sample", "profile"}
    assert "| stage sample | FAILED (traceback in the JSON) |" in capsys.readouterr().out


def test_the_continue_previous_ttfa_times_turns_that_each_heard_the_one_before():
    """server_ttfa(continued=True) on tiny over the real server: every turn after the first must
    come back with a done saying it continued (else it raises: not the figure it claims)."""
    import csmstream
    from bench.gpu_measure import server_ttfa

    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    assert server_ttfa(eng, 2, warmup=0, continued=True) > 0


def test_bad_arguments_say_what_is_allowed(tmp_path, capsys):
    from bench.gpu import main

    for args, says in ((["--stages", "batch1,nope"], "the stages are batch1, context, check, profile"),
                       (["--iters", "0"], "--iters must be >= 1"),
                       (["--buckets", "1,x"], "expected integers separated by commas"),
                       (["--continue-turns", "-1"], "--continue-turns must be >= 0"),
                       (["--sample-draws", "33"], "--sample-draws must be in 1..32, got 33")):
        with pytest.raises(SystemExit) as e:
            main(["--device", "cpu", *args, "--json", str(tmp_path / "x.json")])
        assert e.value.code == 2 and says in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--json", str(tmp_path / "x.json")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
