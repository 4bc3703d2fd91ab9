"""Load a transformers-format CSM checkpoint (the layout of sesame/csm-1b) onto our modules.

A directory holds config.json, model.safetensors (or shards + model.safetensors.index.json) and
the tokenizer files. Every problem is a CheckpointError naming the file and tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import CsmModelConfig
from .rope import interleave_rows


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is missing or does not fit the model."""


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_LAYER = re.compile(r"^(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)$")
_STACK = {"backbone_model": "backbone", "depth_decoder.model": "depth"}
_PLAIN = {
    "embed_text_tokens.weight": "text_embed.weight",
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embed.weight",
    "backbone_model.norm.weight": "backbone.norm.weight",
    "lm_head.weight": "c0_head.weight",
    "depth_decoder.model.embed_tokens.weight": "depth_embed.weight",
    "depth_decoder.model.inputs_embeds_projector.weight": "depth_proj.weight",
    "depth_decoder.model.norm.weight": "depth.norm.weight",
    "depth_decoder.codebooks_head.weight": "depth_heads",
}
# per-layer: checkpoint suffix -> (our suffix, part index within a fused tensor)
_IN_LAYER = {
    "self_attn.q_proj.weight": ("attn.wqkv.weight", 0),
    "self_attn.k_proj.weight": ("attn.wqkv.weight", 1),
    "self_attn.v_proj.weight": ("attn.wqkv.weight", 2),
    "self_attn.o_proj.weight": ("attn.wo.weight", 0),
    "mlp.gate_proj.weight": ("ffn.w13.weight", 0),
    "mlp.up_proj.weight": ("ffn.w13.weight", 1),
    "mlp.down_proj.weight": ("ffn.w2.weight", 0),
    "input_layernorm.weight": ("attn_norm.weight", 0),
    "post_attention_layernorm.weight": ("ffn_norm.weight", 0),
}
_PARTS = {"attn.wqkv.weight": 3, "ffn.w13.weight": 2}


def map_key(key: str) -> tuple[str, int] | None:
    """Checkpoint tensor name -> (our parameter name, part index), or None if unknown."""
    if key in _PLAIN:
        return _PLAIN[key], 0
    m = _LAYER.match(key)
    if m and m.group(3) in _IN_LAYER:
        ours, part = _IN_LAYER[m.group(3)]
        return f"{_STACK[m.group(1)]}.layers.{m.group(2)}.{ours}", part
    return None


def read_config(path: Path):
    """A checkpoint directory's config.json as CsmConfig's attributes (engine/hf_config.py: no
    transformers import), with a clear error when it is not one."""
    from .hf_config import read

    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a CSM checkpoint directory needs config.json")
    try:
        raw = json.loads(file.read_text())
    except (ValueError, RecursionError) as e:  # (RecursionError: nesting past json's limit)
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != "csm":
        raise CheckpointError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'csm'")
    try:
        return read(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def shard_files(path: Path) -> list[Path]:
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{path / INDEX}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX}: weight_map must be a non-empty object of tensor name -> "
                                  f"shard file name, got {str(weight_map)[:60]!r}")
        for name in set(weight_map.values()):  # shards sit beside the index: a name, not a path
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(f"{path / INDEX}: weight_map names shard {name!r:.60}; expected a file "
                                      "name in the checkpoint directory")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in {INDEX})")
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX}; expected a transformers-format checkpoint")


