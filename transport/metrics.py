"""Server metrics in the Prometheus text exposition format (no client library needed).

Counters and histograms are updated on the event loop; gauges that belong to the engine thread
(active streams, frames) are read from its stats when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections import Counter

TTFA_BUCKETS_MS = (10, 25, 50, 100, 200, 350, 500, 1000, 2000, 5000)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def build_info(engine) -> list[str]:
    """csm_build_info, always 1, labelled with what this process runs: the package version and the
    engine's model, device, dtype, quantization and slots (to tell deployments apart on a dashboard)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("csm-stream")
    except PackageNotFoundError:  # (run from a source tree that was never installed)
        ver = "unknown"
    labels = {"version": ver, "model": engine.name, "device": engine.device,
              "dtype": str(engine.dtype).removeprefix("torch."), "quantize": engine.quantize,
              "max_streams": engine.max_streams}
    body = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    return ["# HELP csm_build_info what this server runs (labels); always 1", "# TYPE csm_build_info gauge",
            f"csm_build_info{{{body}}} 1"]


def parse(text: str) -> dict[str, float]:
    """Prometheus text (as /metrics writes it) -> {sample name with its labels: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Histogram:
    def __init__(self, buckets) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.n += 1
        self.total += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    @classmethod
    def of(cls, buckets, counts, total: float) -> Histogram:
        """A histogram kept elsewhere (counts per bucket, the last +Inf), for its lines."""
        h = cls(buckets)
        h.counts, h.total, h.n = list(counts), total, sum(counts)
        return h

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts[:-1], strict=True):  # (the last count: +Inf)
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6g}")
        out.append(f"{name}_count {self.n}")
        return out


class Metrics:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.connections = 0
        self.open_connections = 0
        self.underruns = 0
        self.audio_seconds = 0.0
        self.context_turns = 0  # requests' own context turns encoded (transport/context.py)
        self.context_seconds = 0.0  # worker-thread seconds spent decoding and encoding them
        # REST requests that asked to continue earlier ones (previous_text, previous_request_ids), by
        # whether any of what they named was found (spoken.py): "no" piling up behind several servers
        # means a client's requests are not kept on one
        self.continuations: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.ttfa_ms = Histogram(TTFA_BUCKETS_MS)
        self.rtf = Histogram(RTF_BUCKETS)
        self._last_frames = (time.monotonic(), 0)
        self._fps = 0.0
        self.sources: list = []  # callables giving more Prometheus lines (the loop watch, the phone calls)

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def render(self, worker_stats=None, ready: bool = True, health: dict | None = None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

        metric("csm_ready", "gauge", "1 once the model is loaded and warmed up", int(ready))
        metric("csm_uptime_seconds", "gauge", "seconds since the server started",
               f"{time.monotonic() - self.started:.1f}")
        metric("csm_requests_total", "counter", "generation requests accepted", self.requests)
        metric("csm_requests_completed_total", "counter", "requests that ended with done", self.completed)
        metric("csm_requests_cancelled_total", "counter", "requests cancelled (client cancel or disconnect)",
               self.cancelled)
        metric("csm_connections_total", "counter", "WebSocket connections accepted", self.connections)
        metric("csm_connections_open", "gauge", "WebSocket connections open now", self.open_connections)
        metric("csm_audio_seconds_total", "counter", "seconds of audio sent", f"{self.audio_seconds:.3f}")
        metric("csm_buffer_underruns_total", "counter",
               "times a stream had to wait for audio after its client's playback would have run dry",
               self.underruns)
        metric("csm_context_turns_total", "counter", "context turns sent with requests, encoded with the codec",
               self.context_turns)
        metric("csm_context_encode_seconds_total", "counter", "seconds spent encoding requests' context turns "
               "(worker threads; a request's first audio waits for its turns)", f"{self.context_seconds:.6f}")
        if health is not None:
            metric("csm_free_slots", "gauge", "generation slots free now (for load balancers)", health["free_slots"])
            metric("csm_max_streams", "gauge", "generation slots in all", health["max_streams"])
        rss = _rss_bytes()
        if rss is not None:
            metric("csm_process_resident_bytes", "gauge", "resident memory of the server process", rss)
        metric("process_cpu_seconds_total", "counter", "CPU time of the server process, all threads",
               f"{time.process_time():.3f}")
        if worker_stats is not None:
            now = time.monotonic()
            t0, f0 = self._last_frames
            if now - t0 >= 1.0:
                self._fps = (worker_stats.frames - f0) / (now - t0)
                self._last_frames = (now, worker_stats.frames)
            metric("csm_active_streams", "gauge", "requests generating now", worker_stats.active)
            metric("csm_waiting_requests", "gauge", "requests waiting for a slot", worker_stats.waiting)
            metric("csm_prefilling_requests", "gauge", "requests whose prompt is going in (chunked prefill)",
                   worker_stats.prefilling)
            metric("csm_prefill_tokens_total", "counter", "prompt positions prefilled", worker_stats.prefill_tokens)
            metric("csm_prefill_seconds_total", "counter", "engine-thread seconds spent prefilling",
                   f"{worker_stats.prefill_seconds:.6f}")
            metric("csm_frames_total", "counter", "80 ms frames generated", worker_stats.frames)
            metric("csm_frames_per_second", "gauge", "frames generated per second (since the last scrape)",
                   f"{self._fps:.2f}")
            metric("csm_engine_ticks_total", "counter", "batched frame steps run", worker_stats.ticks)
            from ..engine.worker import STEP_MS_BOUNDS

            step = Histogram.of(STEP_MS_BOUNDS, worker_stats.step_ms, 1000 * worker_stats.step_seconds)
            lines += ["# HELP csm_engine_step_milliseconds how long each batched frame step took (step + decode; "
                      "past 80 ms, a frame of audio, the batch falls behind real time)",
                      "# TYPE csm_engine_step_milliseconds histogram", *step.lines("csm_engine_step_milliseconds")]
        for source in self.sources:
            lines += source()
        lines += ["# HELP csm_errors_total errors sent to clients, by code", "# TYPE csm_errors_total counter"]
        lines += [f'csm_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
        lines += ["# HELP csm_continuations_total REST requests naming earlier ones (previous_text, "
                  "previous_request_ids), by whether any of their sentences were found to hear",
                  "# TYPE csm_continuations_total counter"]
        lines += [f'csm_continuations_total{{found="{f}"}} {self.continuations[f]}' for f in ("yes", "no")]
        lines += ["# HELP csm_ttfa_milliseconds time from request to first audio chunk sent",
                  "# TYPE csm_ttfa_milliseconds histogram", *self.ttfa_ms.lines("csm_ttfa_milliseconds")]
        lines += [("# HELP csm_real_time_factor generation time / audio duration per request (< 1 is faster "
                   "than real time)"), "# TYPE csm_real_time_factor histogram", *self.rtf.lines("csm_real_time_factor")]
        return "\n".join(lines) + "\n"
