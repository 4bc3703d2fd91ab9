"""serve --telnyx: Telnyx connects to the csm-stream process itself; /ws/generate requests that
name a call play into it (no extra hop)."""

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from csmstream.commands import telnyx_routes
from csmstream.integrations.telnyx_bridge import AUTH_HEADER
from csmstream.kernels.g711 import ulaw_decode, ulaw_encode
from csmstream.kernels.resample import Resampler
from tests.integrations.telnyx_sim import TelnyxSimulator
from tests.servers import RunningServer, as_written, fail_on, floor_frame_time, wait_finished, wait_until


@pytest.fixture(scope="module")
def phone_server():
    import csmstream

    routes, calls = telnyx_routes("PCMU", "tok", listen_token="ltok")
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=4), routes=routes, calls=calls).start()
    rs.telnyx_url = rs.url.replace("/ws/generate", "/telnyx")
    rs.calls = calls
    yield rs
    rs.stop()


async def next_json(ws, timeout=30):
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, str):
            return json.loads(m)


def sim(rs, ccid="v2:call-1"):
    return TelnyxSimulator(rs.telnyx_url, ccid, headers={AUTH_HEADER: "tok"})


def test_request_with_call_control_id_plays_into_the_call_and_reports_heard(phone_server):
    rs = phone_server

    async def go():
        async with sim(rs) as s:
            await wait_until(lambda: rs.calls.get("v2:call-1") is not None)
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "Straight into the call.", "call_control_id": "v2:call-1",
                                          "request_id": "p1", "seed": 2}))
                done = await next_json(ws)
            return s, done

    s, done = asyncio.run(go())
    assert done["done"] and done["request_id"] == "p1" and done["heard"] is True and not done["cancelled"]
    assert not s.problems and s.marks_echoed == ["p1"]
    assert done["audio_ms"] == pytest.approx(len(s.audio) / 8, abs=0.1) and len(s.audio) > 0


def test_cancel_is_barge_in(phone_server, monkeypatch):
    floor_frame_time(monkeypatch, phone_server)
    rs = phone_server

    async def go():
        async with sim(rs) as s:
            await wait_until(lambda: rs.calls.get("v2:call-1") is not None)
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "A long reply the caller talks over. " * 6,
                                          "call_control_id": "v2:call-1", "request_id": "long"}))
                await wait_until(lambda: len(s.media_times()) >= 10)
                await ws.send(json.dumps({"cancel": True}))
                done = await next_json(ws)
                await asyncio.sleep(0.3)
            return s, done

    s, done = asyncio.run(go())
    assert done["cancelled"] is True and done["heard"] is False
    assert len(s.cleared_at) == 1
    assert [m for t, m in s.received if t > s.cleared_at[0] and m.get("event") == "media"] == []
    req = next(r for r in reversed(rs.srv.recent) if r.tag.rid == "long")
    wait_finished(req)
    assert req.reason == "cancelled" and req.frames < req.max_frames


def test_an_agent_that_leaves_mid_speech_frees_its_connection_and_the_call_goes_on(phone_server, monkeypatch):
    """The agent's socket closes while its request is speaking into a call. The sender, cancelled
    inside the call's speech, used to take the speech's cancel for a barge-in and carry on, so the
    connection's handler waited for it for ever: the socket and one of the address's connection
    slots were held (64 such exits and the agent's address was refused). And the utterance was
    left "speaking", so the call refused every later one (an internal_error)."""
    floor_frame_time(monkeypatch, phone_server)
    rs = phone_server

    async def go():
        async with sim(rs, "v2:call-left") as s:
            await wait_until(lambda: rs.calls.get("v2:call-left") is not None)
            before = len(rs.srv.connections)
            ws = await connect(rs.url)
            await wait_until(lambda: len(rs.srv.connections) == before + 1)
            await ws.send(json.dumps({"text": "A long reply the agent walks away from. " * 6,
                                      "call_control_id": "v2:call-left", "request_id": "left"}))
            await wait_until(lambda: len(s.media_times()) >= 5)
            await ws.close()
            await wait_until(lambda: len(rs.srv.connections) == before, 10)
            call_alive = not rs.calls.get("v2:call-left").ended.is_set()
            async with connect(rs.url) as again:  # the call takes the next agent's request
                await again.send(json.dumps({"text": "Still here.", "call_control_id": "v2:call-left",
                                             "max_audio_ms": 300}))
                done = await next_json(again)
            return call_alive, done, list(s.marks_echoed)

    call_alive, done, marks = asyncio.run(go())
    assert call_alive and done["done"] is True and done["heard"] is True
    assert marks[0] == "left"  # what was queued of the left request played, and it ended with its mark
    req = next(r for r in reversed(rs.srv.recent) if r.tag.rid == "left")
    assert wait_finished(req) and req.reason == "cancelled" and req.frames < req.max_frames


