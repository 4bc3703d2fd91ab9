"""Tile sweep for the fused small-batch GEMV kernels (kernels/triton_gemv.py) on csm-1b's shapes.

    python bench/gemv_sweep.py [--rows 1,8] [--dtype bfloat16] [--json gemv_sweep.json] [--jobs 16]

The JSON is rewritten after every case (the projections read most often a frame first), so a sweep
cut short still leaves a usable tile table for what it timed.

For every projection of a decoder layer (backbone and depth decoder), every batch size and both
weight formats (the model dtype, and int8 with a scale per row), it times: cuBLAS (F.linear plus the
ops the fused kernel folds in: norm, SiLU·up, residual add, RoPE + cache write), the tiles
`pick_tiles()` chooses, and each tile in a grid; each candidate's output is first checked against
the PyTorch reference. Times are device time per call from CUDA-graph replays over enough weight
copies to overflow the L2 cache, so the weights come from HBM as they do in a frame. It then adds
the calls up into the GEMV time of one frame (backbone layers once, depth layers once per codebook)
for cuBLAS, the picked tiles and the best tiles: the number to hold against the batch-1 frame
target. The candidates are first compiled in parallel processes (--jobs; Triton's on-disk cache
hands them to the timing run). On CPU (tests) it runs interpreted and times with the wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

# BLOCK_K up to 2048: on the H200 (2026-12-04, --rows 1) the widest K tile then timed, 512, won every
# shape, by 10-50 % over 256 (the K loop's latency bounds a one-row GEMV), so wider ones are next;
# with those, output tiles of 2 rows too (twice the programs in flight: a 2,048 K tile leaves the
# 1,024-row w2 only 256 programs of 4 rows for 132 SMs)
# With a fourth entry, stages >= 2: the K loop software-pipelined, the next weight tiles copied into
# shared memory (cp.async) while the current one is multiplied -- more loads in flight a program
# without a wider tile (kernels/triton_gemv.py); compiled for sm_90 they keep the plain loop's
# registers. Staged tiles past the register budget or STAGED_SMEM are not timed (they spill or
# starve occupancy; `candidates`).
# With a fifth entry, splits >= 2: split K, `splits` programs an output tile, each over its share
# of K, the last adding their partial sums (kernels/triton_gemv.py): the other way to more loads in
# flight, by more programs rather than deeper ones -- w2's 16-tile K loop became 4 chains of 4.
# Only where they divide K's tiles evenly (another count would run as one of those).
# With a sixth entry 1, the dot path: tl.dot on tensor cores over the rows padded to 16, whose
# accumulator does not grow with BLOCK_K, so a program's weight tile can be DOT_TILE elements at any
# row count (the plain path's shrinks as rows grow); split and unsplit. Only up to DOT_TILE.
GRID = ([(bn, bk, w) for bn, bk, w in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024, 2048), (4, 8))]
        + [(2, bk, w) for bk, w in itertools.product((1024, 2048), (4, 8))]
        + [(bn, bk, 4, st) for st, bn, bk in itertools.product((2, 3, 4), (4, 8, 16), (256, 512, 1024))]
        + [(bn, bk, 8, st) for st, bn, bk in itertools.product((2, 3, 4), (4,), (512, 1024))]
        + [(2, bk, 4, st) for bk, st in itertools.product((512, 1024, 2048), (2, 3))]
        + [(bn, bk, 4, 1, sp) for sp, bn, bk in itertools.product((2, 4, 8), (4, 8, 16), (256, 512, 1024))]
        + [(4, bk, 8, 1, sp) for sp, bk in itertools.product((2, 4, 8), (512, 1024))]
        + [(bn, 512, 4, 2, sp) for sp, bn in itertools.product((2, 4), (4, 8))]
        + [(bn, bk, 4, 1, sp, 1) for sp, bn, bk in itertools.product((1, 2, 4, 8, 16), (16, 32, 64), (128, 256))])
STAGED_SMEM = 64 << 10  # bytes of weight tiles a staged program may keep in flight
L2_BYTES = 120 << 20  # > 2x an H100's L2: a sweep's weight copies never all fit in it


def shapes(cfg) -> list[dict]:
    """The nine projections of a frame: name, kind, N (outputs; the gate half for w13), K, calls a
    frame (and for the qkv projections, whose kernel also does RoPE and the cache write, the heads);
    the eight of the decoder layers, then the depth decoder's codebook heads.
    The depth decoder makes N - 1 passes a frame: positions 0 and 1 share one (engine/cuda_step)."""
    out = []
    for tag, t, calls in (("backbone", cfg.backbone, cfg.backbone.n_layers),
                          ("depth", cfg.depth, cfg.depth.n_layers * (cfg.num_codebooks - 1))):
        q = (t.n_heads + 2 * t.n_kv_heads) * t.head_dim
        out += [dict(name=f"{tag}.wqkv", kind="rope", N=q, K=t.dim, calls=calls,
                     heads=(t.n_heads, t.n_kv_heads, t.head_dim)),
                dict(name=f"{tag}.wo", kind="add", N=t.dim, K=t.n_heads * t.head_dim, calls=calls),
                dict(name=f"{tag}.w13", kind="swiglu", N=t.ffn_dim, K=t.dim, calls=calls),
                dict(name=f"{tag}.w2", kind="add", N=t.dim, K=t.ffn_dim, calls=calls)]
    # the depth decoder's codebook heads: the final norm, then [codebook_size, dim], once a codebook
    # (kept in the model dtype when the depth decoder's layers are int8: engine/quant.py)
    out.append(dict(name="depth.head", kind="norm", N=cfg.codebook_size, K=cfg.depth.dim, calls=cfg.num_codebooks - 1,
                    int8=False))
    return out


class Case:
    """One (shape, rows, format): inputs, weight copies, the fused call, cuBLAS's call, the reference."""

    def __init__(self, shape: dict, rows: int, int8: bool, dtype, device, copies: int | None = None) -> None:
        from csmstream.kernels.int8 import quantize_int8

        self.shape, self.rows, self.int8 = shape, rows, int8
        kind, N, K = shape["kind"], shape["N"], shape["K"]
        rows_w = 2 * N if kind == "swiglu" else N
        nbytes = rows_w * K * (1 if int8 else torch.finfo(dtype).bits // 8)
        self.nbytes = nbytes
        self.copies = copies or max(2, math.ceil(L2_BYTES / nbytes))
        g = torch.Generator(device="cpu").manual_seed(rows * 7 + N + K)
        w = (torch.randn(rows_w, K, generator=g) / K ** 0.5).to(device)
        self.x = torch.randn(rows, K if kind != "add" else N, generator=g).to(device, dtype)
        self.a = torch.randn(rows, K, generator=g).to(device, dtype)
        self.nw = (1 + 0.1 * torch.randn(K, generator=g)).to(device, dtype)
        if int8:
            qw = quantize_int8(w)
            self.ws = [(qw.q.clone(), qw.scale.clone()) for _ in range(self.copies)]
        else:
            self.ws = [(w.to(dtype).clone(), None) for _ in range(self.copies)]
        self.dense = self.ws[0][0] if not int8 else None  # cuBLAS runs the model dtype only
        # split-K tiles' scratch, as the step keeps one: grown by the eager check, not in a timed graph
        from csmstream.kernels.triton_gemv import SplitWork

        self.work = SplitWork()
        if kind == "rope":  # each row at its own position of a short cache
            H, KV, hd = shape["heads"]
            angles = torch.rand(16, hd // 2, generator=g) * 6
            self.cos, self.sin = torch.cos(angles).to(device), torch.sin(angles).to(device)
            self.pos = (torch.arange(rows) % 16).to(device)
            self.cache = torch.zeros(rows, 16, 2 * KV, hd, device=device, dtype=dtype)

    def _rope(self):
        return (self.shape["heads"][0], self.cos, self.sin, self.pos, self.cache) if self.shape["kind"] == "rope" \
            else None

    def fused(self, tiles, i: int = 0):
        from csmstream.kernels import triton_gemv as gv

        w, s = self.ws[i]
        kind = self.shape["kind"]
        if kind == "add":
            return gv.matvec_add_(self.x, w, self.a, scale=s, tiles=tiles, work=self.work)
        return gv.norm_matvec(self.x, self.nw, w, 1e-5, swiglu=kind == "swiglu", scale=s, tiles=tiles,
                              rope=self._rope(), work=self.work)

    def cublas(self, i: int = 0):
        from csmstream.kernels import triton_ops as ops

        w = self.ws[i][0]
        kind = self.shape["kind"]
        if kind == "add":
            return self.x.add_(F.linear(self.a, w))
        xn = ops.add_rms_norm(self.x, self.x, self.nw, 1e-5, add=False)
        y = F.linear(xn, w)
        if kind == "rope":  # the unfused step's RoPE + cache-write kernel
            ops.rope_store_(y.view(self.rows, -1, self.cos.shape[1] * 2), *self._rope())
        return ops.silu_mul(y) if kind == "swiglu" else y

    def reference(self):
        from csmstream.kernels import triton_gemv as gv

        w, s = self.ws[0]
        kind = self.shape["kind"]
        if kind == "add":
            return gv.matvec_add_ref(self.x.clone(), w, self.a, scale=s)
        y = gv.norm_matvec_ref(self.x, self.nw, w, 1e-5, swiglu=kind == "swiglu", scale=s)
        if kind == "rope":  # q and k rotated (k as the cache holds it), v as is
            from csmstream.kernels.triton_ops import rope_store_ref

            H, KV, hd = self.shape["heads"]
            qkv, cache = y.view(self.rows, -1, hd), self.cache.clone()
            rope_store_ref(qkv, H, self.cos, self.sin, self.pos, cache)
            qkv[:, H:H + KV] = cache[torch.arange(self.rows, device=cache.device), self.pos, :KV]
        return y

    def check(self, tiles) -> float:
        """Largest |fused - reference| relative to the reference's largest value (x is restored)."""
        keep = self.x.clone()
        want = self.reference()
        got = self.fused(tiles).clone()  # (the add kind returns x itself)
        self.x.copy_(keep)
        return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))

    def time_us(self, fn, reps: int = 5) -> float:
        """Device time a call, cycling through the weight copies (x restored after)."""
        keep = self.x.clone()
        try:
            if self.x.is_cuda:
                from csmstream.engine.cuda_step import replay_ms

                fn(0)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for i in range(self.copies):
                        fn(i)
                return replay_ms(graph, reps) * 1e3 / self.copies
            t0 = time.perf_counter()
            for _ in range(reps):
                for i in range(self.copies):
                    fn(i)
            return (time.perf_counter() - t0) * 1e6 / (reps * self.copies)
        finally:
            self.x.copy_(keep)


