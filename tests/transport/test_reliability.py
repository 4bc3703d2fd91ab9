"""Load, faults, shutdown and security: nothing hangs, one failure stays one failure, no one is let
in without credentials."""

import asyncio
import gc
import json
import logging
import random
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.servers import RunningServer, collect, fail_on, floor_frame_time, wait_finished


def reference_pcm(text, seed):
    import csmstream

    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    return np.concatenate(list(eng.stream(text, 0, seed=seed))).astype("<i2").tobytes()


def same_audio(got: bytes, want: bytes) -> bool:
    """Equal length and within 2 LSB: the codes are batch-invariant, a batched Mimi decode may move a
    sample by one LSB of float rounding."""
    a, b = np.frombuffer(got, "<i2").astype(int), np.frombuffer(want, "<i2").astype(int)
    return len(a) == len(b) and (len(a) == 0 or np.abs(a - b).max() <= 2)


def tiny(max_streams=2):
    import csmstream

    return csmstream.load("tiny", device="cpu", max_streams=max_streams)


def live_rings():
    from csmstream.transport.ring import PcmRing

    gc.collect()
    return sum(type(o) is PcmRing for o in gc.get_objects())


def assert_idle_and_freed(rs, baseline: int) -> None:
    """Once its clients are gone, the server's engine is idle within 10 s and no audio ring is left."""
    t = time.monotonic()
    while (rs.srv.worker.stats.active or rs.srv.worker.queued()) and time.monotonic() - t < 10:
        time.sleep(0.05)
    assert rs.srv.worker.stats.active == 0 and rs.srv.worker.queued() == 0
    assert live_rings() <= baseline


def test_more_clients_than_slots_wait_or_get_busy_never_hang():
    rs = RunningServer(tiny(2), max_engine_waiting=2).start()
    baseline = live_rings()
    texts = [f"Caller {i} is on the line." for i in range(6)]
    try:
        async def one(i):
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": texts[i], "seed": i, "max_audio_ms": 2000}))
                return await asyncio.wait_for(collect(ws), 60)

        async def go():
            return await asyncio.gather(*(one(i) for i in range(6)))

        results = asyncio.run(go())
        busy = [i for i, ev in enumerate(results) if ev[-1][0] == "error"]
        done = [i for i, ev in enumerate(results) if ev[-1][0] == "done"]
        assert all(results[i][-1][1]["error"]["code"] == "busy" for i in busy)
        assert len(done) >= 4 and len(busy) + len(done) == 6  # 2 running + 2 waiting at least
        for i in done:
            got = b"".join(b for k, b in results[i] if k == "audio")
            assert same_audio(got, reference_pcm(texts[i], i)[: 2000 * 48])
        time.sleep(0.3)
        assert rs.srv.worker.stats.active == 0 and rs.srv.worker.queued() == 0
        assert live_rings() <= baseline  # every request's audio buffer was freed
    finally:
        rs.stop()


def test_one_request_failing_in_the_engine_leaves_others_intact():
    rs = RunningServer(tiny(2)).start()

    def hook(req):
        if "FAULT" in req.text and req.frames == 3:
            raise ValueError("injected fault")

    rs.srv.worker.fault_hook = hook
    try:
        async def go():
            async with connect(rs.url) as a, connect(rs.url) as b:
                await a.send(json.dumps({"text": "This one will FAULT midway.", "seed": 1}))
                await b.send(json.dumps({"text": "This one is fine.", "seed": 2}))
                return await asyncio.gather(collect(a), collect(b))

        bad, good = asyncio.run(go())
        assert bad[-1][0] == "error" and bad[-1][1]["error"]["code"] == "generation_failed"
        assert "injected fault" in bad[-1][1]["error"]["message"]
        # the 3 frames made before the fault all went out first (none held back in the ring or encoder)
        got = b"".join(v for k, v in bad if k == "audio")
        assert same_audio(got, reference_pcm("This one will FAULT midway.", 1)[: 3 * 1920 * 2])
        assert good[-1][0] == "done"
        assert same_audio(b"".join(v for k, v in good if k == "audio"), reference_pcm("This one is fine.", 2))
        assert rs.srv.worker.alive
    finally:
        rs.stop()