def test_a_call_request_refused_as_busy_gets_its_error_alone_and_the_call_goes_on(phone_server, monkeypatch):
    """A request into a call refused by the engine (every slot and the queue full) used to get its
    busy error and then a done (cancelled) as well: two ends for one request, so an agent counting
    them took that done for its next request's. Now the error alone; the next request plays."""
    from csmstream.engine.worker import Busy

    rs = phone_server
    fail_on(monkeypatch, rs.srv.worker, "submit", "REFUSED", Busy("all streams are busy (injected)"))

    async def go():
        async with sim(rs, "v2:call-busy") as s:
            await wait_until(lambda: rs.calls.get("v2:call-busy") is not None)
            async with connect(rs.url) as ws:
                for rid, text in (("b1", "This one is REFUSED."), ("p2", "Then this one plays.")):
                    await ws.send(json.dumps({"text": text, "call_control_id": "v2:call-busy", "request_id": rid,
                                              "max_audio_ms": 400}))
                got = [await next_json(ws), await next_json(ws)]
                try:  # nothing more may come for either request
                    got.append(await next_json(ws, timeout=0.5))
                except TimeoutError:
                    pass
            return got, list(s.marks_echoed)

    got, marks = asyncio.run(go())
    assert [(m.get("error", {}).get("code"), m["request_id"]) for m in got] == [("busy", "b1"), (None, "p2")]
    assert got[1]["done"] is True and got[1]["heard"] is True and marks == ["p2"]  # nothing of b1's played


def test_unknown_call_is_an_error_and_hangup_cancels(phone_server):
    rs = phone_server

    async def go():
        async with connect(rs.url) as ws:
            await ws.send(json.dumps({"text": "Hello?", "call_control_id": "v2:nobody"}))
            err = await next_json(ws)
            s = sim(rs, "v2:call-2")
            await s.__aenter__()
            await wait_until(lambda: rs.calls.get("v2:call-2") is not None)
            await ws.send(json.dumps({"text": "The caller hangs up during this. " * 6,
                                      "call_control_id": "v2:call-2", "request_id": "h"}))
            await wait_until(lambda: len(s.media_times()) >= 5)
            await s.stop()
            done = await next_json(ws)
            await s.__aexit__(None, None, None)
            return err, done

    err, done = asyncio.run(go())
    assert err["error"]["code"] == "unknown_call" and "v2:nobody" in err["error"]["message"]
    assert done["request_id"] == "h" and done["cancelled"] is True and done["heard"] is False


def test_telnyx_endpoint_requires_the_auth_token(phone_server):
    async def go():
        async with TelnyxSimulator(phone_server.telnyx_url, headers={AUTH_HEADER: "nope"}):
            pass

    with pytest.raises(InvalidStatus) as e:
        asyncio.run(go())
    assert e.value.response.status_code == 401


