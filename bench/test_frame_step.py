"""Frame-step speed: the engine against transformers' generate on the same weights, same run.

    make bench            # or: .venv/bin/python -m pytest bench -q --benchmark-only

Per-frame times are per call / frames per call (see extra_info). The side-by-side test prints and
records the ratio; nothing here asserts a time (machines are noisy), the figures go in README.
"""

import time

import numpy as np
import pytest
import torch

CONFIGS = {
    # name: (backbone (dim, layers, heads, kv, ffn), depth (dim, layers, heads, kv, ffn))
    "tiny": ((256, 2, 4, 2, 512), (128, 2, 4, 2, 256)),
    "mid": ((1024, 4, 16, 4, 4096), (512, 2, 8, 2, 2048)),
}
TEXT = "Hello there, this is a test of the frame step speed."
FRAMES = 8
KW = dict(do_sample=False, depth_decoder_do_sample=False, suppress_tokens=[2048, 2049, 2050],
          depth_decoder_suppress_tokens=[2048, 2049, 2050])


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, our engine, reference model, reference input ids) on identical random weights."""
    import csmstream
    from tests.checkpoints import reference_ids, write_checkpoint

    bb, dd = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref, tok = write_checkpoint(path, seed=0, backbone=bb, depth=dd, max_pos=2048)
    eng = csmstream.load(str(path), device="cpu", dtype="float32", max_streams=1)
    ids = torch.tensor([reference_ids(tok, 0, TEXT)])
    return request.param, eng, ref, ids


def engine_frames(eng, n=FRAMES):
    return list(eng.frames(TEXT, 0, topk=1, max_frames=n))


def reference_frames(ref, ids, n=FRAMES):
    with torch.no_grad():
        return ref.generate(input_ids=ids, max_new_tokens=n, **KW)


def test_engine_frames(benchmark, pair):
    name, eng, _, _ = pair
    benchmark.group = f"frames-{name}"
    benchmark.extra_info["frames_per_call"] = FRAMES
    benchmark.pedantic(engine_frames, args=(eng,), rounds=5, warmup_rounds=1)


def test_reference_generate(benchmark, pair):
    name, _, ref, ids = pair
    benchmark.group = f"frames-{name}"
    benchmark.extra_info["frames_per_call"] = FRAMES
    benchmark.pedantic(reference_frames, args=(ref, ids), rounds=3, warmup_rounds=1)


def test_side_by_side_ratio(benchmark, pair):
    """Engine (CPU frame kernel), engine (eager PyTorch step) and reference, alternately in one run;
    per-frame medians and ratios in extra_info."""
    name, eng, ref, ids = pair
    kernel = eng.gen.cpu

    def eager_frames():
        eng.gen.cpu = None
        try:
            return engine_frames(eng)
        finally:
            eng.gen.cpu = kernel

    paths = {"engine": lambda: engine_frames(eng), "eager": eager_frames,
             "reference": lambda: reference_frames(ref, ids)}
    times = {k: [] for k in paths}
    for f in paths.values():
        f()  # warm
    for _ in range(3):
        for k, f in paths.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) / FRAMES)
    o, e, r = (float(np.median(times[k])) for k in paths)
    benchmark.group = f"ratio-{name}"
    benchmark.extra_info.update(engine_ms_per_frame=1000 * o, eager_ms_per_frame=1000 * e,
                                reference_ms_per_frame=1000 * r, speedup=r / o, eager_speedup=r / e)
    print(f"\n[{name}] engine {1000 * o:.2f} ms/frame (eager step {1000 * e:.2f}), "
          f"transformers generate {1000 * r:.2f} ms/frame: {r / o:.1f}x (eager {r / e:.1f}x)")
    benchmark.pedantic(paths["engine"], rounds=3)  # the timed figure: the engine's 8 frames


@pytest.mark.parametrize("streams", [1, 4])
def test_tiny_step_batched(benchmark, streams):
    """One batched step over several rows: per-stream cost falls as the batch grows."""
    import csmstream
    from csmstream.engine.prompt import build_prompt

    eng = csmstream.load("tiny", device="cpu", max_streams=streams)
    g = eng.gen
    t, m = (torch.from_numpy(a) for a in build_prompt(eng.tokenizer, TEXT, 0, [], 32))

    def refill():
        for row in range(streams):
            g.prefill(row, t, m, seed=row, temperature=0.9, topk=50)

    def step():
        if g.host_pos[0] > g.max_seq_len - 8:
            refill()
        return g.step(0, streams, 50)

    refill()
    benchmark.group = "tiny-step-batched"
    benchmark.extra_info["streams"] = streams
    benchmark.pedantic(step, rounds=30, warmup_rounds=2)