def test_a_request_that_fails_and_is_then_cancelled_still_ends_with_its_error(monkeypatch):
    """The engine fails a request, and its client's cancel is handled while the audio made before
    the failure is still going out. The request used to end with nothing at all (its error was
    skipped as if already reported, and no done followed), so its client waited for ever. Now it
    ends with exactly one message, its error, and the connection takes the next request."""
    from csmstream.transport.connection import Connection

    rs = RunningServer(tiny(2)).start()

    def hook(req):
        if "FAULT" in req.text and req.frames == 3:
            raise ValueError("injected fault")

    source = Connection.source

    async def cancelled_at_the_failure(self, job, unit):
        async for pcm in source(self, job, unit):
            yield pcm
            req = job.active[0][0] if job.active else None
            if req is not None and req.finished and req.reason == "error" and not job.cancelled:
                await self._cancel(job.rid)  # what the client's {"cancel": true} does, arriving now

    monkeypatch.setattr(Connection, "source", cancelled_at_the_failure)
    rs.srv.worker.fault_hook = hook
    try:
        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "This one will FAULT midway.", "seed": 1, "request_id": "bad",
                                          "chunk_ms": 200}))
                await ws.send(json.dumps({"text": "Next one.", "seed": 2, "request_id": "next"}))
                return await collect(ws, until_done=2)

        events = asyncio.run(go())
        ends = [(k, m["request_id"]) for k, m in events if k != "audio"]
        assert ends == [("error", "bad"), ("done", "next")]
        assert "injected fault" in next(m for k, m in events if k == "error")["error"]["message"]
    finally:
        rs.stop()


@pytest.mark.parametrize("refusal,code", [("stopped", "unavailable"), ("bug", "internal_error")])
def test_a_later_sentence_refused_plays_the_earlier_ones_whole_then_the_error(monkeypatch, refusal, code):
    """The engine refuses a request's second sentence (it is stopping; a full queue never refuses a
    later sentence), or handing it over hits a server bug: the first sentence's audio goes out to
    its last sample, then the error; the connection takes the next request. (A bug used to cut the
    audio where it struck.)"""
    rs = RunningServer(tiny(2)).start()
    fail_on(monkeypatch, rs.srv.worker, "submit", "REFUSED", {
        "stopped": RuntimeError("engine stopped"), "bug": TypeError("injected bug")}[refusal])
    try:
        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "The first sentence is fine. This one is REFUSED.", "seed": 4,
                                          "request_id": "two"}))
                first = await collect(ws)
                await ws.send(json.dumps({"text": "Next one.", "seed": 2, "request_id": "next"}))
                return first, await collect(ws)

        first, after = asyncio.run(go())
        assert [k for k, _ in first if k != "audio"] == ["error"]
        assert first[-1][1]["error"]["code"] == code and first[-1][1]["request_id"] == "two"
        if refusal == "bug":
            assert "TypeError: injected bug" in first[-1][1]["error"]["message"]
        got = b"".join(v for k, v in first if k == "audio")
        assert same_audio(got, reference_pcm("The first sentence is fine.", 4))
        assert after[-1][0] == "done"
        assert same_audio(b"".join(v for k, v in after if k == "audio"), reference_pcm("Next one.", 2))
    finally:
        rs.stop()


def test_a_server_bug_on_one_request_is_an_internal_error_and_the_connection_goes_on(monkeypatch):
    """A bug (here: prepare raising a TypeError, as tokenizers did on a lone surrogate) ends that
    request with an error naming it, not a sender that died silently with the client waiting."""
    rs = RunningServer(tiny(2)).start()
    fail_on(monkeypatch, rs.srv.worker, "prepare", "BUG", TypeError("injected bug"))
    try:
        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "This BUG trips the server.", "request_id": "bad"}))
                await ws.send(json.dumps({"text": "This one is fine.", "seed": 2, "request_id": "good"}))
                return await collect(ws, until_done=2)

        events = asyncio.run(go())
        ends = [(k, m) for k, m in events if k != "audio"]
        assert [k for k, _ in ends] == ["error", "done"]
        err = ends[0][1]
        assert err["request_id"] == "bad" and err["error"]["code"] == "internal_error"
        assert "TypeError: injected bug" in err["error"]["message"] and "server bug" in err["error"]["message"]
        assert ends[1][1]["request_id"] == "good"
        assert same_audio(b"".join(v for k, v in events if k == "audio"), reference_pcm("This one is fine.", 2))
        assert rs.srv.metrics.errors.get("internal_error") == 1
    finally:
        rs.stop()


