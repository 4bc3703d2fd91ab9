"""PNG plots for `csm-stream bench` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw_all(out_dir: Path, results, summary_by_level: dict[int, dict]) -> list[Path]:
    ok = [r for r in results if r.error is None and r.ttfa_ms is not None]
    paths = [out_dir / "ttfa.png", out_dir / "timeline.png", out_dir / "underruns.png"]

    fig, ax = plt.subplots(figsize=(7, 4))
    for c in summary_by_level:
        vals = [r.ttfa_ms for r in ok if r.concurrency == c]
        if vals:
            ax.hist(vals, bins=30, alpha=0.6, label=f"concurrency {c}")
    ax.set_xlabel("time to first audio (ms)")
    ax.set_ylabel("requests")
    ax.set_title("Time to first audio" if ok else "Time to first audio (no request succeeded)")
    if ok:
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(ok[:12]):
        if not r.arrivals_ms:
            continue
        per_chunk = r.audio_ms / max(1, r.chunks)
        t0 = r.arrivals_ms[0]
        deadline = [t0 + k * per_chunk for k in range(r.chunks)]  # when playback needs chunk k
        ax.plot(r.arrivals_ms, range(r.chunks), ".", ms=3, color=f"C{i % 10}")
        ax.plot(deadline, range(r.chunks), "-", lw=0.8, color=f"C{i % 10}", alpha=0.5)
    ax.set_xlabel("ms since request")
    ax.set_ylabel("chunk")
    ax.set_title("Chunk arrivals (dots) vs the real-time playback clock (lines): dots left of lines = on time")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    levels = list(summary_by_level)
    ax.plot(levels, [summary_by_level[c]["underruns"] for c in levels], "o-", label="underruns")
    ax2 = ax.twinx()
    ax2.plot(levels, [summary_by_level[c]["ttfa_ms"]["p95"] or 0 for c in levels], "s--", color="C1",
             label="p95 time to first audio (ms)")
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("underruns")
    ax2.set_ylabel("p95 TTFA (ms)")
    ax.set_title("Underruns and TTFA vs concurrency")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
