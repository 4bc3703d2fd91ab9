"""Streaming Mimi decode: one frame of codes per slot in, exactly one frame of audio out.

Built on engine/mimi.py's modules and weights (the offline codec's). Every piece that looks at the
past keeps that past as explicit per-slot state, so decoding frame by frame equals decoding the
whole sequence:
- causal convolutions keep their last (kernel - 1) * dilation input samples;
- transposed convolutions keep the (kernel - stride) overlap tail, without bias (added once, when an
  output sample is final);
- the decoder transformer keeps a ring of keys/values with their absolute positions and attends
  to the last `sliding_window` of them.
State is batched over slots ([rows, ...] tensors); `reset(row)` clears one slot alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cuda_step import bucket_of
from .mimi import CausalConv1d, CausalConvTranspose1d, Mimi, ResidualBlock, rope_cos_sin


class _Conv:
    def __init__(self, m, rows: int, dev, dt) -> None:
        c = m.conv
        if not m.causal or m.pad_mode not in ("constant", "zeros"):
            raise ValueError("streaming decode needs causal, zero-padded convolutions (Mimi's settings)")
        self.w, self.b = c.weight, c.bias
        self.stride, self.dil, self.groups = c.stride[0], c.dilation[0], c.groups
        if self.stride != 1:
            raise ValueError("decoder convolutions with stride > 1 are not supported for streaming")
        self.ctx = (c.kernel_size[0] - 1) * self.dil
        self.state = torch.zeros(rows, c.in_channels, self.ctx, device=dev, dtype=dt)

    def __call__(self, x, rows: slice):
        if self.ctx:
            x = torch.cat([self.state[rows], x], dim=-1)
            self.state[rows] = x[..., -self.ctx :]
        return F.conv1d(x, self.w, self.b, 1, 0, self.dil, self.groups)

    def reset(self, row: int) -> None:
        self.state[row].zero_()


class _ConvT:
    def __init__(self, m, rows: int, dev, dt) -> None:
        c = m.conv
        k, s = c.kernel_size[0], c.stride[0]
        if m.padding_left != 0 or m.padding_right != k - s:
            raise ValueError("streaming decode needs fully right-trimmed causal transposed convolutions")
        self.w, self.b, self.s, self.groups = c.weight, c.bias, s, c.groups
        self.tail_len = k - s
        self.tail = torch.zeros(rows, c.out_channels, self.tail_len, device=dev, dtype=dt)

    def __call__(self, x, rows: slice):
        y = F.conv_transpose1d(x, self.w, None, self.s, groups=self.groups)  # [B, C, (T-1)s + k]
        n = y.shape[-1] - self.tail_len  # = T * s samples become final now
        y[..., : self.tail_len] += self.tail[rows]
        self.tail[rows] = y[..., n:]
        out = y[..., :n]
        return out + self.b[:, None] if self.b is not None else out

    def reset(self, row: int) -> None:
        self.tail[row].zero_()


class _Residual:
    def __init__(self, block, rows: int, dev, dt) -> None:
        self.ops = _build(block.block, rows, dev, dt)
        if not isinstance(block.shortcut, nn.Identity):
            raise ValueError("conv shortcuts are not supported for streaming (Mimi uses identity)")

    def __call__(self, x, rows: slice):
        y = x
        for op in self.ops:
            y = op(y, rows)
        return x + y

    def reset(self, row: int) -> None:
        for op in self.ops:
            getattr(op, "reset", lambda r: None)(row)


class _Elu:
    def __call__(self, x, rows: slice):
        return F.elu(x)


def _build(layers, rows, dev, dt) -> list:
    ops = []
    for m in layers:
        if isinstance(m, CausalConv1d):
            ops.append(_Conv(m, rows, dev, dt))
        elif isinstance(m, CausalConvTranspose1d):
            ops.append(_ConvT(m, rows, dev, dt))
        elif isinstance(m, ResidualBlock):
            ops.append(_Residual(m, rows, dev, dt))
        elif isinstance(m, nn.ELU):
            ops.append(_Elu())
        else:
            raise ValueError(f"unsupported Mimi decoder layer {type(m).__name__}")
    return ops


class _Transformer:
    """Mimi's decoder transformer with a per-slot ring KV cache (window + margin) and positions."""

    def __init__(self, tr, rows: int, dev, dt, steps_per_call: int) -> None:
        spec = tr.spec
        self.tr, self.window = tr, spec.sliding_window
        self.h, self.kv, self.hd = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.size = self.window + steps_per_call  # room so a call never overwrites a key still in view
        L = len(tr.layers)
        self.k = torch.zeros(L, rows, self.kv, self.size, self.hd, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((rows, self.size), -(1 << 40), dtype=torch.int64, device=dev)
        self.next_pos = torch.zeros(rows, dtype=torch.int64, device=dev)

    def __call__(self, x, rows: slice):  # x [B, T, D]
        B, T, _ = x.shape
        pos = self.next_pos[rows, None] + torch.arange(T, device=x.device)  # [B, T]
        cos, sin = rope_cos_sin(self.tr.inv_freq, pos, x.dtype)
        ring = pos % self.size  # [B, T]
        bi = torch.arange(B, device=x.device)[:, None]
        sp = self.slot_pos[rows]
        sp[bi, ring] = pos
        visible = (sp[:, None, :] <= pos[:, :, None]) & (sp[:, None, :] > pos[:, :, None] - self.window)
        mask = visible[:, None]  # [B, 1, T, size]
        for i, layer in enumerate(self.tr.layers):
            q, k, v = layer.qkv(x, cos, sin)
            ck, cv = self.k[i, rows], self.v[i, rows]  # [B, kv, size, hd]
            ck[bi, :, ring] = k.transpose(1, 2)
            cv[bi, :, ring] = v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask, scale=layer.self_attn.scaling,
                                               enable_gqa=self.h != self.kv)
            x = layer.finish(x, o)
        self.next_pos[rows] += T
        return x

    def reset(self, row: int) -> None:
        self.k[:, row].zero_()
        self.v[:, row].zero_()
        self.slot_pos[row] = -(1 << 40)
        self.next_pos[row] = 0