def test_a_server_bug_on_one_message_is_an_internal_error_and_the_running_request_plays_on(monkeypatch):
    from csmstream.transport import protocol

    rs = RunningServer(tiny(2)).start()
    floor_frame_time(monkeypatch, rs)  # (the running request is still generating when the bad message comes)
    parse = protocol.parse

    def buggy(data, **kw):
        if "BUG" in data:
            raise KeyError("injected bug")
        return parse(data, **kw)

    monkeypatch.setattr(protocol, "parse", buggy)
    try:
        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "This one is fine.", "seed": 2, "request_id": "good"}))
                await ws.send(json.dumps({"text": "A BUG trips the server.", "request_id": "bad"}))
                return await collect(ws, until_done=2)

        events = asyncio.run(go())
        (err,) = [m["error"] for k, m in events if k == "error"]
        (done,) = [m for k, m in events if k == "done"]
        assert err["code"] == "internal_error" and "KeyError" in err["message"] and "server bug" in err["message"]
        assert done["request_id"] == "good" and not done["cancelled"]
        assert same_audio(b"".join(v for k, v in events if k == "audio"), reference_pcm("This one is fine.", 2))
    finally:
        rs.stop()


def test_engine_thread_death_turns_health_red_and_requests_get_a_clear_error():
    rs = RunningServer(tiny(1)).start()
    base = rs.url.replace("ws://", "http://").replace("/ws/generate", "")

    def hook(req):
        raise SystemExit("injected: the engine thread dies")

    try:
        async def go():
            async with connect(rs.url) as ws:
                rs.srv.worker.fault_hook = hook
                await ws.send(json.dumps({"text": "Goodbye, engine.", "seed": 1}))
                first = await collect(ws)
                await ws.send(json.dumps({"text": "Anyone there?"}))
                second = await collect(ws)
                return first, second

        first, second = asyncio.run(go())
        assert first[-1][0] == "error" and "engine thread died" in first[-1][1]["error"]["message"]
        assert second[-1][0] == "error" and second[-1][1]["error"]["code"] == "unavailable"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/healthz")
        assert e.value.code == 503 and json.loads(e.value.read())["status"] == "engine thread died"
        assert http(base + "/livez") == 503  # (a restart is due: liveness says so too)
        with pytest.raises(InvalidStatus):
            asyncio.run(connect(rs.url).__aenter__())
    finally:
        rs.stop()


def test_a_stuck_engine_ends_its_requests_with_an_error_and_turns_health_and_liveness_red():
    """An engine step that never returns (a GPU that stopped answering; here a fault hook that
    blocks) must not leave clients waiting forever: after engine_stall_s the request gets an error
    saying why, the next one `unavailable`, /healthz and /livez 503 (a restart is due); /livez was
    200 before, and needs no token."""
    import threading

    release = threading.Event()
    rs = RunningServer(tiny(1), engine_stall_s=3, auth_token="t0ken", warmup=True).start()
    base = rs.url.replace("ws://", "http://").replace("/ws/generate", "")
    auth = {"Authorization": "Bearer t0ken"}
    try:
        assert http(base + "/livez") == 200 and http(base + "/healthz") == 200
        from csmstream.transport.metrics import parse

        with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=auth)) as r:
            assert parse(r.read().decode())["csm_engine_current_step_seconds"] < 1  # (idle: 0 between steps)

        async def go():
            async with connect(rs.url, additional_headers=auth) as ws:
                rs.srv.worker.fault_hook = lambda req: release.wait(120)
                await ws.send(json.dumps({"text": "The engine hangs here.", "seed": 1}))
                first = await asyncio.wait_for(collect(ws), 30)
                await ws.send(json.dumps({"text": "Anyone there?"}))
                return first, await asyncio.wait_for(collect(ws), 30)

        first, second = asyncio.run(go())
        err = first[-1][1]["error"]
        assert first[-1][0] == "error" and "the engine stopped: one step has run over 3 s" in err["message"]
        assert second[-1][0] == "error" and second[-1][1]["error"]["code"] == "unavailable"
        for page in ("/healthz", "/livez"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + page)
            assert e.value.code == 503 and json.loads(e.value.read())["status"] == "engine stalled"
        with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=auth)) as r:
            got = parse(r.read().decode())
        assert got["csm_engine_current_step_seconds"] > 3 and got["csm_ready"] == 0  # (the step still runs: stuck)
    finally:
        release.set()
        rs.stop()


