"""The ElevenLabs-compatible endpoints (stream-input and multi-stream-input), driven by clients
written from ElevenLabs' documented message flows (PROTOCOLS.md §3) over real sockets. The audio is
checked against the engine's own stream() of the same text and seed."""

import asyncio
import base64
import json
import re
import socket
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from tests.servers import RunningServer, collect, fail_on, floor_frame_time, wait_finished, wait_until
from tests.transport.test_reliability import same_audio
from tests.transport.test_server import audio_of, reference_pcm

LONG = "This answer has several sentences. It goes on for a while. Then it goes on a bit more. And it ends."


@pytest.fixture(scope="module")
def el():
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=8), warmup=False).start()
    yield rs
    rs.stop()


def url_of(rs, tail):
    return rs.url.replace("/ws/generate", "/v1/text-to-speech/" + tail)


async def read_contexts(ws, n_final, timeout=60):
    """Read until `n_final` isFinal messages; returns (audio by context, finals in order, other
    messages, the order of (kind, context) events)."""
    audio, finals, other, order = {}, [], [], []
    while len(finals) < n_final:
        msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        cid = msg.get("contextId")
        if msg.get("isFinal"):
            finals.append(msg)
            order.append(("final", cid))
        elif msg.get("audio"):
            assert set(msg) == {"audio", "isFinal", "normalizedAlignment", "alignment", "contextId"}
            audio[cid] = audio.get(cid, b"") + base64.b64decode(msg["audio"])
            order.append(("audio", cid))
        else:
            other.append(msg)
    return audio, finals, other, order