def read_tensors(path: Path) -> tuple[dict[str, tuple[torch.Tensor, Path]], dict[str, torch.Tensor]]:
    """All tensors of a checkpoint: (csm tensors by name with their file, codec tensors)."""
    from safetensors import SafetensorError, safe_open

    csm: dict[str, tuple[torch.Tensor, Path]] = {}
    codec: dict[str, torch.Tensor] = {}
    for file in shard_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.startswith("codec_model."):
                        codec[key[len("codec_model.") :]] = f.get_tensor(key)
                    else:
                        csm[key] = (f.get_tensor(key), file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return csm, codec


def build_state_dict(cfg: CsmModelConfig, expected: dict[str, torch.Size], tensors) -> dict[str, torch.Tensor]:
    """Map checkpoint tensors to our names, fusing q/k/v and gate/up; check names and shapes."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, (t, file) in tensors.items():
        mapped = map_key(key)
        if mapped is None:
            raise CheckpointError(f"{file}: unknown tensor {key!r}; this is not a CSM checkpoint layout")
        name, part = mapped
        if name not in expected:
            raise CheckpointError(f"{file}: tensor {key!r} does not fit config.json (no such layer there)")
        parts.setdefault(name, {})[part] = (t, file, key)
    if cfg.tie_codebook_embeddings:  # one of the tied pair may be left out of the file
        for a, b in (("audio_embed.weight", "depth_embed.weight"), ("depth_embed.weight", "audio_embed.weight")):
            if a in parts and b not in parts:
                parts[b] = parts[a]
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        got = parts.get(name, {})
        need = next((k for suffix, k in _PARTS.items() if name.endswith(suffix)), 1)
        if len(got) < need:
            raise CheckpointError(f"checkpoint is missing the tensor(s) for {name!r} ({_origin(name)})")
        pieces = [got[i][0] for i in range(need)]
        if name.endswith("attn.wqkv.weight"):  # q, k rows to interleaved rotary pairs
            c = cfg.backbone if name.startswith("backbone.") else cfg.depth
            pieces = _interleave_qk(pieces, c)
        t = pieces[0] if need == 1 else torch.cat(pieces, dim=0)
        if t.shape != shape:
            file, key = got[0][1], got[0][2]
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {tuple(pieces[0].shape)}, which does not fit {name} "
                f"{tuple(shape)} built from config.json"
            )
        state[name] = t
    return state


def _interleave_qk(pieces: list[torch.Tensor], c) -> list[torch.Tensor]:
    q, k, v = pieces
    if q.shape[0] != c.n_heads * c.head_dim or k.shape[0] != c.n_kv_heads * c.head_dim:
        return pieces  # wrong shape: the shape check below names it
    return [interleave_rows(q, c.n_heads, c.head_dim), interleave_rows(k, c.n_kv_heads, c.head_dim), v]


def _origin(name: str) -> str:
    for k, v in _PLAIN.items():
        if v == name:
            return k
    m = re.match(r"^(backbone|depth)\.layers\.(\d+)\.(.+)$", name)
    if m:
        stack = {v: k for k, v in _STACK.items()}[m.group(1)]
        srcs = [s for s, (o, _) in _IN_LAYER.items() if o == m.group(3)]
        return ", ".join(f"{stack}.layers.{m.group(2)}.{s}" for s in srcs)
    return name


def check_source(model: str) -> Path | None:
    """The local checkpoint directory `model` names, or None for a hub id (nothing fetched yet).

    Raises:
        CheckpointError: `model` is a file, or neither a directory nor shaped like a hub id.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model}: is a file; pass the checkpoint directory that holds it")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", model):
        raise CheckpointError(
            f"{model!r}: no such directory, and not a hub id like 'sesame/csm-1b'. Pass 'tiny', a "
            "transformers-format checkpoint directory, or a hub id"
        )
    return None


def resolve(model: str) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub when a network and token allow."""
    path = check_source(model)
    if path is not None:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    local_hint = (
        f"Download it on a machine that can (e.g. `hf download {model} --include '*.json' '*.safetensors' "
        "--local-dir csm-1b`) and pass the directory instead: csmstream.load('/path/to/csm-1b') or "
        "`--model /path/to/csm-1b`"
    )
    try:
        got = snapshot_download(
            model,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
        )
    except GatedRepoError:
        raise CheckpointError(
            f"{model}: the repository is gated. Accept its licence on the hub and set HF_TOKEN, or: {local_hint}"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{model}: no such repository on the hub (or it is private). {local_hint}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"{model}: could not fetch from the hub; this machine is offline or the hub is unreachable "
            f"({type(e).__name__}). {local_hint}"
        ) from None
    return Path(got)
