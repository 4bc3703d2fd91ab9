"""`csm-stream bench` against a real server on tiny: fields, consistency, plots, underruns."""

import json
import subprocess
import sys

import pytest

from csmstream.benchtool import playback, run_bench
from tests.servers import RunningServer

PNG = b"\x89PNG\r\n\x1a\n"


def test_playback_simulation_counts_dry_time():
    # chunks of 100 ms arriving at 0, 50, 300 ms: played 0-100, 100-200, dry 200-300, 300-400
    assert playback([0.0, 0.05, 0.3], [0.1, 0.1, 0.1]) == (1, pytest.approx(0.1))
    assert playback([0.0, 0.05, 0.1], [0.1, 0.1, 0.1]) == (0, 0.0)


def test_bench_tool_against_a_real_server(tmp_path, server):
    out = run_bench(server.url, concurrency=[1, 2], requests=3, out_dir=tmp_path, progress=False,
                    texts=["Hello there, this is a test.", "Short one."])
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["summary"]) == {"1", "2"} and len(data["results"]) == 6
    for r in data["results"]:
        assert r["error"] is None
        for key in ("ttfa_ms", "total_ms", "audio_ms", "rtf", "max_gap_ms", "underruns", "underrun_ms",
                    "rest_ttfa_ms", "arrivals_ms", "gaps_ms", "chunks"):
            assert key in r
        assert r["total_ms"] >= r["ttfa_ms"] > 0
        assert r["audio_ms"] == pytest.approx(r["chunk_bytes"] / 48, abs=0.01)  # pcm_24000: 48 bytes/ms
        assert len(r["arrivals_ms"]) == r["chunks"] and len(r["gaps_ms"]) == r["chunks"] - 1
        assert r["rest_ttfa_ms"] >= r["ttfa_ms"]
    s = data["summary"]["1"]
    assert s["ttfa_ms"]["p50"] <= s["ttfa_ms"]["p95"] <= s["ttfa_ms"]["max"]
    assert s["streaming_gain"] > 1
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("index,")
    for name in ("ttfa.png", "timeline.png", "underruns.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert out["best_concurrency"] == 2  # tiny on CPU keeps up with 2 callers
    d = data["summary"]["2"]["drift"]
    assert d["rss_before_mb"] > 0 and d["rss_after_mb"] > 0 and d["ttfa_first_tenth_p50"] > 0
    load = data["summary"]["2"]["server"]  # from the server's /metrics before and after the level
    assert 0 < load["loop_cpu_share"] <= load["process_cpu_share"] and load["loop_lag_max_ms"] >= 0


def test_server_load_needs_both_scrapes_with_the_loop_figures():
    from csmstream.benchtool import server_load

    a = {"_scraped_at": 10.0, "csm_event_loop_cpu_seconds_total": 1.0, "process_cpu_seconds_total": 5.0}
    b = {"_scraped_at": 12.0, "csm_event_loop_cpu_seconds_total": 1.5, "process_cpu_seconds_total": 7.0,
         "csm_event_loop_lag_max_milliseconds": 3.0}
    assert server_load(a, b) == {"loop_cpu_share": 0.25, "process_cpu_share": 1.0, "loop_lag_max_ms": 3.0}
    nothing = {"loop_cpu_share": None, "process_cpu_share": None, "loop_lag_max_ms": None}
    assert server_load(None, b) == nothing  # /metrics unreachable
    assert server_load({"_scraped_at": 1.0}, b) == nothing  # a server without the loop figures (older)


def test_bench_counts_g722_audio_at_its_own_bytes_per_ms(tmp_path, server):
    run_bench(server.url, concurrency=[1], requests=1, out_dir=tmp_path, progress=False, texts=["Wideband."],
              fmt="g722_16000")
    (r,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert r["error"] is None and r["chunk_bytes"] > 0
    assert r["audio_ms"] == pytest.approx(r["chunk_bytes"] / 8, abs=0.01)  # 16 kHz, 4 bits a sample


def test_the_bench_drives_the_http_port_like_the_websocket(tmp_path):
    import csmstream
    from tests.transport.test_text_stream import _write_voice

    (tmp_path / "voices").mkdir()
    _write_voice(tmp_path / "voices", "ada", "A voice prompt.")
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), http_port=0,
                       voices_dir=str(tmp_path / "voices")).start()
    texts = ["Hello there, this is a test.", "Short one."]
    try:
        ws = run_bench(rs.url, concurrency=[1], requests=2, out_dir=tmp_path / "ws", progress=False, texts=texts)
        http = run_bench(rs.srv.speech_url, concurrency=[1], requests=2, out_dir=tmp_path / "http", progress=False,
                         texts=texts)
        bad = run_bench(rs.srv.speech_url, concurrency=[1], requests=1, out_dir=tmp_path / "bad", progress=False,
                        fmt="pcm_24000", chunk_ms=5)
        voiced = [run_bench(url, concurrency=[1], requests=1, out_dir=tmp_path / "v", progress=False, texts=texts,
                            voice="ada") for url in (rs.url, rs.srv.speech_url)]
        contexts = [r.context[0].text for r in list(rs.srv.recent)[-2:]]
        unknown = run_bench(rs.url, concurrency=[1], requests=1, out_dir=tmp_path / "u", progress=False, voice="bob")
    finally:
        rs.stop()
    assert contexts == ["A voice prompt."] * 2  # --voice reached the server on both ports
    for out in voiced:
        (r,) = out["results"]
        assert r.error is None and r.audio_ms > 0
    assert unknown["results"][0].error.startswith("unknown_voice: unknown voice 'bob'; available: ada")
    by_ws, by_http = ({r.index: r for r in out["results"]} for out in (ws, http))
    for i in (0, 1):  # same seeds, same audio, whichever port
        r = by_http[i]
        assert r.error is None and r.audio_ms == by_ws[i].audio_ms > 0
        assert r.audio_ms == pytest.approx(r.chunk_bytes / 48, abs=0.01) and r.total_ms >= r.ttfa_ms > 0
    assert http["summary"][1]["drift"]["rss_before_mb"] > 0  # /metrics found on the HTTP port
    assert bad["results"][0].error.startswith("invalid_chunk_ms: chunk_ms must be an integer in 20..1000")


