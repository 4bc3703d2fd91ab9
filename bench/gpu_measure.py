"""What bench/gpu.py measures: the engines it builds, and each check and timing as one function.

Everything here takes the device it runs on. On CUDA it is the real thing; on CPU (the tests'
dry run) the same functions run the same step eagerly with the Triton kernels interpreted, on the
`micro` configuration, so every path of the GPU benchmark has run before a GPU session spends
its minutes on it. Times on CPU are wall-clock and mean nothing.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

FRAME_MS = 80.0
TEXT = "Hello, this is a streaming test of the engine."
VOICE_TEXT = "This is the voice prompt, ten seconds of it."
REPLY = "Hello there, how can I help you today?"


def log(*a):
    print(*a, flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- engines ------------------------------------------------------------------------------------
def micro_config(text_vocab: int):
    """CSM's structure at its smallest: 3 codebooks (so the depth loop runs once past the merged
    first pass), one layer a stack, GQA on both. Only for running the benchmark's paths on CPU."""
    from csmstream.engine.config import CsmModelConfig, TransformerConfig
    from csmstream.engine.tiny import ROPE

    def stack(seq):
        return TransformerConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=128, head_dim=32,
                                 max_seq_len=seq, rope=ROPE)

    return CsmModelConfig(backbone=stack(512), depth=stack(4), num_codebooks=3, text_vocab=text_vocab,
                          bos_token_id=0)


def small_config(config: str):
    """`tiny` (the embedded model's) or `micro`, for the tiny tokenizer."""
    from csmstream.engine.tiny import tiny_config
    from csmstream.engine.tokenizer import TextTokenizer

    return {"tiny": tiny_config, "micro": micro_config}[config](TextTokenizer.tiny().vocab_size)


def small_model(config: str, int8: bool = False):
    """A small configuration's model on CPU in float32, seeded (two calls give the same weights);
    int8: the depth decoder quantized as load(quantize=) does."""
    from csmstream.engine.model import CSM
    from csmstream.engine.tiny import init_random

    with torch.device("cpu"):
        model = CSM(small_config(config))
    init_random(model)
    model = model.float().eval().requires_grad_(False)
    if int8:
        from csmstream.engine.quant import quantize_depth_

        quantize_depth_(model)
    return model


def build_engine(config: str, device: str, dtype: torch.dtype, max_streams: int, graphs: bool = True,
                 int8_depth: bool = False):
    """An Engine on the fast step. `csm-1b`: csm-1b's shapes (transformers' CsmConfig defaults) and
    the real Mimi config, random weights (speed does not depend on them). `micro`: the CPU dry run's
    model (float32), its generator forced onto the fast step, which runs eagerly there."""
    from csmstream.engine.codec import Codec
    from csmstream.engine.engine import Engine
    from csmstream.engine.tokenizer import TextTokenizer

    if config == "csm-1b":
        from csmstream.engine.config import CsmModelConfig
        from csmstream.engine.mimi import Mimi, MimiSpec, init_random
        from csmstream.engine.model import CSM

        cfg = CsmModelConfig.csm_1b()
        torch.manual_seed(0)
        with torch.device(device):
            model = CSM(cfg).to(dtype)
            for name, p in model.named_parameters():
                p.data.fill_(1.0) if name.endswith("norm.weight") else p.data.normal_(0.0, 0.02)
        mimi = init_random(Mimi(MimiSpec()), 0).to(device)  # (its defaults are Mimi's)
        codec = Codec(mimi, cfg.num_codebooks)
    elif config == "micro":
        model = small_model("micro").to(device)
        codec = Codec.tiny(device, num_codebooks=model.cfg.num_codebooks)
    else:
        raise ValueError(f"config must be csm-1b or micro, got {config!r}")
    if int8_depth:
        from csmstream.engine.quant import quantize_depth_

        quantize_depth_(model)  # after the move: the int8 form is a plain attribute
    eng = Engine(model.eval(), TextTokenizer.tiny(), name=f"{config}-random", max_streams=max_streams,
                 codec=codec, cuda_graphs=graphs)
    if torch.device(device).type != "cuda":  # CPU: the generator would take the numba step
        from csmstream.engine.generator import FrameGenerator

        eng.gen = FrameGenerator(model, rows=max_streams, fast=True, graphs=False)
    if eng.gen.fast is None:  # the engine fell back to the eager step (its warning says why)
        raise RuntimeError("the fast GPU step could not be built here; see the warning above")
    return eng


