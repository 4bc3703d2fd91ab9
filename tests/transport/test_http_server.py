"""The OpenAI-compatible HTTP port of a real server (tiny, loopback TCP), driven by independent
clients: the official OpenAI SDK, httpx, and raw sockets read with h11. Audio is checked against
Engine.stream; streaming, hang-up, keep-alive, pipelining, limits and shutdown against the engine's
own record of each request."""

import base64
import json
import logging
import socket
import struct
import threading
import time

import h11
import httpx
import numpy as np
import pytest

from csmstream.transport import http_server
from csmstream.transport.encoder import AudioEncoder
from tests.servers import RunningServer, fail_on, floor_frame_time, wait_finished
from tests.transport.test_server import reference_pcm

TEXT = "Streaming over plain HTTP."


def base_of(rs) -> str:
    return rs.srv.speech_url.rsplit("/audio/speech", 1)[0]


def h11_request(method: str, target: str, body: bytes = b"", headers=()) -> bytes:
    """The bytes an HTTP/1.1 client (h11) sends for this request."""
    c = h11.Connection(h11.CLIENT)
    hdrs = [("Host", "test"), *headers] + ([("Content-Length", str(len(body)))] if method == "POST" else [])
    return (c.send(h11.Request(method=method, target=target, headers=hdrs)) +
            (c.send(h11.Data(data=body)) if body else b"") + c.send(h11.EndOfMessage()))


def read_responses(raw: bytes, methods: list[str]):
    """h11 reads the responses to requests of these methods from raw:
    [(status, headers dict, body, complete)], stopping at the first incomplete one."""
    c = h11.Connection(h11.CLIENT)
    c.receive_data(raw)
    out = []
    for m in methods:
        c.send(h11.Request(method=m, target="/", headers=[("Host", "t"), ("Content-Length", "0")]))
        c.send(h11.EndOfMessage())
        resp, body, complete = None, b"", False
        while (ev := c.next_event()) is not h11.NEED_DATA:
            if isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                complete = True
                break
        out.append((resp.status_code if resp else None, {k.decode(): v.decode() for k, v in resp.headers}
                    if resp else {}, body, complete))
        if not complete or c.their_state is not h11.DONE:
            break
        c.start_next_cycle()
    return out


def exchange(port: int, data: bytes, timeout: float = 60) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = []
        while b := s.recv(65536):
            got.append(b)
    return b"".join(got)


def speech_json(**body) -> bytes:
    return json.dumps({"model": "csm-1b", "input": TEXT, **body}).encode()


# -- audio -----------------------------------------------------------------------------------------
def test_the_openai_sdk_streams_the_engines_audio(http):
    import openai

    client = openai.OpenAI(base_url=base_of(http), api_key="unused", max_retries=0)
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="2", input=TEXT, response_format="pcm",
            extra_body={"seed": 11, "topk": 20, "temperature": 0.8}) as r:
        assert r.headers["content-type"] == "audio/pcm" and r.headers["x-sample-rate"] == "24000"
        got = b"".join(r.iter_bytes())
    assert got == reference_pcm(TEXT, 2, seed=11, topk=20, temperature=0.8)
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    assert e.value.code == "unknown_voice" and "speaker number" in e.value.message


