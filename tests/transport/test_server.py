"""The real server over TCP: the protocol, ordering, exact chunking, parity with Engine.stream,
concurrency, cancel and disconnect."""

import asyncio
import json
import logging
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect

from tests.servers import collect, floor_frame_time, wait_finished

SEED_MSG = {"text": "Hello from the seed.", "speaker_id": 0}


def run(coro):
    return asyncio.run(coro)


def audio_of(events):
    return b"".join(b for kind, b in events if kind == "audio")


def reference_pcm(text, speaker=0, **kw):
    eng = _ref_engine()
    return np.concatenate(list(eng.stream(text, speaker, **kw))).astype("<i2").tobytes()


_REF = {}


def _ref_engine():
    if "e" not in _REF:
        import csmstream

        _REF["e"] = csmstream.load("tiny", device="cpu", max_streams=1)
    return _REF["e"]


def test_seed_message_streams_chunks_then_done(server):
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps(SEED_MSG))
            return await collect(ws)

    events = run(go())
    chunks = [b for k, b in events if k == "audio"]
    kind, done = events[-1]
    assert kind == "done" and done["done"] is True and done["cancelled"] is False
    assert isinstance(done["request_id"], str) and done["request_id"]
    assert len(chunks) >= 2 and all(len(c) == 4800 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 4800
    assert done["audio_ms"] == pytest.approx(sum(map(len, chunks)) / 2 / 24, abs=0.1)
    assert done["ttfa_ms"] > 0


def test_socket_audio_equals_engine_stream(server):
    msg = {"text": "Parity over the socket.", "speaker_id": 2, "seed": 1234, "topk": 20, "temperature": 0.8}

    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps(msg))
            return audio_of(await collect(ws))

    got = run(go())
    want = reference_pcm(msg["text"], 2, seed=1234, topk=20, temperature=0.8)
    assert len(got) == len(want) and got == want


def test_back_to_back_requests_in_order_without_gaps(server):
    texts = ["First sentence here.", "Then the second one.", "And a third."]

    async def go():
        async with connect(server.url) as ws:
            for i, t in enumerate(texts):
                await ws.send(json.dumps({"text": t, "request_id": f"r{i}", "seed": i}))
            return await collect(ws, until_done=3)

    events = run(go())
    dones = [m for k, m in events if k == "done"]
    assert [d["request_id"] for d in dones] == ["r0", "r1", "r2"]
    assert all(not d["cancelled"] for d in dones)
    # each request's audio sits between the previous done and its own done, and is that text's audio
    segments, cur = [], b""
    for kind, v in events:
        if kind == "audio":
            cur += v
        else:
            segments.append(cur)
            cur = b""
    for i, t in enumerate(texts):
        assert segments[i] == reference_pcm(t, 0, seed=i)
    # no gap by construction: each next request was already generating before the previous one's
    # done went out (it is handed to the engine as soon as the previous finished generating)
    reqs = {r.tag.rid: r for r in server.srv.recent if r.tag.rid in ("r0", "r1", "r2")}
    assert reqs["r1"].t_submit < reqs["r0"].tag.t_done and reqs["r2"].t_submit < reqs["r1"].tag.t_done


FORMATS = {"pcm_24000": 48, "pcm_16000": 32, "pcm_8000": 16, "ulaw_8000": 8, "alaw_8000": 8,
           "g722_16000": 8}  # bytes/ms


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_chunk_sizes_exact_for_every_format_and_chunk_ms(server, fmt):
    async def go():
        out = {}
        async with connect(server.url) as ws:
            for ms in (20, 100, 1000):
                await ws.send(json.dumps({"text": "Chunk sizes.", "format": fmt, "chunk_ms": ms,
                                          "max_audio_ms": 2500, "seed": 3}))
                out[ms] = await collect(ws)
        return out

    for ms, events in run(go()).items():
        chunks = [b for k, b in events if k == "audio"]
        size = FORMATS[fmt] * ms
        assert all(len(c) == size for c in chunks[:-1]), (fmt, ms, {len(c) for c in chunks[:-1]})
        assert 0 < len(chunks[-1]) <= size
        done = events[-1][1]
        total = sum(map(len, chunks))
        assert done["audio_ms"] == pytest.approx(total / FORMATS[fmt], abs=0.1)
        assert 2500 <= done["audio_ms"] <= 2510  # capped; resampled formats add the filter's few-ms tail


