"""Scale-out: two servers behind nginx on loopback (deploy/run_local_lb.sh), and the Kubernetes
example's structure."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_two_servers_behind_nginx_serve_the_bench_tool(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    assert nginx, "nginx is needed for this test: apt-get install nginx (make test installs it when run as root)"
    out = subprocess.run(["bash", str(ROOT / "deploy/run_local_lb.sh"), sys.executable, str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["results"]) == 8 and all(r["error"] is None and r["chunks"] > 0 for r in data["results"])
    served = [int(float(n)) for n in re.findall(r"served (\S+) requests", out.stdout)]
    assert len(served) == 2 and all(n > 0 for n in served) and sum(served) == 8  # least_conn used both
    http = re.findall(r"http via nginx: status (\d+), (\S+), (\d+) bytes", out.stdout)
    assert http == [("200", "chunked", str(800 * 48))] * 2  # streamed through, every byte


def test_kubernetes_example_is_valid_and_consistent():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # Triton's kernel cache sits on a mounted volume (a restart loads the kernels, not compiles them)
    cache = next(e["value"] for e in c["env"] if e["name"] == "TRITON_CACHE_DIR")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert any(cache.startswith(path + "/") for path in mounts.values())
    assert {v["name"] for v in pod["volumes"]} == set(mounts)
    args = c["args"]
    shutdown = float(args[args.index("--shutdown-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > shutdown
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"ws": int(args[args.index("--port") + 1]), "http": int(args[args.index("--http-port") + 1])}
    assert {p["targetPort"] for p in kinds["Service"]["spec"]["ports"]} == set(ports)
    # every argument is one the CLI accepts
    from csmstream.cli import build_parser

    build_parser().parse_args(args)
