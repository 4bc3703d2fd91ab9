"""bench/gpu_session.sh, the one command of a GPU lease, run as its CPU dry run (DRY=1): the
package copied as setup.py maps it, every stage of bench/gpu.py on the micro config with the
kernels interpreted, each part's exit logged and every result file written. On a GPU the same
script runs the full configuration; only the sweep and the compiled kernel tests are GPU-only."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# every Python the dry run starts takes the interpreter's three free speed-ups, as tests/conftest.py
# does for this process (tests/interp.py: the kernels compute exactly what they did). The script puts
# the copied package first on PYTHONPATH and keeps what it was given after it, this folder
HOOK = '''import os
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from tests.interp import speed_up
    except ImportError:  # a Python started before the package was copied
        pass
    else:
        speed_up()
'''


def test_the_dry_run_runs_every_stage_and_writes_every_result(tmp_path):
    out, site, hook = tmp_path / "out", tmp_path / "site", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "DRY": "1", "OUT": str(out), "SITE": str(site), "PY": sys.executable, "BUDGET": "400",
           "PYTHONPATH": str(hook)}
    p = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=400)
    log = (out / "session.log").read_text()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the parts import the copied package, not the checkout's (whose bare csmstream/ comes first on
    # sys.path from its root: there only a venv's editable install resolves the subsystems)
    assert f"csmstream.engine from {site.resolve()}/csmstream/engine/" in log, log[:3000]
    for part in ("first", "rest"):
        assert f"{part}: exit 0" in log, log[-3000:]
    first, rest = (json.loads((out / f"{n}.json").read_text()) for n in ("first", "rest"))
    assert first["errors"] == {} and rest["errors"] == {} and not first["skipped"] and not rest["skipped"]
    assert list(first["stages"]) == ["batch1", "context", "check", "profile", "int8"]
    # micro's 512-position window: the positions past it are capped to leave the timed steps room;
    # its 512 keys are 4 tiles of 128, so a one-row launch splits them 4 ways
    assert [(r["position"], r["splits"]) for r in first["context"]] == [(64, 4), (509, 4)]
    assert all(r["split_ms"] > 0 and r["grouped_ms"] > 0 and r["one_pass_ms"] > 0 for r in first["context"])
    assert list(rest["stages"]) == ["ttfa", "prefill", "sample", "buckets", "live"]
    # the checks are real ones even here: the fast step (interpreted) against the CPU reference
    assert first["batch1"]["graphs_equal_eager"] is True
    # the frame recaptured with CSM_ATTN_FOLD flipped (here no bucket runs fused, so nothing folds)
    assert first["batch1"]["fold"]["graphs_ms"] > 0 and first["batch1"]["fold"]["attn_fold"] is False
    assert {k: v["codes_equal"] for k, v in first["check"].items()} == {
        f"topk{k}{s}": 1.0 for s in ("", "_fused_gemv", "_int8_depth") for k in (1, 50, 2048)}
    assert [r["batch"] for r in rest["buckets"]["rows"]] == [1, 2]
    assert all(v["all_finished_ok"] for v in rest["live"].values())
    assert all(rest["ttfa"][k] > 0 for k in ("ttfa_worker_ms", "ttfa_server_ms", "ttfa_server_voice_ms",
                                             "context_encode_ms", "ttfa_server_context_ms"))
    # the copied package is setup.py's mapping: csmstream/ with each subsystem folder inside
    tree = ast.parse((ROOT / "setup.py").read_text())
    subsystems = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                      if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "SUBSYSTEMS")
    assert all((site / "csmstream" / s / "__init__.py").is_file() for s in subsystems)
    assert sorted(p.name for p in (site / "csmstream").iterdir() if (p / "__init__.py").is_file()) == sorted(subsystems)
