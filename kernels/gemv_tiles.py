"""Measured tiles for the fused GEMV kernels: tables from bench/gemv_sweep.py.

`pick_tiles()` (kernels/triton_gemv.py) guesses tiles from a projection's shape. A sweep on a GPU
times a grid of tiles for every projection of csm-1b and records the fastest (`best_tiles` of each
case in its JSON: BLOCK_N, BLOCK_K, num_warps and, for a software-pipelined K loop, its stages,
then for a split K loop its splits). A table has the tiles wherever it has the shape (rows rounded
up to a power of two, as the kernels round them; K; output columns; matrices read at once; int8 or
not); the guess serves the other shapes. Which table, in order:

- env CSM_GEMV_TILES=FILE: that sweep's JSON, e.g. one just measured on this GPU
  (`CSM_GEMV_TILES=gemv_sweep.json csm-stream serve ...`: sweep, then serve, no code change);
- else the built-in table for this GPU: kernels/tiles/*.json, each a sweep's best tiles on one
  device model (its "device" is torch.cuda.get_device_name()'s; `python bench/gemv_sweep.py
  --builtin SWEEP.json` writes one from a sweep);
- CSM_GEMV_TILES=guess: no table, the guess everywhere.

A file that cannot be read or has no usable cases is an error naming where it came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "CSM_GEMV_TILES"
GUESS = "guess"  # CSM_GEMV_TILES=guess: no table
BUILTIN = Path(__file__).resolve().parent / "tiles"
MAX_STAGES = 8
MAX_SPLITS = 16  # split K: programs that share one output tile, each over its own K range
DOT_MIN = 16  # a dot tile (sixth entry 1, tl.dot on tensor cores): tl.dot's smallest BLOCK_N and BLOCK_K
Key = tuple[int, int, int, int, bool]  # (rows rounded up to a power of two, K, columns, mats, int8)
_loaded: dict[str, dict[Key, tuple[int, ...]]] = {}
_builtin: dict[str, Path] | None = None  # device name -> its built-in table


def key(rows: int, K: int, N: int, mats: int, int8: bool) -> Key:
    return 1 << max(0, rows - 1).bit_length(), int(K), int(N), int(mats), bool(int8)


def tile_args(tiles: tuple) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, stages, splits, dot) of a 3- to 6-tuple of tiles (stages and
    splits 1, dot 0 when absent). A ValueError says what is wrong with a malformed one."""
    if len(tiles) not in (3, 4, 5, 6) or not all(isinstance(v, int) and v >= 1 for v in tiles[:5]) \
            or len(tiles) == 6 and not isinstance(tiles[5], int):
        raise ValueError("tiles must be (BLOCK_N, BLOCK_K, num_warps[, stages[, splits[, dot]]]) positive ints "
                         f"(dot 0 or 1), got {tiles!r}")
    if len(tiles) >= 5 and tiles[4] > MAX_SPLITS:
        raise ValueError(f"tiles split K at most {MAX_SPLITS} ways, got {tiles!r}")
    bn, bk, warps, stages, splits, dot = (*tiles, *(1, 1, 0)[len(tiles) - 3:])
    if dot not in (0, 1) or dot and min(bn, bk) < DOT_MIN:
        raise ValueError(f"tiles' dot is 0 or 1, and a dot tile is at least {DOT_MIN} wide in BLOCK_N and BLOCK_K "
                         f"(tl.dot's smallest), got {tiles!r}")
    return bn, bk, warps, stages, splits, dot


def _valid_tiles(t) -> bool:
    """A table's tiles: well-formed for tile_args (splits up to MAX_SPLITS; dot 0 or 1, a dot tile
    at least DOT_MIN wide), from JSON ints (not booleans), with BLOCK_N, BLOCK_K and num_warps
    powers of two (Triton blocks and warps) and stages up to MAX_STAGES."""
    if not isinstance(t, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in t):
        return False
    try:
        bn, bk, warps, stages, _, _ = tile_args(tuple(t))
    except ValueError:
        return False
    return all(v & (v - 1) == 0 for v in (bn, bk, warps)) and stages <= MAX_STAGES


def load(path: str, where: str | None = None) -> dict[Key, tuple[int, ...]]:
    """The table in a gemv_sweep JSON: {key: (BLOCK_N, BLOCK_K, num_warps[, stages[, splits]])}.
    `where` names the file in errors (default: as CSM_GEMV_TILES named it)."""
    where = where or f"{ENV}={path}"
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
                             f"[BLOCK_N, BLOCK_K, num_warps], optionally then stages 1..{MAX_STAGES}, "
                             f"then splits 1..{MAX_SPLITS}, then dot 0 or 1 (1: BLOCK_N and BLOCK_K >= {DOT_MIN})")
        table[key(c["rows"], c["K"], c["cols"], c["mats"], c["int8"])] = tuple(c["best_tiles"])
    if not table:
        raise ValueError(f"{where}: the file has no cases")
    return table


def builtin_tables() -> dict[str, Path]:
    """{device name: its built-in table} of kernels/tiles/ (read once per process)."""
    global _builtin
    if _builtin is None:
        found = {}
        for f in sorted(BUILTIN.glob("*.json")):
            try:
                dev = json.loads(f.read_text()).get("device")
            except (OSError, ValueError, AttributeError) as e:
                raise ValueError(f"built-in GEMV tile table {f.name}: not a sweep's JSON ({e})") from None
            if not isinstance(dev, str) or not dev:
                raise ValueError(f"built-in GEMV tile table {f.name}: names no device")
            found[dev] = f
        _builtin = found
    return _builtin


def _in_force(device: str | None) -> tuple[str, str | None, Path | None] | None:
    """The table pick_tiles reads for GPU `device` (its name; None: no GPU): (path, how errors name
    it, the built-in file or None), or None where the guess serves every shape."""
    path = os.environ.get(ENV, "").strip()
    if path.lower() == GUESS:
        return None
    if path:
        return path, None, None
    table = builtin_tables().get(device) if device else None
    return (str(table), f"built-in GEMV tile table {table.name}", table) if table is not None else None


def source(device: str | None = None) -> str:
    """Where pick_tiles' measured tiles come from for `device` (a GPU's name; None: no GPU): for logs."""
    found = _in_force(device)
    if found is None:
        if os.environ.get(ENV, "").strip().lower() == GUESS:
            return f"{ENV}={GUESS}: guessed from the shapes"
        return f"guessed from the shapes (no built-in table for {device or 'this device'}; {ENV}=FILE names one)"
    path, _, builtin = found
    if builtin is not None:
        return f"the built-in table for {device} ({builtin.name}), the guess where it lacks a shape"
    return f"{ENV}={path}, the guess where it lacks a shape"


def measured(rows: int, K: int, N: int, mats: int, int8: bool, device: str | None = None) -> tuple[int, ...] | None:
    """The measured tiles for this shape: from the table CSM_GEMV_TILES names, else from the
    built-in table for `device` (a GPU's name); None where the table lacks the shape, where there
    is none, or with CSM_GEMV_TILES=guess. Each file is read once per process."""
    found = _in_force(device)
    if found is None:
        return None
    path, where, _ = found
    if path not in _loaded:
        _loaded[path] = load(path, where)
    return _loaded[path].get(key(rows, K, N, mats, int8))