class StreamingMimiDecoder:
    """Decode codes [B, N] for slots [lo, hi) into audio [B, samples_per_frame], state carried."""

    def __init__(self, mimi: Mimi, rows: int) -> None:
        p = next(mimi.parameters())
        dev, dt = p.device, p.dtype
        self.mimi, self.rows = mimi, rows
        up = mimi.upsample
        self.upsample = _ConvT(up, rows, dev, dt) if up is not None else None
        steps = up.conv.stride[0] if up is not None else 1
        self.transformer = _Transformer(mimi.decoder_transformer, rows, dev, dt, steps)
        self.seanet = _build(mimi.decoder.layers, rows, dev, dt)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        rows = slice(lo, hi)
        x = self.mimi.quantizer.decode(codes[:, :, None])  # [B, D, 1]
        if self.upsample is not None:
            x = self.upsample(x, rows)  # [B, D, 2]
        x = self.transformer(x.transpose(1, 2), rows).transpose(1, 2)
        for op in self.seanet:
            x = op(x, rows)
        return x[:, 0]  # [B, samples]

    def reset(self, row: int) -> None:
        for op in [self.upsample, self.transformer, *self.seanet]:
            if op is not None and hasattr(op, "reset"):
                op.reset(row)


class DecodeGraphs:
    """One CUDA graph per batch bucket around `StreamingMimiDecoder.decode` for rows [0, B).

    A replay advances the decoder state of every row in [0, B): the caller uses it only when every
    row there either wants this frame decoded or does not care (a free slot, reset on admission;
    a row that just ended). Codes for rows outside [lo, hi) keep whatever the buffer held.
    capture=False runs the same whole-bucket decode eagerly (any device): the tests use it on CPU
    to check the callers' rule for when a whole-bucket decode is safe.
    """

    def __init__(self, decoder: StreamingMimiDecoder, buckets: list[int], n_codebooks: int, *,
                 capture: bool = True) -> None:
        import time

        t0 = time.perf_counter()
        dev = next(decoder.mimi.parameters()).device
        self.decoder, self.buckets = decoder, buckets
        self.codes = torch.zeros(decoder.rows, n_codebooks, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()
        self.seconds = time.perf_counter() - t0

    def _capture(self) -> None:
        decoder, buckets = self.decoder, self.buckets
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for B in buckets:
                decoder.decode(self.codes[:B], 0, B)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for B in reversed(buckets):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = decoder.decode(self.codes[:B], 0, B)
                self.graphs[B] = (g, out)
        for r in range(decoder.rows):  # warm-up and capture moved every slot's state
            decoder.reset(r)
        torch.cuda.synchronize()

    def bucket(self, hi: int) -> int:
        return bucket_of(self.buckets, hi)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """codes [hi - lo, N] for rows [lo, hi); returns audio [hi - lo, samples] (a graph buffer:
        copy or consume it before the next call)."""
        B = self.bucket(hi)
        self.codes[lo:hi].copy_(codes)
        if B not in self.graphs:
            return self.decoder.decode(self.codes[:B], 0, B)[lo:hi]
        g, out = self.graphs[B]
        g.replay()
        return out[lo:hi]
