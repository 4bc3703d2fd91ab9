"""bench/gpu.py's parts that run without a GPU (interpreted kernels, wall-clock times)."""

import torch

from bench.gpu import sample_us


def test_sample_us_checks_the_kernel_and_times_both_paths():
    rows = sample_us(batches=(1, 3), device="cpu", dtype=torch.float32)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["one_kernel_us"] > 0 and r["topk_path_us"] > 0 for r in rows)


def test_prefill_ms_times_the_padded_and_the_plain_prefill_and_restores_the_generator(tiny_engine):
    from bench.gpu import prefill_ms, prompt

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
    from bench.gpu import kept_variant, variants_row

    from csmstream.engine.generator import FrameGenerator

    step = FrameGenerator(tiny_engine.model, rows=2, fast=True).fast
    res = kept_variant(step)  # CPU: nothing captured, the cuBLAS-path step
    assert res == {"variant": "cublas", "fused_gemv": False} and variants_row(res) == "kept cublas"
    step.fused_buckets, step.pdl_buckets = {1}, {1}
    step.timing[1] = {"cublas": 7.4, "fused": 6.12, "fused+pdl": 5.2}
    res = kept_variant(step)
    assert res["variant"] == "fused+pdl" and res["capture_fused+pdl_ms"] == 5.2
    assert variants_row(res) == "cublas 7.40 / fused 6.12 / fused+pdl 5.20 ms, kept fused+pdl"