def test_a_slowed_server_produces_underruns_the_tool_reports(tmp_path):
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), test_chunk_delay=0.15).start()
    try:
        out = run_bench(rs.url, concurrency=[1], requests=1, out_dir=tmp_path, progress=False,
                        texts=["A sentence long enough for several chunks of audio."])
    finally:
        rs.stop()
    s = out["summary"][1]
    assert s["underruns"] > 0 and s["underrun_ms"] > 100
    assert out["best_concurrency"] is None


def test_cli_bench_prints_tables_and_writes_files(tmp_path, server):
    out = subprocess.run([sys.executable, "-m", "csmstream", "bench", "--url", server.url, "--sweep", "1,2",
                          "--requests", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "p50/p95/p99/max" in out.stdout and "highest concurrency" in out.stdout and "of a core" in out.stdout
    assert (tmp_path / "results.json").exists() and (tmp_path / "ttfa.png").exists()


def _one_request(server, out, texts, **options) -> dict:
    return run_bench(server.url, concurrency=[1], requests=1, out_dir=out, progress=False, texts=texts, **options)


def test_bench_types_texts_out_word_by_word_like_an_llm(tmp_path, server):
    """--tokens-per-s: each text goes out on one text stream, a word every 1/rate s; the server gets
    it in pieces yet splits and speaks it as the whole text (same seed, same audio length), and
    first audio cannot come before the first sentence's last word was typed."""
    texts = ["Hello there, this is a test. Short one."]
    whole = _one_request(server, tmp_path / "whole", texts)
    typed = _one_request(server, tmp_path / "typed", texts, tokens_per_s=20)
    (w,), (t,) = whole["results"], typed["results"]
    assert t.error is None and t.audio_ms == w.audio_ms > 0
    assert t.ttfa_ms >= 1000 * 5 / 20  # "test." is the 6th word: typed 5 intervals after the first
    assert typed["summary"][1]["tokens_per_s"] == 20 and whole["summary"][1]["tokens_per_s"] is None
    sentences = [r.text for r in list(server.srv.recent)[-2:]]
    assert sentences == ["Hello there, this is a test.", "Short one."]


def test_bench_at_a_speed_times_the_audio_callers_hear(tmp_path, server):
    """speed=: every request asks for it, so each one's audio is the speed-1 audio of the same seed
    stretched to round(n / speed) samples, and that is what is timed and played."""
    texts = ["Hello there, this is a test."]
    plain = _one_request(server, tmp_path / "plain", texts)
    fast = _one_request(server, tmp_path / "fast", texts, speed=1.5)
    (p,), (f,) = plain["results"], fast["results"]
    assert p.error is None and f.error is None and p.chunk_bytes > 4800
    assert f.chunk_bytes // 2 == round(p.chunk_bytes // 2 / 1.5)
    assert fast["summary"][1]["speed"] == 1.5 and plain["summary"][1]["speed"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--tokens-per-s", "0"], "--tokens-per-s must be a rate in (0, 10000] words a second, got 0.0"),
    (["--tokens-per-s", "5", "--url", "http://127.0.0.1:9/v1/audio/speech"], "give a ws://.../ws/generate --url"),
    (["--speed", "5"], "--speed must be a number in 0.25..4"),
    (["--speed", "nan"], "--speed must be a number in 0.25..4"),
])
def test_cli_bench_refuses_a_bad_typing_rate_before_any_request(tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "csmstream", "bench", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
