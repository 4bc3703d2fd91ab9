"""Model configuration: the shapes our modules are built from, read from a transformers CsmConfig
(or engine/hf_config.py's reading of its config.json, which has the same attribute names)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# the kinds of value a config file may state: kind -> (what is allowed, in words; the test)
KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "size": ("a positive integer", lambda v: _int(v) and v > 0),
    "size?": ("a positive integer or null", lambda v: v is None or (_int(v) and v > 0)),
    "sizes": ("a non-empty list of positive integers",
              lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(x) and x > 0 for x in v)),
    "id?": ("a non-negative integer or null", lambda v: v is None or (_int(v) and v >= 0)),
    "positive": ("a positive number", lambda v: _number(v) and v > 0),
    "number": ("a number", _number),
    "finite": ("a finite number", _number),  # (the same test, as codec_config's errors word it)
    "flag": ("true or false", lambda v: isinstance(v, bool)),
    "flag?": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
    "text": ("a string", lambda v: isinstance(v, str)),
    "object?": ("an object or null", lambda v: v is None or isinstance(v, dict)),
}


def checked(name: str, value: Any, kind: str, where: str = "") -> Any:
    """`value` if it is of `kind` (numbers as floats, lists as tuples), else ValueError:
    "{where}{name} must be {what is allowed}, got {value}"."""
    allowed, ok = KINDS[kind]
    if not ok(value):
        text = repr(value)
        raise ValueError(f"{where}{name} must be {allowed}, got {text if len(text) <= 60 else text[:57] + '...'}")
    if kind in ("positive", "number", "finite"):
        return float(value)
    return tuple(value) if kind == "sizes" else value


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters exactly as a checkpoint's config states them."""

    theta: float = 500_000.0
    kind: str = "default"  # "default" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, max_position: int) -> RopeConfig:
        params = dict(params or {})
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(
                f"rope_type {kind!r} is not supported; supported: 'default', 'llama3' (CSM-1B uses 'llama3')"
            )

        def number(key: str, default: float) -> float:
            return checked(key, params.get(key, default), "positive", "rope_parameters.")

        original = number("original_max_position_embeddings", max_position)
        if original != int(original):
            raise ValueError(f"rope_parameters.original_max_position_embeddings must be an integer, got {original!r}")
        low, high = number("low_freq_factor", 1.0), number("high_freq_factor", 4.0)
        if kind == "llama3" and not low < high:
            raise ValueError(f"rope_parameters: llama3 needs low_freq_factor < high_freq_factor, got {low} and {high}")
        return cls(theta=number("rope_theta", 500_000.0), kind=kind, factor=number("factor", 1.0),
                   low_freq_factor=low, high_freq_factor=high, original_max_position=int(original))


@dataclass(frozen=True)
class TransformerConfig:
    """One Llama-style decoder stack (the backbone or the depth decoder)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            checked(name, getattr(self, name), "size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


@dataclass(frozen=True)
class CsmModelConfig:
    """Everything the engine needs to build CSM: backbone, depth decoder, vocabularies."""

    backbone: TransformerConfig
    depth: TransformerConfig
    num_codebooks: int = 32
    audio_vocab: int = 2051  # per codebook, including reserved ids
    codebook_size: int = 2048  # ids >= this are reserved (pad / special) and never sampled
    text_vocab: int = 128_256
    bos_token_id: int = 128_000
    tie_codebook_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf: Any) -> CsmModelConfig:
        """Build from a transformers ``CsmConfig`` (its attribute names are the contract)."""
        dd = hf.depth_decoder_config
        codec = getattr(hf, "codec_config", None)  # a MimiConfig, or config.json's dict (engine/hf_config.py)
        codebook_size = (codec.get("codebook_size") if isinstance(codec, dict) else
                         getattr(codec, "codebook_size", None)) or 2048
        backbone = _stack_from_hf(hf)
        try:
            depth = _stack_from_hf(dd)
        except ValueError as e:
            raise ValueError(f"depth_decoder_config: {e}") from None
        if dd.backbone_hidden_size != hf.hidden_size:
            raise ValueError(
                f"depth_decoder_config.backbone_hidden_size ({dd.backbone_hidden_size}) must equal "
                f"hidden_size ({hf.hidden_size})"
            )
        if dd.num_codebooks != hf.num_codebooks or dd.vocab_size != hf.vocab_size:
            raise ValueError("depth decoder and backbone disagree on num_codebooks or vocab_size")
        return cls(
            backbone=backbone,
            depth=depth,
            num_codebooks=hf.num_codebooks,
            audio_vocab=hf.vocab_size,
            codebook_size=min(int(codebook_size), hf.vocab_size),
            text_vocab=hf.text_vocab_size,
            bos_token_id=hf.bos_token_id if hf.bos_token_id is not None else 128_000,
            tie_codebook_embeddings=bool(hf.tie_codebooks_embeddings),
        )

    @classmethod
    def csm_1b(cls) -> CsmModelConfig:
        """csm-1b's shapes (transformers' CsmConfig defaults, as engine/hf_config.py states them)."""
        from .hf_config import read

        return cls.from_hf(read({}))

    @property
    def frame_rate(self) -> float:
        return 12.5

    def default_max_frames(self, text_chars: int) -> int:
        """Length cap for a text when the caller gives none: generous for slow speech (~8 chars/s)
        plus one second, so a model that never emits end-of-speech still stops."""
        return int(self.frame_rate + math.ceil(1.6 * text_chars))


def _stack_from_hf(c: Any) -> TransformerConfig:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    params = getattr(c, "rope_parameters", None)
    if params is None:  # older transformers spelling
        params = dict(getattr(c, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(c, "rope_theta", 500_000.0))
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {c.hidden_act!r} is not supported; CSM uses 'silu'")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("attention_bias / mlp_bias checkpoints are not supported; CSM has no biases")
    return TransformerConfig(
        dim=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        ffn_dim=c.intermediate_size,
        head_dim=head_dim,
        max_seq_len=c.max_position_embeddings,
        norm_eps=c.rms_norm_eps,
        rope=RopeConfig.from_hf(params, c.max_position_embeddings),
    )
