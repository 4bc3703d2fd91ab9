"""Top-k + temperature sampling on device, with no host sync.

Randomness is counter-based: the noise for (slot seed, frame index, codebook, candidate rank) is a
hash, not generator state. So a seeded request gives the same frames whatever else shares its batch,
and the step needs no per-slot generator objects (and stays CUDA-graph friendly).
Sampling uses the Gumbel-max trick over the top-k candidates: argmax(logits / T + G) with G ~ Gumbel
is an exact draw from softmax(logits / T) restricted to the top k.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3 finaliser on int64 tensors holding 32-bit values
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def gumbel_noise(seed: torch.Tensor, counter: torch.Tensor, n_codebooks: int, k: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, n_codebooks, k] from per-row seed [B] and counter [B] (int64)."""
    dev = seed.device
    s_lo = (seed & _M32)[:, None, None]
    s_hi = ((seed >> 32) & _M32)[:, None, None]
    c = (counter & _M32)[:, None, None]
    cb = torch.arange(n_codebooks, device=dev)[None, :, None]
    r = torch.arange(k, device=dev)[None, None, :]
    h = _fmix32((s_lo * 0x9E3779B1 + c) & _M32)
    h = _fmix32((h ^ s_hi) * 0x27D4EB2F + cb * 0x165667B1 + r & _M32)
    h = _fmix32(h ^ (c * 0x61C88647 & _M32))
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    topk: torch.Tensor,
    kmax: int,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Draw one code per row.

    logits [B, V] with reserved ids already at -inf; temperature [B] float; topk [B] int64 (each
    <= kmax); kmax: host int, the largest k in the batch; noise [B, >= kmax] Gumbel or None when
    kmax == 1 (greedy). Returns [B] int64.
    """
    if kmax == 1:
        return logits.argmax(dim=-1)
    vals, idx = logits.topk(kmax, dim=-1)  # [B, kmax], sorted descending
    ranks = torch.arange(kmax, device=logits.device)
    scores = (vals / temperature[:, None]).masked_fill(ranks[None, :] >= topk[:, None], float("-inf"))
    choice = (scores + noise[:, :kmax]).argmax(dim=-1, keepdim=True)
    return idx.gather(-1, choice)[:, 0]
