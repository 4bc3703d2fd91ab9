"""The GPU frame step: static shapes over rows [0, B), Triton kernels, one CUDA graph per bucket.

A bucket B runs rows [0, B) of the slot arrays (the slot heap hands out the lowest free row, so
live rows sit at the bottom). Everything a step needs lives in persistent device tensors the graph
reads in place: the generator's per-row state (hidden state, position, frame counter, seed,
temperature, top-k), the KV caches and an `active` mask. Positions and attention lengths are
computed on device, and each draw is one kernel that hashes its own noise (any top-k). Rows that
are not active are computed but keep their state (their cache write lands on their own next
position, which they overwrite before reading it).

Per frame: codebook-0 head + draw, 31 depth-decoder passes over its 32 positions (position 0 = the
projected backbone state; the output at position p draws codebook p, and that draw also writes the
code's embedding, position p + 1's input; positions 0 and 1 go through
one pass together, as rows 2b and 2b + 1 sharing cache row b, so each weight is read once for both;
a fused bucket over 8 rows takes them one at a time, the kernels holding 16 rows), then the backbone
step that feeds the frame back. Per layer: fused residual+RMSNorm, qkv matmul, one kernel for RoPE
and the cache write, decode attention over each row's own length (its keys split across programs
when few rows would leave the GPU idle: kernels/triton_attn.py), out-projection, residual+RMSNorm,
gate/up matmul, fused SiLU·up, down matmul.

With graphs off (env CSM_CUDA_GRAPHS=0, `graphs=False`, or on CPU under TRITON_INTERPRET=1 in the
tests) the same `forward` runs eagerly: the results are identical, only launch overhead differs.

Small buckets (B <= 16) can run each layer as five kernels instead (kernels/triton_gemv.py: the
norms folded into the projections' prologue; RoPE + the cache write, SiLU·up and the residual adds
into their epilogue).
Env CSM_FUSED_GEMV: `auto` (default) captures both variants of each such bucket, times their
replays and keeps the faster (so a device where cuBLAS wins keeps cuBLAS); `on` / `off` force it.
With an int8 depth decoder (engine/quant.py) the five-kernel layers read its int8 weights (half the
bytes); the cuBLAS step reads the dequantized copy, so both compute the same function.
Env CSM_PDL (`auto` default, `on`, `off`): on Hopper and later the five-kernel step can also run as
one chain of programmatic dependent launches (kernels/pdl.py: each kernel loads its first weight
tile while the one before finishes). `auto` captures it as a third variant, keeps it only if its
replay gives the same codes as the plain fused step's, and times it with the others.
Env CSM_ATTN_FOLD (`auto` default, `on`, `off`): at batch 1 the fused step can also run the depth
decoder's attention inside its qkv kernels (kernels/triton_gemv.norm_matvec(attend=): the last
program attends, one launch fewer a layer); `auto` captures it as another variant, kept only if its
codes are the plain fused step's and it is faster.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import gumbel_table

log = logging.getLogger("csmstream.engine")


def _progress(what: str, B: int, i: int, n: int, t0: float) -> None:
    """A start-up progress line (a step's graphs take up to a minute at 256 slots)."""
    log.info("  bucket %d: %s (%d of %d, %.1fs)", B, what, i, n, time.perf_counter() - t0)


def graphs_enabled(flag: bool | None) -> bool:
    """The constructor flag wins; else env CSM_CUDA_GRAPHS (default on; 0/false/off turn it off)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("CSM_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "off", "no")


def _switch(env: str, flag: str | None, default: str = "auto", choices: tuple = ("auto", "on", "off")) -> str:
    """One of `choices` ('auto' | 'on' | 'off'; 1/true/yes and 0/false/no mean on and off): the
    argument wins, else the environment variable, else `default`."""
    v = (flag if flag is not None else os.environ.get(env, default)).strip().lower()
    v = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(v, v)
    if v not in choices:
        raise ValueError(f"{env} must be {', '.join(choices[:-1])} or {choices[-1]}, got {v!r}")
    return v


def grouped_setting(flag: str | None = None) -> str:
    """Attention grouped by kv head (kernels/triton_attn.py): the argument, else env
    CSM_ATTN_GROUPED, on or off (default off until measured)."""
    return _switch("CSM_ATTN_GROUPED", flag, default="off", choices=("on", "off"))


def fused_setting(flag: str | None = None) -> str:
    """The five-kernel layers: the argument, else env CSM_FUSED_GEMV (default auto)."""
    return _switch("CSM_FUSED_GEMV", flag)


def pdl_setting(flag: str | None = None) -> str:
    """Programmatic dependent launches in the five-kernel step: the argument, else env CSM_PDL."""
    return _switch("CSM_PDL", flag)


def fold_setting(flag: str | None = None) -> str:
    """Attention folded into the depth decoder's qkv kernels at batch 1: the argument, else env
    CSM_ATTN_FOLD (default auto)."""
    return _switch("CSM_ATTN_FOLD", flag)


def variant_name(fused: bool, pdl: bool, fold: bool = False) -> str:
    return ("fused+pdl" if pdl else "fused" if fused else "cublas") + ("+fold" if fold else "")


def _replayed(graph_out: tuple) -> torch.Tensor:
    """A captured step's codes after one replay (a copy: the buffer is shared)."""
    graph_out[0].replay()
    return graph_out[1].clone()


def buckets_for(rows: int) -> list[int]:
    """Batch buckets 1, 2, 4, ... up to rows (rows itself last when it is not a power of two)."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


def bucket_of(buckets: list[int], hi: int) -> int:
    """The smallest bucket that holds rows [0, hi)."""
    for b in buckets:
        if b >= hi:
            return b
    raise ValueError(f"rows up to {hi} exceed the engine's {buckets[-1]} slots")


def replay_ms(graph, n: int = 20) -> float:
    """Wall ms a replay of a captured CUDA graph, after one warm replay (the device's time: the
    host only enqueues)."""
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


def _pairs(layer: tuple, q: dict | None = None) -> tuple:
    """A layer's (norm, wqkv, wo, norm, w13, w2) with each matrix as a (weight, scale) pair: the
    layer's own (scale None), or its int8 form from engine/quant.py."""
    an, wqkv, wo, fn, w13, w2 = layer
    if q is None:
        return an, (wqkv, None), (wo, None), fn, (w13, None), (w2, None)
    return an, tuple(q["wqkv"]), tuple(q["wo"]), fn, tuple(q["w13"]), tuple(q["w2"])


class FastFrameStep:
    def __init__(self, gen, *, graphs: bool, fused: str | None = None, pdl: str | None = None,
                 fold: str | None = None) -> None:
        from ..kernels import (  # imported here: nothing imports triton at package import
            pdl as pdl_mod,
            triton_attn,
            triton_gemv,
            triton_ops,
        )

        self.ops, self.gemv, self.attn = triton_ops, triton_gemv, triton_attn
        m, cfg = gen.model, gen.model.cfg
        self.gen, self.n, self.V, self.cs = gen, gen.n, cfg.audio_vocab, cfg.codebook_size
        self.bb, self.dd = cfg.backbone, cfg.depth
        dev = gen.device

        def layers(stack):
            return [(L.attn_norm.weight, L.attn.wqkv.weight, L.attn.wo.weight, L.ffn_norm.weight,
                     L.ffn.w13.weight, L.ffn.w2.weight) for L in stack.layers]

        self.bb_layers, self.dd_layers = layers(m.backbone), layers(m.depth)
        # the fused kernels' view: (weight, scale) pairs; int8 + scale for a quantized depth decoder
        q = getattr(m, "depth_int8", None) or [None] * len(self.dd_layers)
        self.bb_fused = [_pairs(L) for L in self.bb_layers]
        self.dd_fused = [_pairs(L, Q) for L, Q in zip(self.dd_layers, q, strict=True)]
        self.int8 = q[0] is not None
        self.bb_norm, self.dd_norm = m.backbone.norm.weight, m.depth.norm.weight
        self.bb_kv = [c.kv for c in gen.bb_caches]
        self.dd_kv = [c.kv for c in gen.dd_caches]
        self.bb_cos, self.bb_sin = gen.bb_rot.real.float().contiguous(), gen.bb_rot.imag.float().contiguous()
        rot = gen.dd_rot[:, 0]
        self.dd_cos, self.dd_sin = rot.real.float().contiguous(), rot.imag.float().contiguous()
        self.dd_pos = torch.arange(self.n, device=dev)
        self.dd_len = self.dd_pos + 1
        self.dd_pos01 = torch.arange(2 * gen.rows, device=dev) % 2  # depth positions 0 and 1 of each row
        self.dd_len01 = self.dd_pos01 + 1
        self.proj = m.depth_proj.weight
        self.inputs = [gen.depth_in[j * self.V : (j + 1) * self.V] for j in range(self.n)]
        self.active = torch.zeros(gen.rows, dtype=torch.bool, device=dev)
        # the split attention's per-(row, head) counters (kernels/triton_attn.py): every launch leaves
        # them at zero, and one step's launches run one after another, so one buffer serves them all
        self.attn_counts = triton_attn.counters(2 * gen.rows, max(self.bb.n_heads, self.dd.n_heads), dev)
        self.attn_splits: int | None = None  # key splits of every attention launch (None: pick_splits)
        self.draw_ways: int | None = None  # the draws' threshold search (None: triton_ops.DRAW_WAYS)
        # env CSM_ATTN_GROUPED=1: a program per kv head with tensor-core dots (kernels/triton_attn.py);
        # default off, one program per query head, until bench/gpu.py's context stage has timed both
        self.attn_grouped = grouped_setting() == "on"
        self.fold_count = torch.zeros(1, dtype=torch.int32, device=dev)  # the fold's; launches leave it at 0
        # scratch of the GEMVs whose tiles split K (a measured table's fifth entry): one serves the
        # step's launches, which run one after another; grown by the eager passes before capture
        self.gemv_work = triton_gemv.SplitWork()
        self._active_host = torch.zeros(gen.rows, dtype=torch.bool)
        if dev.type == "cuda":
            self._active_host = self._active_host.pin_memory()
        self.codes = torch.zeros(gen.rows, self.n, dtype=torch.int64, device=dev)
        self.gtable = gumbel_table(str(dev))  # the draws' shared Gumbel noise table
        self.buckets = buckets_for(gen.rows)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_graphs = graphs and dev.type == "cuda"
        self.fused_mode = fused_setting(fused)
        small = {b for b in self.buckets if b <= triton_gemv.MAX_ROWS}
        self.fused_buckets: set[int] = small if self.fused_mode == "on" else set()  # run as five kernels a layer
        # the fused step's depth heads [N-1, cs, Dd]: the final norm runs in the head's prologue
        self.heads_t = gen.heads.transpose(1, 2).contiguous() if self.fused_mode != "off" else None
        if dev.type == "cuda" and self.fused_mode != "off":
            from ..kernels import gemv_tiles

            log.info("fused GEMV tiles: %s", gemv_tiles.source(triton_gemv.gpu_name(dev.index or 0)))
        self.pdl_mode = pdl_setting(pdl)
        why_not = pdl_mod.unavailable(dev) if self.pdl_mode != "off" and self.fused_mode != "off" else "off"
        self.pdl_ok = why_not is None
        if self.pdl_mode == "on" and not self.pdl_ok and dev.type == "cuda":
            log.warning("CSM_PDL=on but %s: the fused step runs without it", why_not)
        self.pdl_buckets: set[int] = set(self.fused_buckets) if self.pdl_mode == "on" and self.pdl_ok else set()
        # the fused step at batch 1 may fold the depth decoder's attention into its qkv kernels (the
        # last program attends: kernels/triton_gemv.norm_matvec(attend=)), one launch fewer a layer
        self.fold_mode = fold_setting(fold)
        self.fold_buckets: set[int] = {1} & self.fused_buckets if self.fold_mode == "on" else set()
        # capture(): bucket -> {variant name: ms a replay} for each bucket captured more than one way
        self.timing: dict[int, dict[str, float]] = {}
        if self.use_graphs:
            self.capture()
        if self.int8 and dev.type == "cuda" and not self.fused_buckets:
            log.warning("the depth decoder is int8 but no batch bucket runs the int8 kernels (CSM_FUSED_GEMV=%s%s): "
                        "every step reads the dequantized weights, so int8 costs precision and saves nothing",
                        self.fused_mode, "" if self.use_graphs else ", graphs off")

    # -- the step as plain code -------------------------------------------------------------------
    def _stack(self, x, layers, kv, final_norm, eps, n_heads, cos, sin, pos, lengths, B):
        """One position per row through a decoder stack; x [R, D] (consumed as the residual) holds
        one position of each of the B cache rows (R = B), or r consecutive positions of each (R = rB)."""
        ops = self.ops
        d = None
        for i, (an, wqkv, wo, fn, w13, w2) in enumerate(layers):
            xn = ops.add_rms_norm(x, x if d is None else d, an, eps, add=d is not None)
            qkv = F.linear(xn, wqkv).view(x.shape[0], -1, kv[i].shape[-1])
            cache = kv[i][:B]
            ops.rope_store_(qkv, n_heads, cos, sin, pos, cache)
            o = self.attn.decode_attention(qkv[:, :n_heads], cache, lengths, splits=self.attn_splits,
                                           counts=self.attn_counts, grouped=self.attn_grouped)
            xn = ops.add_rms_norm(x, F.linear(o, wo), fn, eps)
            d = F.linear(ops.silu_mul(F.linear(xn, w13)), w2)
        return ops.add_rms_norm(x, d, final_norm, eps)

    def _stack_fused(self, x, layers, kv, final_norm, eps, n_heads, cos, sin, pos, lengths, B, final=True,
                     pdl=False, fold=False):
        """The same stack in five kernels a layer (B <= 16); x [B, D] is updated in place. `layers`
        holds (weight, scale) pairs (self.bb_fused / self.dd_fused). final=False returns the residual
        stream x itself, for a caller that folds the final norm into its next matmul. pdl: every
        kernel a programmatic dependent launch (kernels/pdl.py). fold: each layer's attention runs in
        its qkv kernel's last program (lengths must be pos + 1, as they are in forward)."""
        ops, gemv = self.ops, self.gemv
        for i, (an, (wqkv, sqkv), (wo, so), fn, (w13, s13), (w2, s2)) in enumerate(layers):
            cache, hd = kv[i][:B], kv[i].shape[-1]
            rope = (n_heads, cos, sin, pos, cache)
            if fold:
                o = torch.empty(x.shape[0], n_heads * hd, dtype=x.dtype, device=x.device)
                gemv.norm_matvec(x, an, wqkv, eps, scale=sqkv, rope=rope, pdl=pdl, attend=(o, self.fold_count))
            else:
                qkv = gemv.norm_matvec(x, an, wqkv, eps, scale=sqkv, rope=rope, pdl=pdl)
                q = qkv.view(x.shape[0], -1, hd)[:, :n_heads]  # rotated; k and v went to the cache
                o = self.attn.decode_attention(q, cache, lengths, pdl=pdl, splits=self.attn_splits,
                                               counts=self.attn_counts, grouped=self.attn_grouped)
            work = self.gemv_work
            gemv.matvec_add_(x, wo, o, scale=so, pdl=pdl, work=work)
            up = gemv.norm_matvec(x, fn, w13, eps, swiglu=True, scale=s13, pdl=pdl, work=work)
            gemv.matvec_add_(x, w2, up, scale=s2, pdl=pdl, work=work)
        return ops.add_rms_norm(x, x, final_norm, eps, add=False, pdl=pdl) if final else x

    def forward(self, B: int) -> torch.Tensor:
        """One frame for rows [0, B); returns codes [B, N] (a persistent buffer)."""
        g, n = self.gen, self.n
        h, temp, topk = g.h[:B], g.temperature[:B], g.topk[:B]
        seed, counter, table = g.seed[:B], g.frame[:B], self.gtable
        codes = self.codes[:B]
        dd = self.dd
        fused = B in self.fused_buckets
        pdl = fused and B in self.pdl_buckets
        self.ops.sample(F.linear(h, g.c0_w), temp, topk, seed, counter, 0, table, self.cs, out=codes[:, 0], pdl=pdl,
                        ways=self.draw_ways)
        stack = self._stack_fused if fused else self._stack
        dd_layers, bb_layers = (self.dd_fused, self.bb_fused) if fused else (self.dd_layers, self.bb_layers)
        kw = {"pdl": pdl} if fused else {}
        # fused: the final norm runs inside the head's matvec (and at batch 1 maybe attention in qkv)
        dkw = {"final": False, "fold": B in self.fold_buckets, **kw} if fused else {}

        def depth(x, pos, lengths):
            return stack(x, dd_layers, self.dd_kv, self.dd_norm, dd.norm_eps, dd.n_heads,
                         self.dd_cos, self.dd_sin, pos, lengths, B, **dkw)

        def draw(out, p):
            """Codebook p from depth position p's output (the fused head wants it contiguous); the
            draw also writes the code's embedding, position p + 1's input, which it returns."""
            if fused:
                logits = self.gemv.norm_matvec(out.contiguous(), self.dd_norm, self.heads_t[p - 1], dd.norm_eps,
                                               pdl=pdl, work=self.gemv_work)
            else:
                logits = out @ g.heads[p - 1]
            nxt = torch.empty(B, dd.dim, dtype=h.dtype, device=h.device) if p < n - 1 else None
            self.ops.sample(logits, temp, topk, seed, counter, p, table, self.cs, out=codes[:, p], pdl=pdl,
                            embed=None if nxt is None else (self.inputs[p], nxt), ways=self.draw_ways)
            return nxt

        # depth positions: 0 is the backbone state (its output is only its KV), p >= 1 is codebook
        # p - 1. Positions 0 and 1 go through in one pass (rows 2b, 2b + 1: each weight read once
        # for both) while the rows fit the fused kernels, else one at a time.
        x0, x1 = F.linear(h, self.proj), F.embedding(codes[:, 0], self.inputs[0])
        if not fused or 2 * B <= self.gemv.MAX_ROWS:
            out = depth(torch.stack((x0, x1), dim=1).view(2 * B, -1), self.dd_pos01[: 2 * B], self.dd_len01[: 2 * B])
            x = draw(out.view(B, 2, -1)[:, 1], 1)
            first = 2
        else:
            depth(x0, self.dd_pos[0:1].expand(B), self.dd_len[0:1].expand(B))
            x, first = x1, 1
        for p in range(first, n):
            out = depth(x, self.dd_pos[p : p + 1].expand(B), self.dd_len[p : p + 1].expand(B))
            x = draw(out, p)
        # backbone: feed the frame back at each row's own position
        pos = g.pos[:B].clamp(max=g.max_seq_len - 1)  # an idle row at the window's end writes in bounds
        bb = self.bb
        new_h = stack(g.model.embed_frames(codes), bb_layers, self.bb_kv, self.bb_norm, bb.norm_eps,
                      bb.n_heads, self.bb_cos, self.bb_sin, pos, pos + 1, B, **kw)
        live = self.active[:B]
        h.copy_(torch.where(live[:, None], new_h, h))
        g.pos[:B] += live
        g.frame[:B] += live
        return codes

    # -- graphs -----------------------------------------------------------------------------------
    def variants(self, B: int) -> list[tuple[bool, bool, bool]]:
        """The ways bucket B may run, as (fused, pdl, fold): the cuBLAS step, the five-kernel step,
        that step as one chain of programmatic dependent launches, and (bucket 1) with the depth
        decoder's attention folded into its qkv kernels -- as CSM_FUSED_GEMV, CSM_PDL,
        CSM_ATTN_FOLD and the device allow. capture() times them against each other and keeps the
        fastest."""
        if B > self.gemv.MAX_ROWS or self.fused_mode == "off":
            return [(False, False, False)]
        pdl = {"off": [False], "on": [True], "auto": [False, True]}[self.pdl_mode] if self.pdl_ok else [False]
        fold = {"off": [False], "on": [True], "auto": [False, True]}[self.fold_mode] if B == 1 else [False]
        fused = [(True, p, f) for f in fold for p in pdl if not (p and f and self.fold_mode == "auto")]
        return fused if self.fused_mode == "on" else [(False, False, False), *fused]

    def _use(self, B: int, way: tuple[bool, bool, bool]) -> None:
        fused, pdl, fold = way
        (self.fused_buckets.add if fused else self.fused_buckets.discard)(B)
        (self.pdl_buckets.add if pdl else self.pdl_buckets.discard)(B)
        (self.fold_buckets.add if fold else self.fold_buckets.discard)(B)

    def capture(self) -> None:
        """Capture one graph per bucket (largest first, one shared memory pool). Rows are idle while
        capturing (active all false), so no request state moves; caches get junk they never read.
        A small bucket with several variants (CSM_FUSED_GEMV / CSM_PDL auto) keeps the fastest."""
        t0 = time.perf_counter()
        self.active.zero_()
        ways = {B: self.variants(B) for B in self.buckets}
        log.info("capturing the frame step as CUDA graphs for batch buckets %s (%d variants to time) ...",
                 self.buckets, sum(map(len, ways.values())))
        broken: dict[tuple[bool, bool, bool], str] = {}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            # compile the kernels and create library handles off-graph; a variant that cannot run
            # here is dropped while the bucket has another (a bucket's only way fails the step)
            for i, B in enumerate(self.buckets, 1):
                for way in ways[B]:
                    if way in broken:
                        continue
                    self._use(B, way)
                    try:
                        self.forward(B)
                    except Exception as e:  # noqa: BLE001 - any compile/launch failure
                        if len(ways[B]) == 1:
                            raise
                        broken[way] = f"{type(e).__name__}: {e}"
                        log.warning("the %s step is unavailable here (%s); going without it",
                                    variant_name(*way), broken[way])
                _progress("kernels run", B, i, len(self.buckets), t0)  # (a cold Triton cache compiles them here)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for i, B in enumerate(reversed(self.buckets), 1):
            self.graphs[B] = self._capture_best(B, [w for w in ways[B] if w not in broken], pool)
            _progress("graph captured", B, i, len(self.buckets), t0)
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs (buckets %s) in %.1fs", len(self.graphs), self.buckets,
                 time.perf_counter() - t0)
        if self.timing:
            log.info("step variants, ms a replay: %s; kept %s",
                     {b: {k: round(t, 3) for k, t in v.items()} for b, v in sorted(self.timing.items())},
                     {b: self.kept(b) for b in sorted(self.timing)})

    def kept(self, B: int) -> str:
        """The variant bucket B runs: cublas, fused or fused+pdl, +fold where it folds attention."""
        fused = B in self.fused_buckets
        return variant_name(fused, fused and B in self.pdl_buckets, fused and B in self.fold_buckets)

    def _capture_best(self, B: int, ways: list[tuple[bool, bool, bool]], pool) -> tuple:
        if not ways:
            raise RuntimeError(f"no way to run batch bucket {B} on this device")
        got = {}
        for way in ways:
            self._use(B, way)
            try:
                got[way] = self._capture_one(B, pool)
            except Exception as e:  # noqa: BLE001 - another variant serves
                if len(ways) == 1:
                    raise
                log.warning("the %s graph for bucket %d failed (%s); going without it", variant_name(*way), B, e)
        plain = got.get((True, False, False))
        for way, what in (((True, True, False), "the PDL chain's"), ((True, False, True), "the folded attention's")):
            # PDL: the same kernels in the same order, so any difference is a broken dependency;
            # the fold: the same arithmetic but P·V's P in the cache dtype, which moves a code only at
            # a near tie, so a difference is far likelier a broken read of another program's writes
            if plain and way in got and not torch.equal(_replayed(plain), _replayed(got[way])):
                log.warning("bucket %d: %s codes differ from the fused step's; not using it", B, what)
                del got[way]
        if not got:
            raise RuntimeError(f"no graph for batch bucket {B} could be captured")
        best = next(iter(got))
        if len(got) > 1:
            self.timing[B] = {variant_name(*w): replay_ms(g[0]) for w, g in got.items()}
            best = min(got, key=lambda w: self.timing[B][variant_name(*w)])
        self._use(B, best)
        return got[best]

    def _capture_one(self, B: int, pool) -> tuple:
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            out = self.forward(B)
        return graph, out

    def bucket(self, hi: int) -> int:
        return bucket_of(self.buckets, hi)

    @torch.inference_mode()
    def step(self, lo: int, hi: int, active: list[bool] | None) -> torch.Tensor:
        """One frame for rows [lo, hi) (run as bucket >= hi). Returns codes [hi - lo, N] on device."""
        g = self.gen
        B = self.bucket(hi)
        mask = np.zeros(B, dtype=bool)
        mask[lo:hi] = True if active is None else active
        live = np.flatnonzero(mask)
        if any(g.host_pos[r] >= g.max_seq_len for r in live):
            raise ValueError("a row is past the model's window")
        self._active_host[:B] = torch.from_numpy(mask)
        self.active[:B].copy_(self._active_host[:B], non_blocking=True)
        if B in self.graphs:
            graph, out = self.graphs[B]
            graph.replay()
        else:
            out = self.forward(B)
        for r in live:
            g.host_pos[r] += 1
        return out[lo:hi]