def prompt(eng, text: str = TEXT, context=()):
    from csmstream.engine.prompt import build_prompt

    tok, mask = build_prompt(eng.tokenizer, text, 0, context, eng.config.num_codebooks)
    return torch.from_numpy(tok), torch.from_numpy(mask)


def fill_rows(gen, rows: int, tok_mask, topk: int = 50) -> None:
    tok, mask = tok_mask
    for r in range(rows):
        gen.prefill(r, tok, mask, seed=r + 1, temperature=0.9, topk=topk)


def time_steps(fn, n: int, warmup: int = 3) -> float:
    """Median ms of fn() (which must sync, e.g. copy codes to the host), after warm-up."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, n)):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


# -- checks -------------------------------------------------------------------------------------
def check_small_vs_cpu(device: str = "cuda", config: str = "tiny", frames: int = 12,
                       topks=(1, 50, 2048)) -> dict:
    """The fast step on `device` (graphs where there are any: the cuBLAS and the fused-GEMV
    variants, the fused int8 depth decoder, and on Hopper the PDL chain) against the CPU float32
    reference step (for int8: the CPU model with the same rounded weights). Every top-k runs in
    the graphs. codes_equal is the share of equal codes; 1.0 is the pass."""
    import os

    from csmstream.engine.generator import FrameGenerator
    from csmstream.engine.prompt import build_prompt
    from csmstream.engine.tokenizer import TextTokenizer

    out = {}
    saved = {k: os.environ.get(k) for k in ("CSM_FUSED_GEMV", "CSM_PDL")}
    os.environ["CSM_PDL"] = "off"
    n = small_config(config).num_codebooks
    tok, mask = (torch.from_numpy(a) for a in build_prompt(TextTokenizer.tiny(), TEXT, 0, (), n))
    try:
        for variant, int8, suffix in (("off", False, ""), ("on", False, "_fused_gemv"), ("on", True, "_int8_depth"),
                                      ("pdl", False, "_fused_pdl")):
            if variant == "pdl":  # the fused step as a PDL chain, where the GPU has it (Hopper on)
                if not fused_pdl_possible(device):
                    continue
                variant = os.environ["CSM_PDL"] = "on"
            ref = FrameGenerator(small_model(config, int8), rows=2)  # CPU float32: the numba step
            dev_model = small_model(config).to(device)
            if int8:
                from csmstream.engine.quant import quantize_depth_

                quantize_depth_(dev_model)
            os.environ["CSM_FUSED_GEMV"] = variant
            gen = FrameGenerator(dev_model, rows=2, fast=True)  # fast step + graphs (an error if it cannot build)
            for topk in topks:
                for g in (ref, gen):
                    for r in range(2):
                        g.prefill(r, tok, mask, seed=11 + r, temperature=0.9, topk=topk)
                a = np.stack([ref.step(0, 2, topk).numpy() for _ in range(frames)])
                b = np.stack([gen.step(0, 2, topk).cpu().numpy() for _ in range(frames)])
                hd = (ref.h - gen.h.cpu()).norm() / ref.h.norm()
                out[f"topk{topk}{suffix}"] = {"codes_equal": float((a == b).mean()), "hidden_rel_err": float(hd)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def fused_pdl_possible(device: str = "cuda") -> bool:
    from csmstream.kernels.pdl import unavailable

    why = unavailable(torch.device(device))
    if why:
        log("no PDL check:", why)
    return why is None


def check_graphs_vs_eager(eng, tok_mask, rows: int = 3, frames: int = 8) -> bool:
    """The frame step's and the prefill's graph replays give the eagerly run step's codes, bit for
    bit, over `rows` rows (trivially true where nothing was captured)."""
    gen, fast = eng.gen, eng.gen.fast
    tok, mask = tok_mask
    rows = min(rows, gen.rows)
    runs = []
    sp = gen.static_prefill
    for use_graphs in (True, False):  # the frame step's and the prefill's graphs, then neither
        saved, saved_prefill = fast.graphs, sp.graphs
        fast.graphs, sp.graphs = (saved, saved_prefill) if use_graphs else ({}, {})
        for r in range(rows):
            gen.prefill(r, tok, mask, seed=r + 5, temperature=0.9, topk=50)
        runs.append(np.stack([gen.step(0, rows, 50).cpu().numpy() for _ in range(frames)]))
        fast.graphs, sp.graphs = saved, saved_prefill
        for r in range(rows):
            gen.release(r)
    return bool(np.array_equal(*runs))


# -- timings ------------------------------------------------------------------------------------
def sample_us(batches=(1, 16, 256), device: str = "cuda", dtype=torch.bfloat16, n: int = 20,
              draws: int = 32) -> list[dict]:
    """A frame's 32 draws (top-k 50 over 2,048 codes of 2,051 logits): the one-kernel draw against
    torch.topk + Gumbel over the candidates + argmax, side by side, µs a draw; and the kernel with
    1 and 2 warps instead of its default 4 (one_kernel_w1_us / _w2_us), and its threshold searched
    4, 8 or 16 ways a step instead of by bisection (one_kernel_ways4_us ...; ways16 at 2 warps too:
    one_kernel_ways16_w2_us). On CUDA each variant is captured as one graph of the draws and
    replayed; elsewhere (the CPU test) plain wall time.
    Every batch first checks that the kernel draws what engine/sampling.sample draws. draws: how
    many of the 32 each timing runs (the CPU test, whose interpreted times mean nothing, takes 2)."""
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= 32:
        raise ValueError(f"draws must be an int in 1..32, got {draws!r}")
    return [_draws_timed(B, device, dtype, n, draws) for B in batches]


def _draws_timed(B: int, device: str, dtype, n: int, draws: int = 32) -> dict:
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
    # (name, warps, ways) of each form of the kernel timed; None: the kernel's default
    forms = (("one_kernel_us", None, None), ("one_kernel_w1_us", 1, None), ("one_kernel_w2_us", 2, None),
             ("one_kernel_ways4_us", None, 4), ("one_kernel_ways8_us", None, 8), ("one_kernel_ways16_us", None, 16),
             ("one_kernel_ways16_w2_us", 2, 16))
    for _, w, ways in forms:
        got = triton_ops.sample(logits[5], temp, topk, seed, counter, 5, table, 2048, warps=w, ways=ways)
        if not torch.equal(got, want):
            raise AssertionError(f"batch {B}: the one-kernel draw ({w or 'default'} warps, {ways or 'default'} ways) "
                                 "differs from engine/sampling.sample")

    def one_kernel(warps=None, ways=None):
        for p in range(draws):
            triton_ops.sample(logits[p], temp, topk, seed, counter, p, table, 2048, out=codes[:, p], warps=warps,
                              ways=ways)

    def topk_path():
        for p in range(draws):
            vals, idx = logits[p][:, :2048].float().topk(50, dim=-1)
            s = vals / temp[:, None] + gumbel(seed[:, None], counter[:, None], p, idx)
            codes[:, p] = idx.gather(-1, s.argmax(-1, keepdim=True))[:, 0]

    row = {"batch": B}
    timed = [(name, lambda w=w, ways=ways: one_kernel(w, ways)) for name, w, ways in forms]
    for name, fn in [*timed[:1], ("topk_path_us", topk_path), *timed[1:]]:
        if device == "cuda":
            fn()  # compiles the kernel and creates the library handles, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            row[name] = replay_ms(graph, n) * 1e3 / draws
        else:
            t0 = time.perf_counter()
            fn()
            row[name] = (time.perf_counter() - t0) * 1e6 / draws
    return row


def prefill_ms(gen, prompts: dict, n: int, sync=None, warmup: int = 3) -> dict:
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
        row["graph_ms"] = time_steps(one, n, warmup) if saved else None
        sp.graphs = {}
        row["padded_eager_ms"] = time_steps(one, n, warmup)
        sp.graphs, gen.static_prefill = saved, None
        row["plain_eager_ms"] = time_steps(one, n, warmup)
        gen.static_prefill = sp
        gen.release(0)
        out[name] = row
    return out


def batch1(eng, tok_mask, n: int, warmup: int = 3) -> dict:
    """One row, a frame's time three ways: the graph replay (the variant the engine kept), the same
    static step without graphs, and the eager PyTorch step."""
    gen, fast = eng.gen, eng.gen.fast
    fill_rows(gen, 1, tok_mask)
    res = {}
    res["graphs_ms"] = time_steps(lambda: gen.step(0, 1, 50).cpu(), n, warmup)
    res.update(kept_variant(fast))
    res["fold"] = _folded(fast, lambda: time_steps(lambda: gen.step(0, 1, 50).cpu(), n, warmup))
    saved = fast.graphs
    fast.graphs = {}
    res["static_no_graphs_ms"] = time_steps(lambda: gen.step(0, 1, 50).cpu(), max(1, n // 5), warmup)
    fast.graphs = saved
    gen.fast = None
    res["eager_ms"] = time_steps(lambda: gen.step(0, 1, 50).cpu(), max(1, n // 5), warmup)
    gen.fast = fast
    gen.release(0)
    return res


def context_ms(eng, tok_mask, positions, n: int, warmup: int = 3) -> list[dict]:
    """Batch 1's frame as a call goes on: the graph replay with the row moved to each position of
    `positions` (the backbone attends over that many keys; what they hold does not change the
    time), three attention kernels side by side (kernels/triton_attn.py), each captured in turn:
    keys split as the engine splits them, one program per query head (the default); the same with
    one program per kv head (CSM_ATTN_GROUPED=1); and one pass per (row, head), unsplit."""
    gen, fast = eng.gen, eng.gen.fast
    last = gen.max_seq_len - n - warmup - 2  # the timed steps move the row on by one each
    fill_rows(gen, 1, tok_mask)
    start = int(gen.host_pos[0])

    def timed(p):
        gen.pos[0] = p
        gen.host_pos[0] = p
        return time_steps(lambda: gen.step(0, 1, 50).cpu(), n, warmup)

    rows = [{"position": p} for p in sorted({max(start, min(p, last)) for p in positions})]
    splits = fast.attn.pick_splits(1, fast.bb.n_heads, gen.max_seq_len, fast.bb.head_dim)
    kept = fast.attn_splits, fast.attn_grouped
    for key, forced, grouped in (("split_ms", None, False), ("grouped_ms", None, True), ("one_pass_ms", 1, False)):
        fast.attn_splits, fast.attn_grouped = forced, grouped
        if fast.use_graphs:
            fast.capture()
        for r in rows:
            r[key] = timed(r["position"])
            r["splits"] = splits
    fast.attn_splits, fast.attn_grouped = kept
    if fast.use_graphs:
        fast.capture()
    gen.pos[0] = start
    gen.host_pos[0] = start
    gen.release(0)
    for r in rows:
        log(f"  position {r['position']:5d}: frame {r['split_ms']:7.2f} ms with {splits} key splits, "
            f"{r['grouped_ms']:7.2f} ms grouped by kv head, {r['one_pass_ms']:7.2f} ms in one pass")
    return rows


def _folded(fast, timed) -> dict:
    """The same frame with the depth decoder's attention folded into its qkv kernels or not
    (CSM_ATTN_FOLD on / off: the opposite of what the engine kept for bucket 1), recaptured, then
    put back."""
    mode = fast.fold_mode

    def use(m):
        fast.fold_mode = m
        fast.fold_buckets = {1} & fast.fused_buckets if m == "on" else set()
        if fast.use_graphs:
            fast.capture()

    use("off" if 1 in fast.fold_buckets else "on")
    out = {"attn_fold": 1 in fast.fold_buckets, "graphs_ms": timed(), **kept_variant(fast)}
    use(mode)
    return out


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


def per_bucket(eng, buckets: list[int], tok_mask, n: int, warmup: int = 3) -> list[dict]:
    """Per batch bucket (all rows active): the step alone, and a whole tick (step + streaming decode
    of every row); a bucket sustains its size in real-time streams while a tick < 80 ms."""
    gen, dg = eng.gen, eng.decode_graphs
    rows = []
    for B in buckets:
        fill_rows(gen, B, tok_mask)
        step = time_steps(lambda B=B: gen.step(0, B, 50).cpu(), n, warmup)

        def tick(B=B):
            codes = gen.step(0, B, 50)
            codes.cpu()
            (dg.decode(codes, 0, B) if dg is not None else eng.decoder.decode(codes, 0, B)).cpu()

        t = time_steps(tick, n, warmup)
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


def worker_ttfa(eng, n: int, voice=None, warmup: int = 2) -> float:
    """Median ms from submit to the first 100 ms of PCM in the request's sink, in the engine thread."""
    from csmstream.engine.prompt import Segment
    from csmstream.engine.worker import EngineWorker, GenRequest

    w = EngineWorker(eng, idle_wait=0.001).start()
    ctx = [Segment(0, VOICE_TEXT, codes=voice)] if voice is not None else []
    ts = []
    try:
        for i in range(n + warmup):
            sink = _Sink()
            req = w.submit(GenRequest(text=REPLY, context=ctx, seed=i, max_frames=2, sink=sink))  # 2 x 1920 >= 2400
            while not req.finished:
                time.sleep(0.0005)
            if i >= warmup:
                ts.append((sink.first - req.t_submit) * 1e3)
    finally:
        w.stop()
    return statistics.median(ts)