def test_wav_sse_and_ulaw_carry_the_same_audio(http):
    want = reference_pcm(TEXT, 0, seed=5)
    wav = httpx.post(http.srv.speech_url, content=speech_json(seed=5), timeout=60)
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    assert wav.content[:4] == b"RIFF" and wav.content[44:] == want

    events = []
    with httpx.stream("POST", http.srv.speech_url, content=speech_json(seed=5, stream_format="sse"), timeout=60) as r:
        assert r.headers["content-type"] == "text/event-stream"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 3  # the audio came in pieces
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == wav.content  # wav, as asked
    done = events[-1]
    assert done["type"] == "speech.audio.done" and done["audio_ms"] == pytest.approx(len(want) / 48, abs=0.1)
    assert done["usage"]["output_tokens"] == len(want) // 2 // 1920  # audio frames
    assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + done["usage"]["output_tokens"] > 0

    # cut at max_audio_ms: the frames made still count (they were 0, and the log said "0 sentence(s)")
    with httpx.stream("POST", http.srv.speech_url, timeout=60,
                      content=speech_json(seed=5, stream_format="sse", max_audio_ms=400)) as r:
        cut = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")][-1]
    assert cut["audio_ms"] == 400 and cut["usage"]["input_tokens"] == done["usage"]["input_tokens"]
    assert cut["usage"]["output_tokens"] >= 5  # 400 ms: 5 frames sent, maybe a frame or two more made

    ulaw = httpx.post(http.srv.speech_url, content=speech_json(seed=5, response_format="ulaw_8000"), timeout=60)
    assert ulaw.headers["content-type"] == "audio/basic" and ulaw.headers["x-sample-rate"] == "8000"
    enc = AudioEncoder("ulaw_8000", 100)  # the /ws/generate encoder (tested against a float reference)
    assert ulaw.content == b"".join(enc.feed(np.frombuffer(want, "<i2")) + enc.finish())


def test_audio_arrives_while_the_engine_is_still_generating(http, monkeypatch):
    floor_frame_time(monkeypatch, http, 0.02)
    with httpx.stream("POST", http.srv.speech_url, content=speech_json(response_format="pcm", seed=1,
                                                                        request_id="early"), timeout=60) as r:
        it = r.iter_raw()
        first = next(it)
        req = next(q for q in reversed(http.srv.recent) if q.tag.rid == "early")
        assert first and not req.finished  # streamed, not generated and then sent
        rest = b"".join(it)
    assert wait_finished(req) and req.reason != "cancelled"
    assert first + rest == reference_pcm(TEXT, 0, seed=1)


def test_hanging_up_cancels_the_generation_within_a_frame(http, monkeypatch):
    floor_frame_time(monkeypatch, http)
    body = speech_json(input="A long answer nobody will hear. " * 8, response_format="pcm", request_id="hangup")
    with httpx.stream("POST", http.srv.speech_url, content=body, timeout=60) as r:
        assert next(r.iter_raw())
    req = next(q for q in reversed(http.srv.recent) if q.tag.rid == "hangup")
    assert wait_finished(req) and req.reason == "cancelled"
    assert req.frames - req.frames_at_cancel <= 1 and req.frames < req.max_frames
    deadline = time.monotonic() + 30
    while http.srv.worker.stats.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.srv.worker.stats.active == 0
    assert httpx.post(http.srv.speech_url, content=speech_json(max_audio_ms=300), timeout=60).status_code == 200


def test_hanging_up_before_any_audio_is_noticed_without_waiting_for_a_write(http, monkeypatch):
    floor_frame_time(monkeypatch, http, 0.1)  # the first chunk would take two frames: 0.2 s
    with socket.create_connection(("127.0.0.1", http.srv.http.port)) as s:
        s.sendall(h11_request("POST", "/v1/audio/speech", speech_json(request_id="impatient")))
        deadline = time.monotonic() + 10
        while not any(q.tag.rid == "impatient" for q in http.srv.recent) and time.monotonic() < deadline:
            time.sleep(0.005)
    req = next(q for q in reversed(http.srv.recent) if q.tag.rid == "impatient")
    assert wait_finished(req) and req.reason == "cancelled" and req.frames <= 1


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_that_resets_the_connection_mid_stream_is_gone_not_a_server_bug(loop, monkeypatch, caplog):
    """A hang-up with a TCP reset (SO_LINGER 0) rather than a FIN: the read side fails instead of
    ending, and uvloop refuses writes to the closed transport with a RuntimeError. Either way it
    is the client leaving: the generation is cancelled, nothing is logged as a server bug."""
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), loop=loop, http_port=0).start()
    try:
        floor_frame_time(monkeypatch, rs, 0.02)
        for n in range(3):  # (the reset can land while the server writes or while it waits)
            rid = f"reset-{n}"
            with socket.create_connection(("127.0.0.1", rs.srv.http.port), timeout=30) as s:
                s.sendall(h11_request("POST", "/v1/audio/speech", speech_json(
                    input="A long answer nobody will hear. " * 8, response_format="pcm", request_id=rid)))
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
                time.sleep(0.05 * n)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            req = next(q for q in reversed(rs.srv.recent) if q.tag.rid == rid)
            assert wait_finished(req) and req.reason == "cancelled" and req.frames < req.max_frames
        deadline = time.monotonic() + 10
        while rs.srv.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not rs.srv.connections
        assert rs.srv.metrics.errors["internal_error"] == 0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert httpx.post(rs.srv.speech_url, content=speech_json(max_audio_ms=300), timeout=60).status_code == 200
    finally:
        rs.stop()


