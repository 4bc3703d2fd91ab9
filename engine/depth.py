"""The depth decoder's 31-step inner loop, written for launch count rather than generality.

Per codebook: one table lookup for the input (depth_proj∘embed precomputed), then per layer
norm, qkv, in-place rotary, one cache copy, attention, out-proj, norm, gate/up, SiLU·up, down —
13 ops — then norm, head and the draw. Positions are shared by every row, so rotations and cache
views per position are built once per row range and reused every frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import CSM, KVCache
from .rope import apply_rope_


class DepthLoop:
    def __init__(self, model: CSM, caches: list[KVCache], rot: torch.Tensor, depth_in: torch.Tensor,
                 heads: torch.Tensor, n_codebooks: int, vocab: int) -> None:
        d = model.depth
        c = d.config
        self.h, self.kv, self.hd, self.dim, self.eps = c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.norm_eps
        # weights pre-transposed [in, out] so residual adds fuse into addmm
        self.layers = [(L.attn_norm.weight, L.attn.wqkv.weight.t().contiguous(), L.attn.wo.weight.t().contiguous(),
                        L.ffn_norm.weight, L.ffn.w13.weight.t().contiguous(), L.ffn.w2.weight.t().contiguous(),
                        c.ffn_dim) for L in d.layers]
        self.norm_w, self.proj = d.norm.weight, model.depth_proj.weight
        self.caches, self.rot, self.heads, self.n = caches, rot, heads, n_codebooks
        # input table per codebook j: a [V, Dd] view, so the lookup needs no offset add
        self.inputs = [depth_in[j * vocab : (j + 1) * vocab] for j in range(n_codebooks)]
        self._views: dict[tuple[int, int], list] = {}

    def _cache_views(self, lo: int, hi: int):
        """Per layer, per position p: (write slot [B, 2kv, hd], keys, values [B, kv, p+1, hd])."""
        key = (lo, hi)
        if key not in self._views:
            kv = self.kv
            per_layer = []
            for cache in self.caches:
                c = cache.kv[lo:hi]
                per_layer.append([(c[:, p], c[:, : p + 1, :kv].transpose(1, 2), c[:, : p + 1, kv:].transpose(1, 2))
                                  for p in range(self.n)])
            self._views[key] = per_layer
        return self._views[key]

    def run(self, lo: int, hi: int, h: torch.Tensor, c0: torch.Tensor, draw) -> list[torch.Tensor]:
        """h: backbone state [B, Db]; c0: codebook-0 codes [B]. Returns codes of codebooks 1..N-1."""
        views = self._cache_views(lo, hi)
        B = hi - lo
        x = torch.stack([F.linear(h, self.proj), F.embedding(c0, self.inputs[0])], dim=1)  # [B, 2, Dd]
        out = self._first(x, B, views)
        codes = []
        for j in range(1, self.n):
            c = draw(out @ self.heads[j - 1], j)
            codes.append(c)
            if j < self.n - 1:
                out = self._next(F.embedding(c, self.inputs[j]), j + 1, B, views)
        return codes

    def _next(self, x: torch.Tensor, p: int, B: int, views) -> torch.Tensor:
        """One token per row at position p. x [B, Dd] -> normed output [B, Dd]."""
        h, kv, hd, D, eps = self.h, self.kv, self.hd, self.dim, self.eps
        rot = self.rot[p]  # [1, hd/2]
        for (an, wqkv, wo, fn, w13, w2, ffn), lv in zip(self.layers, views, strict=True):
            qkv = (F.rms_norm(x, (D,), an, eps) @ wqkv).view(B, h + 2 * kv, hd)
            apply_rope_(qkv[:, : h + kv], rot)
            slot, keys, vals = lv[p]
            slot.copy_(qkv[:, h:])
            o = F.scaled_dot_product_attention(qkv[:, :h].view(B, kv, h // kv, hd), keys, vals)
            x = torch.addmm(x, o.view(B, h * hd), wo)
            gate, up = (F.rms_norm(x, (D,), fn, eps) @ w13).split(ffn, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), w2)
        return F.rms_norm(x, (D,), self.norm_w, eps)

    def _first(self, x: torch.Tensor, B: int, views) -> torch.Tensor:
        """Positions 0 (backbone state) and 1 (codebook 0), causal. x [B, 2, Dd] -> [B, Dd] of pos 1."""
        h, kv, hd, D, eps = self.h, self.kv, self.hd, self.dim, self.eps
        rot = self.rot[:2]  # [2, 1, hd/2]
        for (an, wqkv, wo, fn, w13, w2, ffn), lv in zip(self.layers, views, strict=True):
            qkv = (F.rms_norm(x, (D,), an, eps) @ wqkv).view(B, 2, h + 2 * kv, hd)
            apply_rope_(qkv[:, :, : h + kv], rot)
            lv[0][0].copy_(qkv[:, 0, h:])
            lv[1][0].copy_(qkv[:, 1, h:])
            _, keys, vals = lv[1]
            o = F.scaled_dot_product_attention(qkv[:, :, :h].transpose(1, 2), keys, vals,
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
            x = x + o.reshape(B, 2, h * hd) @ wo
            gate, up = (F.rms_norm(x, (D,), fn, eps) @ w13).split(ffn, dim=-1)
            x = x + (F.silu(gate) * up) @ w2
        return F.rms_norm(x[:, -1], (D,), self.norm_w, eps)

