"""CSM's two Llama-style transformers in lean PyTorch, built from a CsmModelConfig (any size).

Module names are ours (fused qkv and gate/up projections); engine/weights.py maps a transformers
checkpoint onto them. Caches are not parameters: the frame generator owns them and passes them in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CsmModelConfig, TransformerConfig
from .rope import apply_rope_


class KVCache:
    """Static per-row cache [rows, S, 2 * n_kv, hd] (keys then values per position), allocated
    once and written in place: one copy stores a step's keys and values together."""

    def __init__(self, rows: int, n_kv: int, seq: int, hd: int, *, device, dtype, kv=None) -> None:
        # kv: an existing [rows, seq, 2 * n_kv, hd] buffer to use (e.g. one layer of a stacked cache)
        self.kv = torch.zeros(rows, seq, 2 * n_kv, hd, device=device, dtype=dtype) if kv is None else kv


class Attend:
    """Where a forward pass reads and writes the cache. One of:
    - per-row decode: T == 1, row b writes at pos[b] (a device tensor; idx = arange(B)), reads
      [:length] under mask [B, 1, 1, length];
    - range: rows write positions [start, start + T) and read [:length], causal within (or under
      mask [1, 1, T, length] when given);
    - device row: rows is a [1] int64 tensor (one row, picked on device: a CUDA graph's input), the
      T positions write at pos [T] (a device tensor) and read the row's [:length] under mask
      [1, 1, T, length] (engine/cuda_prefill.py).
    """

    __slots__ = ("idx", "length", "mask", "pos", "rows", "start")

    def __init__(self, rows: slice, *, pos=None, idx=None, start: int = 0, length: int, mask=None) -> None:
        self.rows, self.pos, self.idx, self.start, self.length, self.mask = rows, pos, idx, start, length, mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # match the reference on half types: normalise in fp32, cast, then scale
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return self.weight * y


class Attention(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.h, self.kv, self.hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, rot, cache: KVCache, at: Attend) -> torch.Tensor:
        B, T, _ = x.shape
        h, kv, hd = self.h, self.kv, self.hd
        qkv = self.wqkv(x).view(B, T, h + 2 * kv, hd)
        apply_rope_(qkv[:, :, : h + kv], rot)
        if isinstance(at.rows, torch.Tensor):  # a row picked on device: write through, read a copy
            cache.kv[at.rows, at.pos] = qkv[0, :, h:]
            c = cache.kv.index_select(0, at.rows)
        else:
            c = cache.kv[at.rows]  # [B, S, 2kv, hd], a view
            if at.pos is not None:  # decode, each row at its own position
                c[at.idx, at.pos] = qkv[:, 0, h:]
            else:
                c[:, at.start : at.start + T] = qkv[:, :, h:]
        seen = c[:, : at.length]
        keys, vals = seen[:, :, :kv].transpose(1, 2), seen[:, :, kv:].transpose(1, 2)  # [B, kv, L, hd]
        if T == 1:  # grouped queries [B, kv, G, hd] per kv head: no kv repeat
            o = F.scaled_dot_product_attention(qkv[:, 0, :h].view(B, kv, h // kv, hd), keys, vals,
                                               attn_mask=at.mask)
        else:
            q = qkv[:, :, :h].transpose(1, 2)  # [B, h, T, hd]
            causal = at.mask is None  # a range from position 0 (start > 0 and device rows pass a mask)
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=at.mask, is_causal=causal,
                                               enable_gqa=True).transpose(1, 2)
        return self.wo(o.reshape(B, T, h * hd))


class FeedForward(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.ffn_dim = c.ffn_dim
        self.w13 = nn.Linear(c.dim, 2 * c.ffn_dim, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn = FeedForward(c)

    def forward(self, x, rot, cache: KVCache, at: Attend) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rot, cache, at)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """A decoder stack with its final norm; no embeddings or heads (CSM's are special)."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x, rot, caches: list[KVCache], at: Attend) -> torch.Tensor:
        # x: [B, T, D]; rot: [B|1, T, 1, hd/2] complex rotations
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, rot, cache, at)
        return self.norm(x)


def _table(rows: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised, as depth_heads is: whoever builds a CSM fills every
    weight (tiny's init_random, a checkpoint's tensors, kernel_report's zeros). nn.Embedding's own
    normal_ init, built on the meta device as a checkpoint load builds it, imports torch._dynamo
    (~4 s) to fill a table nobody reads."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class CSM(nn.Module):
    """Backbone (text + audio frames -> codebook 0) and depth decoder (-> codebooks 1..N-1)."""

    def __init__(self, cfg: CsmModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, V = cfg.num_codebooks, cfg.audio_vocab
        Db, Dd = cfg.backbone.dim, cfg.depth.dim
        self.text_embed = _table(cfg.text_vocab, Db)
        self.audio_embed = _table(n * V, Db)  # codebook i, code c -> row i * V + c
        self.backbone = Transformer(cfg.backbone)
        self.c0_head = nn.Linear(Db, V, bias=False)
        self.depth_embed = self.audio_embed if cfg.tie_codebook_embeddings else _table(n * V, Db)
        self.depth_proj = nn.Linear(Db, Dd, bias=False)
        self.depth = Transformer(cfg.depth)
        self.depth_heads = nn.Parameter(torch.empty(n - 1, Dd, V))  # codebook j uses [j - 1]
        # arange's own step, not arange(n) * V: on the meta device the multiply goes through torch's
        # Python decompositions, which import torch._dynamo (~3 s) for a value to_empty discards
        self.register_buffer("audio_offsets", torch.arange(0, n * V, V), persistent=False)

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., N] -> summed audio embedding [..., Db]."""
        return self.audio_embed(codes + self.audio_offsets).sum(dim=-2)

    def embed_prompt(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prompt rows [T, N+1] (N audio columns, then text) with mask [T, N+1] -> [T, Db]."""
        n = self.cfg.num_codebooks
        audio = self.audio_embed(tokens[:, :n] + self.audio_offsets)  # [T, N, Db]
        text = self.text_embed(tokens[:, n:])  # [T, 1, Db]
        parts = torch.cat([audio, text], dim=1) * mask[:, :, None].to(audio.dtype)
        return parts.sum(dim=1)