def test_an_ended_request_holds_no_codec_state(http):
    """The server keeps its latest 64 requests (`recent`) for inspection, and through them their
    jobs; a FLAC encoder's FFmpeg context alone is ~7.4 MB, so 64 kept ones grew the process by over
    half a gigabyte. Once a request has ended -- whole, or its client gone mid-stream -- no codec
    context of its is alive."""
    import gc

    import av

    def live_contexts():
        gc.collect()
        return sum(issubclass(type(o), av.CodecContext) for o in gc.get_objects())  # (type(): no __class__ lookups)

    baseline = live_contexts()
    for fmt in ("flac", "opus", "aac", "flac"):
        r = httpx.post(http.srv.speech_url, content=speech_json(response_format=fmt, max_audio_ms=300), timeout=60)
        assert r.status_code == 200 and len(r.content) > 100
    body = speech_json(input="A long answer nobody will hear. " * 8, response_format="flac", request_id="gone")
    with httpx.stream("POST", http.srv.speech_url, content=body, timeout=60) as r:
        assert next(r.iter_raw())
    req = next(q for q in reversed(http.srv.recent) if q.tag.rid == "gone")
    assert wait_finished(req) and req.reason == "cancelled"
    deadline = time.monotonic() + 10
    while live_contexts() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_contexts() <= baseline


# -- HTTP itself ---------------------------------------------------------------------------------
def test_pipelined_requests_on_one_connection_are_answered_in_order(http):
    port = http.srv.http.port
    wire = (h11_request("POST", "/v1/audio/speech", speech_json(seed=2, response_format="pcm")) +
            h11_request("GET", "/healthz") +
            h11_request("POST", "/v1/audio/speech", speech_json(input="Second one.", seed=3, response_format="pcm"),
                        headers=[("Connection", "close")]))
    (s1, h1, b1, c1), (s2, _, b2, c2), (s3, h3, b3, c3) = read_responses(exchange(port, wire), ["POST", "GET", "POST"])
    assert (s1, s2, s3) == (200, 200, 200) and c1 and c2 and c3
    assert h1["transfer-encoding"] == "chunked" and h3["connection"] == "close"
    assert b1 == reference_pcm(TEXT, 0, seed=2) and b3 == reference_pcm("Second one.", 0, seed=3)
    assert json.loads(b2)["status"] == "ok"


