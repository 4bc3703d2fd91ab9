"""Compile the GPU frame step's Triton kernels for a GPU architecture without a GPU, and report each
one's registers, spills, shared memory and occupancy.

    python bench/kernel_report.py [--arch 90] [--buckets 1,2,4,8,16] [--int8] [--pdl] [--json out.json]

The frame step (engine/cuda_step.FastFrameStep) runs on CPU tensors of the full csm-1b configuration
(weights left at zero: no kernel runs) with the five-kernel fused layers for every bucket given, and
once per bucket with the cuBLAS-path layers (`--plain-buckets`), the tiles a GPU would get
(pick_tiles). A stand-in Triton driver reports the chosen architecture, and every launch becomes a
compile (Triton's own warm-up: nothing is launched): each kernel is compiled with exactly the
arguments, constexprs and pointer/stride specialisations the step passes on a GPU, through Triton's
real pipeline down to a cubin from ptxas. cuobjdump then reads each cubin's resource use.

It catches before any GPU session: a kernel that does not compile (the CPU tests run the kernels
interpreted, which accepts code the compiler rejects), register spills (local memory: a GEMV that
spills loses the bandwidth it exists for), shared memory over the SM's limit, and occupancy too low
to keep loads in flight. The tiles are pick_tiles' (with CSM_GEMV_TILES naming a sweep's table,
the measured ones; a staged tile must compile to cp.async copies, else it is a problem). With
--pdl the fused step is compiled as its chain of programmatic dependent launches (kernels/pdl.py,
sm_90 and later), and each kernel's PTX is checked for the grid-dependency instructions and for
the weight loads the GEMVs issue before their wait. Exit status 1 when a kernel fails to compile,
spills, needs more shared memory than a block may have, or has a staged K loop not pipelined.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# per SM: registers, max warps, max blocks, shared memory a block may use (bytes); sm_86/89 have fewer
# warps and less shared memory than the data-centre parts
SM_LIMITS = {
    80: dict(regs=65536, warps=64, blocks=32, smem=163 * 1024),
    86: dict(regs=65536, warps=48, blocks=16, smem=99 * 1024),
    89: dict(regs=65536, warps=48, blocks=24, smem=99 * 1024),
    90: dict(regs=65536, warps=64, blocks=32, smem=227 * 1024),
}
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_GLOBAL_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global((?:\.[\w:]+)+)", re.M)  # its qualifiers


def parse_resources(text: str) -> dict:
    """cuobjdump --dump-resource-usage output -> {regs, stack, shared, local} (bytes but regs). A
    Triton kernel has no call stack or local arrays of its own: stack or local bytes are registers
    ptxas spilled to (slow, off-chip) local memory."""
    m = _RESOURCE.search(text)
    if m is None:
        raise ValueError(f"no resource line in cuobjdump output: {text[-300:]!r}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, shared=shared, local=local)


def pdl_order(ptx: str) -> dict:
    """In a kernel's PTX: whether it has griddepcontrol.launch_dependents and .wait, and how many
    global loads come before the first wait (a PDL GEMV's first weight tile; 0 for the others)."""
    at = ptx.find("griddepcontrol.wait")
    return dict(launches_dependents="griddepcontrol.launch_dependents" in ptx, waits=at >= 0,
                loads_before_wait=len(_GLOBAL_LOAD.findall(ptx[:at])) if at >= 0 else 0)


def global_loads(ptx: str) -> tuple[int, int]:
    """(128-bit global load instructions, all global load instructions) in a kernel's PTX: a
    bandwidth-bound kernel should read its weights 16 bytes at a time."""
    widths = []
    for quals in _GLOBAL_LOAD.findall(ptx):
        q = quals.split(".")[1:]  # e.g. ["nc", "v4", "b32"]: the last is the element type
        lanes = int(q[-2][1:]) if len(q) > 1 and q[-2] in ("v2", "v4", "v8") else 1
        widths.append(lanes * int(q[-1][1:]))
    return sum(w == 128 for w in widths), len(widths)


def async_copies(ptx: str) -> int:
    """cp.async instructions (global -> shared copies that do not block: sm_80+) in a kernel's PTX.
    A GEMV with tiles of stages >= 2 reads its weights so, its K loop software-pipelined; one with
    plain tiles has none."""
    return len(re.findall(r"\bcp\.async\.c[ag]\.shared", ptx))


def occupancy(regs: int, warps: int, smem: int, arch: int) -> int:
    """Resident warps per SM for a kernel of `warps` warps a block using `regs` registers a thread
    and `smem` bytes of shared memory a block (registers go out per warp in 256s)."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(lim["blocks"], (lim["regs"] // per_warp) // warps, lim["warps"] // warps)
    if smem:
        blocks = min(blocks, (lim["smem"] + 1024) // (smem + 1024))  # 1 KB a block is the system's
    return blocks * warps


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_tools() / "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True)
    return parse_resources(out.stdout)


class _StandInDriver:
    """Enough of a Triton driver to compile for `arch`: a device, a stream, a target."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def _plain(v):
    """A constexpr as the report keeps it: numbers as they are, anything else (a dtype: the dot
    path's DOT_T) by its name, e.g. bf16."""
    return v if isinstance(v, (bool, int, float, str)) else str(v)


@contextlib.contextmanager
def compile_only(arch: int):
    """Inside: Triton targets sm_`arch` and every kernel launch compiles instead (nothing runs; the
    outputs stay as they were); the fused GEMVs pick GPU tiles for CPU tensors. Yields the list every
    launch is appended to: (kernel name, its int arguments, its constexprs, num_warps, CompiledKernel);
    launches with the same specialisation share one CompiledKernel."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernel_report compiles the kernels: run it with TRITON_INTERPRET=0")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from csmstream.kernels import triton_gemv

    out = []
    launch = JITFunction.run

    def run(self, *args, grid, warmup, **kw):
        kernel = launch(self, *args, grid=grid, warmup=True, **kw)
        # the kernel's own arguments (constexprs come as keywords; num_warps & co. are not arguments)
        named = dict(zip(self.arg_names, args, strict=False)) | {k: v for k, v in kw.items() if k in self.arg_names}
        const = {p.name: _plain(named[p.name]) for p in self.params if p.is_constexpr and p.name in named}
        ints = {k: v for k, v in named.items() if isinstance(v, int) and k not in const}
        out.append((self.fn.__name__, ints, const, kw.get("num_warps", 4), kernel))
        return kernel

    tiles, active = triton_gemv._tiles, driver._active
    JITFunction.run = run
    triton_gemv._tiles = lambda x, K, N, mats=1, int8=False: triton_gemv.pick_tiles(x.shape[0], K, N, mats, int8)
    driver.set_active(_StandInDriver(arch))
    try:
        yield out
    finally:
        JITFunction.run = launch
        triton_gemv._tiles = tiles
        driver.set_active(active)  # no reset_active(): that would look for a real GPU


def frame_step(cfg, int8: bool, rows: int, seq: int | None = None):
    """A FastFrameStep (fused layers available) over `cfg` on CPU, bf16, weights zero (never read),
    its caches the model's whole window unless `seq` (the attention splits its keys by the window)."""
    import torch

    from csmstream.engine.cuda_step import FastFrameStep
    from csmstream.engine.generator import FrameGenerator
    from csmstream.engine.model import CSM

    with torch.device("meta"):
        model = CSM(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        model.audio_offsets.copy_(torch.arange(cfg.num_codebooks) * cfg.audio_vocab)  # a buffer, not a weight
    if int8:
        from csmstream.engine.quant import quantize_depth_

        quantize_depth_(model)
    # the generator's one big product, depth_proj over every code's embedding ([65,632 x 2,048] @
    # [2,048 x 1,024], ~20 s of bf16 on a CPU), is zero with zero weights: say so without computing it
    proj = model.depth_proj
    proj.forward = lambda x: x.new_zeros(*x.shape[:-1], proj.out_features)
    try:
        gen = FrameGenerator(model, rows, max_seq_len=seq, fast=False)
    finally:
        del proj.forward
    return FastFrameStep(gen, graphs=False, fused="on")


def _short(name: str) -> str:
    return name.strip("_").removesuffix("_kernel")


def _label(name: str, ints: dict, const: dict, dims: dict) -> str:
    """Which call of the step a launch serves, from its kernel and shapes (dims: stack -> model dim)."""
    if name == "_norm_matvec_kernel":  # K is the input dim: rope -> qkv, swiglu -> gate/up, else a head
        what = "wqkv" if const.get("ROPE") else "w13" if const.get("SWIGLU") else "head"
        dim = ints["K"]
    elif name == "_matvec_add_kernel":  # N is the residual dim: the wide input is the MLP's
        what = "w2" if ints["K"] > ints["N"] else "wo"
        dim = ints["N"]
    else:
        return _short(name)
    tags = [t for t, d in dims.items() if d == dim]
    return f"{tags[0] if len(tags) == 1 else '?'}.{what}"


def report(arch: int, buckets: list[int], plain: list[int], int8: bool, pdl: bool = False) -> dict:
    import torch

    from csmstream.engine.config import CsmModelConfig

    cfg = CsmModelConfig.csm_1b()
    dims = {"backbone": cfg.backbone.dim, "depth": cfg.depth.dim}
    t0 = time.perf_counter()
    fast = frame_step(cfg, int8, max(buckets + plain))
    kernels = []
    with compile_only(arch) as launches, torch.inference_mode():
        for fused, todo in ((True, buckets), (False, plain)):
            for B in todo:
                fast.fused_buckets = {B} if fused else set()
                fast.pdl_buckets = {B} if fused and pdl else set()
                before = len(launches)
                # (grouped, fold, draw ways): both attention kernels (CSM_ATTN_GROUPED); for the fused
                # step at batch 1 also attention folded into qkv (CSM_ATTN_FOLD) and the draw's 16-way
                # threshold search (triton_ops.WAYS)
                forms = [(False, False, None), (True, False, None)]
                forms += [(False, True, None), (False, False, 16)] * (fused and B == 1)
                for grouped, fold, draw in forms:
                    fast.attn_grouped, fast.fold_buckets, fast.draw_ways = grouped, {B} if fold else set(), draw
                    fast.forward(B)
                fast.attn_grouped, fast.fold_buckets, fast.draw_ways = False, set(), None
                binaries: dict[int, dict] = {}  # one row per compiled kernel, with every call it serves
                for name, ints, const, warps, k in launches[before:]:
                    row = binaries.get(id(k))
                    if row is None:
                        r = resources(k.asm["cubin"])
                        smem = r["shared"] + k.metadata.shared
                        row = binaries[id(k)] = dict(
                            kernel=_short(name), calls=[], bucket=B, fused=fused, pdl=fused and pdl,
                            num_warps=warps, constexprs=const, regs=r["regs"], spill_bytes=r["stack"] + r["local"],
                            shared=smem, warps_per_sm=occupancy(r["regs"], warps, smem, arch),
                            loads_128=global_loads(k.asm["ptx"]), async_copies=async_copies(k.asm["ptx"]),
                            atomics=k.asm["ptx"].count("atom."))
                        if row["pdl"]:
                            row.update(pdl_order(k.asm["ptx"]))
                    label = _label(name, ints, const, dims)
                    if label not in row["calls"]:
                        row["calls"].append(label)
                kernels += binaries.values()
                print(f"bucket {B:>3} {_path(fused, pdl)}: {len(binaries)} kernels "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    import triton

    return dict(arch=f"sm_{arch}", triton=triton.__version__, int8_depth=int8, pdl=pdl, kernels=kernels,
                limits=SM_LIMITS[arch])


def _path(fused: bool, pdl: bool) -> str:
    return "plain" if not fused else "fused+pdl" if pdl else "fused"


def problems(res: dict) -> list[str]:
    lim = res["limits"]
    out = []
    for k in res["kernels"]:
        where = f"{k['kernel']} for {'+'.join(k['calls'])} (bucket {k['bucket']}, {k['constexprs']})"
        if k["spill_bytes"]:
            out.append(f"{where} spills {k['spill_bytes']} bytes a thread to local memory (stack + local)")
        if k["shared"] > lim["smem"]:
            out.append(f"{where} needs {k['shared']} bytes of shared memory; a block may have {lim['smem']}")
        if k["constexprs"].get("STAGES", 1) > 1 and not k.get("async_copies"):
            out.append(f"{where} has a {k['constexprs']['STAGES']}-stage K loop but no cp.async: not pipelined")
        if k["constexprs"].get("SPLITS", 1) > 1 and not k.get("atomics"):
            out.append(f"{where} splits K {k['constexprs']['SPLITS']} ways but has no atomics: no program "
                       "could know it is the last")
        if k.get("pdl") and not (k["launches_dependents"] and k["waits"]):
            out.append(f"{where} is launched with PDL but lacks griddepcontrol.launch_dependents or .wait")
    return out


def table(res: dict) -> str:
    lines = [f"Triton {res['triton']} -> {res['arch']}{', int8 depth decoder' if res['int8_depth'] else ''}",
             (f"{'B':>3} {'path':<9} {'kernel':<12} {'serves':<24} {'constexprs':<52} {'warps':>5} {'regs':>4} "
              f"{'spill':>5} {'smem':>6} {'warps/SM':>8} {'ld128':>6} {'async':>5} {'atom':>4}")]
    for k in res["kernels"]:
        ld128 = "/".join(str(int(n)) for n in k["loads_128"])
        c = ",".join(f"{a}={v if isinstance(v, str) else int(v)}" for a, v in k["constexprs"].items()
                     if not a.startswith(("ADD", "ROPE", "SWIGLU")) and (a, v) != ("ROW_DIV", 1))
        lines.append(f"{k['bucket']:>3} {_path(k['fused'], k.get('pdl')):<9} {k['kernel']:<12} "
                     f"{'+'.join(k['calls']):<24} {c:<52.52} {k['num_warps']:>5} {k['regs']:>4} "
                     f"{k['spill_bytes']:>5} {k['shared']:>6} {k['warps_per_sm']:>8} {ld128:>6} "
                     f"{k.get('async_copies', 0):>5} {k.get('atomics', 0):>4}")
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"buckets must be >= 1, got {s!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Needs TRITON_INTERPRET=0 (or unset) and Triton's NVIDIA backend (ptxas and cuobjdump ship in the\n"
               "triton wheel); no GPU. Exit status 1 on a compile error, a spill, or shared memory over the limit.")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                    help="compute capability to compile for (90 = H100/H200, 80 = A100, 89 = L4/4090)")
    ap.add_argument("--buckets", type=_ints, default=[1, 2, 4, 8, 16],
                    help="batch buckets to compile the fused (five-kernel) step for, each <= 16 (default 1,2,4,8,16)")
    ap.add_argument("--plain-buckets", type=_ints, default=[1],
                    help="buckets to compile the cuBLAS-path step's kernels for (default 1; they do not "
                         "specialise on the batch beyond 1 / multiples of 16)")
    ap.add_argument("--int8", action="store_true", help="with the depth decoder stored as int8")
    ap.add_argument("--pdl", action="store_true",
                    help="the fused step as a chain of programmatic dependent launches (sm_90 and later)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    a = ap.parse_args(argv)
    from csmstream.kernels.triton_gemv import MAX_ROWS

    if any(b > MAX_ROWS for b in a.buckets):
        ap.error(f"--buckets: the fused step runs buckets of at most {MAX_ROWS} rows")
    if a.pdl and a.arch < 90:
        ap.error(f"--pdl: programmatic dependent launch needs sm_90 or later, not sm_{a.arch}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_report compiles the kernels: run it with TRITON_INTERPRET=0 (or unset)", file=sys.stderr)
        return 1
    try:
        res = report(a.arch, a.buckets, a.plain_buckets, a.int8, a.pdl)
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile: say which and why
        print(f"kernel_report: compiling for sm_{a.arch} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(table(res))
    bad = problems(res)
    for p in bad:
        print("PROBLEM:", p)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res | {"problems": bad}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