def test_cancel_storm_does_not_disturb_another_client(server):
    async def storm():
        async with connect(server.url) as ws:
            for i in range(40):
                await ws.send(json.dumps({"text": f"Storm {i}.", "request_id": f"s{i % 5}-{i}"}))
                await ws.send(json.dumps({"cancel": True}))
            await asyncio.sleep(0.5)

    async def calm():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Calm and steady.", "seed": 8}))
            return await collect(ws)

    async def go():
        return await asyncio.gather(storm(), calm())

    _, events = asyncio.run(go())
    assert events[-1][0] == "done"
    assert same_audio(b"".join(v for k, v in events if k == "audio"), reference_pcm("Calm and steady.", 8))


# a session's audio format, and how many bytes a millisecond of it is
FORMATS = {"pcm_24000": 48, "pcm_16000": 32, "pcm_8000": 16, "ulaw_8000": 8, "alaw_8000": 8, "g722_16000": 8,
           "pcm_22050": 44.1}


def _turns(rnd: random.Random) -> list:
    """A request's `context`: a caller's µ-law turn, a 24 kHz one before it, or a broken turn."""
    from csmstream.transport.context import turn

    caller = turn(1, "Could you move my booking?", np.full(1600, 0xFF, np.uint8), "ulaw_8000")
    agent = turn(0, "Sure.", (np.sin(np.arange(4800) / 7) * 3000).astype(np.int16))
    broken = {"speaker_id": 1, "text": "x", "audio": "!!", "audio_format": "ulaw_8000"}
    return rnd.choice([[caller], [agent, caller], [], [broken]])


def _random_message(rnd: random.Random, fmt: str) -> str:
    """One message of a client that does anything in any order: requests whole or streamed, with
    and without ids (reused ones too), continuing the connection's voice, with the caller's turn as
    context; appends, flushes, cancels, bad messages. Every request is in the session's `fmt`."""
    kind = rnd.random()
    if kind < 0.35:
        msg = {"text": rnd.choice(["Hello.", "Hi there. How are you?", "One", "A b c."]),
               "max_audio_ms": rnd.choice([100, 400, 1200]), "chunk_ms": rnd.choice([20, 100, 500]),
               "final": rnd.random() < 0.7, "format": fmt}
        if rnd.random() < 0.7:
            msg["request_id"] = f"r{rnd.randint(0, 3)}"
        if rnd.random() < 0.3:
            msg["continue_previous"] = True
        if rnd.random() < 0.15:
            msg["context"] = _turns(rnd)
    elif kind < 0.5:
        msg = {"cancel": True, **({"request_id": f"r{rnd.randint(0, 3)}"} if rnd.random() < 0.5 else {})}
    elif kind < 0.6:
        msg = {"flush": True}
    elif kind < 0.75:  # (with no text stream open, a request of its own)
        msg = {"text": " and more", "final": rnd.random() < 0.5, "format": fmt}
    else:
        return rnd.choice(["junk", '{"text": 5}', '{"text": "x", "topk": 0}', '{"text": "\\ud800"}', "[" * 5000,
                           '{"text": "hi", "context": 5}'])
    return json.dumps(msg)


