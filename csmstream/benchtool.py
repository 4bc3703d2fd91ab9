"""`csm-stream bench`: drive a running server like callers would, and measure what they feel.

N concurrent simulated callers each send requests and play the audio in real time into a simulated
playback buffer from the moment the first chunk arrives. Per request: time to first audio, total
time, real-time factor, every inter-chunk gap, underruns (the buffer ran dry after playback started)
and their total duration, and the REST-style baseline the seed replaces -- the same request played
only once its last byte has arrived (generate everything, then send), measured in the same run.

With `tokens_per_s` each text is typed out as an LLM would write it -- word by word at that rate, on
one text stream (final=false, then flush) -- and times count from its first word: the time to
first audio a voice agent feels, with the sentence pipelining in the path.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .transport.protocol import byte_rate

DEFAULT_TEXTS = [
    "Thanks for calling. How can I help you today?",
    "Your order shipped on Monday and should arrive by Friday afternoon.",
    "I'm sorry, I didn't catch that. Could you say it again?",
    "Sure. Let me check that for you. One moment please.",
]


@dataclass
class CallResult:
    index: int
    concurrency: int
    chars: int
    ttfa_ms: float | None = None
    total_ms: float | None = None
    audio_ms: float = 0.0
    rtf: float | None = None
    chunks: int = 0
    chunk_bytes: int = 0
    max_gap_ms: float = 0.0
    underruns: int = 0
    underrun_ms: float = 0.0
    rest_ttfa_ms: float | None = None  # REST-style: first audio only when everything has arrived
    error: str | None = None
    arrivals_ms: list = field(default_factory=list)  # each chunk's arrival, from the request
    gaps_ms: list = field(default_factory=list)


def playback(arrivals_s: list[float], durations_s: list[float]) -> tuple[int, float]:
    """Real-time playback from the first arrival: (underruns, total dry time in s)."""
    if not arrivals_s:
        return 0, 0.0
    end = arrivals_s[0]
    n, dry = 0, 0.0
    for t, d in zip(arrivals_s, durations_s, strict=True):
        if t > end + 1e-4:
            n += 1
            dry += t - end
            end = t
        end += d
    return n, dry


def words(text: str) -> list[str]:
    """`text` as an LLM's tokens, roughly: each word with the space before it."""
    return re.findall(r"\s*\S+", text) or [text]


async def type_out(ws, pieces: list[str], t0: float, tokens_per_s: float) -> None:
    """Send `pieces` (the first is already out, at t0) one every 1/tokens_per_s s, then flush."""
    for k, piece in enumerate(pieces, 1):
        await asyncio.sleep(max(0.0, t0 + k / tokens_per_s - time.perf_counter()))
        await ws.send(json.dumps({"text": piece}))
    await ws.send(json.dumps({"flush": True}))


async def one_call(url: str, text: str, index: int, concurrency: int, fmt: str, chunk_ms: int,
                   token: str | None = None, voice: str | None = None,
                   tokens_per_s: float | None = None, ssl_context=None, speed: float = 1.0) -> CallResult:
    from websockets.asyncio.client import connect

    from .transport.client import SesameTTSError, stream_speech_http
    from .transport.tls import connect_options

    per_s = byte_rate(fmt)
    r = CallResult(index, concurrency, len(text))
    arrivals, durations = [], []

    def got(m: bytes, now: float) -> None:
        arrivals.append(now)
        durations.append(len(m) / per_s)
        r.chunk_bytes += len(m)

    named = ({} if voice is None else {"voice": voice}) | ({} if speed == 1 else {"speed": speed})
    try:
        if url.startswith(("http://", "https://")):  # the OpenAI-compatible port: pieces as they arrive
            t0 = time.perf_counter()
            async for m in stream_speech_http(url, text, token=token, ssl_context=ssl_context, format=fmt,
                                              chunk_ms=chunk_ms, seed=index,
                                              **named):
                got(m, time.perf_counter() - t0)
            r.total_ms = 1000 * (time.perf_counter() - t0)
        else:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with connect(url, max_size=None, open_timeout=30, additional_headers=headers,
                               **connect_options(url, ssl_context)) as ws:
                t0 = time.perf_counter()
                opening = {"text": text, "format": fmt, "chunk_ms": chunk_ms, "seed": index, **named}
                toks = words(text) if tokens_per_s else []
                if toks:
                    opening.update(text=toks[0], final=False)
                await ws.send(json.dumps(opening))
                typing = asyncio.create_task(type_out(ws, toks[1:], t0, tokens_per_s)) if toks else None
                try:
                    async for m in ws:
                        now = time.perf_counter() - t0
                        if isinstance(m, bytes):
                            got(m, now)
                            continue
                        msg = json.loads(m)
                        if "error" in msg:
                            r.error = f"{msg['error'].get('code')}: {msg['error'].get('message')}"
                        else:
                            r.total_ms = 1000 * now
                        break
                finally:
                    if typing is not None:
                        typing.cancel()
    except SesameTTSError as e:
        r.error = f"{e.code}: {e.message}"
        return r
    except Exception as e:  # a bench records failures, it does not stop on them
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.chunks = len(arrivals)
    r.audio_ms = 1000 * sum(durations)
    r.arrivals_ms = [round(1000 * t, 3) for t in arrivals]
    if arrivals:
        r.ttfa_ms = 1000 * arrivals[0]
        r.gaps_ms = [round(1000 * (b - a), 3) for a, b in itertools.pairwise(arrivals)]
        r.max_gap_ms = max(r.gaps_ms, default=0.0)
        n, dry = playback(arrivals, durations)
        r.underruns, r.underrun_ms = n, 1000 * dry
        r.rest_ttfa_ms = r.total_ms
    if r.total_ms and r.audio_ms:
        r.rtf = r.total_ms / r.audio_ms
    return r


