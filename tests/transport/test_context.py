"""A /ws/generate request's own context turns ("context": the caller's words and audio, earlier
turns of the conversation): the reply is the Python API's for the same turns as `Segment`s with
audio (the engine encodes them itself there), every sentence hears them, they sit between the
sentences a continue_previous request continues and its own, and a bad turn is one clear error.
The OpenAI-compatible HTTP route takes the same field, with the same audio and the same errors
(a 400)."""

import asyncio
import base64
import json
import time
import urllib.request

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from tests.servers import RunningServer, collect

TEXT, SEED = "Nice to meet you.", 3


def _tone(hz: float, seconds: float, rate: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 7000).astype(np.int16)


def _b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


def _pcm(chunks) -> bytes:
    return np.concatenate(list(chunks)).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def rs():
    import csmstream

    server = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), http_port=0).start()
    yield server
    server.stop()


def _requests(rs, bodies: list[dict]) -> list[list]:
    async def go():
        out = []
        async with connect(rs.url) as ws:
            for body in bodies:
                await ws.send(json.dumps(body))
                out.append(await collect(ws))
        return out

    return asyncio.run(go())


def _audio(events) -> bytes:
    return b"".join(b for k, b in events if k == "audio")


def _reqs(rs, rid: str) -> list:
    return sorted((r for r in rs.srv.recent if r.tag.rid == rid), key=lambda r: r.t_submit)


def test_the_reply_is_the_python_apis_with_the_same_turns_as_segments(rs):
    import csmstream
    from csmstream import Segment
    from csmstream.transport.metrics import parse

    def scrape():
        page = urllib.request.urlopen(rs.url.replace("ws://", "http://").replace("/ws/generate", "/metrics"))
        m = parse(page.read().decode())
        return m["csm_context_turns_total"], m["csm_context_encode_seconds_total"]

    caller, agent = _tone(180, 1.2), _tone(330, 0.6)
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    turns_before, seconds_before = scrape()
    turns = [Segment(1, "Hello, is this the front desk?", audio=caller), Segment(0, "It is.", audio=agent)]
    want = _pcm(eng.stream(TEXT, 0, context=turns, seed=SEED))
    assert want != _pcm(eng.stream(TEXT, 0, seed=SEED))
    context = [{"speaker_id": 1, "text": "Hello, is this the front desk?", "audio": _b64(caller)},
               {"speaker_id": 0, "text": "It is.", "audio": _b64(agent), "audio_format": "pcm_24000"}]
    [events] = _requests(rs, [{"text": TEXT, "seed": SEED, "request_id": "ctx", "context": context}])
    assert events[-1][0] == "done" and _audio(events) == want
    turns_after, seconds_after = scrape()  # /metrics counts the turns and the time their encoding took
    assert turns_after - turns_before == 2 and seconds_after > seconds_before
    # the OpenAI-compatible route: the same turns, the same audio
    r = httpx.post(rs.srv.speech_url, json={"input": TEXT, "voice": "0", "response_format": "pcm", "seed": SEED,
                                            "context": context}, timeout=60)
    assert r.status_code == 200 and r.content == want
    assert scrape()[0] - turns_after == 2


def test_every_format_is_decoded_and_resampled_to_the_codecs_rate(rs):
    """pcm_16000 and G.711 turns: the codes the request heard are the codec's for the audio decoded
    by the reference G.711 decoder (kernels/g711's *_ref) and taken to 24 kHz."""
    import csmstream
    from csmstream.engine.voices import to_24k
    from csmstream.kernels.g711 import alaw_decode_ref, alaw_encode_ref, ulaw_decode_ref, ulaw_encode_ref

    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    wide, narrow = _tone(200, 0.7, 16000), _tone(300, 0.5, 8000)
    ulaw, alaw = ulaw_encode_ref(narrow), alaw_encode_ref(narrow)
    turns = [{"speaker_id": 1, "text": "Sixteen.", "audio": _b64(wide), "audio_format": "pcm_16000"},
             {"speaker_id": 1, "text": "Mu law.", "audio": base64.b64encode(ulaw.tobytes()).decode(),
              "audio_format": "ulaw_8000"},
             {"speaker_id": 2, "text": "A law.", "audio": base64.b64encode(alaw.tobytes()).decode(),
              "audio_format": "alaw_8000"}]
    [events] = _requests(rs, [{"text": TEXT, "seed": SEED, "request_id": "fmt", "context": turns}])
    assert events[-1][0] == "done"
    [req] = _reqs(rs, "fmt")
    want = [eng.codec.encode_context(to_24k(x, rate)) for x, rate in
            ((wide, 16000), (ulaw_decode_ref(ulaw), 8000), (alaw_decode_ref(alaw), 8000))]
    assert [(s.speaker_id, s.text) for s in req.context] == [(1, "Sixteen."), (1, "Mu law."), (2, "A law.")]
    assert all(np.array_equal(got.codes, w) for got, w in zip(req.context, want, strict=True))
    assert not np.array_equal(want[1], want[2])  # (mu-law and A-law round the tone differently)


