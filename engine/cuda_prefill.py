"""Backbone prefill on the GPU fast path: static buffers, one CUDA graph per prompt-length bucket.

Run eagerly, a prefill is one launch per op of every backbone layer (~250 small kernels plus the
host's Python between them): 6.7-13 ms of a 43-token prompt on an H100, the largest part of time
to first audio after the two frames a 100 ms chunk needs. The work itself is one read of the
backbone's weights (~1.95 GB in bf16, well under a millisecond at HBM speed). So on the fast path
the prefill runs at fixed lengths (16, 32, ... up to 512 positions, and the window's length when
that is shorter), each captured once at start-up as a CUDA graph:

- the prompt rows are copied into static token and mask buffers and padded with zero rows (a zero
  embedding) up to the bucket; row, start position and the index of the last real position are
  device scalars copied in with them, so one graph serves every row and every start;
- the padding comes after every real position, so the causal mask keeps it out of the real rows;
  its keys and values land on positions past the prompt, which the row's next chunk or its frames
  write before they read them (positions past the window's end are clamped to its last one, which
  a prompt never reaches: prefill leaves room for a frame);
- attention reads the row's whole cache under a mask computed on device (key position <= query
  position), the same for a first chunk, a later chunk or a prompt after a cached voice prefix;
- the hidden state of the last real position goes to the row's state; a piece longer than the
  largest bucket goes through in pieces of it.

With graphs off (env CSM_CUDA_GRAPHS=0, or on CPU in the tests) the same padded forward runs
eagerly, so a seeded stream gives the same frames with graphs on or off.
"""

from __future__ import annotations

import logging
import time

import torch

from .model import Attend

log = logging.getLogger("csmstream.engine")

MAX_TOKENS = 512  # the largest bucket (the default prefill chunk); longer pieces go through in parts


def length_buckets(window: int, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Padded lengths: powers of two from 16 below min(max_tokens, window), then that cap itself."""
    cap = min(max_tokens, window)
    out, b = [], 16
    while b < cap:
        out.append(b)
        b *= 2
    return out + [cap]


class StaticPrefill:
    def __init__(self, gen, *, graphs: bool, max_tokens: int = MAX_TOKENS) -> None:
        self.gen = gen
        self.buckets = length_buckets(gen.max_seq_len, max_tokens)
        T, cols, dev = self.buckets[-1], gen.n + 1, gen.device
        self.tokens = torch.zeros(T, cols, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(T, cols, dtype=torch.bool, device=dev)
        self.index = torch.zeros(3, dtype=torch.int64, device=dev)  # row, start, last real position
        pin = dev.type == "cuda"
        self._tokens_host = torch.zeros(T, cols, dtype=torch.int64, pin_memory=pin)
        self._mask_host = torch.zeros(T, cols, dtype=torch.bool, pin_memory=pin)
        self._index_host = torch.zeros(3, dtype=torch.int64, pin_memory=pin)
        self._copied = torch.cuda.Event() if pin else None  # the host buffers may be refilled after it
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if graphs and pin:
            try:
                self.capture()
            except Exception as e:  # noqa: BLE001 - keep the same padded prefill, run eagerly
                self.graphs = {}
                log.warning("prefill graphs could not be captured (%s: %s); the prefill runs eagerly (same "
                            "results, a few ms slower per request)", type(e).__name__, e)

    def bucket(self, T: int) -> int:
        """The padded length for T positions (the largest bucket for more: run() splits those)."""
        for b in self.buckets:
            if b >= T:
                return b
        return self.buckets[-1]

    def forward(self, T: int) -> None:
        """The padded prefill of `T` positions from the static buffers (what a graph replays)."""
        g, m = self.gen, self.gen.model
        S = g.max_seq_len
        row, start, last = self.index[0:1], self.index[1], self.index[2:3]
        pos = start + g.positions[:T]
        at_pos = pos.clamp(max=S - 1)
        x = m.embed_prompt(self.tokens[:T], self.mask[:T])[None].to(g.dtype)
        keep = g.positions[:S][None, :] <= pos[:, None]  # [T, S]: causal, from the row's first position
        at = Attend(row, pos=at_pos, length=S, mask=keep[None, None])
        h = m.backbone(x, g.bb_rot[at_pos][None, :, None, :], g.bb_caches, at)
        g.h[row] = h[0].index_select(0, last)

    @torch.inference_mode()
    def run(self, row: int, tokens: torch.Tensor, mask: torch.Tensor, start: int) -> None:
        """Prefill prompt rows tokens/mask [T, N+1] (host tensors) into `row` at positions
        [start, start + T); leaves the last one's hidden state in the row's state."""
        big = self.buckets[-1]
        for a in range(0, tokens.shape[0], big):
            piece = slice(a, min(a + big, tokens.shape[0]))
            self._one(row, tokens[piece], mask[piece], start + a)

    def _one(self, row: int, tokens: torch.Tensor, mask: torch.Tensor, start: int) -> None:
        T = tokens.shape[0]
        Tb = self.bucket(T)
        if self._copied is not None:
            self._copied.synchronize()  # the previous piece's copy has left the host buffers
        self._tokens_host[:T] = tokens
        self._tokens_host[T:Tb] = 0
        self._mask_host[:T] = mask
        self._mask_host[T:Tb] = False
        self._index_host[0], self._index_host[1], self._index_host[2] = row, start, T - 1
        nb = self._copied is not None
        self.tokens[:Tb].copy_(self._tokens_host[:Tb], non_blocking=nb)
        self.mask[:Tb].copy_(self._mask_host[:Tb], non_blocking=nb)
        self.index.copy_(self._index_host, non_blocking=nb)
        if self._copied is not None:
            self._copied.record()
        graph = self.graphs.get(Tb)
        if graph is not None:
            graph.replay()
        else:
            self.forward(Tb)

    def capture(self) -> None:
        """One graph per bucket, largest first in one memory pool. Runs at start-up, before any
        request: the warm-up runs write junk into row 0, which its first prefill overwrites."""
        t0 = time.perf_counter()
        self.index.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for T in self.buckets:  # library handles and workspaces off-graph
                self.forward(T)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for T in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                self.forward(T)
            self.graphs[T] = graph
        torch.cuda.synchronize()
        log.info("captured %d prefill graphs (lengths %s) in %.1fs", len(self.graphs), self.buckets,
                 time.perf_counter() - t0)
