"""bench/kernel_report.py: the GPU frame step's Triton kernels compiled for sm_90 / sm_80 on this
CPU machine (Triton's real compiler and ptxas, nothing launched). The CPU tests run every kernel
interpreted; this is where compiled mode is checked: every kernel the step launches compiles, with
no register spills."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.kernel_report import SM_LIMITS, global_loads, occupancy, parse_resources

ROOT = Path(__file__).resolve().parents[2]
GEMV_CALLS = {f"{t}.{m}" for t in ("backbone", "depth") for m in ("wqkv", "wo", "w13", "w2")} | {"depth.head"}
KERNELS = {"sample", "norm_matvec", "matvec_add", "decode_attn", "decode_attn_grouped", "add_rms_norm", "rope_store",
           "silu_mul"}


def _compiled_env(tmp_path):
    # compiled mode, and a fresh kernel cache so every kernel is really compiled in this test
    return dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_resource_line_and_occupancy_by_hand():
    out = ("Resource usage:\n Common:\n  GLOBAL:28 CONSTANT[4]:16\n Function _norm_matvec_kernel:\n"
           "  REG:140 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert parse_resources(out) == dict(regs=140, stack=16, shared=1024, local=8)
    with pytest.raises(ValueError, match="no resource line"):
        parse_resources("cuobjdump: nothing here")
    # 140 regs -> 18 x 256 = 4608 a warp -> 14 warps of registers -> 3 blocks of 4 warps
    assert occupancy(140, 4, 5120, 90) == 12
    # 32 regs -> 64 warps of registers, capped by the SM's 64 warps
    assert occupancy(32, 4, 0, 90) == 64 and occupancy(32, 4, 0, 89) == 48
    # 100 KB of shared memory a block: two blocks on sm_90 (227 KB), one on sm_80 (163 KB)
    assert occupancy(32, 4, 100 * 1024, 90) == 8 and occupancy(32, 4, 100 * 1024, 80) == 4
    assert set(SM_LIMITS) >= {80, 90}
    ptx = ("\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "\tld.global.nc.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];\n"
           "\t@!%p2 ld.global.v2.b32 { %r9, %r10 }, [ %rd3 + 0 ];\n"
           "\tld.global.b16 %rs1, [ %rd4 + 0 ];\n\tst.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };\n"
           "\tld.global.v2.b64 { %rd6, %rd7 }, [ %rd8 + 0 ];\n\tld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r9 ];\n")
    assert global_loads(ptx) == (3, 5)  # two v4.b32 and a v2.b64 of 128 bits; stores and shared loads do not count


@pytest.mark.parametrize("arch,int8,buckets", [(90, True, "1,2,4,8,16"), (80, False, "1,16")])
def test_every_kernel_of_the_frame_step_compiles_without_spills(tmp_path, arch, int8, buckets):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--arch", str(arch), "--buckets", buckets,
           "--json", str(out)] + (["--int8"] if int8 else [])
    r = subprocess.run(cmd, cwd=tmp_path, env=_compiled_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["arch"] == f"sm_{arch}" and res["problems"] == []
    ks = res["kernels"]
    assert {k["kernel"] for k in ks} == KERNELS
    assert {c for k in ks if k["fused"] for c in k["calls"]} >= GEMV_CALLS
    assert {k["bucket"] for k in ks if k["fused"]} == {int(b) for b in buckets.split(",")}
    assert all(k["spill_bytes"] == 0 and 0 < k["regs"] <= 255 and k["warps_per_sm"] > 0 for k in ks)
    # attention over the backbone's 2,048-position window splits its keys at batch 1 (the merge's
    # atomics and cross-program loads compiled too); over the depth decoder's 32 positions it never does
    for name, g in (("decode_attn", 1), ("decode_attn_grouped", 4)):  # grouped: 4x fewer programs, 4x the splits
        attn = {(k["bucket"], k["constexprs"]["HD"], k["constexprs"]["SPLITS"]) for k in ks
                if k["kernel"] == name and k["fused"]}
        assert (1, 64, 16) in attn and (16, 64, 4 * g) in attn and {s for b, hd, s in attn if hd == 128} == {1}
    # the depth decoder's qkv kernel with attention folded in (CSM_ATTN_FOLD: batch 1, fused), no spill
    folded = [k for k in ks if k["kernel"] == "norm_matvec" and k["constexprs"].get("ATTN")]
    assert folded and {k["bucket"] for k in folded} == {1} and {c for k in folded for c in k["calls"]} == {"depth.wqkv"}
    # the draw with its threshold searched by bisection and 16 ways a step (at batch 1), no spill
    assert {k["constexprs"].get("WAYS") for k in ks if k["kernel"] == "sample" and k["bucket"] == 1} >= {2, 16}
    gemvs = [k for k in ks if k["kernel"] in ("norm_matvec", "matvec_add")]
    # at batch 1 (the latency target) every GEMV reads its weights 16 bytes at a time; larger buckets
    # pick K-tiles as short as 16 (a register budget shared by more rows) and may read narrower
    assert all(k["loads_128"][0] >= 1 for k in gemvs if k["bucket"] == 1)
    # the depth decoder's int8 weights go through the scaled kernels; the backbone's never do
    scaled = {c for k in gemvs if k["constexprs"]["SCALED"] for c in k["calls"]}
    assert scaled == ({c for c in GEMV_CALLS if c.startswith("depth.") and c != "depth.head"} if int8 else set())
    # the table lists every compiled kernel
    assert sum(" fused " in line or " plain " in line for line in r.stdout.splitlines()) == len(ks)


def test_the_pdl_chain_compiles_with_only_weight_loads_before_each_wait(tmp_path):
    """kernels/pdl.py's contract in the compiled PTX for sm_90: every kernel of the fused step has
    griddepcontrol.launch_dependents and .wait; the GEMVs issue their first weight tile's loads
    before the wait, the draw, attention and norm load nothing before it; still no spills."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--buckets", "1,16", "--plain-buckets", "1",
           "--pdl", "--json", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=_compiled_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["pdl"] and res["problems"] == []
    fused = [k for k in res["kernels"] if k["fused"]]
    assert fused and all(k["pdl"] and k["launches_dependents"] and k["waits"] for k in fused)
    assert {k["kernel"] for k in fused} == {"sample", "norm_matvec", "matvec_add", "decode_attn", "decode_attn_grouped",
                                            "add_rms_norm"}
    for k in fused:
        gemv = k["kernel"] in ("norm_matvec", "matvec_add")
        assert (k["loads_before_wait"] >= 1) if gemv else (k["loads_before_wait"] == 0), k
    assert not any(k.get("pdl") for k in res["kernels"] if not k["fused"])  # the cuBLAS path stays plain
    assert all(k["spill_bytes"] == 0 for k in res["kernels"])