def test_every_sentence_hears_the_turns_between_the_continued_sentences_and_its_own(rs):
    first, second = "The first sentence is here.", "And the second one follows."
    caller = {"speaker_id": 1, "text": "Go on then.", "audio": _b64(_tone(150, 0.8))}
    a, b = _requests(rs, [{"text": "We opened at nine. We close at five.", "seed": 1, "request_id": "a"},
                          {"text": f"{first} {second}", "seed": 2, "request_id": "b", "continue_previous": True,
                           "context": [caller]}])
    assert a[-1][0] == "done" and b[-1][0] == "done" and b[-1][1]["continued"] == 2
    heard = [[(s.speaker_id, s.text) for s in r.context] for r in _reqs(rs, "b")]
    assert heard == [[(0, "We opened at nine."), (0, "We close at five."), (1, "Go on then.")],
                     [(0, "We opened at nine."), (0, "We close at five."), (1, "Go on then."), (0, first)]]


@pytest.mark.parametrize("context, message", [
    ("hello", "context must be a non-empty list of turns"),
    ([], "got an empty list"),
    ([{"text": "Hi.", "audio": "AAAA"}] * 9, "at most 8 are allowed"),
    (["Hi."], "context[0] must be an object"),
    ([{"speaker_id": -1, "text": "Hi.", "audio": "AAAA"}], "context[0].speaker_id must be an integer >= 0"),
    ([{"text": " ", "audio": "AAAA"}], "context[0].text must be a non-empty string"),
    ([{"text": "Hi."}], "context[0].audio must be the turn's audio as a base64 string (pcm_24000)"),
    ([{"text": "Hi.", "audio": "not base64!"}], "context[0].audio is not valid base64"),
    ([{"text": "Hi.", "audio": base64.b64encode(b"abc").decode(), "audio_format": "pcm_8000"}],
     "context[0].audio is 3 bytes: pcm_8000 is 16-bit little-endian PCM"),
    ([{"text": "Hi.", "audio": base64.b64encode(bytes(400)).decode(), "audio_format": "ulaw_8000"}],
     "context[0].audio is 50 ms of ulaw_8000; a turn needs at least 80 ms"),
    ([{"text": "Hi.", "audio": "AAAA", "audio_format": "mp3"}], "audio_format must be one of pcm_8000"),
    ([{"text": "Hi.", "audio": "AAAA", "format": "pcm_16000"}],  # (not read as 24 kHz because of a field's name)
     'context[0].audio_format is not given, so its audio would be read as pcm_24000, but context[0].format names '
     'pcm_16000; here it is called audio_format: send {"audio_format": "pcm_16000"}'),
    ([{"text": "Hi.", "audio": base64.b64encode(bytes(8000 * 31)).decode(), "audio_format": "ulaw_8000"}],
     "context holds 31.0 s of audio; at most 30 s"),
])
def test_a_bad_turn_is_one_clear_error_and_the_connection_serves_on(rs, context, message):
    bad, good = _requests(rs, [{"text": TEXT, "request_id": "bad", "context": context},
                               {"text": "Still here.", "request_id": "good"}])
    [(kind, err)] = bad
    assert kind == "error" and err["error"]["code"] == "invalid_context" and err["request_id"] == "bad"
    assert message in err["error"]["message"]
    assert good[-1][0] == "done" and good[-1][1]["request_id"] == "good"
    # over HTTP: a 400 with the same words, and the kept connection takes the next request
    with httpx.Client(timeout=60) as client:
        r = client.post(rs.srv.speech_url, json={"input": TEXT, "context": context})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_context"
        assert r.json()["error"]["message"] == err["error"]["message"]
        assert client.get(rs.srv.speech_url.replace("/v1/audio/speech", "/healthz")).status_code == 200
        assert r.headers["connection"] == "keep-alive"


def test_at_most_two_requests_encode_their_turns_at_a_time(rs, monkeypatch):
    """Four connections send a request with context at once: their turns are encoded two at a time
    (server.CONTEXT_ENCODERS), on worker threads, and every request is answered."""
    import threading
    import time

    from csmstream.transport import connection
    from csmstream.transport.server import CONTEXT_ENCODERS

    real, lock, running, most = connection.encode_turns, threading.Lock(), [0], [0]
    two_in = threading.Event()

    def slow(turns, engine):
        assert threading.current_thread() is not rs._thread  # not on the event loop's thread
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] >= 2:
                two_in.set()
        two_in.wait(10)  # the first two wait for each other, however slowly the connections come in
        time.sleep(0.2)  # (room for a third to get in, were the bound broken)
        with lock:
            running[0] -= 1
        return real(turns, engine)

    monkeypatch.setattr(connection, "encode_turns", slow)
    turn = {"speaker_id": 1, "text": "Hello.", "audio": _b64(_tone(200, 0.3))}

    async def one(i):
        async with connect(rs.url) as ws:
            await ws.send(json.dumps({"text": "Hi.", "request_id": f"c{i}", "context": [turn], "max_audio_ms": 200}))
            return (await collect(ws))[-1]

    async def go():
        return await asyncio.gather(*(one(i) for i in range(4)))

    ends = asyncio.run(go())
    assert [e[0] for e in ends] == ["done"] * 4 and most[0] == CONTEXT_ENCODERS == 2


