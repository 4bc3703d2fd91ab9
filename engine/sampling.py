"""Top-k + temperature sampling, the rule every step implements (this file is its reference).

The draw for one row and one codebook:
1. the candidates are the row's k best codes in the order (logit descending, code id ascending), so
   ties at the k-th place go to the lower code id;
2. each candidate gets Gumbel noise keyed by (request seed, frame counter, codebook, code id);
3. the code is argmax(logit / temperature + noise) over the candidates, ties to the lower code id.
With continuous noise this is an exact draw from softmax(logits / T) restricted to the top k
(the Gumbel-max trick); k == 1 is greedy (argmax, first index on ties).

Noise is counter-based (a hash, not generator state): a seeded request gives the same frames
whatever else shares its batch, and the step needs no per-slot generator objects (CUDA-graph
friendly). Keying by code id rather than by rank lets a kernel draw without sorting: it only needs
the k-th largest logit as a threshold (kernels/triton_ops.sample). The hash picks one of 2**16
Gumbel quantiles from a table that every implementation shares (torch here, the numba CPU step,
the Triton kernel), so all of them draw bit-identical noise: no transcendental function whose last
bit differs between libraries can flip a draw between the eager, CPU and GPU paths. Quantising the
uniform to 16 bits caps the noise at about 11.8 (a true Gumbel exceeds it with probability 8e-6).
"""

from __future__ import annotations

import functools

import torch

NOISE_BITS = 16
_M32 = 0xFFFFFFFF
# The temperatures a step is given: every step holds them in float32 and divides the logits by them,
# so a request's temperature is clamped into this range (engine.Engine._validate). Below 1e-6 float32
# runs out (1e-40 is subnormal, under 1.4e-45 it is 0: the CPU step raised ZeroDivisionError for the
# whole batch, a GPU row would get inf / nan scores) and the draw is already greedy: the noise spans
# under 15, so any logit gap over 1.5e-5 decides. Above 1e30 float32 overflows (3.4e38 raised in the
# prefill) and the draw is already uniform over the top k: the logits add nothing the noise can feel.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e30


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3 finaliser on int64 tensors holding 32-bit values
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def noise_index(seed: torch.Tensor, counter: torch.Tensor, codebook, code: torch.Tensor) -> torch.Tensor:
    """The table index (0 .. 2**NOISE_BITS - 1) for each (seed, counter, codebook, code); int64
    tensors (codebook may be an int), broadcast together."""
    s_lo, s_hi, c = seed & _M32, (seed >> 32) & _M32, counter & _M32
    h = _fmix32((s_lo * 0x9E3779B1 + c) & _M32)
    h = _fmix32(((h ^ s_hi) * 0x27D4EB2F + codebook * 0x165667B1 + code) & _M32)
    h = _fmix32(h ^ (c * 0x61C88647 & _M32))
    return h >> (32 - NOISE_BITS)


@functools.lru_cache(maxsize=8)
def gumbel_table(device: str = "cpu") -> torch.Tensor:
    """float32 [2**NOISE_BITS]: the Gumbel(0, 1) quantile at the middle of each of 2**NOISE_BITS equal
    slices of (0, 1), computed in float64 and rounded once (identical wherever it is used)."""
    n = 1 << NOISE_BITS
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (-torch.log(-torch.log(u))).float().to(device)


def gumbel(seed: torch.Tensor, counter: torch.Tensor, codebook, code: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (float32) for each (seed, counter, codebook, code), broadcast together."""
    return gumbel_table(str(code.device))[noise_index(seed, counter, codebook, code)]


def sample(logits: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor, kmax: int,
           seed: torch.Tensor | None = None, counter: torch.Tensor | None = None, codebook: int = 0) -> torch.Tensor:
    """Draw one code per row by the rule above.

    logits [B, V] float32 (reserved ids left out or at -inf); temperature [B] float; topk [B] int64,
    each in 1..kmax; kmax: host int, the largest k in the batch (1: all greedy, seed and counter
    unused); seed/counter [B] int64: each row's request seed and frame counter; codebook: which of
    the frame's codebooks this is. Returns [B] int64.
    """
    if kmax == 1:
        return logits.argmax(dim=-1)
    V = logits.shape[-1]
    cand = logits.sort(dim=-1, descending=True, stable=True).indices[:, :kmax]  # ties: lower id first
    ranks = torch.arange(cand.shape[1], device=logits.device)
    noise = gumbel(seed[:, None], counter[:, None], codebook, cand)
    scores = logits.gather(-1, cand) / temperature[:, None] + noise
    scores = scores.masked_fill(ranks[None, :] >= topk[:, None], float("-inf"))
    best = scores.max(dim=-1, keepdim=True).values
    return torch.where(scores == best, cand, V).min(dim=-1).values  # equal scores: the lower code id