def _l16_call_hears(rs, ccid: str, request: dict) -> np.ndarray:
    """A call on L16 at 24 kHz; `request` names it over /ws/generate: what the call heard, once
    its done says heard (checked against the call's own audio)."""
    async def go():
        url = rs.telnyx_url + "?codec=L16&sampling_rate=24000"
        async with TelnyxSimulator(url, ccid, headers={AUTH_HEADER: "tok"}, codec="L16", sampling_rate=24000) as s:
            await wait_until(lambda: rs.calls.get(ccid) is not None)
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({**request, "call_control_id": ccid}))
                done = await next_json(ws)
            return s, done

    s, done = asyncio.run(go())
    assert not s.problems and done["heard"] is True and done["audio_ms"] == pytest.approx(s.audio_ms)
    return s.pcm()


def _engine_pcm(text: str, speaker: int, seed: int) -> np.ndarray:
    from tests.transport.test_server import reference_pcm  # (one engine a process for these)

    return np.frombuffer(reference_pcm(text, speaker, seed=seed), "<i2")


def test_stream_url_query_picks_l16_at_24khz_the_engines_own_samples(phone_server):
    """`/telnyx?codec=L16&sampling_rate=24000` (the server's default is PCMU): the call gets the
    engine's 24 kHz samples untouched, big-endian, in 960-byte frames."""
    text = "Uncompressed into this call."
    got = _l16_call_hears(phone_server, "v2:call-3", {"text": text, "seed": 4, "speaker_id": 1})
    pcm = _engine_pcm(text, 1, 4)
    np.testing.assert_array_equal(got[: len(pcm)], pcm)
    assert not got[len(pcm):].any() and len(got) - len(pcm) < 480


def test_a_call_request_with_a_speed_plays_the_engines_samples_at_that_speed(phone_server):
    """`speed` on a request that names a call: the call hears the engine's samples played by the
    stretcher (its whole-signal reference, kernels/stretch), and `done` counts that audio."""
    from csmstream.kernels.stretch import stretch_ref

    text = "Quicker into this call."
    got = _l16_call_hears(phone_server, "v2:call-5", {"text": text, "seed": 4, "speed": 1.3})
    want = stretch_ref(_engine_pcm(text, 0, 4), 1.3)
    np.testing.assert_array_equal(got[: len(want)], want)
    assert not got[len(want):].any() and len(got) - len(want) < 480


@pytest.mark.parametrize("query,reason", [("?codec=G722&sampling_rate=8000", "G722 runs at 16000 Hz"),
                                          ("?bitrate=64", "unknown stream URL parameter 'bitrate'"),
                                          ("?codec=" + "%E2%82%AC" * 60, "codec must be one of"),  # 180 bytes
                                          ("?sampling_rate=%C2%B9%C2%B2", "whole number of Hz")])
def test_a_stream_url_asking_for_what_cannot_be_spoken_is_closed_saying_why(phone_server, query, reason):
    async def go():
        async with connect(phone_server.telnyx_url + query, additional_headers={AUTH_HEADER: "tok"}) as ws:
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), 10)
            return e.value

    closed = asyncio.run(go())
    assert closed.rcvd.code == 1008 and reason in closed.rcvd.reason


def listen_url(rs, query):
    return rs.url.replace("/ws/generate", "/telnyx/listen") + query


async def next_event(ws, timeout=10):
    """The next JSON event, skipping audio frames."""
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, str):
            return json.loads(m)