def test_stream_input_flow(el):
    """A client written from ElevenLabs' documented message flow (PROTOCOLS.md §3)."""
    url = url_of(el, "1/stream-input?model_id=x&output_format=pcm_16000")

    async def go():
        async with connect(url) as ws:
            await ws.send(json.dumps({"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8},
                                      "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]}}))
            for piece in ["Hello there. ", "How are ", "you doing ", "today? "]:
                await ws.send(json.dumps({"text": piece}))
            await ws.send(json.dumps({"text": "I hope well. ", "flush": True}))
            await ws.send(json.dumps({"text": ""}))
            audio, final = b"", None
            async for m in ws:
                msg = json.loads(m)
                if msg.get("isFinal"):
                    final = msg
                    break
                assert set(msg) >= {"audio", "normalizedAlignment", "alignment"}
                audio += base64.b64decode(msg["audio"])
            return audio, final

    audio, final = asyncio.run(go())
    assert final == {"audio": None, "isFinal": True, "normalizedAlignment": None, "alignment": None}
    assert len(audio) > 16000 and len(audio) % 2 == 0  # over half a second of 16 kHz int16
    parts = [r.text for r in list(el.srv.recent)[-3:]]
    assert parts == ["Hello there.", "How are you doing today?", "I hope well."]


@pytest.mark.parametrize("failure,code,close", [("busy", "busy", 1013), ("refused", "invalid_request", 1008),
                                                ("bug", "internal_error", 1011)])
def test_stream_input_that_fails_gets_its_error_then_isfinal_and_the_socket_closes(el, monkeypatch, failure, code,
                                                                                   close):
    """A stream refused as busy (or hit by a server bug) used to leave its client waiting for ever:
    the error went out, but no isFinal, and the socket stayed open. Now it ends as every stream
    here does; a failed second sentence keeps the first's audio whole."""
    from csmstream.engine.worker import Busy

    fail_on(monkeypatch, el.srv.worker, "submit", "FAIL", {
        "busy": Busy("all streams are busy (injected)"), "refused": ValueError("prompt too long (injected)"),
        "bug": TypeError("injected bug")}[failure])

    async def go(text):
        async with connect(url_of(el, "0/stream-input?seed=4")) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": text}))
            await ws.send(json.dumps({"text": ""}))
            audio, other, final = b"", [], None
            with pytest.raises(ConnectionClosedError):  # (what websockets raises for a close code other than 1000)
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("isFinal"):
                        final = msg
                    elif msg.get("audio"):
                        audio += base64.b64decode(msg["audio"])
                    else:
                        other.append(msg)
            return audio, other, final, ws.close_code

    for text, spoken in (("We FAIL at once. ", None), ("This one is fine. Then we FAIL. ", "This one is fine.")):
        audio, other, final, closed = asyncio.run(asyncio.wait_for(go(text), 60))
        assert [m["error"] for m in other] == [code] and final["isFinal"] is True and closed == close
        if spoken is None:
            assert audio == b""
        else:  # all of the first sentence, also before a bug (which used to cut it where it struck)
            assert same_audio(audio, reference_pcm(spoken, 0, seed=4))


def test_stream_input_seed_gives_the_engines_audio(el):
    async def go():
        async with connect(url_of(el, "0/stream-input?seed=7")) as ws:
            for m in [{"text": " "}, {"text": "Seeded and exact. "}, {"text": ""}]:
                await ws.send(json.dumps(m))
            audio = b""
            async for m in ws:
                msg = json.loads(m)
                if msg["isFinal"]:
                    return audio
                audio += base64.b64decode(msg["audio"])

    assert same_audio(asyncio.run(go()), reference_pcm("Seeded and exact.", 0, seed=7))


def test_mp3_output_is_whole_frames_a_message_with_the_alignment_after_the_priming_delay(el):
    """LiveKit's ElevenLabs plugin asks for mp3 (mp3_22050_32 by default): each message's audio is
    whole MP3 frames, the messages join into the MP3 of the engine's audio (decoded by libsndfile,
    independently of our encoder), and the alignment counts from the start of the decoded stream,
    where LAME's priming samples come first."""
    import io

    import numpy as np
    import soundfile as sf

    from csmstream.transport.mp3 import LAME_DELAY, frame_length
    from tests.transport.test_http_elevenlabs import encoded

    async def go():
        async with connect(url_of(el, "0/stream-input?seed=7&output_format=mp3_22050_32")) as ws:
            for m in [{"text": " "}, {"text": "Seeded and exact. "}, {"text": ""}]:
                await ws.send(json.dumps(m))
            return [json.loads(m) async for m in ws]

    msgs = asyncio.run(go())
    chunks = [base64.b64decode(m["audio"]) for m in msgs[:-1]]
    assert msgs[-1]["isFinal"] and all(frame_length(c[:4]) for c in chunks)
    got, rate = sf.read(io.BytesIO(b"".join(chunks)), dtype="float32")
    want, _ = sf.read(io.BytesIO(encoded("mp3_22050_32", reference_pcm("Seeded and exact.", 0, seed=7))),
                      dtype="float32")
    assert rate == 22050 and len(got) == len(want)
    assert np.dot(got, want) / np.sqrt(np.dot(got, got) * np.dot(want, want)) > 0.99
    first = next(m["alignment"] for m in msgs if m.get("alignment"))
    assert first["charStartTimesMs"][0] == round(1000 * LAME_DELAY / 22050)


def test_opus_output_is_whole_ogg_pages_a_message_timed_by_what_they_decode_to(el):
    """ElevenLabs' opus_48000_KBPS: each message is whole Ogg pages; the messages join into one
    Ogg Opus stream that decodes (libsndfile, independently of our encoder) to exactly the
    engine's audio's length, the same audio as our encoding of it; Opus's pre-skip is dropped by
    decoders, so the alignment starts at 0 and ends where the audio does."""
    import io

    import numpy as np
    import soundfile as sf

    from tests.transport.test_http_elevenlabs import encoded
    from tests.transport.test_opus import pages

    async def go():
        async with connect(url_of(el, "0/stream-input?seed=7&output_format=opus_48000_32")) as ws:
            for m in [{"text": " "}, {"text": "Seeded and exact. "}, {"text": ""}]:
                await ws.send(json.dumps(m))
            return [json.loads(m) async for m in ws]

    msgs = asyncio.run(go())
    chunks = [base64.b64decode(m["audio"]) for m in msgs[:-1]]
    assert msgs[-1]["isFinal"] and all(pages(c) for c in chunks)
    pcm = reference_pcm("Seeded and exact.", 0, seed=7)
    got, rate = sf.read(io.BytesIO(b"".join(chunks)), dtype="int16")
    want, _ = sf.read(io.BytesIO(encoded("opus_48000_32", pcm)), dtype="int16")
    assert rate == 24000 and len(got) == len(pcm) // 2
    np.testing.assert_array_equal(got, want)
    align = [m["alignment"] for m in msgs if m.get("alignment")]
    assert align[0]["charStartTimesMs"][0] == 0
    end = align[-1]["charStartTimesMs"][-1] + align[-1]["charDurationsMs"][-1]
    assert abs(end - 1000 * len(got) / rate) <= 2


@pytest.mark.parametrize("tail, word", [
    ("nobody/stream-input", "nobody"),
    ("0/stream-input?output_format=opus_48000_256", "opus_48000_192"),
    ("0/multi-stream-input?inactivity_timeout=0", "inactivity_timeout"),
    ("0/multi-stream-input?inactivity_timeout=181", "inactivity_timeout"),
    ("0/stream-input?inactivity_timeout=soon", "inactivity_timeout"),
    ("0/multi-stream-input?seed=-1", "seed"),
    ("0/stream-input?seed=4294967296", "seed"),
    ("%C2%B2/multi-stream-input", "voice_id"),  # a superscript two is a digit, not a speaker number
    ("9" * 5000 + "/stream-input", "voice_id"),  # past the 4,300 digits int() reads
    ("0/multi-stream-input?seed=" + "9" * 5000, "seed"),
    ("0/stream-input?seed=" + "%E2%82%AC" * 40, "seed"),  # 40 euro signs: 120 bytes quoted, > a close frame's 123
    ("0/multi-stream-input?continue_previous=yes", "continue_previous must be true or false"),
])
def test_a_bad_url_is_refused_with_what_is_allowed(el, tail, word):
    async def go():
        async with connect(url_of(el, tail)) as ws:
            msg = json.loads(await ws.recv())
            await ws.wait_closed()
            return msg, ws.close_code

    msg, code = asyncio.run(go())
    assert msg["error"] == "invalid_request" and word in msg["message"] and code == 1008


def test_multi_contexts_are_independent_and_each_ends_with_one_isfinal(el):
    """Context a is opened and left waiting for text; b, opened after it, is spoken at once (it does
    not queue behind a); then a gets its text. Each context's audio is the engine's own for its
    text and the URL's seed, every message names its context, and close_socket ends the socket."""
    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=3&output_format=pcm_24000")) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "a", "voice_settings": {"stability": 0.4}}))
            await ws.send(json.dumps({"text": " ", "context_id": "b"}))
            await ws.send(json.dumps({"text": "Bee speaks first. ", "context_id": "b"}))
            await ws.send(json.dumps({"context_id": "b", "flush": True}))
            await ws.send(json.dumps({"context_id": "b", "close_context": True}))
            first = await read_contexts(ws, 1)
            await ws.send(json.dumps({"text": "", "context_id": "a"}))  # keep-alive: no audio, no close
            await ws.send(json.dumps({"text": "Then comes a. ", "context_id": "a", "flush": True}))
            await ws.send(json.dumps({"context_id": "a", "close_context": True}))
            second = await read_contexts(ws, 1)
            await ws.send(json.dumps({"close_socket": True}))
            await ws.wait_closed()
            return first, second, ws.close_code

    (a1, f1, o1, _), (a2, f2, o2, _), code = asyncio.run(go())
    assert set(a1) == {"b"} and f1 == [{"audio": None, "isFinal": True, "normalizedAlignment": None,
                                        "alignment": None, "contextId": "b"}]
    assert same_audio(a1["b"], reference_pcm("Bee speaks first.", 0, seed=3))
    assert set(a2) == {"a"} and [f["contextId"] for f in f2] == ["a"]
    assert same_audio(a2["a"], reference_pcm("Then comes a.", 0, seed=3))
    assert o1 == o2 == [] and code == 1000


def test_multi_a_server_bug_in_one_context_ends_it_with_an_error_and_isfinal(el, monkeypatch):
    """A bug while streaming one context (prepare raising, as tokenizers did on a lone surrogate)
    ends that context with internal_error and its isFinal; the other context plays on."""
    fail_on(monkeypatch, el.srv.worker, "prepare", "BUG", TypeError("injected bug"))

    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=4")) as ws:
            await ws.send(json.dumps({"text": "A BUG here. ", "context_id": "x", "flush": True}))
            await ws.send(json.dumps({"text": "This one is fine. ", "context_id": "y", "flush": True}))
            await ws.send(json.dumps({"context_id": "y", "close_context": True}))
            out = await read_contexts(ws, 2)
            await ws.send(json.dumps({"close_socket": True}))
            await ws.wait_closed()
            return out

    audio, finals, other, order = asyncio.run(go())
    assert sorted(f["contextId"] for f in finals) == ["x", "y"] and set(audio) == {"y"}
    assert [(m["error"], m["contextId"]) for m in other] == [("internal_error", "x")]
    assert "TypeError: injected bug" in other[0]["message"]
    assert same_audio(audio["y"], reference_pcm("This one is fine.", 0, seed=4))


def test_multi_the_rest_of_a_failed_turn_is_dropped_and_its_context_id_serves_the_next_turn(el, monkeypatch):
    """A context refused as busy while its client was still writing its turn ends with its error
    and isFinal. The text that follows for it is the rest of that turn: it used to open a new
    context under the same id, which spoke the answer from mid-sentence and sent the id a second
    isFinal. Now it is dropped until the turn's flush (or close_context), and then the id opens a
    new context. A context refused after its client flushed keeps its id free at once."""
    from csmstream.engine.worker import Busy

    fail_on(monkeypatch, el.srv.worker, "submit", "FAIL", Busy("all streams are busy (injected)"))

    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=6")) as ws:
            async def send(**m):
                await ws.send(json.dumps(m))

            await send(text=" ", context_id="x")
            await send(text="We FAIL right here. And then", context_id="x")
            failed = await read_contexts(ws, 1)
            await send(text=" the rest of the turn. ", context_id="x")  # dropped
            await send(text="", context_id="x")  # a keep-alive: also nothing
            await send(context_id="x", flush=True)  # ends the failed turn
            await send(text="A new turn. ", context_id="x", flush=True)
            await send(context_id="x", close_context=True)
            reused = await read_contexts(ws, 1)
            await send(text="Zed will FAIL too. ", context_id="z", flush=True)  # flushed before it fails
            flushed = await read_contexts(ws, 1)
            await send(text="Zed goes on. ", context_id="z", flush=True)
            await send(context_id="z", close_context=True)
            after = await read_contexts(ws, 1)
            await send(close_socket=True)
            await ws.wait_closed()
            return failed, reused, flushed, after

    (a1, f1, o1, _), (a2, f2, o2, _), (a3, f3, o3, _), (a4, f4, o4, _) = asyncio.run(asyncio.wait_for(go(), 60))
    assert a1 == {} and [f["contextId"] for f in f1] == ["x"]
    assert [(m["error"], m["contextId"]) for m in o1] == [("busy", "x")]
    assert "the rest of its text is dropped until its flush or close_context" in o1[0]["message"]
    assert set(a2) == {"x"} and [f["contextId"] for f in f2] == ["x"] and o2 == []
    assert same_audio(a2["x"], reference_pcm("A new turn.", 0, seed=6))
    assert a3 == {} and [(m["error"], m["contextId"]) for m in o3] == [("busy", "z")]
    assert "dropped" not in o3[0]["message"] and [f["contextId"] for f in f3] == ["z"]
    assert set(a4) == {"z"} and o4 == [] and same_audio(a4["z"], reference_pcm("Zed goes on.", 0, seed=6))


def test_multi_a_server_bug_on_a_message_is_its_internal_error_and_the_socket_goes_on(el, monkeypatch):
    """A bug while handling one message used to end the multi-context socket (close 1011) and every
    context on it; stream-input and /ws/generate already answered internal_error and went on."""
    from csmstream.transport import protocol

    problem = protocol.text_problem

    def buggy(text):
        if "BUG" in text:
            raise TypeError("injected bug")
        return problem(text)

    monkeypatch.setattr(protocol, "text_problem", buggy)

    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=5")) as ws:
            await ws.send(json.dumps({"text": "Kept going. ", "context_id": "a"}))
            await ws.send(json.dumps({"text": "A BUG here. ", "context_id": "b"}))
            await ws.send(json.dumps({"context_id": "a", "close_context": True}))
            out = await read_contexts(ws, 1)
            await ws.send(json.dumps({"close_socket": True}))
            await ws.wait_closed()
            return out, ws.close_code

    (audio, finals, other, _), code = asyncio.run(asyncio.wait_for(go(), 60))
    assert [m["error"] for m in other] == ["internal_error"] and "TypeError: injected bug" in other[0]["message"]
    assert [f["contextId"] for f in finals] == ["a"] and code == 1000
    assert same_audio(audio["a"], reference_pcm("Kept going.", 0, seed=5))


@pytest.mark.parametrize("tail", ["0/stream-input", "0/multi-stream-input"])
def test_json_that_python_cannot_read_is_an_invalid_message_and_the_socket_goes_on(el, tail):
    """Nesting past json's recursion limit and an integer past Python's 4,300 digits raise other
    exceptions than a syntax error; both are the client's bad message, not a dead connection. So are
    JSON that is not an object, and text that is not a string: each error says what was expected."""
    async def go():
        async with connect(url_of(el, tail)) as ws:
            errs = []
            for bad in ("[" * 100_000, '{"text": "hi", "n": 1' + "0" * 5000 + "}", "[1, 2]", '{"text": 5}'):
                await ws.send(bad)
                errs.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await ws.send(json.dumps({"text": "Still here. ", "flush": True}))
            return errs, json.loads(await asyncio.wait_for(ws.recv(), 30))

    errs, after = asyncio.run(go())
    assert [e["error"] for e in errs] == ["invalid_message"] * 4
    assert all("messages are JSON objects like {" in e["message"] for e in errs[:3])
    assert errs[3]["message"] == "text must be a string, got int"
    assert after.get("audio")


def test_stream_input_refuses_a_lone_surrogate_and_goes_on(el):
    async def go():
        async with connect(url_of(el, "0/stream-input?seed=6")) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": "Broken \udc00 text. "}))
            err = json.loads(await asyncio.wait_for(ws.recv(), 30))
            await ws.send(json.dumps({"text": "Fine text. "}))
            await ws.send(json.dumps({"text": ""}))
            audio = b""
            async for m in ws:
                msg = json.loads(m)
                if msg.get("isFinal"):
                    return err, audio
                audio += base64.b64decode(msg["audio"])

    err, audio = asyncio.run(go())
    assert err["error"] == "invalid_message" and "unpaired surrogate \\udc00 at character 7" in err["message"]
    assert same_audio(audio, reference_pcm("Fine text.", 0, seed=6))


def test_multi_contexts_stream_side_by_side(el):
    """Two long contexts sent at once: the second's audio starts before the first has ended (they
    are generated and sent concurrently, not one after the other), and each is the audio
    /ws/generate makes of the same text and seed; without a context_id, a message goes to the
    context "default"."""
    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=1")) as ws:
            await ws.send(json.dumps({"text": LONG + " ", "context_id": "one", "flush": True}))
            await ws.send(json.dumps({"text": LONG + " ", "flush": True}))
            await ws.send(json.dumps({"close_socket": True}))  # both finish, then the socket closes
            out = await read_contexts(ws, 2)
            await ws.wait_closed()
        async with connect(el.url) as ws:
            await ws.send(json.dumps({"text": LONG, "seed": 1}))
            want = audio_of(await collect(ws))
        return out, ws.close_code, want

    (audio, finals, other, order), code, want = asyncio.run(go())
    assert sorted(f["contextId"] for f in finals) == ["default", "one"] and not other and code == 1000
    assert same_audio(audio["one"], want) and same_audio(audio["default"], want)
    first_final = min(order.index(("final", "one")), order.index(("final", "default")))
    assert {("audio", "one"), ("audio", "default")} <= set(order[:first_final])


def test_barge_in_stops_one_context_at_once_and_not_the_other(monkeypatch):
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=4), warmup=False).start()
    floor_frame_time(monkeypatch, rs, 0.02)
    try:
        async def go():
            async with connect(url_of(rs, "0/multi-stream-input?seed=2")) as ws:
                await ws.send(json.dumps({"text": "Interrupted talk goes on and on and on. ", "context_id": "old",
                                          "flush": True}))
                await ws.send(json.dumps({"text": "Kept talk goes on to its end. ", "context_id": "keep"}))
                await ws.send(json.dumps({"context_id": "keep", "close_context": True}))  # graceful
                await ws.send(json.dumps({"text": "Too late. ", "context_id": "keep"}))
                seen = []
                while not seen or seen[-1].get("contextId") != "old":  # the old context has started to play
                    seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                await ws.send(json.dumps({"context_id": "old", "close_context": True, "immediate": True}))
                later, finals, other, _ = await read_contexts(ws, 2 - sum(bool(m.get("isFinal")) for m in seen))
                audio = {}
                for m in seen:
                    if m.get("audio"):
                        audio[m["contextId"]] = audio.get(m["contextId"], b"") + base64.b64decode(m["audio"])
                for c, pcm in later.items():
                    audio[c] = audio.get(c, b"") + pcm
                return audio, finals + [m for m in seen if m.get("isFinal")], other + [
                    m for m in seen if "error" in m]

        audio, finals, other = asyncio.run(go())
        assert sorted(f["contextId"] for f in finals) == ["keep", "old"]
        assert [(m["error"], m["contextId"]) for m in other] == [("context_closed", "keep")]
        assert "open a new context_id" in other[0]["message"]
        assert same_audio(audio["keep"], reference_pcm("Kept talk goes on to its end.", 0, seed=2))  # all of it
        old = [r for r in rs.srv.recent if r.text.startswith("Interrupted")]
        assert len(old) == 1 and wait_finished(old[0])
        assert old[0].reason == "cancelled" and old[0].frames < old[0].max_frames
        assert not [r for r in rs.srv.recent if r.text == "Too late."]
        assert rs.srv.health()["active"] == 0
    finally:
        rs.stop()


def test_multi_a_context_id_is_free_the_moment_its_isfinal_is_out(el, monkeypatch):
    """A client may reuse a context_id as soon as it reads that context's isFinal. The server used
    to forget the context only once its task resumed after sending the isFinal, so a quick enough
    client (or a busy loop: it failed in CI under uvloop) had its new turn taken for the ended
    context's: `context_closed`, or text silently dropped and a context that never ended. Here the
    server's bookkeeping after each isFinal is made slow on purpose."""
    from csmstream.transport.elevenlabs_multi import MultiContextConnection

    final = MultiContextConnection._final

    async def final_then_dawdle(self, job):
        await final(self, job)
        await asyncio.sleep(0.3)

    monkeypatch.setattr(MultiContextConnection, "_final", final_then_dawdle)

    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=7")) as ws:
            turns = []
            for text in ("First turn. ", "Second turn. ", "Third turn. "):
                await ws.send(json.dumps({"text": text, "context_id": "x", "flush": True}))
                await ws.send(json.dumps({"context_id": "x", "close_context": True}))
                turns.append(await read_contexts(ws, 1, timeout=30))  # the next turn goes at once
            await ws.send(json.dumps({"close_socket": True}))
            await ws.wait_closed()
            return turns, ws.close_code

    turns, code = asyncio.run(go())
    for (audio, finals, other, _), text in zip(turns, ("First turn.", "Second turn.", "Third turn."), strict=True):
        assert other == [] and [f["contextId"] for f in finals] == ["x"]
        assert same_audio(audio["x"], reference_pcm(text, 0, seed=7))
    assert code == 1000


def test_multi_close_socket_waits_for_every_isfinal_on_its_way(el, monkeypatch):
    """close_socket closes the socket after the last context's isFinal: also when the isFinals are
    slow to go out (a context is forgotten as its isFinal starts out, not once it is sent)."""
    from csmstream.transport.elevenlabs_multi import MultiContextConnection

    send_timed = MultiContextConnection._send_timed

    async def slow_finals(self, job, message):  # a's at once, b's after 0.3 s, c's after 0.6 s
        if isinstance(message, str) and '"isFinal": true' in message:
            await asyncio.sleep(0.3 * "abc".index(job.context_id))
        await send_timed(self, job, message)

    monkeypatch.setattr(MultiContextConnection, "_send_timed", slow_finals)

    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=8")) as ws:
            for c in "abc":
                await ws.send(json.dumps({"text": f"Context {c}. ", "context_id": c, "flush": True}))
            await ws.send(json.dumps({"close_socket": True}))
            audio, finals, other, _ = await read_contexts(ws, 3, timeout=30)
            await ws.wait_closed()
            return finals, other, ws.close_code

    finals, other, code = asyncio.run(go())
    assert sorted(f["contextId"] for f in finals) == ["a", "b", "c"] and other == [] and code == 1000


def test_multi_bad_messages_get_clear_errors_and_the_contexts_go_on(el):
    async def go():
        async with connect(url_of(el, "0/multi-stream-input?seed=5")) as ws:
            async def error_for(msg):
                await ws.send(msg if isinstance(msg, str) else json.dumps(msg))
                return json.loads(await asyncio.wait_for(ws.recv(), 30))

            errs = [await error_for("not json"), await error_for({"text": "x", "context_id": 5}),
                    await error_for({"text": 3, "context_id": "x"}),
                    await error_for({"context_id": "nope", "flush": True}),
                    await error_for({"context_id": "nope", "close_context": True})]
            for c in "abcde":
                await ws.send(json.dumps({"text": " ", "context_id": c}))
            errs.append(await error_for({"text": "Sixth. ", "context_id": "f"}))
            errs.append(await error_for({"text": "x" * 5001, "context_id": "a"}))
            await ws.send(json.dumps({"context_id": "e", "close_context": True}))  # nothing said: ends now
            _, finals, _, _ = await read_contexts(ws, 1)
            await ws.send(json.dumps({"text": "Sixth now fits. ", "context_id": "f", "flush": True}))
            await ws.send(json.dumps({"context_id": "f", "close_context": True}))
            got = await read_contexts(ws, 1)
            await ws.send(json.dumps({"close_socket": True}))
            rest = await read_contexts(ws, 4)
            await ws.wait_closed()
            return errs, finals, got, rest, ws.close_code

    errs, finals, (audio, f_finals, _, _), (r_audio, r_finals, _, _), code = asyncio.run(go())
    assert [e["error"] for e in errs] == ["invalid_message"] * 3 + ["context_not_found"] * 2 + [
        "max_active_conversations", "text_too_long"]
    assert "context_id must be a string" in errs[1]["message"] and "contextId" not in errs[1]
    assert errs[2]["contextId"] == "x" and "text must be a string" in errs[2]["message"]
    assert errs[3]["contextId"] == "nope" and "a context opens with its first text" in errs[3]["message"]
    assert errs[5]["contextId"] == "f" and "at most 5 contexts" in errs[5]["message"]
    assert errs[6]["contextId"] == "a" and "5000" in errs[6]["message"]
    assert [f["contextId"] for f in finals] == ["e"]
    assert [f["contextId"] for f in f_finals] == ["f"]
    assert same_audio(audio["f"], reference_pcm("Sixth now fits.", 0, seed=5))
    assert sorted(f["contextId"] for f in r_finals) == ["a", "b", "c", "d"] and r_audio == {} and code == 1000


def test_inactivity_closes_input_speaks_what_was_sent_then_closes_an_idle_socket(el):
    async def multi():
        async with connect(url_of(el, "0/multi-stream-input?seed=4&inactivity_timeout=0.5")) as ws:
            await ws.send(json.dumps({"text": "Unfinished words without an end", "context_id": "t"}))
            audio, finals, other, _ = await read_contexts(ws, 1)  # no close, no flush: the timeout ends it
            err = json.loads(await asyncio.wait_for(ws.recv(), 10))  # then nothing is open: the socket goes
            await ws.wait_closed()
            return audio, finals, other, err, ws.close_code

    async def single_silent():
        async with connect(url_of(el, "0/stream-input?inactivity_timeout=0.3")) as ws:
            err = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.wait_closed()
            return err, ws.close_code

    async def single_unfinished():
        async with connect(url_of(el, "0/stream-input?seed=4&inactivity_timeout=0.5")) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": "Unfinished words without an end"}))
            audio = b""
            async for m in ws:
                msg = json.loads(m)
                if msg["isFinal"]:
                    break
                audio += base64.b64decode(msg["audio"])
            await ws.wait_closed()
            return audio, ws.close_code

    want = reference_pcm("Unfinished words without an end", 0, seed=4)
    audio, finals, other, err, code = asyncio.run(multi())
    assert same_audio(audio["t"], want) and [f["contextId"] for f in finals] == ["t"] and other == []
    assert err["error"] == "input_timeout_exceeded" and "inactivity_timeout" in err["message"] and code == 1008
    err, code = asyncio.run(single_silent())
    assert err["error"] == "input_timeout_exceeded" and code == 1008
    audio, code = asyncio.run(single_unfinished())
    assert same_audio(audio, want) and code == 1000


def test_a_context_whose_client_stops_reading_is_cut_off(monkeypatch):
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), warmup=False, send_timeout=0.5,
                       socket_send_buffer=8192).start()
    floor_frame_time(monkeypatch, rs, 0.02)
    try:
        async def go():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", rs.srv.port))
            ws = await connect(url_of(rs, "0/multi-stream-input"), sock=sock, max_queue=1)
            await ws.send(json.dumps({"text": "A very long answer nobody reads. " * 8, "context_id": "c",
                                      "flush": True}))
            await asyncio.sleep(3.0)  # never reads
            return ws

        asyncio.run(go())
        reqs = [r for r in rs.srv.recent if r.text.startswith("A very long")]
        assert reqs and all(wait_finished(r) for r in reqs)
        assert reqs[-1].reason == "cancelled" and len(reqs) < 8
        assert rs.srv.metrics.errors["slow_reader"] == 1
        time.sleep(0.3)
        assert rs.srv.health()["active"] == 0 and not rs.srv.connections
    finally:
        rs.stop()