def test_g722_is_ffmpegs_encoding_of_the_audio_at_16khz(server):
    from csmstream.kernels.resample import Resampler
    from tests import ffmpeg

    text = "Wideband, please."

    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": text, "format": "g722_16000", "chunk_ms": 20, "seed": 5}))
            return await collect(ws)

    events = run(go())
    got = audio_of(events)
    r = Resampler(24000, 16000)
    pcm = np.frombuffer(reference_pcm(text, 0, seed=5), "<i2")
    res = np.concatenate([r.process(pcm), r.flush(), np.zeros(1, np.int16)])  # an odd sample ends with a zero
    want = ffmpeg.g722_encode(res[: len(res) // 2 * 2]).tobytes()
    assert got == want and events[-1][1]["audio_ms"] == pytest.approx(len(want) / 8, abs=0.1)


def test_eight_concurrent_clients_get_complete_correct_audio(server):
    texts = [f"Client number {i} speaking now." for i in range(8)]

    async def one(i):
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": texts[i], "seed": 100 + i, "speaker_id": i % 3}))
            return await collect(ws)

    async def go():
        return await asyncio.gather(*(one(i) for i in range(8)))

    results = run(go())
    for i, events in enumerate(results):
        assert events[-1][0] == "done" and not events[-1][1]["cancelled"]
        got = np.frombuffer(audio_of(events), "<i2").astype(np.int32)
        want = np.frombuffer(reference_pcm(texts[i], i % 3, seed=100 + i), "<i2").astype(np.int32)
        assert len(got) == len(want)
        # batched vs single-row float rounding may move a sample by an LSB, never more
        assert np.abs(got - want).max() <= 2


def test_cancel_stops_within_one_frame_and_frees_the_slot(server, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="csmstream.server")
    floor_frame_time(monkeypatch, server)
    text = "This is a long request that we will interrupt. " * 8

    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": text, "request_id": "long"}))
            first = await ws.recv()
            assert isinstance(first, bytes)
            await ws.send(json.dumps({"cancel": True}))
            events = await collect(ws)
            # the connection still works afterwards
            await ws.send(json.dumps({"text": "After cancel.", "max_audio_ms": 400}))
            return events, await collect(ws)

    events, after = run(go())
    assert events[-1] == ("done", events[-1][1]) and events[-1][1]["cancelled"] is True
    assert events[-1][1]["request_id"] == "long"
    assert after[-1][0] == "done" and audio_of(after)
    req = next(r for r in server.srv.recent if r.tag.rid == "long")
    assert wait_finished(req) and req.reason == "cancelled"
    assert req.frames - req.frames_at_cancel <= 1
    assert req.frames < req.max_frames
    # its log line counts the sentence and frames it had (it said "0 sentence(s) ... 0 frames")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("request long: cancelled"))
    m = re.fullmatch(r"request long: cancelled, \d+ ms audio in (\d+) sentence\(s\), ttfa [\d.]+ ms, (\d+) frames",
                     line)
    assert m and int(m[1]) == 1 and int(m[2]) >= 1, line


def test_disconnect_frees_the_slot_within_one_frame(server, monkeypatch):
    floor_frame_time(monkeypatch, server)
    text = "A request whose client goes away. " * 8

    async def go():
        ws = await connect(server.url)
        await ws.send(json.dumps({"text": text, "request_id": "gone"}))
        assert isinstance(await ws.recv(), bytes)
        await ws.close()

    run(go())
    req = next(r for r in reversed(server.srv.recent) if r.tag.rid == "gone")
    assert wait_finished(req) and req.reason == "cancelled"
    assert req.frames - req.frames_at_cancel <= 1
    deadline = time.monotonic() + 30
    while server.srv.worker.stats.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.srv.worker.stats.active == 0


def test_cancel_one_request_id_keeps_the_others(server):
    async def go():
        async with connect(server.url) as ws:
            for rid in ("a", "b", "c"):
                await ws.send(json.dumps({"text": f"Request {rid}.", "request_id": rid, "max_audio_ms": 800}))
            await ws.send(json.dumps({"cancel": True, "request_id": "b"}))
            return await collect(ws, until_done=3)

    dones = [m for k, m in run(go()) if k == "done"]
    assert [(d["request_id"], d["cancelled"]) for d in dones] == [("a", False), ("b", True), ("c", False)]


def test_a_request_id_is_free_again_the_moment_its_done_is_out(server, monkeypatch):
    """A client that reuses its request_id once it has the done (one id per conversation turn, say)
    is not told it is a duplicate: the server used to forget the request only after its sender
    resumed from sending that done, so a quick client (or a busy loop) got duplicate_request_id,
    and a cancel sent at once was taken for that request and never answered. Here the server's
    bookkeeping after each done is made slow on purpose."""
    from csmstream.transport.connection import Connection

    done = Connection._done

    async def done_then_dawdle(self, job, **kwargs):
        await done(self, job, **kwargs)
        await asyncio.sleep(0.3)

    monkeypatch.setattr(Connection, "_done", done_then_dawdle)

    async def go():
        async with connect(server.url) as ws:
            turns = []
            for n in range(3):
                await ws.send(json.dumps({"text": f"Turn {n}.", "request_id": "turn", "max_audio_ms": 400}))
                turns.append(await collect(ws))  # the next goes the moment this one's done is read
                await ws.send(json.dumps({"cancel": True, "request_id": "turn"} if n else {"cancel": True}))
                turns.append(await collect(ws))
            return turns

    turns = run(go())
    for events in turns[::2]:
        assert [k for k, _ in events if k != "audio"] == ["done"], events
        assert events[-1][1]["request_id"] == "turn" and not events[-1][1]["cancelled"]
    for [(kind, msg)] in turns[1::2]:  # (not taken for the request that has had its done)
        assert kind == "error" and msg["error"]["code"] == "nothing_to_cancel", msg


def test_queue_full_after_eight_waiting(server):
    async def go():
        async with connect(server.url) as ws:
            for i in range(10):
                await ws.send(json.dumps({"text": f"Queued request number {i}. " * 4, "request_id": f"q{i}"}))
            errors, dones = [], []
            while len(errors) + len(dones) < 10:
                m = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(m, str):
                    msg = json.loads(m)
                    (errors if "error" in msg else dones).append(msg)
                    if len(errors) == 1 and not dones:
                        await ws.send(json.dumps({"cancel": True}))
            return errors, dones

    errors, dones = run(go())
    assert [(e["error"]["code"], e["request_id"]) for e in errors] == [("queue_full", "q9")]
    assert [d["request_id"] for d in dones] == [f"q{i}" for i in range(9)]


def test_the_step_histogram_counts_every_frame_step_in_its_bucket(server):
    """csm_engine_step_milliseconds: one observation a frame step (its count is the ticks), each in
    the bucket its duration falls in (checked by hand on WorkerStats), cumulative, summing the
    steps' time."""
    from csmstream.engine.worker import STEP_MS_BOUNDS, WorkerStats
    from csmstream.transport.metrics import parse

    st = WorkerStats()
    for s in (0.003, 0.005, 0.0051, 0.09, 2.0):
        st.observe_step(s)
    assert st.step_ms == [2, 1, 0, 0, 0, 1, 0, 0, 0, 1] and st.ticks == 5  # 3 and 5 ms <= 5; 5.1 <= 10; 90 <= 160
    assert len(st.step_ms) == len(STEP_MS_BOUNDS) + 1
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Count my steps.", "max_audio_ms": 400}))
            return await collect(ws)

    assert run(go())[-1][0] == "done"
    base = server.url.replace("ws://", "http://").replace("/ws/generate", "")
    with urllib.request.urlopen(base + "/metrics") as r:
        m = parse(r.read().decode())
    stats = server.srv.worker.stats
    buckets = [m[f'csm_engine_step_milliseconds_bucket{{le="{b}"}}'] for b in (*STEP_MS_BOUNDS, "+Inf")]
    assert buckets == sorted(buckets) and buckets[-1] == m["csm_engine_step_milliseconds_count"]
    assert m["csm_engine_step_milliseconds_count"] == m["csm_engine_ticks_total"] >= 5  # (a 400 ms request: 5 steps)
    assert m["csm_engine_step_milliseconds_sum"] == pytest.approx(1000 * stats.step_seconds, rel=0.01, abs=1)


def test_health_metrics_and_unknown_path(server):
    base = server.url.replace("ws://", "http://").replace("/ws/generate", "")
    with urllib.request.urlopen(base + "/healthz") as r:
        assert r.status == 200
        health = json.loads(r.read())
    assert set(health) == {"status", "max_streams", "active", "free_slots", "waiting", "max_text_chars"}
    assert health["status"] == "ok" and health["max_text_chars"] == server.srv.max_text_chars
    assert health["free_slots"] + health["active"] == health["max_streams"] == server.srv.engine.max_streams
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    for name in ("csm_requests_total", "csm_active_streams", "csm_frames_per_second",
                 "csm_ttfa_milliseconds_bucket", "csm_real_time_factor_count", "csm_buffer_underruns_total",
                 "csm_errors_total", "csm_prefilling_requests", "csm_prefill_tokens_total"):
        assert name in text
    import csmstream

    info = f'csm_build_info{{version="{csmstream.__version__}",model="tiny",device="cpu",dtype="float32",' \
           f'quantize="none",max_streams="{server.srv.engine.max_streams}"}} 1'
    assert info in text.splitlines()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/nope")
    assert e.value.code == 404


def test_healthz_is_503_until_the_model_is_ready():
    import threading

    import csmstream
    from tests.servers import RunningServer

    gate = threading.Event()

    def slow_engine():
        gate.wait(30)
        return csmstream.load("tiny", device="cpu", max_streams=1)

    rs = RunningServer(slow_engine, warmup=True)
    rs._thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        srv = rs.srv
        if srv._ws is not None and srv._ws.sockets:
            break
        time.sleep(0.01)
    base = f"http://127.0.0.1:{rs.srv.port}"
    for page in ("/healthz", "/v1/models"):  # (no model yet, so none to list)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + page)
        assert e.value.code == 503
    assert json.loads(e.value.read())["error"]["code"] == "unavailable"
    with urllib.request.urlopen(base + "/livez") as r:  # alive while it loads: no restart is due
        assert r.status == 200 and json.loads(r.read())["status"] == "warming up"
    gate.set()
    assert rs._ready.wait(60)
    with urllib.request.urlopen(base + "/healthz") as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/v1/models") as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]
    rs.stop()


def test_permessage_deflate_is_declined_unless_the_server_is_asked_for_it(server):
    """A client offering permessage-deflate (websockets' client always does) gets plain frames from
    the default server, compressed ones from compression="deflate"; the audio is the same."""
    import csmstream
    from tests.servers import RunningServer

    async def one(url):
        async with connect(url) as ws:
            assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]  # offered
            await ws.send(json.dumps({**SEED_MSG, "seed": 4}))
            return ws.response.headers.get("Sec-WebSocket-Extensions"), audio_of(await collect(ws))

    plain_ext, plain = run(one(server.url))
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1), compression="deflate").start()
    try:
        deflate_ext, deflated = run(one(rs.url))
    finally:
        rs.stop()
    assert plain_ext is None
    assert deflate_ext is not None and deflate_ext.startswith("permessage-deflate")
    assert plain == deflated == reference_pcm(SEED_MSG["text"], seed=4)


