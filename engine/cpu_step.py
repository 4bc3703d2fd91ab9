"""Glue for kernels/frame_cpu.py: the CPU float32 frame step as one compiled call per tick.

Weights are laid out once for the kernel ([in, out] matrices stacked per layer, RoPE as cos/sin
tables); the backbone KV cache is the generator's own stacked buffer, shared with the PyTorch
prefill through a NumPy view (no copies per step). Per-row state (hidden state, position, frame
counter) is updated in place by the kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import CSM
from .sampling import gumbel_table


def cpu_kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """The numba kernel serves CPU float32; everything else takes the eager PyTorch path."""
    return device.type == "cpu" and dtype == torch.float32


def _arr(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)


def _layers(stack) -> tuple:
    """(attn_norm, wqkv_t, wo_t, ffn_norm, w13_t, w2_t), each stacked over layers."""
    L = list(stack)
    return (_arr(torch.stack([b.attn_norm.weight for b in L])),
            _arr(torch.stack([b.attn.wqkv.weight.t() for b in L])),
            _arr(torch.stack([b.attn.wo.weight.t() for b in L])),
            _arr(torch.stack([b.ffn_norm.weight for b in L])),
            _arr(torch.stack([b.ffn.w13.weight.t() for b in L])),
            _arr(torch.stack([b.ffn.w2.weight.t() for b in L])))


class CpuFrameStep:
    def __init__(self, gen) -> None:
        m: CSM = gen.model
        cfg = m.cfg
        bb, dd = cfg.backbone, cfg.depth
        self.n = gen.n
        self.c0_t = _arr(gen.c0_w.t())  # [Db, C]
        self.audio_embed = _arr(m.audio_embed.weight)
        self.vocab = cfg.audio_vocab
        self.blayers = _layers(m.backbone.layers)
        self.bdims = (bb.n_heads, bb.n_kv_heads, np.float32(bb.norm_eps))
        self.bnorm = _arr(m.backbone.norm.weight)
        self.bcos, self.bsin = _arr(gen.bb_rot.real), _arr(gen.bb_rot.imag)
        self.bcache = gen.bb_cache.numpy()  # [L, R, S, 2KV, hd], shared with the torch caches
        rot = gen.dd_rot[:, 0]
        self.depth = (_arr(m.depth_proj.weight.t()), _arr(gen.depth_in), cfg.audio_vocab, _arr(m.depth.norm.weight),
                      _arr(gen.heads), _arr(rot.real), _arr(rot.imag))
        self.dlayers = _layers(m.depth.layers)
        self.ddims = (dd.n_heads, dd.n_kv_heads, np.float32(dd.norm_eps))
        self.h, self.pos, self.counter = gen.h.numpy(), gen.pos.numpy(), gen.frame.numpy()
        self.temp, self.topk, self.seed = gen.temperature.numpy(), gen.topk.numpy(), gen.seed.numpy()
        self.gtable = gumbel_table().numpy()

    def step(self, rows: np.ndarray) -> torch.Tensor:
        """One frame for each row in `rows` (int64), each drawn with its own seed, frame counter,
        temperature and top-k. Returns frames [len(rows), N] int64."""
        from ..kernels.frame_cpu import frame_step

        frames = np.empty((len(rows), self.n), np.int64)
        frame_step(rows, self.h, self.pos, self.counter, self.seed, self.temp, self.topk, self.gtable, self.c0_t,
                   self.audio_embed, self.vocab, self.blayers, self.bdims, self.bnorm, self.bcos, self.bsin,
                   self.bcache, self.depth, self.dlayers, self.ddims, frames)
        return torch.from_numpy(frames)

    def depth_only(self, h: torch.Tensor, c0: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor,
                   seed: torch.Tensor, counter: torch.Tensor, force: np.ndarray | None = None,
                   record: np.ndarray | None = None) -> torch.Tensor:
        """The depth decoder alone (codebooks 1..N-1) for given backbone states, drawing with the
        given seeds and counters; force/record teacher-force codes and capture logits [B, N-1, C]
        (the parity tests use them)."""
        from ..kernels.frame_cpu import depth_frame

        B = h.shape[0]
        codes = np.empty((B, self.n - 1), np.int64)

        def arr(t):
            return np.ascontiguousarray(t.numpy())

        depth_frame(arr(h), arr(c0), self.depth, self.dlayers, self.ddims, arr(temperature), arr(topk), arr(seed),
                    arr(counter), self.gtable, np.zeros((0, 0), np.int64) if force is None else force,
                    np.zeros((0, 0, 0), np.float32) if record is None else record, codes)
        return torch.from_numpy(codes)