def server_ttfa(eng, n: int, voices=None, warmup: int = 2, *, continued: bool = False,
                context: list | None = None) -> float | None:
    """Median ms from a request sent over the real websockets server to its first audio chunk
    received (None where websockets is missing). continued: each request whole (its sentence to
    its cap) with continue_previous, so from the second on it hears the ones before as context
    (a voice agent's turns on one connection); n >= 1 of them are timed, after the first.
    context: the request's own turns ("context", transport/context.py), encoded per request."""
    try:
        import asyncio

        from websockets.asyncio.client import connect

        from csmstream.transport.server import StreamServer
    except ImportError:
        return None

    result: list = []

    async def main():
        srv = StreamServer(eng, port=0, voices=voices or {})
        await srv.start()
        try:
            async with connect(srv.url) as ws:
                for i in range(n + max(warmup, int(continued))):
                    msg = {"text": REPLY, "seed": i, "max_audio_ms": 160}  # two frames: the first 100 ms chunk
                    if continued:
                        del msg["max_audio_ms"]  # (a cut sentence is not context: its codes never complete)
                        msg["continue_previous"] = True
                    if voices:
                        msg["voice"] = next(iter(voices))
                    if context:
                        msg["context"] = context
                    t0 = time.perf_counter()
                    await ws.send(json.dumps(msg))
                    first = None
                    while True:
                        m = await ws.recv()
                        if isinstance(m, bytes) and first is None:
                            first = time.perf_counter()
                        elif isinstance(m, str) and "done" in m:
                            done = json.loads(m)
                            break
                    if continued and i and not done.get("continued"):
                        raise RuntimeError(f"turn {i} heard no turn before it: {done}")
                    if i >= max(warmup, int(continued)):
                        result.append((first - t0) * 1e3)
        finally:
            await srv.stop()

    asyncio.run(main())
    return statistics.median(result)


