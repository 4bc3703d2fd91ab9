#!/usr/bin/env bash
# Two csm-stream servers on `tiny` behind nginx on loopback, then the bench tool (WebSocket) and two
# OpenAI-compatible HTTP requests through nginx.
#   deploy/run_local_lb.sh [PYTHON] [OUT_DIR]      (needs nginx on PATH or in /usr/sbin)
set -euo pipefail
PY=${1:-python3}
OUT=${2:-out/lb}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
prefix=$(cd "$OUT" && pwd)/nginx
mkdir -p "$prefix"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "nginx not found: apt-get install nginx" >&2; exit 2; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p1=$(free_port); p2=$(free_port); plb=$(free_port); h1=$(free_port); h2=$(free_port); hlb=$(free_port)
pids=()
cleanup() {
  [ -f "$prefix/nginx.pid" ] && kill "$(cat "$prefix/nginx.pid")" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
for pair in "$p1:$h1" "$p2:$h2"; do
  # nginx connects from loopback: --trusted-proxies makes its X-Forwarded-For the client's address
  "$PY" -m csmstream serve --port "${pair%:*}" --http-port "${pair#*:}" --device cpu --trusted-proxies 127.0.0.1 \
    > "$OUT/server-${pair%:*}.log" 2>&1 &
  pids+=($!)
done
for p in "$p1" "$p2"; do
  "$PY" -c "from csmstream.commands import wait_healthy; wait_healthy('http://127.0.0.1:$p/healthz', timeout=180)"
done
sed -e "s#@LISTEN@#127.0.0.1:$plb#" -e "s#@LISTEN_HTTP@#127.0.0.1:$hlb#" -e "s#@PREFIX@#$prefix#g" \
    -e "s#@UPSTREAMS@#        server 127.0.0.1:$p1 max_fails=1 fail_timeout=5s;\n        server 127.0.0.1:$p2 max_fails=1 fail_timeout=5s;#" \
    -e "s#@UPSTREAMS_HTTP@#        server 127.0.0.1:$h1 max_fails=1 fail_timeout=5s;\n        server 127.0.0.1:$h2 max_fails=1 fail_timeout=5s;#" \
    "$here/nginx.conf" > "$prefix/nginx.conf"
"$NGINX" -t -c "$prefix/nginx.conf" -p "$prefix" 2>> "$OUT/nginx-test.log"
"$NGINX" -c "$prefix/nginx.conf" -p "$prefix"
"$PY" -c "from csmstream.commands import wait_healthy; wait_healthy('http://127.0.0.1:$plb/healthz', timeout=30)"
"$PY" -m csmstream bench --url "ws://127.0.0.1:$plb/ws/generate" --concurrency 4 --requests 8 --out "$OUT"
for p in "$p1" "$p2"; do
  "$PY" -c "import urllib.request as u; m=u.urlopen('http://127.0.0.1:$p/metrics').read().decode(); print('server :$p served', [l.split()[1] for l in m.splitlines() if l.startswith('csm_requests_total')][0], 'requests')"
done
"$PY" - "http://127.0.0.1:$hlb/v1/audio/speech" <<'PYEOF'
import sys, time, httpx
with httpx.Client(timeout=60) as c:
    for i in range(2):  # OpenAI-compatible HTTP through nginx: streamed (chunked), whole
        t0 = time.perf_counter()
        with c.stream("POST", sys.argv[1], json={"input": "Through the balancer.", "response_format": "pcm",
                                                 "max_audio_ms": 800, "seed": i}) as r:
            it = r.iter_raw()
            n, first = len(next(it)), time.perf_counter() - t0
            n += sum(len(b) for b in it)
        print(f"http via nginx: status {r.status_code}, {r.headers.get('transfer-encoding')}, {n} bytes, "
              f"request {r.headers.get('x-request-id')}, "
              f"first audio after {1000 * first:.0f} ms of {1000 * (time.perf_counter() - t0):.0f} ms")
PYEOF