def test_a_clients_turn_helper_round_trips_through_the_parser():
    from csmstream.transport import context as ctx, protocol

    pcm = _tone(220, 0.5, 16000)
    raw = json.dumps({"text": "Hi.", "context": [ctx.turn(1, "Yes.", pcm, "pcm_16000"),
                                                 ctx.turn(0, "Ok.", bytes(800), "ulaw_8000")]})
    a, b = protocol.parse(raw).context
    assert (a.speaker_id, a.text, a.rate) == (1, "Yes.", 16000) and np.array_equal(a.pcm, pcm)
    assert (b.rate, len(b.pcm)) == (8000, 800) and np.all(b.pcm == b.pcm[0])  # silence in mu-law: one level
    for bad in ((pcm, "ulaw_8000"), (pcm.astype(np.float32), "pcm_16000"), (b"", "mp3_44100_128")):
        with pytest.raises(ValueError):
            ctx.turn(0, "x", *bad)


def test_a_turns_unknown_keys_are_named_as_the_requests_ignored_fields():
    from csmstream.transport import context as ctx, protocol

    odd = {**ctx.turn(1, "Yes.", bytes(800), "ulaw_8000"), "sample_rate": 8000, "audio_fromat": "pcm_24000"}
    g = protocol.parse(json.dumps({"text": "Hi.", "context": [ctx.turn(0, "Ok.", bytes(800), "ulaw_8000"), odd],
                                   "contxt": 1}))
    assert [t.rate for t in g.context] == [8000, 8000]  # (audio_fromat names the default: no harm, no error)
    assert g.ignored == {"contxt": "context", "context[1].sample_rate": None,
                         "context[1].audio_fromat": "context[1].audio_format"}


def test_an_http_client_that_hangs_up_while_its_turns_are_encoded_gets_nothing_generated(rs, monkeypatch):
    """The turns of an HTTP request are encoded before its response starts; a client gone by then
    (its connection watched, not only written to) has no generation started, and the server serves on."""
    import socket
    import threading

    from csmstream.transport import connection

    real, entered, release = connection.encode_turns, threading.Event(), threading.Event()

    def slow(turns, engine):
        entered.set()
        release.wait(10)
        return real(turns, engine)

    monkeypatch.setattr(connection, "encode_turns", slow)
    cancelled = rs.srv.metrics.cancelled
    body = json.dumps({"input": TEXT, "request_id": "gone", "response_format": "pcm", "context": [
        {"speaker_id": 1, "text": "Hello.", "audio": _b64(_tone(200, 0.3))}]}).encode()
    port = int(rs.srv.speech_url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert entered.wait(10)
    deadline = time.monotonic() + 10  # the server sees the close (its stream is marked gone) ...
    while not any(getattr(c, "gone", False) for c in list(rs.srv.connections)) and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()  # ... and only then do the turns come back encoded
    deadline = time.monotonic() + 10
    while rs.srv.metrics.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rs.srv.metrics.cancelled == cancelled + 1  # the request is counted as cancelled, as a hang-up is
    assert not _reqs(rs, "gone")  # nothing was handed to the engine
    monkeypatch.setattr(connection, "encode_turns", real)
    r = httpx.post(rs.srv.speech_url, json={"input": "Still here.", "response_format": "pcm", "max_audio_ms": 200},
                   timeout=60)
    assert r.status_code == 200 and len(r.content) == 200 * 48


def test_turns_the_codec_refuses_are_a_400_over_http_before_any_audio(rs, monkeypatch):
    from csmstream.transport import connection

    def refuse(turns, engine):
        raise ValueError("context[0].audio: the codec refuses it")

    monkeypatch.setattr(connection, "encode_turns", refuse)
    turn = {"speaker_id": 1, "text": "Hello.", "audio": _b64(_tone(200, 0.3))}
    with httpx.Client(timeout=60) as client:
        r = client.post(rs.srv.speech_url, json={"input": TEXT, "request_id": "refused", "context": [turn]})
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "context[0].audio: the codec refuses it",
                                     "type": "invalid_request_error", "param": None, "code": "invalid_context"}
        assert client.get(rs.srv.speech_url.replace("/v1/audio/speech", "/healthz")).status_code == 200  # kept open
    assert not _reqs(rs, "refused")