def ttfa(eng, n: int, warmup: int = 2, continue_turns: int = 0) -> dict:
    """Time to first audio, in the engine thread and over the server, plain and with a 10 s named
    voice (uncached, then its prefix pinned), and over the server for turns that continue the ones
    before them."""
    from csmstream.engine.voices import Voice

    voice = np.random.default_rng(0).integers(0, eng.config.codebook_size, (125, eng.config.num_codebooks))
    out = {"ttfa_worker_ms": worker_ttfa(eng, n, warmup=warmup),
           "ttfa_worker_voice_nocache_ms": worker_ttfa(eng, n, voice, warmup)}
    eng.pin_voice(VOICE_TEXT, voice)
    out["ttfa_worker_voice_cached_ms"] = worker_ttfa(eng, n, voice, warmup)
    out["ttfa_server_ms"] = server_ttfa(eng, n, warmup=warmup)
    out["ttfa_server_voice_ms"] = server_ttfa(eng, n, {"v": Voice("v", VOICE_TEXT, voice)}, warmup)
    if continue_turns:  # turns of ~6 s that each hear up to 4 before them (continue_previous): a longer prompt
        out["ttfa_server_continue_ms"] = server_ttfa(eng, continue_turns, warmup=warmup, continued=True)
    turn = caller_turn()  # a reply that hears the caller's 2 s of phone audio
    out["context_encode_ms"] = context_encode_ms(eng, turn, n)
    out["ttfa_server_context_ms"] = server_ttfa(eng, n, warmup=warmup, context=[turn])
    return out