def test_the_agent_hears_the_caller_on_telnyx_listen(phone_server):
    """The listener connects before the call (the race it waits out); it gets the call's start,
    the caller's audio decoded and resampled to 16 kHz sample for sample, a key press, the mark of
    what was spoken into the call, and the stop."""
    rs = phone_server
    t = np.arange(8000) / 8000
    speech = (6000 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.int16)  # 1 s

    async def go():
        async with connect(listen_url(rs, "?call_control_id=v2:call-5"),
                           additional_headers={"Authorization": "Bearer ltok"}) as lw:
            async with TelnyxSimulator(rs.telnyx_url, "v2:call-5", headers={AUTH_HEADER: "tok"},
                                       caller_pcm=speech) as s:
                start = json.loads(await asyncio.wait_for(lw.recv(), 10))
                pcm = bytearray()
                while len(pcm) < 2 * 16000:
                    m = await asyncio.wait_for(lw.recv(), 10)
                    assert isinstance(m, bytes)
                    pcm += m
                await s.send_raw(json.dumps({"event": "dtmf", "stream_id": "STREAM-1", "dtmf": {"digit": "5"}}))
                dtmf = await next_event(lw)
                async with connect(rs.url) as ws:
                    await ws.send(json.dumps({"text": "Heard you.", "call_control_id": "v2:call-5",
                                              "request_id": "said", "max_audio_ms": 400}))
                    await next_json(ws)  # done, once the mark came back
                mark = await next_event(lw)
                await s.stop()
                stop = await next_event(lw)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(lw.recv(), 10)
                return start, bytes(pcm), dtmf, mark, stop, lw.close_code

    start, pcm, dtmf, mark, stop, code = asyncio.run(go())
    assert start["event"] == "start" and start["call_control_id"] == "v2:call-5" and start["from"] == "+15550001"
    assert (start["encoding"], start["sample_rate"], start["format"]) == ("PCMU", 8000, "pcm_16000")
    assert start["custom_parameters"] == {"agent": "a1"}
    r = Resampler(8000, 16000)
    want = r.process(ulaw_decode(ulaw_encode(speech)))
    np.testing.assert_array_equal(np.frombuffer(pcm, "<i2")[: len(want)], want)
    assert dtmf == {"event": "dtmf", "digit": "5"} and mark == {"event": "mark", "name": "said", "heard": True}
    assert stop == {"event": "stop"} and code == 1000


def test_a_bug_serving_a_listener_closes_it_with_1011_and_the_call_goes_on(phone_server, monkeypatch, caplog):
    """A bug while serving a listener used to end its socket as if the listener had left (a normal
    close, an INFO line without the traceback). Now: 1011 and an ERROR with the traceback; the
    call itself is untouched and still takes requests."""
    import logging

    from csmstream.integrations import telnyx_listen

    class Broken:
        def __init__(self, *a):
            pass

        def process(self, pcm):
            raise ZeroDivisionError("injected bug")

    monkeypatch.setattr(telnyx_listen, "Resampler", Broken)
    rs = phone_server

    async def go():
        async with connect(listen_url(rs, "?call_control_id=v2:call-6&format=pcm_16000"),
                           additional_headers={"Authorization": "Bearer ltok"}) as lw:
            async with sim(rs, "v2:call-6") as s:
                await wait_until(lambda: rs.calls.get("v2:call-6") is not None)
                json.loads(await asyncio.wait_for(lw.recv(), 10))  # start
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(lw.recv(), 10)
                async with connect(rs.url) as ws:
                    await ws.send(json.dumps({"text": "Still on.", "call_control_id": "v2:call-6",
                                              "max_audio_ms": 300}))
                    done = await next_json(ws)
                return lw.close_code, done, s.marks_echoed

    with caplog.at_level(logging.INFO, logger="csmstream.telnyx"):
        code, done, marks = asyncio.run(go())
    assert code == 1011 and done["heard"] is True and len(marks) == 1
    [rec] = [r for r in caplog.records if "serving the listener failed" in r.getMessage()]
    assert rec.levelname == "ERROR" and rec.exc_info[0] is ZeroDivisionError


@pytest.mark.parametrize("query,reason", [
    ("", "call_control_id is required"),
    ("?call_control_id=v2:nobody&wait=0.2", "no Telnyx media stream for call 'v2:nobody' connected within 0.2 s"),
    ("?call_control_id=v2:x&format=pcm_44100", "format must be one of pcm_8000, pcm_16000, pcm_24000"),
    ("?call_control_id=v2:x&wait=forever", "wait must be seconds in 0..60"),
    ("?call_control_id=v2:x&frame_ms=30", "frame_ms must be a multiple of 20 from 20 to 1000"),
    ("?call_control_id=v2:x&frame_ms=2000", "frame_ms must be a multiple of 20 from 20 to 1000"),
    ("?call_control_id=v2:x&frame_ms=%C2%B2%C2%B2", "frame_ms must be a multiple of 20 from 20 to 1000"),
    ("?call_control_id=v2:x&codec=G722", "unknown parameter 'codec'"),
])
def test_a_listener_asking_for_what_cannot_be_served_is_closed_saying_why(phone_server, query, reason):
    async def go():
        async with connect(listen_url(phone_server, query), additional_headers={"Authorization": "Bearer ltok"}) as ws:
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), 10)
            return e.value

    closed = asyncio.run(go())
    assert closed.rcvd.code == 1008 and reason in closed.rcvd.reason


