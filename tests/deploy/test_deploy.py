"""Scale-out: two servers behind nginx on loopback (deploy/run_local_lb.sh), and the structure of
the Kubernetes example and of the image it runs (deploy/Dockerfile: no Docker engine runs on these
machines, so the image is checked against the package it installs, not built)."""

import ast
import json
import re
import shlex
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
    http = re.findall(r"http via nginx: status (\d+), (\S+), (\d+) bytes, request (\S+),", out.stdout)
    assert [h[:3] for h in http] == [("200", "chunked", str(800 * 48))] * 2  # streamed through, every byte
    # each known by nginx's $request_id (32 hex digits), set by deploy/nginx.conf
    assert all(re.fullmatch("[0-9a-f]{32}", h[3]) for h in http) and http[0][3] != http[1][3]


def test_kubernetes_example_is_valid_and_consistent():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"  # (not /healthz: 503 while stopping and loading)
    from csmstream.transport.gate import OPEN_PATHS

    assert {"/healthz", "/livez"} <= set(OPEN_PATHS)  # the kubelet sends no token
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
    from csmstream.transport.proxies import TrustedProxies

    build_parser().parse_args(args)
    # the ingress's X-Forwarded-For is believed from the pod network (the client, not the ingress)
    assert TrustedProxies(next(e["value"] for e in c["env"] if e["name"] == "CSM_TRUSTED_PROXIES")).trusts("10.1.2.3")


def _dockerfile() -> list[tuple[str, str]]:
    """deploy/Dockerfile's instructions as (KEYWORD, rest), continuation lines joined."""
    steps, line = [], ""
    for raw in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not (line or raw.strip()):
            continue
        line += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            keyword, _, rest = line.partition(" ")
            steps.append((keyword.upper(), rest.strip()))
            line = ""
    return steps


def _setup_constant(name: str):
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == name for t in n.targets))


def test_the_image_copies_the_whole_package_and_runs_its_cli():
    from csmstream.cli import build_parser

    steps = _dockerfile()
    sources = [src for k, rest in steps if k == "COPY" for src in shlex.split(rest)[:-1]]
    # what setup.py installs (its package folders) and reads (README.md) is in the image, and it exists
    wanted = {"setup.py", "README.md", "csmstream", *_setup_constant("SUBSYSTEMS")}
    assert set(sources) == wanted and all((ROOT / s).exists() for s in sources)
    # the build context holds exactly that (Dockerfile.dockerignore: everything out, those back in)
    ignore = [ln.strip() for ln in (ROOT / "deploy/Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")} == wanted
    # the entry point is setup.py's console script; the default command and kubernetes' args parse
    script = re.search(r'"console_scripts": \["([\w-]+)=', (ROOT / "setup.py").read_text()).group(1)
    command = {k: json.loads(rest) for k, rest in steps if k in ("ENTRYPOINT", "CMD")}
    assert command["ENTRYPOINT"] == [script]
    build_parser().parse_args(command["CMD"])
    cmd = command["CMD"]
    exposed = {int(p) for k, rest in steps if k == "EXPOSE" for p in rest.split()}
    assert exposed == {int(cmd[cmd.index("--port") + 1]), int(cmd[cmd.index("--http-port") + 1])}
    # the caches lie on the volume, which kubernetes mounts on a hostPath made writable for the user
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for k, rest in steps if k == "ENV")))
    [volume] = [rest for k, rest in steps if k == "VOLUME"]
    assert all(env[v].startswith(volume + "/") for v in ("TRITON_CACHE_DIR", "NUMBA_CACHE_DIR", "HF_HOME"))
    uid = re.search(r"useradd .*--uid (\d+) (\w+)", " ".join(rest for k, rest in steps if k == "RUN"))
    assert [rest for k, rest in steps if k == "USER"] == [uid.group(2)]
    pod = next(d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text())
               if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert f"chown -R {uid.group(1)} {volume}" in " ".join(init["command"])
    assert {m["mountPath"] for m in init["volumeMounts"]} == {volume}
    c = pod["containers"][0]
    cache = next(e["value"] for e in c["env"] if e["name"] == "TRITON_CACHE_DIR")
    assert cache == env["TRITON_CACHE_DIR"] and {m["mountPath"] for m in c["volumeMounts"]} >= {volume}


def test_the_images_sources_alone_build_the_whole_package(tmp_path):
    """What the Dockerfile copies is enough for `pip install .`: a wheel built from those files alone
    holds every module of the package and its data (the measured GEMV tiles) and the console script."""
    import zipfile

    sources = [src for k, rest in _dockerfile() if k == "COPY" for src in shlex.split(rest)[:-1]]
    ctx = tmp_path / "context"
    ctx.mkdir()
    for src in sources:
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, ctx / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / src, ctx / src)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "wheel"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = {"csmstream": "csmstream", **{f"csmstream/{s}": s for s in _setup_constant("SUBSYSTEMS")}}
    want = {f"{pkg}/{p.relative_to(ROOT / folder).as_posix()}" for pkg, folder in folders.items()
            for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".json") and "__pycache__" not in p.parts}
    assert any(n.startswith("csmstream/kernels/tiles/") for n in want)
    assert want <= names, sorted(want - names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "csm-stream = csmstream.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
