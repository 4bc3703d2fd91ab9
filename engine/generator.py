"""The frame step: per-row static state, prefill, and one batched step that yields codes [B, N].

Rows are slots. A step runs a contiguous range of rows [lo, hi) together: codebook-0 sampling
from the last backbone state, N-1 depth-decoder steps with sampling, then one backbone step that
feeds the frame back, all on device with no host sync. The caller copies the returned codes to the
host once per tick (the only device->host copy). On CPU float32 the same step is one compiled call
(engine/cpu_step.py), batch-invariant per row.
"""

from __future__ import annotations

import logging
import os

import torch

from .cpu_step import CpuFrameStep, cpu_kernel_usable
from .depth import DepthLoop
from .model import CSM, Attend, KVCache
from .rope import rope_table
from .sampling import sample

log = logging.getLogger("csmstream.engine")


def build_fast_step(gen, graphs: bool | None, *, required: bool):
    """The Triton/CUDA-graph step for `gen`. If it cannot be built here (a kernel that does not
    compile for this GPU or Triton version, a failed capture) and nobody asked for it by name
    (required=False: the default on CUDA), say why and return None: the generator then runs the
    eager PyTorch step, the same draws at a lower speed, instead of the server not starting."""
    from .cuda_step import FastFrameStep, graphs_enabled

    try:
        return FastFrameStep(gen, graphs=graphs_enabled(graphs))
    except Exception as e:  # noqa: BLE001 - any build failure: fall back unless the caller insisted
        if required:
            raise
        log.warning("the fast GPU step could not be built (%s: %s); running the eager PyTorch step, which is "
                    "several times slower. Set CSM_FAST_STEP=0 to skip the attempt.", type(e).__name__, e)
        return None