def test_telnyx_listen_requires_the_servers_token(phone_server):
    async def go():
        async with connect(listen_url(phone_server, "?call_control_id=v2:x")):
            pass

    with pytest.raises(InvalidStatus) as e:
        asyncio.run(go())
    assert e.value.response.status_code == 401


def test_shutdown_closes_live_calls_and_listeners_instead_of_waiting_for_them():
    """SIGTERM with a call on the line: the server stops within its deadline (it used to wait for
    Telnyx to hang up, which a live call never does); the call's stream and its listener are
    closed with 1001, the listener after being told the call stopped or at once, and so is a
    listener still waiting for its call."""
    import time

    import csmstream
    from csmstream.transport.server import StreamServer

    async def go():
        routes, calls = telnyx_routes("PCMU", None)
        srv = StreamServer(csmstream.load("tiny", device="cpu", max_streams=1), port=0, routes=routes, calls=calls,
                           warmup=False)
        await srv.start()
        sim = TelnyxSimulator(srv.url.replace("/ws/generate", "/telnyx"), "v2:live")
        await sim.__aenter__()
        got = []

        async def listen():
            async with connect(srv.url.replace("/ws/generate", "/telnyx/listen") + "?call_control_id=v2:live") as lw:
                try:
                    async for m in lw:
                        got.append(m)
                except ConnectionClosed:
                    pass
                return lw.close_code

        listener = asyncio.create_task(listen())
        waiting = await connect(srv.url.replace("/ws/generate", "/telnyx/listen") + "?call_control_id=v2:later&wait=60")
        await wait_until(lambda: len(got) > 3)  # the start and some caller audio
        t0 = time.monotonic()
        await asyncio.wait_for(srv.stop(1.0), 20)
        took = time.monotonic() - t0
        code = await asyncio.wait_for(listener, 10)
        await sim.__aexit__(None, None, None)
        return took, sim.ws.close_code, code, waiting.close_code

    took, call_code, listener_code, waiting_code = asyncio.run(go())
    assert took < 8 and call_code == 1001 and listener_code in (1000, 1001)
    assert waiting_code == 1001  # a listener still waiting for its call does not hold the shutdown either


def test_metrics_count_the_calls_their_audio_both_ways_and_barge_ins(phone_server, monkeypatch):
    """/metrics: calls on the line now and in all, caller frames in, media out, utterances spoken
    and heard, clears, refused stream URLs -- each against what the simulated Telnyx counted."""
    from csmstream.benchtool import server_metrics

    floor_frame_time(monkeypatch, phone_server)
    rs = phone_server

    def scrape():
        return server_metrics(rs.url)

    async def go():
        before = scrape()
        async with connect(rs.telnyx_url + "?codec=XYZ", additional_headers={AUTH_HEADER: "tok"}) as bad:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(bad.recv(), 10)
        s = sim(rs, "v2:metrics")
        async with s:
            await wait_until(lambda: rs.calls.get("v2:metrics") is not None)
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "Counted once.", "call_control_id": "v2:metrics", "seed": 3}))
                assert (await next_json(ws))["heard"] is True
                n = len(s.media_times())
                await ws.send(json.dumps({"text": "Cut off by the caller. " * 4, "call_control_id": "v2:metrics"}))
                await wait_until(lambda: len(s.media_times()) >= n + 10)
                await ws.send(json.dumps({"cancel": True}))
                assert (await next_json(ws))["cancelled"] is True
            during = await asyncio.to_thread(scrape)
            await s.stop()
            await wait_until(lambda: rs.calls.get("v2:metrics") is None)
        after = await asyncio.to_thread(scrape)
        return s, before, during, after

    s, before, during, after = asyncio.run(go())

    def delta(name):
        return after[name] - before[name]

    assert during["csm_telnyx_calls_active"] == before["csm_telnyx_calls_active"] + 1
    assert after["csm_telnyx_calls_active"] == before["csm_telnyx_calls_active"]
    assert delta("csm_telnyx_calls_total") == 1 and delta("csm_telnyx_streams_refused_total") == 1
    assert delta("csm_telnyx_utterances_total") == 2 and delta("csm_telnyx_utterances_heard_total") == 1
    assert delta("csm_telnyx_clears_total") == 1 == len(s.cleared_at)
    assert delta("csm_telnyx_media_sent_total") == len(s.media_times()) > 0
    # every frame sent before the stop; the simulator's caller may send one more after it, unread
    assert s.caller_frames_sent - 1 <= delta("csm_telnyx_caller_frames_total") <= s.caller_frames_sent
    assert s.caller_frames_sent > 10
    assert delta("csm_telnyx_bad_messages_total") == 0 and not s.problems