def test_an_unknown_compression_is_refused():
    from csmstream.transport.server import StreamServer

    with pytest.raises(ValueError, match="compression must be None or 'deflate'"):
        StreamServer(lambda: None, compression="gzip")


def test_build_info_labels_escape_what_the_prometheus_text_format_requires():
    """A checkpoint path is a label value: its backslashes, quotes and newlines are escaped as the
    exposition format says (\\\\, \\", \\n), so one odd path cannot break the whole /metrics page."""
    from types import SimpleNamespace

    from csmstream.transport.metrics import build_info

    engine = SimpleNamespace(name='C:\\models\\"csm"\nv2', device="cuda:0", dtype="torch.bfloat16",
                             quantize="int8-depth", max_streams=64)
    help_, type_, sample = build_info(engine)
    assert help_.startswith("# HELP csm_build_info ") and type_ == "# TYPE csm_build_info gauge"
    assert sample.endswith('} 1') and '\n' not in sample
    assert 'model="C:\\\\models\\\\\\"csm\\"\\nv2",device="cuda:0",dtype="bfloat16",quantize="int8-depth",' \
           'max_streams="64"}' in sample


@pytest.mark.parametrize("bad", [True, -1, "30", float("nan"), float("inf")])
def test_a_bad_engine_stall_timeout_is_refused_when_the_server_is_made(bad):
    from csmstream.transport.server import StreamServer

    with pytest.raises(ValueError, match=r"engine_stall_s must be seconds >= 0 \(0: no watch; unset: 120 on a GPU"):
        StreamServer(object(), engine_stall_s=bad)
