"""Split K for the fused GEMVs (kernels/triton_gemv.py): tiles' fifth entry, splits >= 2.

Program (output tile, split) runs the K loop over its own range of whole K tiles (`split_plan`),
stores its fp32 sums in a SplitWork, and takes its output tile's counter with an atomic; the last
of the tile's programs to arrive adds the partials in split order (the same sum whichever program
finishes last), runs the kernel's epilogue and puts the counter back to 0 for the next launch.
The jit helpers below are the kernels' side of that; the Python side plans the launch and keeps
the scratch.

Programs handing sums to each other through memory is only really checked on a GPU (interpreted,
they run one after another), so `splits_ok` checks a w2-sized split launch against the unsplit
one once per device, and a device where they differ runs every GEMV unsplit, with a warning,
rather than producing wrong audio.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)
CHECK_SHAPE = (8192, 1024, 512, 8)  # K, N, BLOCK_K, splits of splits_ok's launch: csm-1b's w2, 8 ways
_checked: dict[str, bool] = {}  # device -> split K gave the unsplit sums there


@triton.jit
def k_range(K, CHUNK, SPLITS: tl.constexpr):
    """[lo, hi): the K range of this program, split `tl.program_id(1)` of SPLITS (all of K at 1)."""
    if SPLITS == 1:
        lo = 0
        hi = K
    else:
        lo = tl.program_id(1) * CHUNK
        hi = tl.minimum(lo + CHUNK, K)
    return lo, hi


@triton.jit
def part_at(part_ptr, split, j, b, n, B, N, MATS: tl.constexpr):
    """Where split `split`'s partial sums of accumulator j live: part[split, j, b, n] ([SPLITS, MATS, B, N])."""
    return part_ptr + ((split * MATS + j) * B + b[:, None]) * N + n[None, :]


@triton.jit
def arrive(cnt_ptr, tile, SPLITS: tl.constexpr):
    """Called once this program's partials are stored: whether it is the last of output tile
    `tile`'s SPLITS programs to get here; that one puts the tile's counter back to 0 for the next
    launch and sums the partials (release/acquire on the counter: it sees every program's stores)."""
    tl.debug_barrier()  # every thread's partials are stored before the counter says so
    last = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLITS - 1
    tl.atomic_xchg(cnt_ptr + tile, 0, mask=last)
    return last


@triton.jit
def gathered(part_ptr, j, b, n, keep, B, N, SPLITS: tl.constexpr, MATS: tl.constexpr):
    """Accumulator j summed over the splits in split order, whichever program finished last (only
    lanes of `keep` load: the last program's); read past L1, since other programs wrote them."""
    y = tl.load(part_at(part_ptr, 0, j, b, n, B, N, MATS), mask=keep, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLITS):
        y += tl.load(part_at(part_ptr, s, j, b, n, B, N, MATS), mask=keep, other=0.0, cache_modifier=".cg")
    return y


@triton.jit
def settle(part_ptr, cnt_ptr, tile, y, y2, b, n, m, B, N, SPLITS: tl.constexpr, MATS: tl.constexpr):
    """A split program's end: its sums y (and y2, with MATS 2) stored as split tl.program_id(1)'s
    partials, then (y, y2, m, last): the tile's totals over all splits and the store mask `m` left
    only to the last program to arrive (`last`), which runs the epilogue with them."""
    tl.store(part_at(part_ptr, tl.program_id(1), 0, b, n, B, N, MATS), y, mask=m)
    if MATS == 2:
        tl.store(part_at(part_ptr, tl.program_id(1), 1, b, n, B, N, MATS), y2, mask=m)
    last = arrive(cnt_ptr, tile, SPLITS)
    m = tl.where(last, m, False)  # (not m & last: the interpreter's & of these is int)
    y = gathered(part_ptr, 0, b, n, m, B, N, SPLITS, MATS)
    if MATS == 2:
        y2 = gathered(part_ptr, 1, b, n, m, B, N, SPLITS, MATS)
    return y, y2, m, last


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def split_plan(K: int, bk: int, splits: int) -> tuple[int, int]:
    """(CHUNK, used): split-K's K range a program (whole BLOCK_K tiles) and the splits that get any,
    so no program has an empty range (K = 1024 in 512-wide tiles splits at most 2 ways)."""
    tiles = triton.cdiv(K, bk)
    per = triton.cdiv(tiles, max(1, splits))
    return per * bk, triton.cdiv(tiles, per)


