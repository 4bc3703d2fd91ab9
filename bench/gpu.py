"""GPU benchmark: the full csm-1b configuration with random weights (speed does not depend on them).

    python bench/gpu.py [--json out.json] [--stages batch1,check,...] [--budget-s 400]
                        [--buckets 1,2,...,256] [--streams 256] [--dtype bfloat16]

It runs in stages, the open target first, and rewrites the JSON after every stage, so a run cut
short (a device lease runs out, a stage fails) keeps everything measured up to then; a stage that
raises is recorded with its traceback and the next one runs. Stages (default: all, in this order):
  batch1   a frame at batch 1 on a one-slot engine (only bucket 1's kernels get compiled): the
           graph replay of the kept variant, each variant's replay as timed at capture (cublas /
           fused / fused+pdl), the same recaptured with the depth decoder's attention folded into
           its qkv kernels (CSM_ATTN_FOLD flipped), the static step without graphs, the eager
           PyTorch step; and graph replay == the eagerly run step, bit for bit;
  context  batch 1's frame as a call goes on (the row at positions --positions: the backbone
           attends over that many keys), the attention's keys split (the engine's way), the same
           with a program per kv head (CSM_ATTN_GROUPED=1), and in one pass, side by side;
  check    the fast step of a small config (tiny) against the CPU float32 reference: the cuBLAS,
           fused-GEMV, int8-depth and (Hopper) PDL variants, top-k 1/50/2048;
  profile  the kernels of a batch-1 frame by device time, and the prefill/step/decode pieces;
  int8     batch 1 again with the depth decoder in int8;
  ttfa     time to first audio: engine thread (submit -> first 100 ms of PCM) and the real server
           (request sent -> first 100 ms chunk received, when websockets is installed), with and
           without a 10 s named-voice prompt (prefix cache); turns that continue the ones before
           (--continue-turns); a reply hearing a caller's 2 s phone turn ("context"), and that
           turn's decode + codec encode alone;
  prefill  the prefill alone: graph replay, the same padded prefill eagerly, the plain eager one;
  sample   a frame's 32 draws: the one-kernel draw against torch.topk + argmax, per batch, and
           the kernel with 1, 2 and 4 warps, and its threshold by bisection or 4, 8, 16 ways a step;
  buckets  per batch bucket (an engine with max(--buckets) slots): frame step and step + streaming
           decode per tick, and the real-time streams that sustains (a tick must take < 80 ms);
  live     --streams concurrent requests through the engine thread, every chunk's lateness
           measured, with the chunked-prefill budget and with one prefill chunk a tick.
--budget-s: a stage starts only while the run is inside its budget (the rest are listed as skipped).
--device cpu --config micro is the dry run the tests make: every stage's code on CPU, the kernels
interpreted, the times meaningless. bench/gpu_session.sh runs this in a 15-minute device lease.
bench/gemv_sweep.py times the GEMV kernels' tiles one projection at a time.
bench/kernel_report.py compiles every kernel of the step for a GPU architecture without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

if __package__:  # imported as bench.gpu (the tests)
    from . import gpu_measure as gm
else:  # run as a script: bench/ is on sys.path (the checkout's root must not be: its kernels/
    import gpu_measure as gm  # folder would shadow the `kernels` package transformers looks for)

STAGES = ("batch1", "context", "check", "profile", "int8", "ttfa", "prefill", "sample", "buckets", "live")


class Bench:
    """The stages' shared engines and results; `run` writes the JSON after every stage."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dtype = getattr(torch, a.dtype) if a.device == "cuda" else torch.float32
        self.t0 = time.perf_counter()
        dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)"
        self.res = {"device": dev, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "triton": _triton_version(), "dtype": str(self.dtype).removeprefix("torch."),
                    "config": a.config, "gemv_tiles": _tile_source(dev if a.device == "cuda" else None),
                    "stages": {}, "errors": {}, "skipped": []}
        self._engines: dict[str, object] = {}
        self._prompt = None

    def engine(self, kind: str):
        """'one': one slot (bucket 1 only: the fewest kernels to compile); 'int8': the same with an
        int8 depth decoder; 'many': max(--buckets) slots, held alone (its caches are the big ones)."""
        if kind not in self._engines:
            if kind == "many" or "many" in self._engines:
                self._engines.clear()
                if self.a.device == "cuda":
                    torch.cuda.empty_cache()
            slots = max(self.a.buckets) if kind == "many" else 1
            t0 = time.perf_counter()
            eng = gm.build_engine(self.a.config, self.a.device, self.dtype, slots, int8_depth=kind == "int8")
            eng.decoder  # noqa: B018 - builds the decoder and captures its graphs
            self.res[f"startup_{kind}_s"] = time.perf_counter() - t0
            gm.log(f"engine '{kind}' ({slots} slots) built and captured in {self.res[f'startup_{kind}_s']:.1f}s "
                   f"(buckets {eng.gen.fast.buckets})")
            self._engines[kind] = eng
            self._prompt = self._prompt or gm.prompt(eng)  # (the same for every engine of the config)
        return self._engines[kind]

    # -- stages: each stores its results under res[name] ----------------------------------------
    def batch1(self):
        eng = self.engine("one")
        out = {"graphs_equal_eager": gm.check_graphs_vs_eager(eng, self._prompt, rows=1, frames=self.a.check_frames)}
        out.update(gm.batch1(eng, self._prompt, self.a.iters, self.a.warmup))
        return out

    def context(self):
        eng = self.engine("one")
        return gm.context_ms(eng, self._prompt, self.a.positions, self.a.iters, self.a.warmup)

    def check(self):
        small = "tiny" if self.a.config == "csm-1b" else self.a.config
        return gm.check_small_vs_cpu(self.a.device, small, self.a.check_frames)

    def profile(self):
        if self.a.device != "cuda":
            return {"skipped": "the profile reads CUDA kernels"}
        return gm.profile(self.engine("one"), self._prompt)

    def int8(self):
        eng = self.engine("int8")
        gm.fill_rows(eng.gen, 1, self._prompt)
        ms = gm.time_steps(lambda: eng.gen.step(0, 1, 50).cpu(), self.a.iters, self.a.warmup)
        return {"graphs_ms": ms, **gm.kept_variant(eng.gen.fast)}

    def ttfa(self):
        return gm.ttfa(self.engine("one"), self.a.ttfa_requests, min(2, self.a.warmup), self.a.continue_turns)

    def prefill(self):
        eng = self.engine("one")
        voice = np.random.default_rng(0).integers(0, eng.config.codebook_size, (125, eng.config.num_codebooks))
        prompts = {"text": self._prompt, "voice_10s": gm.prompt(eng, gm.REPLY, [(0, gm.VOICE_TEXT, voice)])}
        return gm.prefill_ms(eng.gen, prompts, self.a.iters, lambda: gm.sync(eng.device), self.a.warmup)

    def sample(self):
        return gm.sample_us(self.a.sample_batches, self.a.device, self.dtype, max(1, self.a.iters // 2),
                            self.a.sample_draws)

    def buckets(self):
        eng = self.engine("many")
        rows = gm.per_bucket(eng, self.a.buckets, self._prompt, max(1, self.a.iters // 3), self.a.warmup)
        timing = {str(b): v for b, v in sorted(eng.gen.fast.timing.items())}
        return {"rows": rows, "variant_timing_ms": timing, "kept": {b: eng.gen.fast.kept(int(b)) for b in timing}}

    def live(self):
        if not self.a.streams:
            return {"skipped": "--streams 0"}
        eng = self.engine("many")
        out = {"budget": gm.live(eng, self.a.streams, self.a.seconds)}
        gm.log("live:", out["budget"])
        out["one_chunk_a_tick"] = gm.live(eng, self.a.streams, self.a.seconds, max_prefill_s=0.0)
        return out

    # -- the run ------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, stages: list[str]) -> dict:
        for name in stages:
            if self.a.budget_s is not None and self.elapsed() >= self.a.budget_s:
                self.res["skipped"].append(name)
                gm.log(f"## {name}: skipped, the {self.a.budget_s:.0f} s budget is spent")
                self.save()
                continue
            gm.log(f"## {name} ({self.elapsed():.0f} s into the run)")
            t0 = time.perf_counter()
            try:
                self.res[name] = getattr(self, name)()
                gm.log(f"{name}: {_brief(self.res[name])}")
            except Exception as e:  # noqa: BLE001 - recorded; the next stage runs
                self.res["errors"][name] = traceback.format_exc(limit=12)
                gm.log(f"{name} FAILED: {type(e).__name__}: {e}")
            self.res["stages"][name] = round(time.perf_counter() - t0, 2)
            self.save()
        return self.res

    def save(self) -> None:
        Path(self.a.json).write_text(json.dumps(self.res, indent=1, default=str))


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _brief(v) -> str:
    """A stage's result on one line for the log (the profile's kernel table is printed whole)."""
    if isinstance(v, dict) and "kernels" in v:
        gm.log(v["kernels"])
        v = {k: x for k, x in v.items() if k != "kernels"}
    text = json.dumps(v, default=lambda x: round(x, 3) if isinstance(x, float) else str(x))
    return text if len(text) < 2000 else text[:2000] + " ..."


def table(res: dict) -> str:
    """The Markdown table of whatever the run measured."""
    rows = [(f"## {res['device']}, {res['date']}, {res['config']} config, random weights, {res['dtype']}, "
             f"torch {res['torch']}, triton {res['triton']}"), "| measure | value |", "| --- | --- |"]
    f = "{:.2f}".format
    if "batch1" in res:
        b = res["batch1"]
        rows += [f"| frame, batch 1, CUDA graph | {f(b['graphs_ms'])} ms (RTF {b['graphs_ms'] / gm.FRAME_MS:.3f}) |",
                 f"| frame, batch 1, replay timed at capture | {gm.variants_row(b)} |",
                 (f"| frame, batch 1, CSM_ATTN_FOLD={int(b['fold']['attn_fold'])} (recaptured) | "
                  f"{f(b['fold']['graphs_ms'])} ms ({gm.variants_row(b['fold'])}) |"),
                 f"| frame, batch 1, static Triton step, no graphs | {f(b['static_no_graphs_ms'])} ms |",
                 f"| frame, batch 1, eager PyTorch | {f(b['eager_ms'])} ms |",
                 f"| graph replay == eager step | {b['graphs_equal_eager']} |"]
    for r in res.get("context", []):
        rows.append(f"| frame, batch 1, at position {r['position']}: {r['splits']} key splits / the same grouped by "
                    f"kv head / one pass | {f(r['split_ms'])} / {f(r['grouped_ms'])} / {f(r['one_pass_ms'])} ms |")
    if "check" in res:
        worst = min((v["codes_equal"] for v in res["check"].values()), default=None)
        rows.append(f"| small config vs CPU f32: least share of equal codes | {worst} ({len(res['check'])} cases) |")
    if "int8" in res:
        rows.append(f"| frame, batch 1, CUDA graph, int8 depth decoder | {f(res['int8']['graphs_ms'])} ms "
                    f"({gm.variants_row(res['int8'])}) |")
    for k, v in res.get("ttfa", {}).items():
        rows.append(f"| {k} | {'n/a (websockets missing)' if v is None else f'{v:.1f} ms'} |")
    for name, r in res.get("prefill", {}).items():
        g = "n/a" if r["graph_ms"] is None else f(r["graph_ms"])
        rows.append(f"| prefill, {name} ({r['tokens']} tokens, bucket {r['bucket']}): graph / padded eager / "
                    f"plain eager | {g} / {f(r['padded_eager_ms'])} / {f(r['plain_eager_ms'])} ms |")
    for r in res.get("sample", []):
        rows.append(f"| a draw at batch {r['batch']}: one kernel / torch.topk path | {r['one_kernel_us']:.1f} / "
                    f"{r['topk_path_us']:.1f} µs |")
        if "one_kernel_w1_us" in r:
            rows.append(f"| a draw at batch {r['batch']}: one kernel with 1 / 2 / 4 warps | "
                        f"{r['one_kernel_w1_us']:.1f} / {r['one_kernel_w2_us']:.1f} / {r['one_kernel_us']:.1f} µs |")
        if "one_kernel_ways16_us" in r:
            rows.append(f"| a draw at batch {r['batch']}: threshold by bisection / 4 / 8 / 16 ways a step "
                        f"(16 at 2 warps) | {r['one_kernel_us']:.1f} / {r['one_kernel_ways4_us']:.1f} / "
                        f"{r['one_kernel_ways8_us']:.1f} / {r['one_kernel_ways16_us']:.1f} "
                        f"({r['one_kernel_ways16_w2_us']:.1f}) µs |")
    for r in res.get("buckets", {}).get("rows", []):
        rows.append(f"| bucket {r['batch']} | step {f(r['step_ms'])} ms, tick {f(r['tick_ms'])} ms, "
                    f"{r['realtime_streams']} real-time streams |")
    for key, lv in res.get("live", {}).items():
        if isinstance(lv, dict):
            rows.append(f"| live ({key}), {lv['streams']} streams | {lv['late_writes']} late writes, worst "
                        f"{lv['worst_lateness_ms']:.1f} ms, TTFA median {lv['ttfa_median_ms']:.0f} ms, max "
                        f"{lv['ttfa_max_ms']:.0f} ms |")
    for name in res["errors"]:
        rows.append(f"| stage {name} | FAILED (traceback in the JSON) |")
    if res["skipped"]:
        rows.append(f"| skipped (budget) | {', '.join(res['skipped'])} |")
    return "\n".join(rows)


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return v


def _stages(s: str) -> list[str]:
    v = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in v if x not in STAGES]
    if bad or not v:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {bad or s!r}; the stages are {', '.join(STAGES)}")
    return v


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--json", default="gpu_bench.json", help="where to write the results (after every stage)")
    ap.add_argument("--stages", type=_stages, default=list(STAGES), help="comma-separated, run in the order given")
    ap.add_argument("--budget-s", type=float, help="start no stage after this many seconds (default: no limit)")
    ap.add_argument("--buckets", type=_ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                    help="batch buckets of the 'buckets' stage; its engine has max(buckets) slots")
    ap.add_argument("--streams", type=int, default=256, help="concurrent requests in the live run (0: skip)")
    ap.add_argument("--seconds", type=float, default=6.0, help="audio per request in the live run")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="(CUDA; CPU is float32)")
    ap.add_argument("--iters", type=int, default=50, help="timed repetitions (medians)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed repetitions before each timing")
    ap.add_argument("--check-frames", type=int, default=12, help="frames compared in the checks")
    ap.add_argument("--ttfa-requests", type=int, default=10, help="timed requests per time-to-first-audio figure")
    ap.add_argument("--continue-turns", type=int, default=5,
                    help="timed whole turns (~6 s each) for the continue_previous time to first audio; 0 skips it "
                         "(the CPU dry run: its frames are interpreted one by one)")
    ap.add_argument("--positions", type=_ints, default=[64, 512, 1024, 2000],
                    help="positions of the 'context' stage (capped to leave the timed steps in the window)")
    ap.add_argument("--sample-batches", type=_ints, default=[1, 16, 256], help="batches of the 'sample' stage")
    ap.add_argument("--sample-draws", type=int, default=32,
                    help="draws (of a frame's 32) each timing of the 'sample' stage runs (the CPU dry run: 2)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the dry run (with --config micro), nothing it times is a GPU figure")
    ap.add_argument("--config", default="csm-1b", choices=["csm-1b", "micro"])
    return ap


def _tile_source(device: str | None) -> str:
    """Which GEMV tile table the fused kernels use here (kernels/gemv_tiles.py), for the record."""
    from csmstream.kernels import gemv_tiles

    return gemv_tiles.source(device)


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    for name in ("iters", "check_frames", "ttfa_requests"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= a.sample_draws <= 32:
        ap.error(f"--sample-draws must be in 1..32, got {a.sample_draws}")
    if a.warmup < 0 or a.streams < 0 or a.continue_turns < 0 or not a.seconds > 0:
        ap.error("--warmup, --streams and --continue-turns must be >= 0 and --seconds > 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; none is available here (--device cpu --config micro is the "
              "dry run)", file=sys.stderr)
        return 2
    bench = Bench(a)
    gm.log(f"# {bench.res['device']}, torch {torch.__version__}, triton {bench.res['triton']}, {bench.res['dtype']}, "
           f"stages {','.join(a.stages)}")
    res = bench.run(a.stages)
    gm.log("\n" + table(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