def _audio_accounted(got: list, fmt: str) -> list:
    """Each request's audio comes before its `done`, in turn with the others on the connection: the
    bytes since the previous `done` are what this one's `audio_ms` says (where no error came
    between: an error may end a request with audio out or none). Returns the mismatches."""
    bad, pending, clean = [], 0, True
    for m in got:
        if isinstance(m, bytes):
            pending += len(m)
            continue
        d = json.loads(m)
        if "error" in d:
            clean = False
        elif d.get("done"):
            if clean and abs(pending - d["audio_ms"] * FORMATS[fmt]) > 2 * FORMATS[fmt] + 2:
                bad.append((pending, d))
            pending, clean = 0, True
    return bad


def test_random_message_sequences_never_close_a_connection_hang_or_leak(caplog):
    """Twelve clients at once send random sequences of messages, then cancel or flush and ask for
    one more request: every connection still answers it, every request's audio adds up to what its
    `done` says, nothing is logged as a server error, and once they are gone the engine is idle and
    every audio buffer is freed."""
    rs = RunningServer(tiny(4)).start()
    baseline = live_rings()
    try:
        async def session(seed):
            rnd = random.Random(seed)
            fmt = rnd.choice(sorted(FORMATS))
            got = []
            async with connect(rs.url) as ws:
                for _ in range(rnd.randint(4, 14)):
                    await ws.send(_random_message(rnd, fmt))
                    if rnd.random() < 0.3:
                        await asyncio.sleep(rnd.random() * 0.2)
                await ws.send(json.dumps({"cancel": True} if rnd.random() < 0.6 else {"flush": True}))
                last = json.dumps({"text": "Still here.", "request_id": "last", "max_audio_ms": 300, "format": fmt})
                await ws.send(last)
                while True:
                    m = await asyncio.wait_for(ws.recv(), 60)
                    got.append(m)
                    if isinstance(m, bytes) or (d := json.loads(m)).get("request_id") != "last":
                        continue
                    if d.get("error", {}).get("code") in ("busy", "queue_full"):  # what a client retries
                        await asyncio.sleep(0.2)
                        await ws.send(last)
                        continue
                    if "done" in d or "error" in d:
                        return d, _audio_accounted(got, fmt)

        async def go():
            return await asyncio.gather(*(session(s) for s in range(12)))

        with caplog.at_level(logging.WARNING):
            ends = asyncio.run(go())
        assert [e.get("done") and not e["cancelled"] and e["audio_ms"] > 0 for e, _ in ends] == [True] * 12, ends
        assert [bad for _, bad in ends] == [[]] * 12
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert_idle_and_freed(rs, baseline)
    finally:
        rs.stop()


def test_graceful_stop_lets_running_requests_finish_then_closes_1001():
    rs = RunningServer(tiny(1)).start()
    try:
        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "Finishing during shutdown.", "seed": 4, "max_audio_ms": 3000}))
                first = await ws.recv()
                assert isinstance(first, bytes)
                rs.loop.call_soon_threadsafe(lambda: rs.loop.create_task(rs.srv.stop(timeout=30)))
                events = [("audio", first)] + await collect(ws)
                with pytest.raises(ConnectionClosed) as e:
                    await asyncio.wait_for(ws.recv(), 10)
                return events, e.value.rcvd.code

        events, code = asyncio.run(go())
        assert events[-1][0] == "done" and not events[-1][1]["cancelled"]
        assert sum(len(b) for k, b in events if k == "audio") == 3000 * 48
        assert code == 1001
    finally:
        rs.stop()


def test_stop_deadline_cancels_what_is_left_with_a_done():
    rs = RunningServer(tiny(1)).start()
    try:
        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "A long answer that cannot finish in time. " * 10}))
                await ws.recv()
                rs.loop.call_soon_threadsafe(lambda: rs.loop.create_task(rs.srv.stop(timeout=0.1)))
                return await asyncio.wait_for(collect(ws), 30)

        events = asyncio.run(go())
        assert events[-1][0] == "done" and events[-1][1]["cancelled"] is True
        assert events[-1][1]["reason"] == "server_shutdown"  # not the client's own cancel
    finally:
        rs.stop()