def caller_turn() -> dict:
    """A caller's 2 s turn as a request's "context" carries it: 8 kHz mu-law, as a phone call does."""
    from csmstream.kernels.g711 import ulaw_encode
    from csmstream.transport.context import turn

    t = np.arange(16000) / 8000
    return turn(1, "Hi, I'd like to move my booking to Friday, please.",
                ulaw_encode((np.sin(2 * np.pi * 180 * t) * 6000).astype(np.int16)), "ulaw_8000")


def context_encode_ms(eng, turn: dict, n: int) -> float:
    """Median ms of decoding one context turn and encoding it with the engine's codec
    (transport/context.py; the codes come back on the host)."""
    from csmstream.transport import context as ctx, protocol

    def bad(code, message):
        return ValueError(message)

    times = []
    for _ in range(max(3, n)):
        t0 = time.perf_counter()
        ctx.encode_turns(ctx.parse_turns([turn], bad, 1000, protocol.text_problem), eng)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def live(eng, streams: int, seconds: float, max_prefill_s: float | None = None) -> dict:
    """`streams` concurrent requests, all sent at once (the worst burst); playback of a stream
    starts when its first 100 ms are there, and a write is late if its first sample should
    already be playing. max_prefill_s: the worker's prefill allowance a tick (None: its default;
    0: one prefill chunk a tick, the scheduler before chunked prefill)."""
    from csmstream.engine.worker import EngineWorker, GenRequest

    kw = {} if max_prefill_s is None else {"max_prefill_s": max_prefill_s}
    w = EngineWorker(eng, idle_wait=0.001, max_waiting=streams, **kw).start()
    frames = max(2, int(seconds * 12.5))
    sinks = [_Sink() for _ in range(streams)]
    t0 = time.perf_counter()
    reqs = [w.submit(GenRequest(text=f"Caller {i}, your appointment is confirmed for tomorrow.", seed=i,
                                max_frames=frames, sink=s)) for i, s in enumerate(sinks)]
    while not all(r.finished for r in reqs):
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    w.stop()
    late, worst, ttfa_ms = 0, 0.0, []
    for r, s in zip(reqs, sinks, strict=True):
        if not s.times:
            continue
        ttfa_ms.append((s.first - r.t_submit) * 1e3)
        for t, before in s.times:
            over = (t - max(s.first, s.first + before / 24000)) * 1e3
            worst = max(worst, over)
            late += over > 0
    st = w.stats
    return {"streams": streams, "max_prefill_s": w.budget.max_tick_s, "frames_each": frames, "wall_s": wall,
            "late_writes": int(late), "worst_lateness_ms": worst, "ttfa_median_ms": statistics.median(ttfa_ms),
            "ttfa_max_ms": max(ttfa_ms), "mean_tick_ms": st.step_seconds / max(1, st.ticks) * 1e3,
            "all_finished_ok": all(r.reason == "max_frames" for r in reqs)}


def profile(eng, tok_mask, n: int = 20) -> dict:
    """Where a batch-1 frame's time goes (CUDA): the kernels of n graph replays by total device
    time, and the host-side pieces of time to first audio (prefill, step, decode)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    gen = eng.gen
    fill_rows(gen, 1, tok_mask)
    prep = eng._validate(REPLY, 0, (), 0.9, 50, 1, 10)

    def prefill():
        eng._prefill(0, prep, audio=True)
        sync(eng.device)

    out = {"tokens": len(prep[0]), "prefill_ms": time_steps(prefill, n),
           "step_ms": time_steps(lambda: gen.step(0, 1, 50).cpu(), n)}
    codes = gen.step(0, 1, 50)
    if eng.decode_graphs is not None:
        out["decode_graph_ms"] = time_steps(lambda: eng.decode_graphs.decode(codes, 0, 1).cpu(), n)
    out["decode_eager_ms"] = time_steps(lambda: eng.decoder.decode(codes, 0, 1).cpu(), n)
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            gen.step(0, 1, 50).cpu()
    out["kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    gen.release(0)
    return out
