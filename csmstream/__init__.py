"""csm-stream: real-time streaming text-to-speech for Sesame's CSM-1B.

    import csmstream
    eng = csmstream.load("tiny")          # or a checkpoint directory, or "sesame/csm-1b"
    for codes in eng.frames("Hello there."):  # np.int64 (32,), one per 80 ms frame
        ...
    async with csmstream.Streamer(eng) as tts:  # many concurrent streams, one batched step a frame
        async for pcm in tts.stream("Hi."):     # np.int16, 1920 samples a frame
            ...
        async for pcm in tts.stream_text(llm_pieces()):  # text as it is written, sentence by sentence
            ...

Heavy modules (torch) load on first use, not at import; transformers is not needed at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "Engine", "Segment", "CheckpointError", "DeviceMemoryError", "Streamer", "Busy", "GenerationError",
           "StreamerClosed", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .engine.engine import Engine
    from .engine.loader import load
    from .engine.memory import DeviceMemoryError
    from .engine.prompt import Segment
    from .engine.weights import CheckpointError
    from .streamer import Busy, GenerationError, Streamer, StreamerClosed

_LAZY = {
    "load": ("csmstream.engine.loader", "load"),
    "Engine": ("csmstream.engine.engine", "Engine"),
    "Segment": ("csmstream.engine.prompt", "Segment"),
    "CheckpointError": ("csmstream.engine.weights", "CheckpointError"),
    "DeviceMemoryError": ("csmstream.engine.memory", "DeviceMemoryError"),  # max_streams too many for the device
    "Streamer": ("csmstream.streamer", "Streamer"),  # many streams of one engine, batched (embedded use)
    "Busy": ("csmstream.streamer", "Busy"),
    "GenerationError": ("csmstream.streamer", "GenerationError"),
    "StreamerClosed": ("csmstream.streamer", "StreamerClosed"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'csmstream' has no attribute {name!r}")