def test_an_agent_streams_its_llm_tokens_into_the_call_with_the_python_client(phone_server):
    """The voice agent's whole path: tokens as its LLM writes them, through stream_text, into a live
    call; the reply is spoken sentence by sentence and the done says the caller heard it all."""
    from csmstream.transport.client import SesameWebSocketService

    rs = phone_server
    reply = "Sure, I can help with that. Your order shipped on Monday."

    async def go():
        async with sim(rs, "v2:call-llm") as s:
            await wait_until(lambda: rs.calls.get("v2:call-llm") is not None)
            async with SesameWebSocketService(rs.url) as svc:
                back = [c async for c in svc.stream_text(as_written(reply, 0.02), call_control_id="v2:call-llm", seed=1,
                                                         request_id="llm-1")]
                done = svc.last_done
            return s, back, done

    s, back, done = asyncio.run(go())
    assert back == []  # the audio went to the call, not to the agent
    assert done["request_id"] == "llm-1" and done["heard"] is True and not done["cancelled"]
    assert not s.problems and s.marks_echoed == ["llm-1"]
    assert done["audio_ms"] == pytest.approx(len(s.audio) / 8, abs=0.1) and len(s.audio) > 0
    assert [r.text for r in rs.srv.recent if r.tag.rid == "llm-1"] == ["Sure, I can help with that.",
                                                                      "Your order shipped on Monday."]


def test_a_call_over_tls_plays_and_reports_heard(tmp_path):
    """serve --telnyx --tls-cert: Telnyx's wss:// stream_url reaches /telnyx with no proxy in front,
    and an agent's request over wss:// plays into the call as over plain ws://."""
    import trustme

    import csmstream
    from csmstream.transport.tls import client_context, server_context

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trust = client_context(str(tmp_path / "ca.pem"))
    routes, calls = telnyx_routes("PCMU", "tok")
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), routes=routes, calls=calls,
                       ssl_context=server_context(str(tmp_path / "both.pem"))).start()
    try:
        assert rs.url.startswith("wss://")

        async def go():
            async with TelnyxSimulator(rs.url.replace("/ws/generate", "/telnyx"), "v2:tls-1",
                                       headers={AUTH_HEADER: "tok"}, ssl=trust) as s:
                await wait_until(lambda: calls.get("v2:tls-1") is not None)
                async with connect(rs.url, ssl=trust) as ws:
                    await ws.send(json.dumps({"text": "Over TLS into the call.", "call_control_id": "v2:tls-1",
                                              "request_id": "t1", "seed": 2}))
                    done = await next_json(ws)
                return s, done

        s, done = asyncio.run(go())
    finally:
        rs.stop()
    assert done["done"] and done["heard"] is True and not done["cancelled"] and not s.problems
    assert s.marks_echoed == ["t1"] and len(s.audio) > 0
    assert done["audio_ms"] == pytest.approx(len(s.audio) / 8, abs=0.1)
