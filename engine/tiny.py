"""`tiny`: CSM's architecture scaled down, random weights from a fixed seed, no download.

It keeps 32 codebooks and the 2051-entry audio vocabulary, so every code path is the real one.
Its audio is noise-like: it proves the pipeline, not the voice.
"""

from __future__ import annotations

import torch

from .config import CsmModelConfig, RopeConfig, TransformerConfig

SEED = 1234
ROPE = RopeConfig(theta=500_000.0, kind="llama3", factor=32.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position=8192)


def tiny_config(text_vocab: int, num_codebooks: int = 32) -> CsmModelConfig:
    """tiny's shape; num_codebooks < 32 gives a model with a shorter depth loop (num_codebooks - 1
    steps a frame; Codec.tiny takes the same count): the tests that run the GPU step's kernels
    interpreted use one, since their cost is almost all depth steps."""
    if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or not 2 <= num_codebooks <= 32:
        raise ValueError(f"num_codebooks must be an int in 2..32, got {num_codebooks!r}")
    backbone = TransformerConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512,
                                 head_dim=64, max_seq_len=2048, rope=ROPE)
    depth = TransformerConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                              head_dim=32, max_seq_len=num_codebooks + 1, rope=ROPE)
    return CsmModelConfig(backbone=backbone, depth=depth, num_codebooks=num_codebooks, text_vocab=text_vocab,
                          bos_token_id=0)


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int = SEED, std: float = 0.02) -> None:
    """Deterministic init in the style of transformers: normal(0, std) matrices, unit norms."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
