"""TelnyxService routing, the Call Control helper (against a local HTTP server), and the bridge
behind a Starlette/FastAPI-style socket object."""

import asyncio
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from csmstream.integrations.call_control import TelnyxAPIError, TelnyxAuthError, TelnyxValidationError, start_streaming
from csmstream.integrations.telnyx_bridge import CallRegistry, TelnyxCall, UnknownCall
from csmstream.integrations.telnyx_service import TelnyxService


def test_routing_by_provider_and_websocket_flag():
    calls = []

    async def eleven(ccid, text, cfg):
        calls.append(("elevenlabs", ccid, text))
        return "played by the user's own path"

    async def legacy(ccid, text, cfg):
        calls.append(("sesame_rest", ccid, text))

    svc = TelnyxService(CallRegistry(), providers={"elevenlabs": eleven, "sesame_rest": legacy})

    async def go():
        r = await svc.speak_text("c1", "hi", {"tts_provider": "elevenlabs", "use_websocket_tts": True})
        await svc.speak_text("c2", "yo", {"tts_provider": "sesame", "use_websocket_tts": False})
        with pytest.raises(ValueError, match="no TTS handler for tts_provider='polly'"):
            await svc.speak_text("c3", "x", {"tts_provider": "polly"})
        with pytest.raises(ValueError, match="agent_config must be a dict"):
            await svc.speak_text("c3", "x", None)
        with pytest.raises(ValueError, match=r"agent_config\['sesame_settings'\] must be a dict .*got str"):
            await svc.speak_text("c3", "x", {"tts_provider": "sesame", "sesame_settings": "speaker 1"})
        return r

    assert asyncio.run(go()) == "played by the user's own path"
    assert calls == [("elevenlabs", "c1", "hi"), ("sesame_rest", "c2", "yo")]


def test_unused_sesame_settings_are_warned_of_once_each_and_named(caplog):
    """A typo or another provider's key in sesame_settings changes nothing the call hears, so it is
    a WARNING (once per key and service) before the utterance goes on."""
    svc = TelnyxService(CallRegistry(), stream_wait=0.01)

    async def go(settings):
        with pytest.raises(UnknownCall):  # (no such call: the settings were looked at first)
            await svc.speak_text("v2:none", "Hi.", {"tts_provider": "sesame", "sesame_settings": settings})

    with caplog.at_level("WARNING", logger="csmstream.telnyx"):
        asyncio.run(go({"speaker_id": 1, "voice_id": "ada", "temprature": 0.5, "stability": 0.3}))
        asyncio.run(go({"voice_id": "ada", "seed": 3, "topK": 5}))
        asyncio.run(go({"speaker_id": 0, "voice": "ada", "speed": 1.1}))
    warned = [r.getMessage() for r in caplog.records if "sesame_settings" in r.getMessage()]
    assert len(warned) == 2
    assert warned[0].startswith("agent_config['sesame_settings'] keys voice_id (did you mean voice?), temprature "
                                "(did you mean temperature?), stability are not used and are ignored (it takes "
                                "speaker_id, temperature, topk, seed, voice, context, speed, continue_previous, url)")
    assert warned[1].startswith("agent_config['sesame_settings'] keys topK (did you mean topk?) are not used")


def test_another_provider_gets_an_llms_pieces_joined_once_they_have_all_come():
    got = []

    async def eleven(ccid, text, cfg):
        got.append(text)

    async def pieces():
        for p in ["Hello ", "there, ", "caller."]:
            await asyncio.sleep(0)
            yield p

    svc = TelnyxService(CallRegistry(), providers={"elevenlabs": eleven})
    cfg = {"tts_provider": "elevenlabs"}

    async def go():
        await svc.speak_text("c1", pieces(), cfg)
        await svc.speak_text("c1", ["Sync ", "pieces."], cfg)
        with pytest.raises(ValueError, match="pieces of text must be str, got NoneType"):
            await svc.speak_text("c1", ["ok", None], cfg)
        with pytest.raises(ValueError, match="text must be a str or pieces of text"):
            await svc.speak_text("c1", 5, cfg)

    asyncio.run(go())
    assert got == ["Hello there, caller.", "Sync pieces."]


def test_sesame_route_needs_a_connected_call():
    svc = TelnyxService(CallRegistry(), stream_wait=0.05)

    async def go():
        await svc.speak_text("v2:missing", "hi", {"tts_provider": "sesame", "use_websocket_tts": True})

    with pytest.raises(UnknownCall, match="streaming_start"):
        asyncio.run(go())