def test_the_client_raises_when_the_server_shuts_down_mid_request_not_a_silent_short_stream():
    """The project's client took a shutdown's done (cancelled: true) as the end of the audio: the
    caller got a short stream and no error. Its own cancel still ends the stream quietly."""
    from csmstream.transport.client import SesameConnectionError, SesameWebSocketService

    rs = RunningServer(tiny(1)).start()
    try:
        async def own_cancel():
            async with SesameWebSocketService(rs.url) as svc:
                got = 0
                async for chunk in svc.stream_tts("A long answer that is cut short. " * 10, request_id="mine"):
                    got += len(chunk)
                    if got == len(chunk):
                        await svc.cancel("mine")
                return got, svc.last_done

        got, done = asyncio.run(own_cancel())
        assert got > 0 and done["cancelled"] is True and "reason" not in done

        async def shutdown():
            svc, got = SesameWebSocketService(rs.url), 0
            with pytest.raises(SesameConnectionError, match="shut down before the request finished") as e:
                async for chunk in svc.stream_tts("A long answer that cannot finish in time. " * 10):
                    got += len(chunk)
                    if got == len(chunk):
                        rs.loop.call_soon_threadsafe(lambda: rs.loop.create_task(rs.srv.stop(timeout=0.1)))
            return got, svc.last_done, str(e.value)

        got, done, message = asyncio.run(shutdown())
        assert done["cancelled"] is True and done["reason"] == "server_shutdown"
        assert f"({done['audio_ms']} ms of audio had been sent)" in message and done["audio_ms"] == got / 48
    finally:
        rs.stop()


@pytest.fixture(scope="module")
def secured():
    rs = RunningServer(tiny(2), auth_token="t0ken", allowed_origins=["https://app.example"],
                       max_connections_per_ip=3, max_requests_per_minute=3).start()
    yield rs
    rs.stop()


