"""Measured tiles for the fused GEMV kernels: a table from bench/gemv_sweep.py, named by env var.

    CSM_GEMV_TILES=gemv_sweep.json csm-stream serve ...

`pick_tiles()` (kernels/triton_gemv.py) guesses tiles from a projection's shape. A sweep on the GPU
that will serve times a grid of tiles for every projection of csm-1b and records the fastest
(`best_tiles` of each case in its JSON: BLOCK_N, BLOCK_K, num_warps and, for a software-pipelined K
loop, its stages, then for a split K loop its splits). With CSM_GEMV_TILES naming that file, the kernels use the
measured tiles wherever the table has the shape (rows rounded up to a power of two, as the kernels
round them; K; output columns; matrices read at once; int8 or not) and the guess elsewhere. So one
GPU session can sweep and run the engine on the result without a code change in between.
A file that cannot be read or has no usable cases is an error naming the variable and the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "CSM_GEMV_TILES"
MAX_STAGES = 8
MAX_SPLITS = 16  # split K: programs that share one output tile, each over its own K range
Key = tuple[int, int, int, int, bool]  # (rows rounded up to a power of two, K, columns, mats, int8)
_loaded: dict[str, dict[Key, tuple[int, ...]]] = {}


def key(rows: int, K: int, N: int, mats: int, int8: bool) -> Key:
    return 1 << max(0, rows - 1).bit_length(), int(K), int(N), int(mats), bool(int8)


def _valid_tiles(t) -> bool:
    """[BLOCK_N, BLOCK_K, num_warps] (powers of two: Triton blocks and warps), optionally with the K
    loop's pipeline stages (1..MAX_STAGES) after them, and then its splits (1..MAX_SPLITS)."""
    return (isinstance(t, list) and len(t) in (3, 4, 5)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in t)
            and all(v > 0 and v & (v - 1) == 0 for v in t[:3]) and (len(t) < 4 or 1 <= t[3] <= MAX_STAGES)
            and (len(t) < 5 or 1 <= t[4] <= MAX_SPLITS))


def load(path: str) -> dict[Key, tuple[int, ...]]:
    """The table in a gemv_sweep JSON: {key: (BLOCK_N, BLOCK_K, num_warps[, stages[, splits]])}."""
    where = f"{ENV}={path}"
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{where}: cannot read the file ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    cases = doc.get("cases") if isinstance(doc, dict) else None
    if not isinstance(cases, list):
        raise ValueError(f"{where}: expected bench/gemv_sweep.py's JSON, an object with a list of 'cases'")
    table = {}
    for i, c in enumerate(cases):
        fields = ("rows", "K", "cols", "mats", "int8", "best_tiles")
        if not isinstance(c, dict) or any(f not in c for f in fields):
            raise ValueError(f"{where}: case {i} lacks one of {', '.join(fields)} (written by an older gemv_sweep?)")
        if not _valid_tiles(c["best_tiles"]):
            raise ValueError(f"{where}: case {i} has best_tiles {c['best_tiles']!r}; expected three powers of two "
                             f"[BLOCK_N, BLOCK_K, num_warps], optionally then stages 1..{MAX_STAGES} "
                             f"and then splits 1..{MAX_SPLITS}")
        table[key(c["rows"], c["K"], c["cols"], c["mats"], c["int8"])] = tuple(c["best_tiles"])
    if not table:
        raise ValueError(f"{where}: the file has no cases")
    return table


def measured(rows: int, K: int, N: int, mats: int, int8: bool) -> tuple[int, ...] | None:
    """The measured tiles for this shape from the table CSM_GEMV_TILES names (None: not set, or the
    table has no such shape). The file is read once per process."""
    path = os.environ.get(ENV, "").strip()
    if not path:
        return None
    if path not in _loaded:
        _loaded[path] = load(path)
    return _loaded[path].get(key(rows, K, N, mats, int8))