def test_a_spilling_tile_is_reported(tmp_path):
    """The check above can fail: a tile far over the register budget spills, and the report says so."""
    code = """
import json, sys, torch
from bench.kernel_report import compile_only, problems, resources, SM_LIMITS
from csmstream.kernels import triton_gemv as G
with compile_only(90) as launches:
    x, a, w = torch.zeros(16, 256), torch.zeros(16, 1024), torch.zeros(256, 1024)
    G.matvec_add_(x, w, a, tiles=(16, 128, 1))  # 16x16x128 fp32 partial sums for 32 threads
name, ints, const, warps, k = launches[0]
r = resources(k.asm["cubin"])
row = dict(kernel="matvec_add", calls=["test"], bucket=16, constexprs=const, spill_bytes=r["stack"] + r["local"],
           shared=r["shared"])
print(json.dumps(problems({"kernels": [row], "limits": SM_LIMITS[90]})))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_compiled_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(found) == 1 and "spills" in found[0] and "BLOCK_K" in found[0]


def test_a_split_kernel_without_atomics_is_a_problem():
    """A split-K GEMV's programs learn which of them is last from a counter taken with atomics; a
    compiled split kernel without any would have lost that (rows by hand: the rule, not a compile)."""
    from bench.kernel_report import problems

    def row(splits, atomics):
        return dict(kernel="matvec_add", calls=["depth.w2"], bucket=1, constexprs={"SPLITS": splits},
                    spill_bytes=0, shared=0, atomics=atomics)

    found = problems({"kernels": [row(4, 2), row(1, 0), row(4, 0)], "limits": SM_LIMITS[90]})
    assert len(found) == 1 and "splits K 4 ways but has no atomics" in found[0]


def test_interpreted_mode_is_refused_with_a_clear_line(tmp_path):
    env = dict(_compiled_env(tmp_path), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--buckets", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "TRITON_INTERPRET=0" in r.stderr


def test_bad_arguments_are_one_clear_line(capsys):
    from bench.kernel_report import main

    for argv, msg in ((["--buckets", "1,32"], "at most 16 rows"), (["--buckets", "x"], "comma-separated"),
                      (["--arch", "75"], "invalid choice"), (["--arch", "80", "--pdl"], "needs sm_90 or later")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_staged_and_split_tiles_compile_as_asked_and_plain_ones_as_before(tmp_path):
    """tiles' fourth entry (kernels/triton_gemv.py): with 3 stages the compiled K loop copies its
    weight tiles global -> shared with cp.async ahead of the multiply (no spill); with the 3-tuple
    or stages 1 it loads them straight to registers (no cp.async), the code the tiles always gave.
    The fifth, splits: the kernel takes counters with atomics, which no unsplit one has. Both GEMV
    kernels, two-matrix (SwiGLU) and int8 forms included."""
    code = """