def http(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_auth_token_required_everywhere_but_healthz(secured):
    base = secured.url.replace("ws://", "http://").replace("/ws/generate", "")
    assert http(base + "/healthz") == 200
    assert http(base + "/metrics") == 401
    assert http(base + "/metrics", {"Authorization": "Bearer t0ken"}) == 200
    assert http(base + "/voices", {"Authorization": "Bearer nope"}) == 401
    for listing in ("/v1/models", "/v1/voices", "/v1/voices/0"):  # (OpenAI's and ElevenLabs' lists ask for it too)
        assert http(base + listing) == 401 and http(base + listing, {"Authorization": "Bearer t0ken"}) == 200

    async def attempt(headers):
        try:
            async with connect(secured.url, additional_headers=headers) as ws:
                await ws.send(json.dumps({"text": "Authorised.", "max_audio_ms": 300}))
                return (await collect(ws))[-1][0]
        except InvalidStatus as e:
            return e.response.status_code

    assert asyncio.run(attempt({})) == 401
    assert asyncio.run(attempt({"Authorization": "Bearer wrong"})) == 401
    assert asyncio.run(attempt({"Authorization": "Bearer t0ken"})) == "done"
    el = secured.url.replace("/ws/generate", "/v1/text-to-speech/0/stream-input")

    async def eleven():
        async with connect(el, additional_headers={"xi-api-key": "t0ken"}) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": "Hi there. "}))
            await ws.send(json.dumps({"text": ""}))
            async for m in ws:
                if json.loads(m).get("isFinal"):
                    return True

    assert asyncio.run(eleven())

    async def eleven_multi(headers):
        try:
            async with connect(el.replace("/stream-input", "/multi-stream-input"), additional_headers=headers) as ws:
                await ws.send(json.dumps({"text": "Hi there. ", "context_id": "c", "flush": True}))
                await ws.send(json.dumps({"close_socket": True}))
                async for m in ws:
                    if json.loads(m).get("isFinal"):
                        return True
        except InvalidStatus as e:
            return e.response.status_code
        except ConnectionClosed as e:
            return e.rcvd.code

    # with no credential at all, ElevenLabs' paths wait for one in the first message (the next test);
    # this one carries none: refused there
    assert asyncio.run(eleven_multi({})) == 1008
    assert asyncio.run(eleven_multi({"xi-api-key": "wrong"})) == 401
    assert asyncio.run(eleven_multi({"xi-api-key": "t0ken"})) is True

    async def browser(subprotocols, url=secured.url):
        """A browser's WebSocket sets no headers: the token comes as the subprotocol after "bearer"."""
        try:
            async with connect(url, subprotocols=subprotocols) as ws:
                chosen = ws.subprotocol
                await ws.send(json.dumps({"text": "Authorised.", "max_audio_ms": 300}))
                return chosen, (await collect(ws))[-1][0]
        except InvalidStatus as e:
            return e.response.status_code

    assert asyncio.run(browser(["bearer", "t0ken"])) == ("bearer", "done")  # the token is never echoed
    assert asyncio.run(browser(["json", "bearer", "t0ken"])) == ("bearer", "done")
    assert asyncio.run(browser(["bearer", "wrong"])) == 401
    assert asyncio.run(browser(["t0ken"])) == 401  # the token alone is not a credential
    assert asyncio.run(browser(["bearer"])) == 401
    assert asyncio.run(browser(["t0ken", "bearer"])) == 401  # (nothing after "bearer")

    from csmstream.transport.client import SesameWebSocketService

    async def client():
        return [c async for c in SesameWebSocketService(secured.url, token="t0ken").stream_tts("Hi.", max_audio_ms=200)]

    assert sum(map(len, asyncio.run(client()))) == 200 * 48


def test_origins_connection_and_rate_limits(secured):
    auth = {"Authorization": "Bearer t0ken"}

    async def origin(o):
        try:
            async with connect(secured.url, additional_headers={**auth, "Origin": o}):
                return 101
        except InvalidStatus as e:
            return e.response.status_code

    assert asyncio.run(origin("https://evil.example")) == 403
    assert asyncio.run(origin("https://app.example")) == 101

    async def many():
        conns = [await connect(secured.url, additional_headers=auth) for _ in range(3)]
        try:
            with pytest.raises(InvalidStatus) as e:
                await connect(secured.url, additional_headers=auth)
            return e.value.response.status_code
        finally:
            for c in conns:
                await c.close()

    assert asyncio.run(many()) == 429

    async def rate():
        async with connect(secured.url, additional_headers=auth) as ws:
            codes = []
            for i in range(4):
                await ws.send(json.dumps({"text": f"Req {i}.", "max_audio_ms": 100}))
                codes.append((await collect(ws))[-1])
            return codes

    codes = asyncio.run(rate())
    assert [c[0] for c in codes[:3]] == ["done"] * 3
    assert codes[3][0] == "error" and codes[3][1]["error"]["code"] == "rate_limited"


def test_a_client_that_stops_reading_is_cut_off_and_others_are_unaffected(monkeypatch):
    import socket

    rs = RunningServer(tiny(2), send_timeout=0.5, socket_send_buffer=8192).start()
    floor_frame_time(monkeypatch, rs, 0.02)  # a sentence takes >= 1.2 s: it is mid-way at the cut-off
    try:
        async def slow():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", rs.srv.port))
            ws = await connect(rs.url, sock=sock, max_queue=1)
            await ws.send(json.dumps({"text": "A very long answer nobody reads. " * 8, "request_id": "slow"}))
            await asyncio.sleep(3.0)  # never reads
            return ws

        async def normal():
            await asyncio.sleep(0.2)
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "I read everything.", "seed": 3}))
                return await collect(ws)

        async def go():
            return await asyncio.gather(slow(), normal())

        ws, events = asyncio.run(go())
        assert events[-1][0] == "done"
        assert same_audio(b"".join(v for k, v in events if k == "audio"), reference_pcm("I read everything.", 3))
        # the reply is 8 sentences and the engine runs one sentence ahead of what was sent: once
        # the sends stall, no further sentence starts, the one generating is cancelled mid-way,
        # and its slot is free again
        reqs = [r for r in rs.srv.recent if r.tag.rid == "slow"]
        assert all(wait_finished(r) for r in reqs)
        assert 1 <= len(reqs) < 8
        assert reqs[-1].reason == "cancelled" and reqs[-1].frames < reqs[-1].max_frames
        assert all(r.reason in ("max_frames", "eos") for r in reqs[:-1])
        time.sleep(0.3)
        assert [r for r in rs.srv.recent if r.tag.rid == "slow"] == reqs
        assert rs.srv.health()["active"] == 0
        assert rs.srv.metrics.errors["slow_reader"] >= 1
    finally:
        rs.stop()