class SplitWork:
    """Scratch of split-K launches (tiles' fifth entry): fp32 partial sums [splits, mats, B, N] and
    a counter per output tile, zero, which every launch leaves at zero. Launches of one stream run
    one after another (a programmatic dependent launch too: it waits for the kernel before it to
    finish before it writes either), so one SplitWork serves every split launch of a stream. It
    grows on first use of a larger shape, keeping what it outgrew alive (a captured graph may point
    at it); a capture must find it grown (the step runs eagerly before it captures), since memory set
    to zero inside a capture is zero only on replay. `device`: the tensors' device (x.device)."""

    def __init__(self) -> None:
        self.parts: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []  # outgrown scratch: a captured graph may still point at it

    def take(self, parts: int, tiles: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        small = self.parts is None or self.parts.device != torch.device(device) or self.parts.numel() < parts \
            or self.counts.numel() < tiles
        if small:
            if _capturing():
                raise RuntimeError("split-K scratch must grow before a CUDA graph capture: run the step eagerly first")
            self._retired += [t for t in (self.parts, self.counts) if t is not None]
            self.parts = torch.empty(max(parts, 0 if self.parts is None else self.parts.numel()),
                                     dtype=torch.float32, device=device)
            self.counts = torch.zeros(max(tiles, 0 if self.counts is None else self.counts.numel()),
                                      dtype=torch.int32, device=device)
        return self.parts, self.counts


def split_args(K: int, bk: int, splits: int, B: int, cols: int, bn: int, mats: int, work: SplitWork | None,
               device) -> tuple:
    """(used splits, CHUNK, partials, counters) of a launch: no scratch where it does not split."""
    chunk, used = split_plan(K, bk, splits)
    if used == 1:
        return 1, 0, None, None
    parts, counts = (work or SplitWork()).take(used * mats * B * cols, triton.cdiv(cols, bn), device)
    return used, chunk, parts, counts


def splits_ok(device) -> bool:
    """Whether split K gives the unsplit kernel's sums on `device` (checked once per device): one
    row through a CHECK_SHAPE matvec_add_ split and unsplit, twice split, on one scratch. They sum
    in different orders, so they agree to fp32 rounding; a lost or stale partial (a memory-ordering
    fault) is off by a whole split's share. Never inside a CUDA graph capture: there the answer is
    no until an eager pass has checked (the step's warm-up does)."""
    from .triton_gemv import matvec_add_

    dev = str(torch.device(device))
    if dev in _checked:
        return _checked[dev]
    if _capturing():
        return False
    K, N, bk, splits = CHECK_SHAPE
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    a = torch.randn(1, K, generator=g).to(device, dtype)
    x = torch.randn(1, N, generator=g).to(device, dtype)
    want = matvec_add_(x.clone(), w, a, tiles=(4, bk, 4)).float()
    work, worst = SplitWork(), 0.0
    for _ in range(2):
        got = matvec_add_(x.clone(), w, a, tiles=(4, bk, 4, 1, splits), work=work).float()
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-6)))
    ok = worst < 2e-2 and not work.counts.any()
    if not ok:
        log.warning("split-K GEMV tiles give wrong sums on %s (off by %.3g of the largest output, or a counter "
                    "left set); every fused GEMV there runs unsplit", dev, worst)
    _checked[dev] = ok
    return ok


def unsplit_if_unsafe(tiles: tuple, device) -> tuple:
    """`tiles` as they are, or without their splits where splits_ok says split K is wrong on `device`."""
    if len(tiles) >= 5 and tiles[4] > 1 and not splits_ok(device):
        return (*tiles[:4], 1, tiles[5]) if len(tiles) == 6 else tiles[:4]
    return tiles
