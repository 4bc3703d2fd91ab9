"""bench/telnyx_capacity.py at a small scale: a child server, a handful of full-duplex calls, the
rows read back from its /metrics (the figures themselves live in the README, not here)."""

import pytest

from bench import telnyx_capacity as cap


def test_five_calls_both_ways_every_call_gets_its_audio_and_the_loop_is_measured():
    lines = []
    (row,) = cap.measure([5], seconds=2.0, codec="G722", progress=lines.append, encode="loop", agents="pcm_8000",
                          agent_frame_ms=100)
    assert row["calls"] == 5 and row["active_calls"] == 5 and row["compression"] == "off" and row["encode"] == "loop"
    assert 0 < row["loop_cpu_share"] <= row["process_cpu_share"] + 0.05
    assert row["caller_frames_per_call_s"] > 25  # 50 a second are sent; all were counted by the server
    assert 500 < row["audio_out_ms_per_call_s"] <= 2100  # real time: 1000 (the pacer allows at most 2x)
    assert row["lag_p99"].startswith(("<= ", "> "))
    assert 500 < row["agent_heard_ms_per_call_s"] <= 1100  # each call's agent heard its caller in real time
    assert row["codec_thread_calls_per_s"] == 0  # --encode loop: no chunk went to the codec threads
    assert row["model_streams"] == 0 and "model_requests" not in row  # no clients of the model asked for
    assert row["switch_ms"] == 5.0  # Python's default, read back from the child
    assert "G722" in lines[0] and "encoding on the event loop" in lines[0] and "(pcm_8000, 100 ms frames)" in lines[0]
    assert "5 calls" in lines[1] and "agents heard" in lines[1]


@pytest.mark.parametrize("kw,message", [
    ({"calls": [0]}, "calls must be whole numbers >= 1"),
    ({"calls": [1], "codec": "OPUS"}, "codec must be PCMU, PCMA, G722 or L16"),
    ({"calls": [1], "seconds": 0}, "seconds must be > 0"),
    ({"calls": [1], "compression": "gzip"}, "compression must be None or 'deflate'"),
    ({"calls": [1], "encode": "gpu"}, "encode must be one of auto, loop, threads, got 'gpu'"),
    ({"calls": [1], "agents": "pcm_44100"}, "agents must be None or one of pcm_8000, pcm_16000, pcm_24000"),
    ({"calls": [1], "agent_frame_ms": 30}, "agent_frame_ms must be a multiple of 20 from 20 to 1000, got 30"),
    ({"calls": [1], "switch_ms": 0}, "switch_ms must be None .* or milliseconds in 0.01..100, got 0"),
    ({"calls": [1], "switch_ms": float("nan")}, "switch_ms must be None"),
    ({"calls": [1], "model_streams": -1}, "model_streams must be a whole number in 0..64, got -1"),
    ({"calls": [1], "model_streams": 2.5}, "model_streams must be a whole number in 0..64, got 2.5"),
])
def test_bad_arguments_are_refused_before_a_server_starts(kw, message):
    with pytest.raises(ValueError, match=message):
        cap.measure(**kw)


def test_lag_quantile_reads_the_histogram_window():
    name = "csm_event_loop_lag_milliseconds_bucket"
    before = {f'{name}{{le="1"}}': 10, f'{name}{{le="5"}}': 10, f'{name}{{le="+Inf"}}': 10}
    after = {f'{name}{{le="1"}}': 100, f'{name}{{le="5"}}': 109, f'{name}{{le="+Inf"}}': 110}
    assert cap.lag_quantile(before, after, 0.5) == "<= 1 ms"  # 90 of the window's 100 samples <= 1 ms
    assert cap.lag_quantile(before, after, 0.99) == "<= 5 ms"  # 99 of them
    assert cap.lag_quantile(before, after, 1.0) == "> 5 ms"  # the last one beyond every bound


def test_clients_of_the_model_beside_the_calls_and_the_servers_switch_interval():
    """--model-streams: the child's engine speaks to clients of /ws/generate through the window (its
    frames counted, the requests that fit in the window timed); --switch-ms reaches the child."""
    lines = []
    (row,) = cap.measure([3], seconds=5.0, codec="PCMU", progress=lines.append, encode="loop", switch_ms=1.5,
                          model_streams=1)
    assert row["switch_ms"] == 1.5 and "GIL switch interval 1.5 ms" in lines[0]
    assert "1 client of the model beside them" in lines[0] and "model: " in lines[1]
    assert row["model_streams"] == 1 and row["model_errors"] == 0
    # the tiny model on CPU is faster than real time alone (RTF ~0.1-0.4), so a sentence (2-4 s of
    # audio) fits in the window and one stream's 12.5 frames a second are exceeded while it speaks
    assert row["model_requests"] >= 1 and 0 < row["model_rtf_p50"] <= row["model_rtf_max"]
    assert row["model_frames_per_s"] > 0 and row["model_ttfa_ms_p50"] > 0
    assert 500 < row["audio_out_ms_per_call_s"] <= 2100  # the calls went on meanwhile