def test_a_server_bug_is_a_500_that_says_so_and_the_connection_serves_on(http, monkeypatch):
    """A bug on a request (here prepare raising, as tokenizers did on a lone surrogate) used to close
    the connection without a response. Now: before any audio, a 500 internal_error naming it, and
    the keep-alive connection answers its next request; on a later sentence, the audio made before
    it goes out whole and the body is cut (how HTTP says a 200 failed). A bug reading the request's
    body is its 500 too."""
    from tests.transport.test_reliability import same_audio

    fail_on(monkeypatch, http.srv.worker, "prepare", "BUG", TypeError("injected bug"))
    port = http.srv.http.port
    wire = (h11_request("POST", "/v1/audio/speech", speech_json(input="This BUG trips.")) +
            h11_request("POST", "/v1/audio/speech", speech_json(input="Second one.", seed=3, response_format="pcm"),
                        headers=[("Connection", "close")]))
    (s1, h1, b1, c1), (s2, _, b2, c2) = read_responses(exchange(port, wire), ["POST", "POST"])
    err = json.loads(b1)["error"]
    assert (s1, c1, err["code"], err["type"]) == (500, True, "internal_error", "server_error")
    assert "TypeError: injected bug" in err["message"] and h1["content-type"] == "application/json"
    assert s2 == 200 and c2 and b2 == reference_pcm("Second one.", 0, seed=3)
    wire = h11_request("POST", "/v1/audio/speech", speech_json(input="Fine first. Then a BUG.", seed=4,
                                                               response_format="pcm"))
    [(status, _, body, complete)] = read_responses(exchange(port, wire), ["POST"])
    assert status == 200 and not complete and same_audio(body, reference_pcm("Fine first.", 0, seed=4))
    parse = http_server.hs.parse_speech  # and a bug reading the body: its 500, the next request answered

    def bad_parse(body, **kw):
        if b"BUG" in body:
            raise TypeError("injected bug")
        return parse(body, **kw)

    monkeypatch.setattr(http_server.hs, "parse_speech", bad_parse)
    wire = (h11_request("POST", "/v1/audio/speech", speech_json(input="A BUG in the body.")) +
            h11_request("GET", "/healthz", headers=[("Connection", "close")]))
    (s1, _, b1, _), (s2, _, _, c2) = read_responses(exchange(port, wire), ["POST", "GET"])
    assert s1 == 500 and json.loads(b1)["error"]["code"] == "internal_error" and (s2, c2) == (200, True)


def test_an_http10_client_gets_the_audio_unchunked_and_ended_by_the_close(http):
    """HTTP/1.0 knows no chunked bodies (RFC 9112 §6.1: no Transfer-Encoding to a 1.0 request): the
    stream goes out as plain bytes and the server closes the connection after the last one, even
    when the client asked for keep-alive. h11 reads the response (a body with no length: to the close)."""
    body = speech_json(seed=4, response_format="pcm")
    wire = (b"POST /v1/audio/speech HTTP/1.0\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(body)
            + body)
    raw = exchange(http.srv.http.port, wire, timeout=30)  # (reads until the server closes)
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert b"transfer-encoding" not in head and b"content-length" not in head and b"connection: close" in head
    c = h11.Connection(h11.CLIENT)  # (it speaks only 1.1; the request it reads the answer to is a formality)
    c.send(h11.Request(method="POST", target="/", headers=[("Host", "t"), ("Content-Length", "0")]))
    c.send(h11.EndOfMessage())
    c.receive_data(raw)
    c.receive_data(b"")  # the close: the end of the body
    events = []
    while (ev := c.next_event()) is not h11.NEED_DATA and not isinstance(ev, h11.ConnectionClosed):
        events.append(ev)
        if isinstance(ev, h11.EndOfMessage):
            break
    assert events[0].status_code == 200 and isinstance(events[-1], h11.EndOfMessage)
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == reference_pcm(TEXT, 0, seed=4)


def test_expect_100_continue_is_answered_before_the_body(http):
    body = speech_json(max_audio_ms=200, response_format="pcm")
    head = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", http.srv.http.port), timeout=30) as s:
        s.sendall(head)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        raw = b"".join(iter(lambda: s.recv(65536), b""))
    ((status, _, audio, complete),) = read_responses(raw, ["POST"])
    assert status == 200 and complete and len(audio) == 200 * 48