def test_elevenlabs_sockets_take_the_token_in_their_first_message(secured, monkeypatch):
    """As ElevenLabs documents for clients that cannot set headers: xi_api_key (or authorization:
    "Bearer ...") in the first message, when the handshake offers no credential."""
    from csmstream.transport import gate

    el = secured.url.replace("/ws/generate", "/v1/text-to-speech/0/stream-input")

    async def first_message(url, opening, then=()):
        async with connect(url) as ws:  # no header at all
            got = []
            try:
                await ws.send(json.dumps(opening))
                for m in then:  # (a refused socket may be closed by now)
                    await ws.send(json.dumps(m))
                async for m in ws:
                    got.append(json.loads(m))
                    if got[-1].get("isFinal"):
                        return "final", got
            except ConnectionClosed:
                pass
            return ws.close_code, got

    said = [{"text": "Hi there. "}, {"text": ""}]
    kind, got = asyncio.run(first_message(el, {"text": " ", "xi_api_key": "t0ken"}, said))
    assert kind == "final" and any(m.get("audio") for m in got)
    multi = el.replace("/stream-input", "/multi-stream-input")
    kind, _ = asyncio.run(first_message(multi, {"text": "Hi there. ", "context_id": "c", "flush": True,
                                               "authorization": "Bearer t0ken"}, [{"close_socket": True}]))
    assert kind == "final"
    for wrong in ({"text": " ", "xi_api_key": "nope"}, {"text": " ", "authorization": "t0ken"}, {"text": " "}):
        code, got = asyncio.run(first_message(el, wrong, said))
        assert code == 1008 and got[0]["error"] == "unauthorized"
        assert "missing or wrong credentials: send the 'xi-api-key' header, or xi_api_key" in got[0]["message"]
    monkeypatch.setattr(gate, "AUTH_WAIT_S", 0.3)

    async def silent():
        async with connect(el) as ws:
            m = json.loads(await ws.recv())
            await asyncio.wait_for(ws.wait_closed(), 10)
            return ws.close_code, m["message"]

    code, message = asyncio.run(silent())
    assert code == 1008 and message.startswith("no credentials: the first message did not come within 0 s")
    # the other ways are unchanged: a wrong header is still a 401 at the handshake, and /ws/generate has
    # no message-borne token

    async def handshake(url, headers):
        try:
            async with connect(url, additional_headers=headers):
                return 101
        except InvalidStatus as e:
            return e.response.status_code

    assert asyncio.run(handshake(el, {"xi-api-key": "nope"})) == 401
    # a socket not yet let in learns nothing of the server, not even which voices it has
    code, got = asyncio.run(first_message(el.replace("/0/", "/nobody/"), {"text": " "}))
    assert code == 1008 and got == [got[0]] and "voice" not in got[0]["message"]
    assert asyncio.run(handshake(secured.url, {})) == 401


def test_the_main_ports_pages_name_a_listed_origin_so_its_page_can_read_them(secured):
    """The GET pages on the WebSocket port (a page needs no preflight for a GET without a token)."""
    base = secured.url.replace("ws://", "http://").replace("/ws/generate", "")

    def get(path, headers):
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers)) as r:
                return r.status, r.headers.get("Access-Control-Allow-Origin")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Access-Control-Allow-Origin")

    app = "https://app.example"
    assert get("/healthz", {"Origin": app}) == (200, app)
    assert get("/voices", {"Origin": app, "Authorization": "Bearer t0ken"}) == (200, app)
    assert get("/metrics", {"Origin": app}) == (401, app)  # the page can read why
    assert get("/healthz", {}) == (200, None)
    assert get("/metrics", {"Origin": "https://evil.example", "Authorization": "Bearer t0ken"}) == (403, None)