def test_an_unknown_path_is_a_404_that_lists_the_endpoints(el):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(el.url.replace("ws://", "http://").replace("/ws/generate", "/v1/text-to-speech/0/x"))
    assert e.value.code == 404
    body = e.value.read().decode()
    assert "/ws/generate" in body and "stream-input" in body and "multi-stream-input" in body


def test_the_official_elevenlabs_sdk_streams_from_csm_stream(el):
    """ElevenLabs' own Python SDK (convert_realtime: stream-input, text fed word by word with
    try_trigger_generation on every piece) as an independent client. Its pieces are single words:
    the server must still generate whole sentences (a hint is not a flush), and the bytes it yields
    are exactly those sentences' frames."""
    from elevenlabs.client import ElevenLabs

    client = ElevenLabs(api_key="unused", base_url=el.url.replace("ws://", "http://").replace("/ws/generate", ""))
    # the SDK always opens its socket with TLS (wss://); this test server speaks plain ws://
    client.text_to_speech._ws_base_url = el.url.replace("/ws/generate", "")

    def words():  # as an LLM writes them: "Hello", " there,", " how", ...
        yield from re.split("(?= )", "Hello there, how are you? I am fine, thank you.")

    before = len(el.srv.recent)
    audio = b"".join(client.text_to_speech.convert_realtime(voice_id="0", text=words(), output_format="pcm_24000"))
    reqs = list(el.srv.recent)[before:]
    assert [r.text for r in reqs] == ["Hello there, how are you?", "I am fine, thank you."]
    assert len(audio) == 2 * 1920 * sum(r.frames for r in reqs) > 0


