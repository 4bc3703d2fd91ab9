"""A checkpoint's config.json read as transformers' CsmConfig reads it, without importing transformers.

Importing transformers' CsmConfig costs a checkpoint load ~2 s on a 2-core machine (more than the
rest of its Python start-up after torch), only to read one JSON file. `read()` gives the attribute
names `CsmModelConfig.from_hf` takes, with transformers' defaults for what a file leaves out and
its spelling rules (`codebook_size` for `vocab_size`; old `rope_scaling` + `rope_theta` folded into
`rope_parameters`). tests/engine/test_hf_config.py holds both to transformers' CsmConfig.

Every value is type-checked here, so a bad file is refused naming the field and what it allows.
The codec's part (`codec_config`) stays a dict: MimiSpec.from_config reads and checks it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from .config import checked

DEFAULT_THETA = 500_000.0  # transformers' CsmConfig.default_theta (both stacks)


# name -> (kind, transformers' default). Only what the engine reads; other keys are left alone.
_STACK = {
    "num_codebooks": ("size", 32),
    "vocab_size": ("size", 2051),
    "intermediate_size": ("size", 8192),
    "head_dim": ("size?", None),
    "hidden_act": ("text", "silu"),
    "rms_norm_eps": ("positive", 1e-5),
    "attention_bias": ("flag", False),
    "mlp_bias": ("flag", False),
}
BACKBONE = {
    **_STACK,
    "hidden_size": ("size", 2048),
    "num_hidden_layers": ("size", 16),
    "num_attention_heads": ("size", 32),
    "num_key_value_heads": ("size?", 8),
    "max_position_embeddings": ("size", 2048),
    "text_vocab_size": ("size", 128_256),
    "bos_token_id": ("id?", 128_000),
    "tie_codebooks_embeddings": ("flag?", True),
}
DEPTH = {
    **_STACK,
    "backbone_hidden_size": ("size", 2048),
    "hidden_size": ("size", 1024),
    "num_hidden_layers": ("size", 4),
    "num_attention_heads": ("size", 8),
    "num_key_value_heads": ("size?", 2),
    "max_position_embeddings": ("size", 33),
}


def read(raw: dict) -> SimpleNamespace:
    """config.json's object -> CsmConfig's attributes (`depth_decoder_config` nested the same way,
    `codec_config` a dict). Raises ValueError naming the field for a value of the wrong kind."""
    top = _stack(raw, BACKBONE, "")
    top.depth_decoder_config = _stack(_object(raw, "depth_decoder_config", ""), DEPTH, "depth_decoder_config.")
    top.codec_config = _object(raw, "codec_config", "")
    return top


def _object(raw: dict, name: str, where: str) -> dict:
    return dict(checked(name, raw.get(name), "object?", where) or {})


def _stack(raw: dict, fields: dict, where: str) -> SimpleNamespace:
    if "vocab_size" not in raw and "codebook_size" in raw:  # CsmConfig's attribute_map spelling
        raw = {**raw, "vocab_size": raw["codebook_size"]}
    out: dict[str, Any] = {}
    for name, (kind, default) in fields.items():
        out[name] = checked(name, raw.get(name, default), kind, where)
    # transformers' order: rope_scaling (the old name) over rope_parameters; rope_theta beside them as the default
    rope = _object(raw, "rope_scaling", where) or _object(raw, "rope_parameters", where)
    rope.setdefault("rope_theta", checked("rope_theta", raw.get("rope_theta", DEFAULT_THETA), "number", where))
    out["rope_parameters"] = rope
    return SimpleNamespace(**out)

