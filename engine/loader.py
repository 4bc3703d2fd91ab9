"""csmstream.load(): resolve a model name to an Engine on a device and dtype."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import memory
from .config import CsmModelConfig
from .engine import Engine
from .model import CSM
from .quant import check_mode, quantize_depth_
from .tokenizer import TextTokenizer
from .weights import (
    CheckpointError,
    build_state_dict,
    check_source,
    read_config,
    read_tensors,
    resolve,
    shard_files,
)

log = logging.getLogger("csmstream.engine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):  # (as PyTorch users pass it)
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string: 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available here; use 'cpu' or 'auto'")
    return dev


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):  # torch.bfloat16 for "bfloat16", and so on
        dtype = next((name for name, dt in DTYPES.items() if dt == dtype), str(dtype))
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[dtype]


def check_load_args(model, device="auto", dtype="auto", max_streams=None, cuda_graphs=None, quantize=None):
    """load()'s arguments checked without loading anything (a server checks them before it binds
    its port): returns (device, dtype, max_streams, quantize) as load() will use them.

    Raises:
        ValueError: as load() does for a bad argument; CheckpointError for a local path that is
            not a directory (a hub id is only fetched by load()).
    """
    if not isinstance(model, (str, Path)) or not str(model):
        raise ValueError(f"model must be 'tiny', a checkpoint directory or a hub id, got {model!r}")
    quantize = check_mode(quantize)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if max_streams is None:
        max_streams = 64 if dev.type == "cuda" else 4
    if isinstance(max_streams, bool) or not isinstance(max_streams, int) or not 1 <= max_streams <= 1024:
        raise ValueError(f"max_streams must be an integer in 1..1024, got {max_streams!r}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True, False or None (the default: env CSM_CUDA_GRAPHS), got "
                         f"{cuda_graphs!r:.40}")
    if str(model) != "tiny":
        check_source(str(model))
    return dev, dt, max_streams, quantize


def load(model: str = "tiny", device: str = "auto", dtype: str = "auto", *,
         max_streams: int | None = None, cuda_graphs: bool | None = None, quantize: str | None = None) -> Engine:
    """Load a CSM model and return an Engine.

    Args:
        model: "tiny" (embedded, random weights, no download), a transformers-format checkpoint
            directory, or a hub id such as "sesame/csm-1b" (needs a network and an accepted licence).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N" (or a torch.device).
        dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16" or "float16" (or that
            torch.dtype).
        max_streams: concurrent streams (KV-cache slots); default 4 on CPU, 64 on GPU.
        cuda_graphs: on CUDA, capture the frame step and the streaming decode as one CUDA graph per
            batch bucket at load time (None: on unless env CSM_CUDA_GRAPHS=0). False runs the same
            step eagerly (identical results, more launch overhead). Ignored on CPU.
        quantize: None (default) or "int8-depth": weight-only int8 for the depth decoder (one
            scale per output row), which halves the bytes a small-batch GPU frame reads; the model
            then computes with the rounded weights on every path. Speeds up only the fused
            small-batch GPU kernels; no speed-up on CPU.

    Raises:
        ValueError: bad argument; CheckpointError (a ValueError) for a bad or unreachable checkpoint;
            DeviceMemoryError (a ValueError) when max_streams' KV caches do not fit in the device's
            free memory (it says how many do).
    """
    dev, dt, max_streams, quantize = check_load_args(model, device, dtype, max_streams, cuda_graphs, quantize)
    t0 = time.perf_counter()
    if str(model) == "tiny":
        net, tok, name, codec = _load_tiny(dev, dt)
    else:
        net, tok, name, codec = _load_checkpoint(resolve(str(model)), dev, dt)
        if check_source(str(model)) is None:  # a hub id: named so, not by its snapshot's folder (a commit hash)
            name = str(model)
    if quantize == "int8-depth":
        quantize_depth_(net)
    per_stream = memory.stream_bytes(net.cfg, dt)
    memory.check_fits(max_streams, per_stream, memory.free_bytes(dev), dev)  # before the caches are allocated
    try:
        engine = Engine(net, tok, name=name, max_streams=max_streams, codec=codec, cuda_graphs=cuda_graphs)
    except torch.OutOfMemoryError as e:  # past the caches: graphs' pool, the codec's states
        raise memory.out_of_memory(max_streams, per_stream, dev, e) from None
    log.info("loaded %s on %s/%s%s in %.2fs", engine.name, dev, str(dt).removeprefix("torch."),
             f" ({quantize})" if quantize else "", time.perf_counter() - t0)
    return engine


def _load_tiny(dev, dt):
    from .tiny import init_random, tiny_config

    tok = TextTokenizer.tiny()
    cfg = tiny_config(tok.vocab_size)
    with torch.device("cpu"):
        model = CSM(cfg)
    init_random(model)
    model = model.to(device=dev, dtype=dt).eval()
    return model, tok, "tiny", _tiny_codec(dev)


def _load_checkpoint(path: Path, dev, dt):
    hf = read_config(path)
    try:
        cfg = CsmModelConfig.from_hf(hf)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    size = sum(f.stat().st_size for f in shard_files(path))
    log.info("loading %s: %.2f GB of weights onto %s/%s ...", path, size / 1e9, dev, str(dt).removeprefix("torch."))
    tok = TextTokenizer.from_dir(path)
    if tok.vocab_size > cfg.text_vocab:
        raise CheckpointError(f"{path / 'tokenizer.json'}: {tok.vocab_size} tokens, but the model's "
                              f"text vocabulary is {cfg.text_vocab}")
    with torch.device("meta"):
        model = CSM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors, codec_state = read_tensors(path)
    state = build_state_dict(cfg, expected, tensors)
    model.load_state_dict(state, assign=True, strict=True)
    model.audio_offsets = torch.arange(cfg.num_codebooks) * cfg.audio_vocab
    if cfg.tie_codebook_embeddings:
        model.depth_embed = model.audio_embed
    model = model.to(device=dev, dtype=dt).eval()
    return model, tok, path.name, _checkpoint_codec(hf, codec_state, path, dev)


def _tiny_codec(dev):
    from .codec import Codec

    return Codec.tiny(dev)


def _checkpoint_codec(hf, state, path, dev):
    from .codec import Codec

    return Codec.from_state(hf.codec_config, state, dev, hf.num_codebooks, str(path))