async def run_level(url: str, texts: list[str], concurrency: int, requests: int, fmt: str, chunk_ms: int,
                    progress: bool = True, token: str | None = None, voice: str | None = None,
                    tokens_per_s: float | None = None, ssl_context=None, speed: float = 1.0) -> list[CallResult]:
    sem = asyncio.Semaphore(concurrency)
    done = 0
    results: list[CallResult] = []

    async def worker(i: int) -> None:
        nonlocal done
        async with sem:
            res = await one_call(url, texts[i % len(texts)], i, concurrency, fmt, chunk_ms, token, voice,
                                 tokens_per_s, ssl_context, speed)
        results.append(res)
        done += 1
        if progress:
            bar = "#" * (30 * done // requests)
            print(f"\r  concurrency {concurrency:3d} [{bar:<30}] {done}/{requests}", end="", file=sys.stderr,
                  flush=True)

    await asyncio.gather(*(worker(i) for i in range(requests)))
    if progress:
        print(file=sys.stderr)
    return sorted(results, key=lambda r: r.index)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def summarize(results: list[CallResult]) -> dict:
    ok = [r for r in results if r.error is None and r.ttfa_ms is not None]
    out: dict = {"requests": len(results), "errors": len(results) - len(ok),
                 "underruns": sum(r.underruns for r in ok), "underrun_ms": round(sum(r.underrun_ms for r in ok), 1)}
    for name in ("ttfa_ms", "total_ms", "rtf", "max_gap_ms", "rest_ttfa_ms"):
        vals = [getattr(r, name) for r in ok if getattr(r, name) is not None]
        out[name] = {p: (None if _pct(vals, q) is None else round(_pct(vals, q), 3))
                     for p, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}
    t, rest = out["ttfa_ms"]["p50"], out["rest_ttfa_ms"]["p50"]
    out["streaming_gain"] = round(rest / t, 2) if t and rest else None
    return out


def loop(summary: dict) -> str:
    share = (summary.get("server") or {}).get("loop_cpu_share")
    return "-" if share is None else f"{100 * share:.1f}% of a core"


def table(summary_by_level: dict[int, dict]) -> str:
    rows = [("concurrency  requests errors underruns  ttfa p50/p95/p99/max ms        rtf p95  max gap p95  "
             "REST-style first audio p50  gain  server loop CPU")]
    for c, s in summary_by_level.items():
        f = s["ttfa_ms"]

        def fmt(v):
            return "-" if v is None else f"{v:.0f}"

        rows.append(f"{c:11d}  {s['requests']:8d} {s['errors']:6d} {s['underruns']:9d}  "
                    f"{fmt(f['p50']):>5}/{fmt(f['p95']):>5}/{fmt(f['p99']):>5}/{fmt(f['max']):>5}"
                    f"{'':13}{s['rtf']['p95'] or 0:6.3f}  {s['max_gap_ms']['p95'] or 0:9.0f}  "
                    f"{s['rest_ttfa_ms']['p50'] or 0:24.0f} ms  {s['streaming_gain'] or 0:4.1f}x  {loop(s)}")
    return "\n".join(rows)


def write_outputs(out_dir: Path, results: list[CallResult], summary_by_level: dict[int, dict],
                  best: int | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.csv"]
    payload = {"summary": {str(k): v for k, v in summary_by_level.items()}, "best_concurrency": best,
               "results": [asdict(r) for r in results]}
    paths[0].write_text(json.dumps(payload, indent=1))
    cols = [k for k in asdict(results[0]) if k not in ("arrivals_ms", "gaps_ms")] if results else []
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    try:
        from .plots import draw_all
    except ImportError:  # matplotlib missing: data still written
        print("csm-stream bench: matplotlib not installed; skipping plots (pip install matplotlib)", file=sys.stderr)
        return paths
    return paths + draw_all(out_dir, results, summary_by_level)


def write_rows(path: str | Path | None, rows: list[dict]) -> None:
    """A bench script's rows as JSON, with the machine, its CPU count and the date beside them
    (path None: its --json was not given, nothing to write)."""
    import os

    if path is None:
        return
    Path(path).write_text(json.dumps({"rows": rows, "machine": os.uname().machine, "cpus": os.cpu_count(),
                                      "date": time.strftime("%Y-%m-%d")}, indent=1))


def server_metrics(url: str, token: str | None = None, ssl_context=None) -> dict[str, float] | None:
    """The server's /metrics, parsed (None when unavailable)."""
    import time
    import urllib.request

    from .transport.metrics import parse

    base = url.replace("ws://", "http://").replace("wss://", "https://")
    http = (base.split("/v1/")[0] if "/v1/audio/speech" in base else base.split("/ws/")[0]) + "/metrics"
    try:
        req = urllib.request.Request(http, headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(req, timeout=5, context=ssl_context if http.startswith("https:") else None) as r:
            out = parse(r.read().decode())
    except (OSError, ValueError):
        return None
    out["_scraped_at"] = time.monotonic()
    return out


def server_load(before: dict | None, after: dict | None) -> dict:
    """What the level cost the server, from two scrapes of its /metrics: its event loop's and its
    whole process's share of a core, and the loop's largest lag (of the last 10 s)."""
    keys = ("csm_event_loop_cpu_seconds_total", "process_cpu_seconds_total")
    if before is None or after is None or not all(k in before and k in after for k in keys):
        return {"loop_cpu_share": None, "process_cpu_share": None, "loop_lag_max_ms": None}
    wall = max(1e-9, after["_scraped_at"] - before["_scraped_at"])
    share = [round((after[k] - before[k]) / wall, 4) for k in keys]
    return {"loop_cpu_share": share[0], "process_cpu_share": share[1],
            "loop_lag_max_ms": after.get("csm_event_loop_lag_max_milliseconds")}


def drift(results: list[CallResult], rss_before: int | None, rss_after: int | None) -> dict:
    """Soak view: TTFA of the first vs last tenth of requests, and server memory before vs after."""
    ok = [r.ttfa_ms for r in sorted(results, key=lambda r: r.index) if r.ttfa_ms is not None]
    k = max(1, len(ok) // 10)
    first, last = _pct(ok[:k], 50), _pct(ok[-k:], 50)

    def mb(b: int | None) -> float | None:
        return None if b is None else round(b / 2**20, 1)

    return {"ttfa_first_tenth_p50": first, "ttfa_last_tenth_p50": last,
            "rss_before_mb": mb(rss_before), "rss_after_mb": mb(rss_after),
            "rss_growth_mb": None if rss_before is None or rss_after is None else mb(rss_after - rss_before)}


def best_level(summary_by_level: dict[int, dict], ttfa_threshold_ms: float) -> int | None:
    good = [c for c, s in summary_by_level.items()
            if s["errors"] == 0 and s["underruns"] == 0 and (s["ttfa_ms"]["p95"] or 1e18) <= ttfa_threshold_ms]
    return max(good) if good else None


def run_bench(url: str, *, concurrency: list[int], requests: int, texts: list[str] | None = None,
              fmt: str = "pcm_24000", chunk_ms: int = 100, out_dir: str | Path = "out/bench",
              ttfa_threshold_ms: float = 500.0, progress: bool = True, token: str | None = None,
              voice: str | None = None, tokens_per_s: float | None = None, ssl_context=None,
              speed: float = 1.0) -> dict:
    """Run each concurrency level in turn; voice: a named voice of the server's for every request
    (its time to first audio then includes the voice prompt); tokens_per_s: type each text out
    word by word at that rate on a text stream (times count from its first word); speed: every
    request's speaking rate (the audio timed and played is the stretched audio the server sends)."""
    texts = texts or DEFAULT_TEXTS
    results: list[CallResult] = []
    summaries: dict[int, dict] = {}
    for c in concurrency:
        before = server_metrics(url, token, ssl_context)
        level = asyncio.run(run_level(url, texts, c, max(requests, c), fmt, chunk_ms, progress, token, voice,
                                      tokens_per_s, ssl_context, speed))
        after = server_metrics(url, token, ssl_context)
        results += level
        summaries[c] = summarize(level)
        rss = [None if m is None else m.get("csm_process_resident_bytes") for m in (before, after)]
        summaries[c]["drift"] = drift(level, *(None if b is None else int(b) for b in rss))
        summaries[c]["server"] = server_load(before, after)
        summaries[c]["tokens_per_s"] = tokens_per_s
        summaries[c]["speed"] = speed
    best = best_level(summaries, ttfa_threshold_ms)
    files = write_outputs(Path(out_dir), results, summaries, best)
    return {"summary": summaries, "best_concurrency": best, "files": [str(p) for p in files], "results": results}