def test_alignment_is_sentence_exact_and_adds_up_like_elevenlabs_clients_add_it(el):
    """Each sentence's characters (and a space after it) come once, in the message whose audio
    ends that sentence; times count from where the previous alignment ended, so adding up each
    message's end (as ElevenLabs' clients do) puts every sentence at its true start: the frames
    the engine made for the sentences before it, 80 ms each."""
    text = "First one here. The second is a little longer! And a third?"

    async def go():
        async with connect(url_of(el, "3/multi-stream-input?output_format=ulaw_8000")) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "c"}))
            await ws.send(json.dumps({"text": "", "context_id": "c"}))  # a keep-alive changes nothing
            await ws.send(json.dumps({"text": text + " ", "context_id": "c"}))
            await ws.send(json.dumps({"context_id": "c", "close_context": True}))
            msgs = []
            while not msgs or not msgs[-1].get("isFinal"):
                msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            return msgs

    before = len(el.srv.recent)
    msgs = asyncio.run(go())
    reqs = list(el.srv.recent)[before:]
    assert [r.text for r in reqs] == ["First one here.", "The second is a little longer!", "And a third?"]
    true_starts = [80 * sum(r.frames for r in reqs[:i]) for i in range(len(reqs))]
    chars, sent_ms, clock, starts_seen = "", 0.0, 0.0, []
    for m in msgs[:-1]:
        sent_ms += len(base64.b64decode(m["audio"])) / 8  # ulaw_8000: 8 bytes a millisecond
        a = m["alignment"]
        assert a == m["normalizedAlignment"]
        if a is None:
            continue
        assert len(a["chars"]) == len(a["charStartTimesMs"]) == len(a["charDurationsMs"])
        assert all(d >= 0 for d in a["charDurationsMs"]) and a["charStartTimesMs"][0] == 0
        assert a["charStartTimesMs"] == sorted(a["charStartTimesMs"])
        for c, t in zip(a["chars"], a["charStartTimesMs"], strict=True):
            if not chars or chars[-2:] in (". ", "! ", "? "):  # a sentence's first character
                starts_seen.append(clock + t)
            chars += c
        clock += a["charStartTimesMs"][-1] + a["charDurationsMs"][-1]
        assert clock <= sent_ms + 1  # never ahead of the audio that has been sent
    assert chars == "".join(r.text + " " for r in reqs)
    assert abs(clock - true_starts[-1] - 80 * reqs[-1].frames) <= 1
    assert [round(t) for t in starts_seen] == true_starts