def candidates(shape: dict, rows: int, int8: bool, grid=GRID) -> tuple[int, int, tuple, list[tuple]]:
    """(cols, mats, picked, tiles to time) of one case: pick_tiles' choice first, then the grid's
    tiles that fit the register budget and K."""
    from csmstream.kernels.triton_gemv import DOT_TILE, PRODUCTS, pick_tiles

    mats = 2 if shape["kind"] in ("swiglu", "rope") else 1  # rope: one accumulator per pair member
    bb = 1 << (rows - 1).bit_length()
    cols = shape["N"] // 2 if shape["kind"] == "rope" else shape["N"]  # rope: programs cover column pairs
    picked = pick_tiles(rows, shape["K"], cols, mats=mats, int8=int8)
    kmax = 1 << (shape["K"] - 1).bit_length()  # a K tile past K only loads masked lanes

    def fits(t) -> bool:
        if len(t) >= 5 and t[4] > 1 and -(-shape["K"] // t[1]) % t[4]:  # split K: as many K tiles to each split
            return False
        if len(t) == 6 and t[5]:  # the dot path: its weight tile, whatever the rows
            return t[0] * t[1] * mats <= DOT_TILE
        products = bb * t[0] * t[1] * mats
        if len(t) == 5 and t[4] > 1 and products > PRODUCTS:  # on sm_90 int8 16 x 1024 split spills (Triton 3.6)
            return False
        if len(t) < 4 or t[3] == 1:
            return products <= 2 * PRODUCTS
        # staged: on sm_90 a 16 x 512 two-matrix tile at 3 stages spills (255 registers, Triton 3.6)
        staged = (t[3] - 1) * t[0] * t[1] * mats * (1 if int8 else 2)
        return products <= PRODUCTS and staged <= STAGED_SMEM

    return cols, mats, picked, [picked] + [t for t in grid if t != picked and t[1] <= kmax and fits(t)]


def cases(shape_list, rows_list) -> list[tuple]:
    """(rows, shape, int8) of every case: both weight formats, but only the model dtype for a shape
    marked int8=False (one the int8 depth decoder keeps in it)."""
    return [(rows, shape, int8) for rows, shape in itertools.product(rows_list, shape_list)
            for int8 in ((False, True) if shape.get("int8", True) else (False,))]


def deal(shape_list, rows_list, jobs: int, grid=GRID) -> list[list[tuple]]:
    """The candidates of every case dealt one by one to `jobs` processes, each process's share as
    (shape, rows, int8, its tiles of that case) per case it has any of. By whole cases, 17 cases at
    one row would keep only 9 of 16 processes busy (two cases each), one with a ~110-tile case twice."""
    every = cases(shape_list, rows_list)
    todo = [(i, t) for i, (rows, shape, int8) in enumerate(every) for t in candidates(shape, rows, int8, grid)[3]]
    out, n = [], max(1, min(jobs, len(todo)))
    for j in range(n):
        mine: dict[int, list] = {}
        for i, t in todo[j::n]:
            mine.setdefault(i, []).append(t)
        out.append([(every[i][1], every[i][0], every[i][2], tiles) for i, tiles in mine.items()])
    return out


def precompile(shape_list, rows_list, dtype, device, jobs: int, grid=GRID, log=print) -> int:
    """Run every candidate once in `jobs` processes at once (`deal`), so Triton compiles them in
    parallel into its on-disk cache and the timing run only loads them (a compile takes ~0.3-0.5 s
    and a sweep has over a thousand). A process builds the weights of each case it has candidates
    of. Returns how many ran; one that fails is left to the timing run, which reports it."""
    chunks = [(work, str(dtype).removeprefix("torch."), device) for work in deal(shape_list, rows_list, jobs, grid)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(chunks), mp_context=multiprocessing.get_context("spawn")) as ex:
        n = sum(ex.map(_run_cases, chunks))
    log(f"# ran {n} candidate kernels once in {len(chunks)} processes ({time.perf_counter() - t0:.0f} s): compiled")
    return n


def _run_cases(chunk) -> int:
    work, dtype, device = chunk
    n = 0
    for shape, rows, int8, tiles in work:
        case = Case(shape, rows, int8, getattr(torch, dtype), device, copies=1)
        for t in tiles:
            try:
                case.fused(t)
                n += 1
            except Exception:  # noqa: BLE001 - the timing run meets it again and says what failed
                continue
    if device == "cuda":
        torch.cuda.synchronize()
    return n


def sweep(shape_list, rows_list, dtype, device, grid=GRID, copies=None, log=print, jobs: int = 0,
          save=None, reps: int = 5) -> dict:
    """Time every case (jobs > 1: compile its candidates in that many processes first), the
    projections read most often a frame first. save(cases): called after each case with those done
    so far (a run cut short still leaves a tile table for them). reps: timed passes over the weight
    copies a candidate (the tests' CPU sweeps, whose interpreted times mean nothing, take 1)."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    if jobs > 1:
        precompile(shape_list, rows_list, dtype, device, jobs, grid, log)
    results = []
    by_calls = sorted(shape_list, key=lambda s: -s["calls"])  # stable: the depth decoder's (31 a frame) first
    for rows, shape, int8 in cases(by_calls, rows_list):
        case = Case(shape, rows, int8, dtype, device, copies)
        cols, mats, picked, cands = candidates(shape, rows, int8, grid)
        row = dict(name=shape["name"], rows=rows, int8=int8, K=shape["K"], cols=cols, mats=mats,
                   calls=shape["calls"], mbytes=case.nbytes / 1e6,
                   cublas_us=None if int8 else case.time_us(case.cublas, reps), tiles={})
        for t in cands:
            # a candidate that fails to compile or run, or gives a wrong result, is recorded and left
            # out (a GPU session's sweep goes on to the shapes after it); main() then exits 1
            try:
                err = case.check(t)
                if not err < 2e-2:
                    raise AssertionError(f"off by {err:.3g} against the reference")
                row["tiles"][str(t)] = case.time_us(lambda i, t=t, c=case: c.fused(t, i), reps)
            except Exception as e:  # noqa: BLE001 - said, recorded, and the sweep goes on
                if case.x.is_cuda:
                    with contextlib.suppress(Exception):  # a launch error may surface here again
                        torch.cuda.synchronize()
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                row.setdefault("failed", {})[str(t)] = why
                log(f"  {shape['name']:15s} B={rows:2d} int8={int8} tiles={t}: FAILED {why}")
        if not row["tiles"]:
            raise RuntimeError(f"{shape['name']} rows={rows} int8={int8}: every candidate failed: {row['failed']}")
        if str(picked) not in row["tiles"]:
            raise RuntimeError(f"{shape['name']} rows={rows} int8={int8}: pick_tiles' choice {picked} failed: "
                               f"{row['failed'][str(picked)]}")
        row["picked"], row["picked_us"] = list(picked), row["tiles"][str(picked)]
        fastest = min((t for t in cands if str(t) in row["tiles"]), key=lambda t: row["tiles"][str(t)])
        best = str(fastest)
        row["best"], row["best_us"] = best, row["tiles"][best]
        row["best_tiles"] = list(fastest)  # CSM_GEMV_TILES reads these
        row["best_gbps"] = case.nbytes / row["best_us"] / 1e3
        cublas = "      -" if int8 else f"{row['cublas_us']:7.1f}"
        log(f"  {shape['name']:15s} B={rows:2d} {'int8' if int8 else str(dtype)[6:]:8s} "
            f"cuBLAS {cublas} us  picked {row['picked_us']:7.1f} us  "
            f"best {row['best_us']:7.1f} us {best} ({row['best_gbps']:.0f} GB/s)")
        results.append(row)
        if save is not None:
            save(results)
    return {"cases": results, "frame_gemv_ms": frame_totals(results)}


def frame_totals(results) -> dict:
    """GEMV ms of one frame per rows: cuBLAS, fused (picked / best tiles), fused with an int8 depth decoder."""
    out = {}
    for rows in sorted({r["rows"] for r in results}):
        mine = [r for r in results if r["rows"] == rows]
        dense = [r for r in mine if not r["int8"]]
        depth8 = [r for r in mine if r["int8"] and r["name"].startswith("depth.")]
        # with the depth decoder int8: the backbone, and what it keeps in the model dtype (its heads)
        bb = [r for r in dense if r["name"] not in {d["name"] for d in depth8}]
        tot = {k: sum(r[k] * r["calls"] for r in dense) / 1e3 for k in ("cublas_us", "picked_us", "best_us")}
        for k in ("picked_us", "best_us"):
            tot["int8_depth_" + k] = sum(r[k] * r["calls"] for r in bb + depth8) / 1e3
        out[str(rows)] = {k.replace("_us", "_ms"): round(v, 3) for k, v in tot.items()}
    return out


def builtin_table(doc: dict, source: str) -> dict:
    """A sweep's JSON cut to what the engine reads (kernels/gemv_tiles.py): its device, date and
    dtype, where it came from, its frame totals, and each case's key and best tiles (and time)."""
    if not isinstance(doc, dict) or not doc.get("device") or not isinstance(doc.get("cases"), list):
        raise ValueError("not a finished sweep's JSON: it needs 'device' and 'cases'")
    keep = ("name", "rows", "K", "cols", "mats", "int8", "best_tiles", "best_us")
    return dict(device=doc["device"], date=doc.get("date"), dtype=doc.get("dtype"), source=source,
                frame_gemv_ms=doc.get("frame_gemv_ms"), cases=[{k: c[k] for k in keep} for c in doc["cases"]])


def install_builtin(sweep_json: str, into: Path | None = None) -> Path:
    """Write the built-in tile table for the sweep's device (kernels/tiles/<device>.json) and
    return its path; the engine then uses those tiles on that GPU model by default."""
    from csmstream.kernels import gemv_tiles

    doc = json.loads(Path(sweep_json).read_text())
    table = builtin_table(doc, Path(sweep_json).name)
    gemv_tiles.load(sweep_json, f"--builtin {sweep_json}")  # its tiles are valid, or say why
    slug = "".join(ch if ch.isalnum() else "_" for ch in table["device"].lower()).strip("_")
    out = (into or gemv_tiles.BUILTIN) / f"{slug}.json"
    out.write_text(json.dumps(table, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8", help="batch sizes (<= 16), comma-separated (default: 1,8)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--json", default="gemv_sweep.json", help="where to write the results (CSM_GEMV_TILES reads it)")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                    help="processes that compile the candidate kernels first, in parallel (default: the CPUs, "
                         "at most 16; 1 compiles each one as it is timed)")
    ap.add_argument("--builtin", metavar="SWEEP_JSON",
                    help="no sweep: make SWEEP_JSON (this script's --json, from a GPU) the built-in tile table "
                         "of its device (kernels/tiles/), which the engine then uses there by default")
    a = ap.parse_args(argv)
    if a.builtin:
        try:
            print(f"wrote {install_builtin(a.builtin)}")
        except (OSError, ValueError, KeyError) as e:
            print(f"--builtin {a.builtin}: {e}", file=sys.stderr)
            return 2
        return 0
    if a.jobs < 1:
        print(f"--jobs must be >= 1, got {a.jobs}", file=sys.stderr)
        return 2
    try:
        rows = [int(r) for r in a.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or not all(1 <= r <= 16 for r in rows):
        print(f"--rows must be comma-separated batch sizes in 1..16, got {a.rows!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench/gemv_sweep.py needs a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    from csmstream.engine.config import CsmModelConfig

    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, {a.dtype}, {time.strftime('%Y-%m-%d')}", flush=True)
    head = dict(device=dev, date=time.strftime("%Y-%m-%d"), dtype=a.dtype)

    def save(cases, done=False):  # after every case: CSM_GEMV_TILES can use a sweep cut short
        doc = {"cases": cases, "frame_gemv_ms": frame_totals(cases), **head, "complete": done}
        Path(a.json).write_text(json.dumps(doc, indent=1))
        return doc

    res = sweep(shapes(CsmModelConfig.csm_1b()), rows, getattr(torch, a.dtype), "cuda",
                log=lambda *x: print(*x, flush=True), jobs=a.jobs, save=save)
    res = save(res["cases"], done=True)
    failed = {c["name"] + (" int8" if c["int8"] else ""): c["failed"] for c in res["cases"] if c.get("failed")}
    print("GEMV ms a frame (cuBLAS / fused picked / fused best / int8 depth picked / int8 depth best):")
    for rows, t in res["frame_gemv_ms"].items():
        print(f"  B={rows}: {t['cublas_ms']} / {t['picked_ms']} / {t['best_ms']} / {t['int8_depth_picked_ms']} / "
              f"{t['int8_depth_best_ms']}")
    if failed:
        print(f"FAILED candidates (left out of the table): {json.dumps(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