@pytest.mark.parametrize("wire, status, code", [
    (h11_request("GET", "/v1/audio/speech"), 405, "method_not_allowed"),
    (h11_request("POST", "/healthz", b"{}"), 405, "method_not_allowed"),  # (was "no route /healthz")
    (h11_request("DELETE", "/metrics"), 405, "method_not_allowed"),
    (h11_request("POST", "/v1/models", b"{}"), 405, "method_not_allowed"),
    (h11_request("DELETE", "/v1/voices/0"), 405, "method_not_allowed"),
    (h11_request("GET", "/v1/voices/nobody"), 404, "voice_not_found"),
    (h11_request("GET", "/v1/models/tts-1"), 404, "model_not_found"),
    (h11_request("POST", "/v1/chat/completions", b"{}"), 404, "not_found"),
    (h11_request("POST", "/v1/audio/speech", b"{oops"), 400, "invalid_json"),
    (h11_request("POST", "/v1/audio/speech", b'{"input": "hi", "seed": 1' + b"0" * 5000 + b"}"), 400, "invalid_json"),
    (h11_request("POST", "/v1/audio/speech", b"[" * 100_000), 400, "invalid_json"),
    (h11_request("POST", "/v1/audio/speech", speech_json(response_format="wma")), 400, "invalid_format"),
    (b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411,
     "length_required"),
    (b"POST /v1/audio/speech HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, "body_too_large"),
    (b"POST /v1/audio/speech HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413, "body_too_large"),
    (b"POST /v1/audio/speech HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400, "invalid_http"),  # '²'.isdigit()
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "invalid_http"),  # TLS to a plain port
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "head_too_large"),
])
def test_bad_requests_get_a_status_and_an_openai_error_and_the_server_serves_on(http, wire, status, code):
    raw = exchange(http.srv.http.port, wire + h11_request("GET", "/healthz", headers=[("Connection", "close")]))
    got, *after = read_responses(raw, ["GET" if wire.startswith(b"GET") else "POST", "GET"])
    assert got[0] == status and json.loads(got[2])["error"]["code"] == code
    assert json.loads(got[2])["error"]["message"]
    if status == 405:
        assert got[1]["allow"] == ("POST" if b"/v1/audio/speech" in wire else "GET, HEAD")
    if status < 411 and code != "invalid_http":  # the request was whole: the connection goes on
        assert after and after[0][0] == 200
    assert httpx.get(base_of(http).replace("/v1", "/healthz")).status_code == 200


def test_request_ids_cannot_break_the_response_head(http):
    """A request id goes back in X-Request-Id: one with a line break (a header of the attacker's
    choosing) is refused; one in another script is percent-encoded there, as it is in JSON."""
    url = base_of(http) + "/audio/speech"
    r = httpx.post(url, json={"input": "Hi.", "request_id": "a\r\nX-Evil: 1"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request_id" and "x-evil" not in r.headers
    r = httpx.post(url, json={"input": "Hi.", "request_id": "€uro-1", "response_format": "pcm", "max_audio_ms": 160,
                              "stream_format": "sse"}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "%E2%82%ACuro-1"
    done = json.loads(r.text.strip().split("data: ")[-1])
    assert done["type"] == "speech.audio.done" and done["request_id"] == "€uro-1"


def test_a_proxys_x_request_id_names_a_request_whose_body_names_none(http):
    """nginx ($request_id) and ingresses send X-Request-Id: a request without its own request_id
    is known by it (the engine's record, the response, the log); the body's id wins; a header
    that is not a valid id is ignored and the server names the request itself."""
    url = base_of(http) + "/audio/speech"

    def post(headers, **body):
        before = len(http.srv.recent)
        r = httpx.post(url, json={"input": "Hi.", "response_format": "pcm", "max_audio_ms": 80, **body},
                       headers=headers, timeout=30)
        assert r.status_code == 200
        (req,) = list(http.srv.recent)[before:]
        assert req.tag.rid == r.headers["x-request-id"]
        return r.headers["x-request-id"]

    assert post({"X-Request-Id": "9f2c1e7a4b"}) == "9f2c1e7a4b"
    assert post({"X-Request-Id": "9f2c1e7a4b"}, request_id="mine") == "mine"
    for bad in ("x" * 129, "a\tb", ""):
        got = post({"X-Request-Id": bad})
        assert got != bad and got.startswith(http.srv._prefix + "-")
    r = httpx.post(base_of(http) + "/text-to-speech/0/stream?output_format=pcm_16000", json={"text": "Hi."},
                   headers={"X-Request-Id": "from-the-proxy"}, timeout=30)
    assert r.headers["request-id"] == r.headers["x-request-id"] == "from-the-proxy"  # ElevenLabs' route too


def test_a_request_head_that_never_finishes_times_out(http, monkeypatch):
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT", 0.3)
    t = time.monotonic()
    raw = exchange(http.srv.http.port, b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\n")
    assert read_responses(raw, ["POST"])[0][0] == 408 and time.monotonic() - t < 10


def test_pages_and_head_requests_on_the_http_port(http):
    raw = exchange(http.srv.http.port, h11_request("HEAD", "/healthz") +
                   h11_request("GET", "/metrics", headers=[("Connection", "close")]))
    (s1, h1, b1, _), (s2, h2, b2, _) = read_responses(raw, ["HEAD", "GET"])
    assert s1 == 200 and b1 == b"" and int(h1["content-length"]) > 0 and h1["content-type"] == "application/json"
    assert s2 == 200 and h2["content-type"].startswith("text/plain") and b"csm_requests_total" in b2


# -- limits, auth, busy, shutdown ----------------------------------------------------------------
def test_auth_connection_and_rate_limits_apply_to_the_http_port():
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1), http_port=0, auth_token="s3cret",
                       max_connections_per_ip=2, max_requests_per_minute=2, warmup=False).start()
    try:
        url, port = rs.srv.speech_url, rs.srv.http.port
        r = httpx.post(url, content=speech_json())
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert httpx.get(url.replace("/v1/audio/speech", "/healthz")).status_code == 200  # open, like on ws
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url, content=speech_json(max_audio_ms=100), headers=ok).status_code == 200
        assert httpx.post(url, content=speech_json(max_audio_ms=100), headers=ok).status_code == 200
        r = httpx.post(url, content=speech_json(max_audio_ms=100), headers=ok)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        a, b = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
        try:
            time.sleep(0.2)
            raw = exchange(port, h11_request("GET", "/healthz"))
            assert read_responses(raw, ["GET"])[0][0] == 429
        finally:
            a.close()
            b.close()
    finally:
        rs.stop()


def test_a_client_that_stops_reading_is_cut_off_and_its_generation_cancelled(monkeypatch):
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), http_port=0, send_timeout=0.5,
                       socket_send_buffer=4096, warmup=False).start()
    try:
        floor_frame_time(monkeypatch, rs, 0.05)  # 1.6x real time: the cut comes mid-sentence on any machine
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", rs.srv.http.port))
            s.sendall(h11_request("POST", "/v1/audio/speech", speech_json(
                input="Nobody reads this answer. " * 12, response_format="pcm", request_id="deaf")))
            deadline = time.monotonic() + 30
            while not rs.srv.metrics.errors["slow_reader"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rs.srv.metrics.errors["slow_reader"] == 1  # while the client still holds on
            reqs = [q for q in rs.srv.recent if q.tag.rid == "deaf"]  # one per sentence started
            assert wait_finished(reqs[-1]) and reqs[-1].reason == "cancelled" and len(reqs) < 12
        deadline = time.monotonic() + 30
        while rs.srv.worker.stats.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rs.srv.worker.stats.active == 0
        assert httpx.post(rs.srv.speech_url, content=speech_json(max_audio_ms=200), timeout=60).status_code == 200
    finally:
        rs.stop()


def test_a_busy_engine_is_503_with_retry_after_and_a_stop_lets_the_stream_finish(monkeypatch):
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1), http_port=0, max_engine_waiting=0,
                       warmup=False).start()
    stopper = None
    try:
        floor_frame_time(monkeypatch, rs)
        url = rs.srv.speech_url
        with httpx.stream("POST", url, content=speech_json(response_format="pcm", seed=9), timeout=60) as r:
            it = r.iter_raw()
            got = next(it)
            busy = httpx.post(url, content=speech_json(), timeout=60)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "busy" and busy.json()["error"]["type"] == "server_error"
            stopper = threading.Thread(target=rs.stop)  # graceful: the running stream may finish
            stopper.start()
            got += b"".join(it)
        assert got == reference_pcm(TEXT, 0, seed=9)
    finally:
        if stopper is None:
            rs.stop()
        else:
            stopper.join(30)
    with pytest.raises(httpx.TransportError):
        httpx.post(url, content=speech_json(), timeout=5)