import json, torch
from bench.kernel_report import async_copies, compile_only, resources
from csmstream.kernels import triton_gemv as G
from csmstream.kernels.int8 import quantize_int8
x, a, nw = torch.zeros(1, 512, dtype=torch.bfloat16), torch.zeros(1, 2048, dtype=torch.bfloat16), torch.ones(2048)
w2, w13 = torch.zeros(512, 2048, dtype=torch.bfloat16), torch.zeros(1024, 2048, dtype=torch.bfloat16)
q = quantize_int8(torch.zeros(512, 2048))
out = []
for t in [(4, 256, 4), (4, 256, 4, 1), (4, 256, 4, 3), (4, 256, 4, 1, 4)]:
    with compile_only(90) as launches:
        G.matvec_add_(x, w2, a, tiles=t)
        G.matvec_add_(x, q.q, a, scale=q.scale, tiles=t)
        G.norm_matvec(a, nw.to(torch.bfloat16), w13, 1e-5, swiglu=True, tiles=t)
    for name, ints, const, warps, k in launches:
        r = resources(k.asm["cubin"])
        out.append(dict(t=list(t), kernel=name, stages=const.get("STAGES"), copies=async_copies(k.asm["ptx"]),
                        splits=const.get("SPLITS"), atomics=k.asm["ptx"].count("atom."),
                        spill=r["stack"] + r["local"], shared=r["shared"] + k.metadata.shared))
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_compiled_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 12 and all(k["spill"] == 0 for k in rows)
    split = [k for k in rows if len(k["t"]) == 5]
    rows = [k for k in rows if len(k["t"]) < 5]
    # split K: each call's K of 2,048 in 256-wide tiles, four ways; each program takes its output
    # tile's counter (atom.add) and the last puts it back (atom.exch); no cp.async at one stage
    assert [k["splits"] for k in split] == [4, 4, 4] and all(k["atomics"] == 2 and not k["copies"] for k in split)
    assert all(k["atomics"] == 0 and k["splits"] == 1 for k in rows)
    plain = [k for k in rows if len(k["t"]) == 3 or k["t"][3] == 1]
    staged = [k for k in rows if len(k["t"]) == 4 and k["t"][3] == 3]
    assert len(staged) == 3 and all(k["stages"] == 3 and k["copies"] > 0 for k in staged)
    assert all(k["copies"] == 0 for k in plain)
    # the bf16 SwiGLU call: its two 4 x 256 tiles a stage need buffers past the plain kernel's
    # reduction scratch (the int8 ones fit inside it)
    assert staged[2]["kernel"] == "_norm_matvec_kernel" and staged[2]["shared"] > plain[5]["shared"]


def test_the_qkv_kernel_splits_k_with_and_without_the_folded_attention(tmp_path):
    """The depth decoder's qkv call (rope epilogue, and at batch 1 attention folded into its last
    program) with split tiles, compiled for sm_90: no spill; the split's counter (atom.add, then
    atom.exch by the last) and, folded, the fold's counter too -- four atomics."""
    code = """
import json, torch
from bench.kernel_report import compile_only, resources
from csmstream.kernels import triton_gemv as G
x, nw = torch.zeros(1, 1024, dtype=torch.bfloat16), torch.ones(1024, dtype=torch.bfloat16)
w = torch.zeros(1536, 1024, dtype=torch.bfloat16)
cache, cos = torch.zeros(1, 32, 4, 128, dtype=torch.bfloat16), torch.zeros(32, 64)
rope = (8, cos, cos, torch.zeros(1, dtype=torch.long), cache)
attend = (torch.zeros(1, 1024, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int32))
with compile_only(90) as launches:
    G.norm_matvec(x, nw, w, 1e-5, tiles=(4, 256, 4, 1, 4), rope=rope)
    G.norm_matvec(x, nw, w, 1e-5, tiles=(4, 256, 4, 1, 4), rope=rope, attend=attend)
out = []
for name, ints, const, warps, k in launches:
    r = resources(k.asm["cubin"])
    out.append(dict(splits=const.get("SPLITS"), attn=const.get("ATTN", False), atomics=k.asm["ptx"].count("atom."),
                    spill=r["stack"] + r["local"]))
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_compiled_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows == [dict(splits=4, attn=False, atomics=2, spill=0), dict(splits=4, attn=True, atomics=4, spill=0)]
