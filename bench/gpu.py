"""GPU benchmark: the full csm-1b configuration with random weights (speed does not depend on them).

    python bench/gpu.py [--json out.json] [--buckets 1,2,...,256] [--streams 256] [--dtype bfloat16]

1. checks: GPU float32 frames of a small config equal the CPU float32 reference (the numba step);
   on the full config, graph replay equals the same step run eagerly (bit for bit);
2. time per frame at batch 1: eager PyTorch, the static Triton step without graphs, with graphs
   (the variant CSM_FUSED_GEMV picked);
3. time to first audio: engine thread (submit -> first 100 ms of PCM in the request's sink) and,
   when websockets is installed, the real server (request sent -> first 100 ms chunk received),
   with and without a 10 s named-voice prompt (prefix cache); the prefill alone: graph replay,
   the same padded prefill eagerly, and the plain eager prefill, side by side;
4. per batch bucket: frame step and step + streaming decode per tick, and the real-time streams
   that sustains (a tick must take < 80 ms);
5. a live run: N concurrent requests through the engine thread, every chunk's lateness measured,
   with the chunked-prefill budget and with one prefill chunk a tick, side by side;
6. for small buckets, the fused-GEMV step against the cuBLAS one and, on Hopper, the fused step as
   a chain of programmatic dependent launches (all captured, replays timed; CSM_FUSED_GEMV and
   CSM_PDL auto keep the fastest), and batch 1 again with an int8 depth decoder;
7. a frame's 32 draws: the one-kernel draw against torch.topk + argmax, per batch (sample_us).
bench/gemv_sweep.py times the GEMV kernels' tiles one projection at a time.
bench/kernel_report.py compiles every kernel of the step for a GPU architecture without a GPU (registers, spills).
Prints a table and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

FRAME_MS = 80.0


def log(*a):
    print(*a, flush=True)


def full_engine(max_streams: int, dtype: torch.dtype, graphs: bool = True, int8_depth: bool = False):
    """csm-1b shapes (transformers' CsmConfig defaults) and the real Mimi config, random weights
    (int8_depth: the depth decoder quantized as load(quantize="int8-depth") does)."""
    from csmstream.engine.codec import Codec, randomize_codebooks
    from csmstream.engine.config import CsmModelConfig
    from csmstream.engine.engine import Engine
    from csmstream.engine.model import CSM
    from csmstream.engine.tokenizer import TextTokenizer
    from transformers import CsmConfig, MimiConfig, MimiModel

    cfg = CsmModelConfig.from_hf(CsmConfig())
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CSM(cfg).to(dtype)
        for name, p in model.named_parameters():
            p.data.fill_(1.0) if name.endswith("norm.weight") else p.data.normal_(0.0, 0.02)
        mimi = MimiModel(MimiConfig())
    randomize_codebooks(mimi)
    if int8_depth:
        from csmstream.engine.quant import quantize_depth_

        quantize_depth_(model)
    eng = Engine(model.eval(), TextTokenizer.tiny(), name="csm-1b-random", max_streams=max_streams,
                 codec=Codec(mimi.eval(), cfg.num_codebooks), cuda_graphs=graphs)
    if eng.gen.fast is None:  # the engine fell back to the eager step (its warning says why)
        raise SystemExit("bench/gpu.py: the fast GPU step could not be built here; see the warning above")
    return eng


def prompt(eng, text="Hello, this is a streaming test of the engine.", context=()):
    from csmstream.engine.prompt import build_prompt

    tok, mask = build_prompt(eng.tokenizer, text, 0, context, eng.config.num_codebooks)
    return torch.from_numpy(tok), torch.from_numpy(mask)


def fill_rows(gen, rows: int, topk: int = 50) -> None:
    tok, mask = prompt_cache["p"]
    for r in range(rows):
        gen.prefill(r, tok, mask, seed=r + 1, temperature=0.9, topk=topk)


prompt_cache: dict = {}


def time_steps(fn, n: int) -> float:
    """Median ms of fn() (which must sync, e.g. copy codes to the host), after warm-up."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


# -- 1. checks ---------------------------------------------------------------------------------
def check_small_vs_cpu(frames: int = 12) -> dict:
    """The GPU step (graphs; the cuBLAS and the fused-GEMV variants, and the fused int8 depth
    decoder) against the CPU reference (for int8: the CPU model with the same rounded weights)."""
    import os

    from csmstream.engine.generator import FrameGenerator
    from csmstream.engine.quant import quantize_depth_

    import csmstream

    out = {}
    saved = {k: os.environ.get(k) for k in ("CSM_FUSED_GEMV", "CSM_PDL")}
    os.environ["CSM_PDL"] = "off"
    for variant, int8, suffix in (("off", False, ""), ("on", False, "_fused_gemv"), ("on", True, "_int8_depth"),
                                  ("pdl", False, "_fused_pdl")):
        if variant == "pdl":  # the fused step as a PDL chain, where the GPU has it (Hopper on)
            if not fused_pdl_possible():
                continue
            variant = os.environ["CSM_PDL"] = "on"
        q = "int8-depth" if int8 else None
        cpu = csmstream.load("tiny", device="cpu", dtype="float32", max_streams=2, quantize=q)
        gpu_model = csmstream.load("tiny", device="cpu", dtype="float32", max_streams=1).model.to("cuda")
        if int8:
            quantize_depth_(gpu_model)
        prompt_cache["tiny"] = prompt(cpu)
        os.environ["CSM_FUSED_GEMV"] = variant
        gen_gpu = FrameGenerator(gpu_model, rows=2, fast=True)  # fast step + graphs (an error if it cannot build)
        for topk in (1, 50, 2048):  # any top-k runs in the graphs
            tok, mask = prompt_cache["tiny"]
            for g in (cpu.gen, gen_gpu):
                for r in range(2):
                    g.prefill(r, tok, mask, seed=11 + r, temperature=0.9, topk=topk)
            a = np.stack([cpu.gen.step(0, 2, topk).numpy() for _ in range(frames)])
            b = np.stack([gen_gpu.step(0, 2, topk).cpu().numpy() for _ in range(frames)])
            hd = (cpu.gen.h - gen_gpu.h.cpu()).norm() / cpu.gen.h.norm()
            key = f"topk{topk}{suffix}"
            out[key] = {"codes_equal": float((a == b).mean()), "hidden_rel_err": float(hd)}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return out


def fused_pdl_possible() -> bool:
    from csmstream.kernels.pdl import unavailable

    why = unavailable(torch.device("cuda"))
    if why:
        log("no PDL check:", why)
    return why is None


def check_graphs_vs_eager(eng, frames: int = 8) -> bool:
    gen, fast = eng.gen, eng.gen.fast
    tok, mask = prompt_cache["p"]
    runs = []
    sp = gen.static_prefill
    for use_graphs in (True, False):  # the frame step's and the prefill's graphs, then neither
        saved, saved_prefill = fast.graphs, sp.graphs
        fast.graphs, sp.graphs = (saved, saved_prefill) if use_graphs else ({}, {})
        for r in range(3):
            gen.prefill(r, tok, mask, seed=r + 5, temperature=0.9, topk=50)
        runs.append(np.stack([gen.step(0, 3, 50).cpu().numpy() for _ in range(frames)]))
        fast.graphs, sp.graphs = saved, saved_prefill
        for r in range(3):
            gen.release(r)
    return bool(np.array_equal(*runs))


# -- 2-4. timings ------------------------------------------------------------------------------
def sample_us(batches=(1, 16, 256), device: str = "cuda", dtype=torch.bfloat16, n: int = 20) -> list[dict]:
    """A frame's 32 draws (top-k 50 over 2,048 codes of 2,051 logits): the one-kernel draw against
    torch.topk + Gumbel over the candidates + argmax, side by side, µs a draw. On CUDA each variant
    is captured as one graph of 32 draws and replayed; elsewhere (the CPU test) plain wall time.
    Every batch first checks that the kernel draws what engine/sampling.sample draws."""
    return [_draws_timed(B, device, dtype, n) for B in batches]


def _draws_timed(B: int, device: str, dtype, n: int) -> dict:
    from csmstream.engine.cuda_step import replay_ms
    from csmstream.engine.sampling import gumbel, gumbel_table, sample
    from csmstream.kernels import triton_ops

    g = torch.Generator().manual_seed(B)
    logits = [torch.randn(B, 2051, generator=g).to(device, dtype) for _ in range(32)]
    temp = torch.full((B,), 0.9, device=device)
    topk = torch.full((B,), 50, device=device)
    seed, counter = torch.arange(B, device=device) + 1, torch.zeros(B, dtype=torch.long, device=device)
    table, codes = gumbel_table(device), torch.zeros(B, 32, dtype=torch.long, device=device)
    want = sample(logits[5][:, :2048].float(), temp, topk, 50, seed, counter, 5)
    if not torch.equal(triton_ops.sample(logits[5], temp, topk, seed, counter, 5, table, 2048), want):
        raise AssertionError(f"batch {B}: the one-kernel draw differs from engine/sampling.sample")

    def one_kernel():
        for p in range(32):
            triton_ops.sample(logits[p], temp, topk, seed, counter, p, table, 2048, out=codes[:, p])

    def topk_path():
        for p in range(32):
            vals, idx = logits[p][:, :2048].float().topk(50, dim=-1)
            s = vals / temp[:, None] + gumbel(seed[:, None], counter[:, None], p, idx)
            codes[:, p] = idx.gather(-1, s.argmax(-1, keepdim=True))[:, 0]

    row = {"batch": B}
    for name, fn in (("one_kernel_us", one_kernel), ("topk_path_us", topk_path)):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            row[name] = replay_ms(graph, n) * 1e3 / 32
        else:
            t0 = time.perf_counter()
            fn()
            row[name] = (time.perf_counter() - t0) * 1e6 / 32
    return row


def prefill_ms(gen, prompts: dict, n: int, sync=None) -> dict:
    """ms to prefill each prompt into row 0, three ways side by side: the padded prefill's graph
    replay, the same padded prefill run eagerly, and the plain eager prefill (before the graphs)."""
    sync = sync or torch.cuda.synchronize
    sp, out = gen.static_prefill, {}
    for name, (tok, mask) in prompts.items():
        def one(tok=tok, mask=mask):
            gen.prefill(0, tok, mask, seed=1, temperature=0.9, topk=50)
            sync()

        row = {"tokens": int(tok.shape[0]), "bucket": sp.bucket(tok.shape[0])}  # (the largest, for a longer prompt)
        saved = sp.graphs
        row["graph_ms"] = time_steps(one, n) if saved else None
        sp.graphs = {}
        row["padded_eager_ms"] = time_steps(one, n)
        sp.graphs, gen.static_prefill = saved, None
        row["plain_eager_ms"] = time_steps(one, n)
        gen.static_prefill = sp
        gen.release(0)
        out[name] = row
    return out


def batch1(eng, n: int) -> dict:
    gen, fast = eng.gen, eng.gen.fast
    fill_rows(gen, 1)
    res = {}
    res["graphs_ms"] = time_steps(lambda: gen.step(0, 1, 50).cpu(), n)
    res.update(kept_variant(fast))
    saved = fast.graphs
    fast.graphs = {}
    res["static_no_graphs_ms"] = time_steps(lambda: gen.step(0, 1, 50).cpu(), max(5, n // 5))
    fast.graphs = saved
    gen.fast = None
    res["eager_ms"] = time_steps(lambda: gen.step(0, 1, 50).cpu(), max(5, n // 5))
    gen.fast = fast
    gen.release(0)
    return res


def batch1_int8(dtype, n: int) -> dict:
    """Batch-1 graph replay with the depth decoder in int8 (a second engine, one slot)."""
    eng = full_engine(1, dtype, int8_depth=True)
    gen, fast = eng.gen, eng.gen.fast
    fill_rows(gen, 1)
    return {"graphs_ms": time_steps(lambda: gen.step(0, 1, 50).cpu(), n), **kept_variant(fast)}


def variants_row(res: dict) -> str:
    """'cublas 7.40 / fused 6.10 / fused+pdl 5.20 ms, kept fused+pdl' from kept_variant's dict."""
    times = " / ".join(f"{k[len('capture_'):-len('_ms')]} {v:.2f}" for k, v in res.items()
                       if k.startswith("capture_"))
    return f"{times + ' ms, ' if times else ''}kept {res['variant']}"


def kept_variant(fast, B: int = 1) -> dict:
    """Which step variant the engine kept for bucket B (cublas, fused, fused+pdl) and, where
    capture() timed several (CSM_FUSED_GEMV / CSM_PDL auto), each one's replay ms."""
    out = {"variant": fast.kept(B), "fused_gemv": B in fast.fused_buckets}
    out.update({f"capture_{k}_ms": v for k, v in fast.timing.get(B, {}).items()})
    return out


def per_bucket(eng, buckets: list[int], n: int) -> list[dict]:
    gen, dg = eng.gen, eng.decode_graphs
    rows = []
    for B in buckets:
        fill_rows(gen, B)
        step = time_steps(lambda B=B: gen.step(0, B, 50).cpu(), n)

        def tick(B=B):
            codes = gen.step(0, B, 50)
            codes.cpu()
            (dg.decode(codes, 0, B) if dg is not None else eng.decoder.decode(codes, 0, B)).cpu()

        t = time_steps(tick, n)
        for r in range(B):
            gen.release(r)
        rows.append({"batch": B, "step_ms": step, "tick_ms": t, "rtf": t / FRAME_MS,
                     "realtime_streams": B if t < FRAME_MS else 0})
        log(f"  bucket {B:4d}: step {step:7.2f} ms, step+decode {t:7.2f} ms, RTF {t / FRAME_MS:.3f}")
    return rows


class _Sink:
    """Records when each write happened; `first` = when 2,400 samples (100 ms) had arrived."""

    def __init__(self):
        self.samples, self.first, self.times = 0, None, []

    def write(self, pcm):
        now = time.perf_counter()
        self.times.append((now, self.samples))  # (when, index of the write's first sample)
        self.samples += len(pcm)
        if self.first is None and self.samples >= 2400:
            self.first = now
        return len(pcm)


def worker_ttfa(eng, n: int, voice=None) -> float:
    from csmstream.engine.prompt import Segment
    from csmstream.engine.worker import EngineWorker, GenRequest

    w = EngineWorker(eng, idle_wait=0.001).start()
    ctx = [Segment(0, "This is the voice prompt, ten seconds of it.", codes=voice)] if voice is not None else []
    ts = []
    try:
        for i in range(n + 2):
            sink = _Sink()
            req = w.submit(GenRequest(text="Hello there, how can I help you today?", context=ctx, seed=i,
                                      max_frames=3, sink=sink))
            while not req.finished:
                time.sleep(0.0005)
            if i >= 2:
                ts.append((sink.first - req.t_submit) * 1e3)
    finally:
        w.stop()
    return statistics.median(ts)


def server_ttfa(eng, n: int, voices=None) -> float | None:
    try:
        import asyncio

        from csmstream.transport.server import StreamServer
        from websockets.asyncio.client import connect
    except ImportError:
        return None
    import asyncio

    result: list = []

    async def main():
        srv = StreamServer(eng, port=0, voices=voices or {})
        await srv.start()
        try:
            async with connect(srv.url) as ws:
                for i in range(n + 2):
                    msg = {"text": "Hello there, how can I help you today?", "seed": i, "max_audio_ms": 400}
                    if voices:
                        msg["voice"] = next(iter(voices))
                    t0 = time.perf_counter()
                    await ws.send(json.dumps(msg))
                    first = None
                    while True:
                        m = await ws.recv()
                        if isinstance(m, bytes) and first is None:
                            first = time.perf_counter()
                        elif isinstance(m, str) and "done" in m:
                            break
                    if i >= 2:
                        result.append((first - t0) * 1e3)
        finally:
            await srv.stop()

    asyncio.run(main())
    return statistics.median(result)


def live(eng, streams: int, seconds: float, max_prefill_s: float | None = None) -> dict:
    """`streams` concurrent requests, all sent at once (the worst burst); playback of a stream
    starts when its first 100 ms are there, and a write is late if its first sample should
    already be playing. max_prefill_s: the worker's prefill allowance a tick (None: its default;
    0: one prefill chunk a tick, the scheduler before chunked prefill)."""
    from csmstream.engine.worker import EngineWorker, GenRequest

    kw = {} if max_prefill_s is None else {"max_prefill_s": max_prefill_s}
    w = EngineWorker(eng, idle_wait=0.001, max_waiting=streams, **kw).start()
    frames = int(seconds * 12.5)
    sinks = [_Sink() for _ in range(streams)]
    t0 = time.perf_counter()
    reqs = [w.submit(GenRequest(text=f"Caller {i}, your appointment is confirmed for tomorrow.", seed=i,
                                max_frames=frames, sink=s)) for i, s in enumerate(sinks)]
    while not all(r.finished for r in reqs):
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    w.stop()
    late, worst, ttfa = 0, 0.0, []
    for r, s in zip(reqs, sinks):
        if not s.times:
            continue
        ttfa.append((s.first - r.t_submit) * 1e3)
        for t, before in s.times:
            over = (t - max(s.first, s.first + before / 24000)) * 1e3
            worst = max(worst, over)
            late += over > 0
    st = w.stats
    return {"streams": streams, "max_prefill_s": w.budget.max_tick_s, "frames_each": frames, "wall_s": wall, "late_writes": int(late),
            "worst_lateness_ms": worst, "ttfa_median_ms": statistics.median(ttfa), "ttfa_max_ms": max(ttfa),
            "mean_tick_ms": st.step_seconds / max(1, st.ticks) * 1e3,
            "all_finished_ok": all(r.reason == "max_frames" for r in reqs)}


def profile(dtype) -> None:
    """Where a batch-1 frame's time goes: kernels of 20 graph replays by total device time, and the
    host-side pieces of time to first audio (prefill, step, decode)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    eng = full_engine(1, dtype)
    prompt_cache["p"] = prompt(eng)
    gen = eng.gen
    fill_rows(gen, 1)
    prep = eng._validate("Hello there, how can I help you today?", 0, (), 0.9, 50, 1, 10)

    def prefill():
        eng._prefill(0, prep, audio=True)
        torch.cuda.synchronize()

    log(f"prefill ({len(prep[0])} tokens): {time_steps(prefill, 20):.2f} ms")
    log(f"step: {time_steps(lambda: gen.step(0, 1, 50).cpu(), 20):.2f} ms")
    codes = gen.step(0, 1, 50)
    log(f"decode (graph): {time_steps(lambda: eng.decode_graphs.decode(codes, 0, 1).cpu(), 20):.2f} ms")
    log(f"decode (eager): {time_steps(lambda: eng.decoder.decode(codes, 0, 1).cpu(), 20):.2f} ms")
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            gen.step(0, 1, 50).cpu()
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="gpu_bench.json", help="where to write the results")
    ap.add_argument("--buckets", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--streams", type=int, default=256, help="concurrent requests in the live run (0: skip)")
    ap.add_argument("--seconds", type=float, default=6.0, help="audio per request in the live run")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="only profile a batch-1 frame and the TTFA pieces")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    buckets = [int(b) for b in a.buckets.split(",")]
    dt = getattr(torch, a.dtype)
    if a.profile:
        profile(dt)
        return 0
    dev = torch.cuda.get_device_name()
    res = {"device": dev, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "dtype": a.dtype}
    log(f"# {dev}, torch {torch.__version__}, {a.dtype}")
    res["check_small_vs_cpu_f32"] = check_small_vs_cpu()
    log("check small config GPU vs CPU f32:", res["check_small_vs_cpu_f32"])
    t0 = time.perf_counter()
    eng = full_engine(max(buckets), dt)
    eng.decoder  # noqa: B018 - builds the decoder and captures its graphs
    res["startup_s"] = time.perf_counter() - t0
    log(f"full engine + graph capture: {res['startup_s']:.1f}s (buckets {eng.gen.fast.buckets})")
    prompt_cache["p"] = prompt(eng)
    res["graphs_equal_eager"] = check_graphs_vs_eager(eng)
    log("graph replay == eager static step:", res["graphs_equal_eager"])
    res["batch1"] = batch1(eng, a.iters)
    log("batch 1:", {k: round(v, 2) for k, v in res["batch1"].items()})
    res["batch1_int8_depth"] = batch1_int8(dt, a.iters)
    log("batch 1, int8 depth decoder:", res["batch1_int8_depth"])
    res["sample_us"] = sample_us(dtype=dt)
    log("a draw, one kernel vs torch.topk path, µs:", res["sample_us"])
    voice = np.random.default_rng(0).integers(0, 2048, (125, 32))
    voice_prompt = prompt(eng, "Hello there, how can I help you today?",
                          [(0, "This is the voice prompt, ten seconds of it.", voice)])
    res["prefill"] = prefill_ms(eng.gen, {"text": prompt_cache["p"], "voice_10s": voice_prompt}, a.iters)
    log("prefill, ms (graph / padded eager / plain eager):", res["prefill"])
    res["ttfa_worker_ms"] = worker_ttfa(eng, 10)
    res["ttfa_worker_voice_nocache_ms"] = worker_ttfa(eng, 10, voice)
    eng.pin_voice("This is the voice prompt, ten seconds of it.", voice)
    res["ttfa_worker_voice_cached_ms"] = worker_ttfa(eng, 10, voice)
    from csmstream.engine.voices import Voice

    res["ttfa_server_ms"] = server_ttfa(eng, 10)
    res["ttfa_server_voice_ms"] = server_ttfa(eng, 10, {"v": Voice("v", "This is the voice prompt, ten seconds of it.",
                                                                  voice)})
    log("TTFA:", {k: v for k, v in res.items() if k.startswith("ttfa")})
    res["buckets"] = per_bucket(eng, buckets, max(10, a.iters // 3))
    if a.streams:  # the burst with the prefill budget, and with one prefill chunk a tick, side by side
        res["live"] = live(eng, a.streams, a.seconds)
        log("live:", res["live"])
        res["live_one_chunk_a_tick"] = live(eng, a.streams, a.seconds, max_prefill_s=0.0)
        log("live, one prefill chunk a tick:", res["live_one_chunk_a_tick"])
    res["variant_timing_ms"] = {str(b): v for b, v in sorted(eng.gen.fast.timing.items())}
    log("step variants per small bucket (cublas / fused / fused+pdl), ms a replay:", res["variant_timing_ms"])
    Path(a.json).write_text(json.dumps(res, indent=1))
    b1 = res["batch1"]
    log(f"\n## {dev}, {res['date']}, csm-1b config, random weights, {a.dtype}")
    log("| measure | value |\n| --- | --- |")
    log(f"| frame, batch 1, eager PyTorch | {b1['eager_ms']:.2f} ms |")
    log(f"| frame, batch 1, static Triton step, no graphs | {b1['static_no_graphs_ms']:.2f} ms |")
    log(f"| frame, batch 1, CUDA graph | {b1['graphs_ms']:.2f} ms (RTF {b1['graphs_ms'] / FRAME_MS:.3f}) |")
    log(f"| frame, batch 1, replay timed at capture: {variants_row(b1)} |")
    b8 = res["batch1_int8_depth"]
    log(f"| frame, batch 1, CUDA graph, int8 depth decoder | {b8['graphs_ms']:.2f} ms ({variants_row(b8)}) |")
    for row in res["sample_us"]:
        log(f"| a draw at batch {row['batch']}: one kernel / torch.topk path | {row['one_kernel_us']:.1f} / "
            f"{row['topk_path_us']:.1f} µs |")
    for name, row in res["prefill"].items():
        log(f"| prefill, {name} ({row['tokens']} tokens, bucket {row['bucket']}): graph / padded eager / plain "
            f"eager | {row['graph_ms'] or float('nan'):.2f} / {row['padded_eager_ms']:.2f} / "
            f"{row['plain_eager_ms']:.2f} ms |")
    for k in ("ttfa_worker_ms", "ttfa_worker_voice_nocache_ms", "ttfa_worker_voice_cached_ms", "ttfa_server_ms",
              "ttfa_server_voice_ms"):
        v = res[k]
        log(f"| {k} | {'n/a (websockets missing)' if v is None else f'{v:.1f} ms'} |")
    for row in res["buckets"]:
        log(f"| bucket {row['batch']} | step {row['step_ms']:.2f} ms, tick {row['tick_ms']:.2f} ms, "
            f"{row['realtime_streams']} real-time streams |")
    for key in ("live", "live_one_chunk_a_tick"):
        if key in res:
            lv = res[key]
            log(f"| {key} {lv['streams']} streams | {lv['late_writes']} late writes, worst "
                f"{lv['worst_lateness_ms']:.1f} ms, TTFA median {lv['ttfa_median_ms']:.0f} ms, max "
                f"{lv['ttfa_max_ms']:.0f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
