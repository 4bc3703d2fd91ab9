"""Rotary position embeddings: inverse frequencies (default and Llama-3 scaling), applied as a
complex multiply on interleaved pairs.

transformers rotates half-split pairs (i, i + hd/2). We permute the q and k projection rows once
at load time (`interleave_rows`) so each pair sits side by side; q.k is unchanged by a permutation
applied to both, and the rotation becomes one complex multiply instead of four ops.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with Llama-3 scaling when the config asks."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "default":
        return inv
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_table(rope: RopeConfig, head_dim: int, max_pos: int) -> torch.Tensor:
    """Unit complex rotations [max_pos, head_dim // 2] (complex64), angle = position * inv_freq."""
    inv = inv_frequencies(rope, head_dim)
    angles = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_(x: torch.Tensor, rot: torch.Tensor) -> None:
    """Rotate x in place. x: [B, T, H, hd] with interleaved pairs (a view of the qkv buffer);
    rot: [B|1, T, 1, hd/2] complex64."""
    if x.dtype == torch.float32:
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rot)
    else:  # half types: rotate in float32, like the reference, then store back
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        x.copy_(torch.view_as_real(xc * rot).flatten(-2))


def interleave_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute a q or k projection [n_heads * hd, D] from half-split to interleaved pair order."""
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return w.view(n_heads, head_dim, -1)[:, order].reshape(n_heads * head_dim, -1)