class _Recorder(BaseHTTPRequestHandler):
    replies: ClassVar[list] = []
    seen: ClassVar[list] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, dict(self.headers), json.loads(body)))
        status, payload = self.replies.pop(0)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()  # bytes: sent as they are
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if isinstance(payload, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture()
def telnyx_api():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.replies, _Recorder.seen = [], []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v2", _Recorder
    httpd.shutdown()


def test_start_streaming_sends_the_exact_body_and_headers(telnyx_api, monkeypatch):
    base, rec = telnyx_api
    rec.replies.append((200, {"data": {"result": "ok"}}))
    monkeypatch.setenv("TELNYX_API_KEY", "KEY123")
    out = asyncio.run(start_streaming("v2:abc", "wss://host/telnyx", "PCMU", base_url=base,
                                      auth_token="tok", client_state="c3RhdGU="))
    assert out == {"result": "ok"}
    path, headers, body = rec.seen[0]
    assert path == "/v2/calls/v2:abc/actions/streaming_start"
    assert headers["Authorization"] == "Bearer KEY123" and headers["Content-Type"] == "application/json"
    assert body == {"stream_url": "wss://host/telnyx", "stream_track": "inbound_track",
                    "stream_bidirectional_mode": "rtp", "stream_bidirectional_codec": "PCMU",
                    "stream_bidirectional_sampling_rate": 8000, "stream_bidirectional_target_legs": "opposite",
                    "stream_auth_token": "tok", "client_state": "c3RhdGU="}


@pytest.mark.parametrize("status,errors,exc,code", [
    (401, [{"code": "10009", "title": "Authentication failed", "detail": "bad key"}], TelnyxAuthError, "10009"),
    (422, [{"code": "90045", "title": "Invalid call state", "detail": "streaming is active"}],
     TelnyxValidationError, "90045"),
    (500, [{"code": "10007", "title": "Unexpected error", "detail": "oops"}], TelnyxAPIError, "10007"),
])
def test_start_streaming_errors_are_typed_with_telnyx_codes(telnyx_api, status, errors, exc, code):
    base, rec = telnyx_api
    rec.replies.append((status, {"errors": errors}))
    with pytest.raises(exc) as e:
        asyncio.run(start_streaming("v2:abc", "wss://h/t", api_key="k", base_url=base))
    assert e.value.status == status and e.value.codes == [code] and errors[0]["detail"] in str(e.value)


def test_start_streaming_survives_what_a_proxy_may_answer_and_quotes_the_call_id(telnyx_api):
    """A body that is not Telnyx's JSON (an HTML 502 from a proxy, an empty or odd 200) raised a
    bare ValueError or AttributeError; the call id went into the URL path unquoted, so one with a
    "/" or "?" reached another endpoint."""
    base, rec = telnyx_api
    rec.replies += [(502, b"<html>Bad Gateway</html>"), (422, {"errors": ["not an object"]}), (200, b""),
                    (200, [1, 2]), (200, {"data": {"result": "ok"}})]
    with pytest.raises(TelnyxAPIError) as e:
        asyncio.run(start_streaming("v2:abc", "wss://h/t", api_key="k", base_url=base))
    assert e.value.status == 502 and "Bad Gateway" in str(e.value) and e.value.codes == []
    with pytest.raises(TelnyxValidationError) as e:
        asyncio.run(start_streaming("v2:abc", "wss://h/t", api_key="k", base_url=base))
    assert e.value.status == 422 and e.value.codes == []
    for _ in range(2):  # streaming started: the odd body is no failure
        assert asyncio.run(start_streaming("v2:abc", "wss://h/t", api_key="k", base_url=base)) == {}
    assert asyncio.run(start_streaming("v3:a/b?c#d", "wss://h/t", api_key="k", base_url=base)) == {"result": "ok"}
    assert rec.seen[-1][0] == "/v2/calls/v3:a%2Fb%3Fc%23d/actions/streaming_start"


def test_start_streaming_validates_before_calling(monkeypatch):
    monkeypatch.delenv("TELNYX_API_KEY", raising=False)
    with pytest.raises(ValueError, match="TELNYX_API_KEY"):
        asyncio.run(start_streaming("v2:abc", "wss://h/t"))
    with pytest.raises(ValueError, match="case-sensitive"):
        asyncio.run(start_streaming("v2:abc", "wss://h/t", "pcmu", api_key="k"))
    with pytest.raises(ValueError, match="ws:// or wss://"):
        asyncio.run(start_streaming("v2:abc", "https://h/t", api_key="k"))


def test_streaming_body_rate_follows_the_codec_unless_given():
    from csmstream.integrations.call_control import streaming_body

    rate = "stream_bidirectional_sampling_rate"
    assert streaming_body("wss://h/t?codec=G722", "G722")[rate] == 16000  # G.722 is 16 kHz audio
    assert streaming_body("wss://h/t", "L16")[rate] == 16000 and streaming_body("wss://h/t", "PCMA")[rate] == 8000
    assert streaming_body("wss://h/t", "L16", sampling_rate=24000)[rate] == 24000
    with pytest.raises(ValueError, match="sampling_rate must be one of"):
        streaming_body("wss://h/t", "L16", sampling_rate=44100)


class StarletteLike:
    """The surface FastAPI/Starlette WebSockets offer: send_text / iter_text."""

    def __init__(self, incoming):
        self.incoming, self.sent = incoming, []

    async def send_text(self, text):
        self.sent.append(json.loads(text))

    async def iter_text(self):
        while True:
            msg = await self.incoming.get()
            if msg is None:
                return
            yield msg


def test_bridge_runs_over_a_starlette_style_socket():
    async def go():
        q = asyncio.Queue()
        ws = StarletteLike(q)
        registry = CallRegistry()
        call = TelnyxCall(ws, registry)
        runner = asyncio.create_task(call.run())
        await q.put('{"event": "connected", "version": "1.0.0"}')
        await q.put('{"event": "start", "stream_id": "S", "start": {"call_control_id": "v2:z", '
                    '"media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}')
        found = await registry.wait_for("v2:z", 2)

        async def pcm():
            yield b"\x00\x10" * 2400  # 100 ms

        utt = await found.speak(pcm(), name="hello")
        while not any(m["event"] == "mark" for m in ws.sent):
            await asyncio.sleep(0.01)
        await q.put('{"event": "mark", "mark": {"name": "hello"}}')
        heard = await found.heard(utt, timeout=2)
        await q.put('{"event": "stop", "stop": {}}')
        await asyncio.wait_for(runner, 2)
        return ws.sent, heard, registry

    sent, heard, registry = asyncio.run(go())
    media = [m for m in sent if m["event"] == "media"]
    sizes = [len(base64.b64decode(m["media"]["payload"])) for m in media]
    # 100 ms in one message (media_ms 100), then the resampler's tail padded to a 20 ms frame
    assert sizes == [800, 160] and sent[-1] == {"event": "mark", "mark": {"name": "hello"}}
    assert heard and len(registry) == 0


class WebSocketDisconnect(Exception):
    """(Starlette's exception of that name, as receive_text raises it when the peer leaves.)"""


class RecvStyle:
    """A socket read with receive_text(); its last item, an exception, is raised."""

    def __init__(self, incoming):
        self.incoming, self.sent = list(incoming), []

    async def send_text(self, text):
        self.sent.append(json.loads(text))

    async def receive_text(self):
        await asyncio.sleep(0)
        item = self.incoming.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


START = ('{"event": "start", "stream_id": "S", "start": {"call_control_id": "v2:q", '
         '"media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}')


@pytest.mark.parametrize("end,level", [(WebSocketDisconnect(1000), "INFO"), (ConnectionResetError("reset"), "INFO"),
                                       (KeyError("injected bug"), "ERROR")])
def test_a_call_ended_by_its_socket_is_info_and_by_a_bug_an_error_with_its_traceback(caplog, end, level):
    """Both end the call (its speakers are cut off, heard() answers False); a bug used to be logged
    like a hang-up, at INFO and without its traceback, so it went unseen."""
    import logging

    async def go():
        call = TelnyxCall(RecvStyle([START, end]), CallRegistry())
        await asyncio.wait_for(call.run(), 5)
        return call

    with caplog.at_level(logging.INFO, logger="csmstream.telnyx"):
        call = asyncio.run(go())
    assert call.ended.is_set()
    [rec] = [r for r in caplog.records if "ended:" in r.getMessage()]
    assert rec.levelname == level and type(end).__name__ in rec.getMessage()
    assert bool(rec.exc_info) == (level == "ERROR")


def test_a_mark_that_never_comes_back_is_reported_not_heard_after_the_audio_and_a_grace(monkeypatch, caplog):
    """heard() used to wait for a mark for ever: a mark Telnyx lost (the stream still up) left the
    request without its done. Without a timeout it now answers False MARK_GRACE_S after the queued
    audio should have finished playing, counts it and says so; a mark in time is still True."""
    import logging
    import time

    from csmstream.integrations import telnyx_bridge

    monkeypatch.setattr(telnyx_bridge, "MARK_GRACE_S", 0.3)

    async def go():
        q = asyncio.Queue()
        ws = StarletteLike(q)
        registry = CallRegistry()
        runner = asyncio.create_task(TelnyxCall(ws, registry).run())
        await q.put(START)
        call = await registry.wait_for("v2:q", 2)

        async def pcm():
            yield b"\x00\x10" * 4800  # 200 ms

        t0 = time.monotonic()
        lost = await asyncio.wait_for(call.heard(await call.speak(pcm(), name="lost")), 5)
        waited = time.monotonic() - t0
        kept = await call.speak(pcm(), name="kept")
        await q.put('{"event": "mark", "mark": {"name": "kept"}}')
        heard = await asyncio.wait_for(call.heard(kept), 5)
        await q.put(None)
        await runner
        return lost, waited, heard, registry.counts["marks_lost"]

    with caplog.at_level(logging.WARNING, logger="csmstream.telnyx"):
        lost, waited, heard, n_lost = asyncio.run(go())
    assert lost is False and heard is True and n_lost == 1
    assert waited >= 0.2 + 0.3 - 0.05  # not before its audio could have played, plus the grace
    assert any("mark of utterance 'lost' did not come back" in r.getMessage() for r in caplog.records)