class FrameGenerator:
    def __init__(self, model: CSM, rows: int, max_seq_len: int | None = None, *, fast: bool | None = None,
                 graphs: bool | None = None) -> None:
        cfg = model.cfg
        p = next(model.parameters())
        dev, dt = p.device, p.dtype
        self.model, self.rows, self.device, self.dtype = model, rows, dev, dt
        self.n, self.V, cs = cfg.num_codebooks, cfg.audio_vocab, cfg.codebook_size
        bb, dd = cfg.backbone, cfg.depth
        self.max_seq_len = min(max_seq_len or bb.max_seq_len, bb.max_seq_len)
        kw = dict(device=dev, dtype=dt)
        # backbone caches: one stacked buffer [L, rows, S, 2kv, hd], a KVCache view per layer
        self.bb_cache = torch.zeros(bb.n_layers, rows, self.max_seq_len, 2 * bb.n_kv_heads, bb.head_dim, **kw)
        self.bb_caches = [KVCache(rows, bb.n_kv_heads, self.max_seq_len, bb.head_dim, kv=self.bb_cache[i], **kw)
                          for i in range(bb.n_layers)]
        self.dd_caches = [KVCache(rows, dd.n_kv_heads, self.n, dd.head_dim, **kw) for _ in range(dd.n_layers)]
        self.bb_rot = rope_table(bb.rope, bb.head_dim, self.max_seq_len).to(dev)  # [S, hd/2]
        self.dd_rot = rope_table(dd.rope, dd.head_dim, self.n).to(dev)[:, None, :]  # [N, 1, hd/2]
        with torch.inference_mode():
            # reserved ids (>= codebook_size) are never sampled: the heads simply omit them
            self.c0_w = model.c0_head.weight[:cs]  # [cs, Db], a view
            self.heads = model.depth_heads[:, :, :cs].contiguous()  # [N-1, Dd, cs]
            # depth input for code c of codebook j: depth_proj(depth_embed(j * V + c)), one lookup
            self.depth_in = model.depth_proj(model.depth_embed.weight)  # [N * V, Dd]
        self.depth_loop = DepthLoop(model, self.dd_caches, self.dd_rot, self.depth_in, self.heads, self.n, self.V)
        # per-row state, all on device
        self.h = torch.zeros(rows, bb.dim, **kw)  # last backbone hidden state
        self.pos = torch.zeros(rows, dtype=torch.int64, device=dev)  # next cache position
        self.frame = torch.zeros(rows, dtype=torch.int64, device=dev)  # frames generated
        self.seed = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.temperature = torch.ones(rows, dtype=torch.float32, device=dev)
        self.topk = torch.ones(rows, dtype=torch.int64, device=dev)
        self.positions = torch.arange(max(self.max_seq_len, rows), device=dev)
        self.host_pos = [0] * rows  # host mirror of pos, for attention lengths without a sync
        # CPU float32: the whole step is one compiled call per tick (kernels/frame_cpu.py); set to
        # None to use the eager PyTorch path (the tests compare the two)
        self.cpu = CpuFrameStep(self) if cpu_kernel_usable(dev, dt) and not fast else None
        # CUDA: static-shape step with Triton kernels, one CUDA graph per batch bucket
        # (engine/cuda_step.py). fast=None: on for CUDA (env CSM_FAST_STEP=0 turns it off);
        # fast=True on CPU runs the same code eagerly (tests, under TRITON_INTERPRET=1).
        self.fast = None
        required = fast is not None
        if fast is None:
            switch = os.environ.get("CSM_FAST_STEP", "1").strip().lower()
            fast = dev.type == "cuda" and switch not in ("0", "false", "off")
        if fast:
            self.fast = build_fast_step(self, graphs, required=required)
        # with the fast step, prompts go in at fixed padded lengths (one CUDA graph each; eagerly
        # when graphs are off, so the frames are the same either way)
        self.static_prefill = None
        if self.fast is not None:
            from .cuda_prefill import StaticPrefill

            self.static_prefill = StaticPrefill(self, graphs=self.fast.use_graphs)

    @torch.inference_mode()
    def prefill(self, row: int, tokens: torch.Tensor, mask: torch.Tensor, *, seed: int,
                temperature: float, topk: int, prefix: tuple[int, torch.Tensor] | None = None,
                start: int | None = None, last: bool = True) -> None:
        """Run the prompt rows [T, N+1] through the backbone into `row`'s cache.

        prefix: (P, kv) puts cached KV [layers, P, 2kv, hd] at positions [0, P) first.
        start: the position of tokens[0] (default: right after the prefix, or 0); positions
        [0, start) must already hold this row's KV (the prefix, or earlier chunks of the prompt).
        last: False for a chunk of a longer prompt: only the cache is written (and on the fast path
        the row's hidden state, which the last chunk sets), and the row's next
        position moves past the chunk, so a frame step that carries this row as idle writes its junk
        where the next chunk will overwrite it. The last chunk sets the row up to generate."""
        P = 0 if prefix is None else prefix[0]
        start = P if start is None else start
        T = tokens.shape[0]
        if start < P:
            raise ValueError(f"start {start} lies inside the {P}-position prefix")
        if start + T > self.max_seq_len - 1:
            raise ValueError(f"prompt is {start + T} positions; the model's window is {self.max_seq_len}")
        if T < 1:
            raise ValueError("prefill needs at least one token after the cached prefix")
        if P:
            self.bb_cache[:, row, :P].copy_(prefix[1])
        if self.static_prefill is not None:  # the last position's hidden state goes to h[row]
            self.static_prefill.run(row, tokens, mask, start)
        else:
            x = self.model.embed_prompt(tokens.to(self.device), mask.to(self.device))[None].to(self.dtype)
            rot = self.bb_rot[start : start + T][None, :, None, :]
            if start:
                causal = self.positions[: start + T][None, :] <= self.positions[start : start + T][:, None]
                at = Attend(slice(row, row + 1), start=start, length=start + T, mask=causal[None, None])
            else:
                at = Attend(slice(row, row + 1), length=T)
            h = self.model.backbone(x, rot, self.bb_caches, at)
            if last:
                self.h[row] = h[0, -1]
        T += start
        self.pos[row] = T
        self.host_pos[row] = T
        if not last:
            return
        self.frame[row] = 0
        self.seed[row] = seed & 0x7FFFFFFFFFFFFFFF
        self.temperature[row] = temperature
        self.topk[row] = topk

    def sync(self) -> None:
        """Wait for the device to finish what was queued (a prefill's graph returns at once; the
        prefill budget times the work, not the enqueueing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def cached_kv(self, row: int, length: int) -> torch.Tensor:
        """A copy of `row`'s backbone KV at positions [0, length): [layers, length, 2kv, hd]."""
        return self.bb_cache[:, row, :length].clone()

    def release(self, row: int) -> None:
        self.pos[row] = 0
        self.host_pos[row] = 0

    @torch.inference_mode()
    def step(self, lo: int, hi: int, kmax: int, active: list[bool] | None = None) -> torch.Tensor:
        """One frame for rows [lo, hi). kmax: the largest top-k among them (host int; the eager step
        draws from that many candidates, the compiled CPU and GPU steps need no bound).
        active: per row of the range, whether it advances (None: all). Inactive rows inside the
        range are computed but keep their state (hidden state, position, frame counter); their
        cache write lands on their own next position, which they overwrite before reading.
        Returns codes [hi - lo, N] int64 on device (rows that are inactive hold junk)."""
        m = self.model
        if self.cpu is not None:
            return self._cpu_step(lo, hi, active)
        if self.fast is not None:
            return self.fast.step(lo, hi, active)
        rows = slice(lo, hi)
        temp, topk, seed, counter = self.temperature[rows], self.topk[rows], self.seed[rows], self.frame[rows]

        def draw(logits: torch.Tensor, j: int) -> torch.Tensor:
            return sample(logits.float(), temp, topk, kmax, seed, counter, j)

        h = self.h[rows]  # [B, Db]
        c = draw(h @ self.c0_w.t(), 0)
        frame = torch.stack([c, *self.depth_loop.run(lo, hi, h, c, draw)], dim=1)  # [B, N]

        # backbone: feed the frame back, each row at its own position
        pos = self.pos[rows]
        length = min(self.max_seq_len, max(self.host_pos[lo:hi]) + 1)
        keep = self.positions[:length] <= pos[:, None]  # [B, L]
        at = Attend(rows, pos=pos, idx=self.positions[: hi - lo], length=length, mask=keep[:, None, None, :])
        x = m.embed_frames(frame)[:, None]  # [B, 1, Db]
        new_h = m.backbone(x, self.bb_rot[pos][:, None, None, :], self.bb_caches, at)[:, 0]
        if active is None or all(active):
            self.h[rows] = new_h
            self.pos[rows] += 1
            self.frame[rows] += 1
            for r in range(lo, hi):
                self.host_pos[r] += 1
        else:
            live = torch.tensor(active, device=self.device)
            self.h[rows] = torch.where(live[:, None], new_h, h)
            self.pos[rows] += live
            self.frame[rows] += live
            for r, a in zip(range(lo, hi), active, strict=True):
                self.host_pos[r] += bool(a)
        return frame

    def _cpu_step(self, lo: int, hi: int, active: list[bool] | None) -> torch.Tensor:
        live = [r for r in range(lo, hi) if active is None or active[r - lo]]
        if not live:
            return torch.zeros(hi - lo, self.n, dtype=torch.int64)
        idx = torch.tensor(live, dtype=torch.int64)
        if max(self.host_pos[r] for r in live) >= self.max_seq_len:
            raise ValueError("a row is past the model's window")
        frames = self.cpu.step(idx.numpy())
        for r in live:
            self.host_pos[r] += 1
        if len(live) == hi - lo:
            return frames
        out = torch.zeros(hi - lo, self.n, dtype=torch.int64)
        out[idx - lo] = frames
        return out

