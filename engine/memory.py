"""What a stream costs in device memory, and load()'s check that max_streams of them fit.

A stream's slot holds the backbone's KV cache over its whole context (csm-1b in bf16: 16 layers x
2048 positions x 8 KV heads x 64 x 2 x 2 bytes = 64 MiB) and the depth decoder's over one frame.
At max_streams=1024 that is 69 GB, more than an H100 has: without this check such a load ran
through the weights and then died in torch.zeros with an out-of-memory traceback. Now it is refused
before the cache is allocated, with the number of streams that do fit.
"""

from __future__ import annotations

import logging

import torch

from .config import CsmModelConfig

log = logging.getLogger("csmstream.engine")
HEADROOM = 0.9  # of the free memory for the caches; the rest: CUDA graphs' pool, the codec's states, prefill


class DeviceMemoryError(ValueError):
    """The engine does not fit in the device's memory at these settings (a ValueError: the
    CLI says it in one line, like a bad argument)."""


def stream_bytes(cfg: CsmModelConfig, dtype: torch.dtype) -> int:
    """Bytes of KV cache one stream's slot holds (FrameGenerator's caches, per row)."""
    bb, dd = cfg.backbone, cfg.depth
    elements = (bb.n_layers * bb.max_seq_len * 2 * bb.n_kv_heads * bb.head_dim
                + dd.n_layers * cfg.num_codebooks * 2 * dd.n_kv_heads * dd.head_dim)
    return elements * torch.empty((), dtype=dtype).element_size()


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`: the GPU's free memory, or for the CPU the host's
    MemAvailable, or what the process's cgroup (a container's limit) leaves, whichever is less;
    None where it cannot be told."""
    if device.type == "cuda":  # (plus what torch's allocator holds in reserve, free to it)
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    return host_free()


def host_free(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    figures = []
    try:
        with open(meminfo) as f:
            figures += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    # cgroup v2 (memory.max: bytes or "max"), then v1 (an unlimited limit is a huge number)
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):
        try:
            with open(f"{cgroup}/{limit}") as a, open(f"{cgroup}/{usage}") as b:
                cap, used = a.read().strip(), int(b.read().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 2**60:
            figures.append(max(int(cap) - used, 0))
        break
    return min(figures) if figures else None


def check_fits(max_streams: int, per_stream: int, free: int | None, device) -> None:
    """Refuse max_streams whose caches cannot fit in `free` bytes; warn when they leave little over.

    Raises:
        DeviceMemoryError: naming what is needed, what is free and how many streams fit.
    """
    need = max_streams * per_stream
    log.info("KV cache: %d stream%s x %s = %s on %s%s", max_streams, "s" * (max_streams != 1), _size(per_stream),
             _size(need), device, f" ({_size(free)} free)" if free is not None else "")
    if free is None or need <= free * HEADROOM:
        return
    fit = int(free * HEADROOM // per_stream)
    advice = (f"at most {fit} fit with room for the rest: lower max_streams (serve --max-streams {fit})" if fit
              else "not even one fits: free memory on it, or use a device with more")
    if need > free:
        raise DeviceMemoryError(f"max_streams={max_streams} needs {_size(need)} of KV cache on {device} "
                                f"({_size(per_stream)} a stream), but only {_size(free)} is free there; {advice}")
    log.warning("max_streams=%d takes %s of the %s free on %s for KV cache, leaving little for CUDA graphs and "
                "the codec; if the load runs out of memory, lower it to %d", max_streams, _size(need), _size(free),
                device, fit)


def out_of_memory(max_streams: int, per_stream: int, device, error: BaseException) -> DeviceMemoryError:
    """The error for an out-of-memory while building the engine (past the cache: graphs, codec)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DeviceMemoryError(f"out of memory on {device} building the engine for max_streams={max_streams} "
                             f"({_size(max_streams * per_stream)} of it KV cache): lower max_streams "
                             f"(serve --max-streams) ({first})")


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