def test_a_keep_alive_without_a_context_opens_none(el):
    async def go():
        async with connect(url_of(el, "0/multi-stream-input")) as ws:
            await ws.send(json.dumps({"text": ""}))  # pipecat's keep-alive between turns
            await ws.send(json.dumps({"text": "", "context_id": "later"}))
            await ws.send(json.dumps({"close_socket": True}))
            got = [m async for m in ws]  # nothing is open: the socket closes at once
            return got, ws.close_code

    assert asyncio.run(go()) == ([], 1000)


def test_stream_input_ended_before_any_text_is_final_at_once(el):
    """{"text": ""} ends the input, as ElevenLabs reads it, also as the first message: isFinal with
    no audio and a normal close now, not when the inactivity timeout (20 s) would have come."""
    async def go():
        async with connect(url_of(el, "0/stream-input")) as ws:
            await ws.send(json.dumps({"text": ""}))
            got = [json.loads(m) async for m in ws]
            return got, ws.close_code

    got, code = asyncio.run(asyncio.wait_for(go(), 10))  # (half the timeout: it did not wait for it)
    assert got == [{"audio": None, "isFinal": True, "normalizedAlignment": None, "alignment": None}] and code == 1000


def test_stream_input_first_message_is_bounded_and_may_carry_text_and_flush(el):
    async def go():
        async with connect(url_of(el, "0/stream-input?seed=6")) as ws:
            await ws.send(json.dumps({"text": "x" * 5001}))  # over --max-text-chars: refused, nothing opened
            err = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(json.dumps({"text": "Said at once, no end mark", "flush": True}))
            # the flush alone starts it: it is generated to the end while the stream is still open
            await wait_until(lambda: any(r.text == "Said at once, no end mark" and r.finished
                                         for r in list(el.srv.recent)), 30)
            await ws.send(json.dumps({"text": ""}))
            audio = b""
            async for m in ws:
                audio += base64.b64decode(json.loads(m)["audio"] or "")
            return err, audio, ws.close_code

    err, audio, code = asyncio.run(go())
    assert err["error"] == "text_too_long" and "5000" in err["message"]
    assert same_audio(audio, reference_pcm("Said at once, no end mark", 0, seed=6)) and code == 1000
