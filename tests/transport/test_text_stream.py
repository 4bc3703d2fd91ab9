"""Text as it arrives: streamed pieces, sentence pipelining with context, long text, voices -- all
over real sockets (the ElevenLabs endpoints are in test_elevenlabs.py)."""

import asyncio
import json
import time
import urllib.request
import wave

import numpy as np
import pytest
from websockets.asyncio.client import connect

from tests.servers import RunningServer, collect, fail_on

REPLY = ("Sure, I can help with that. Your order shipped on Monday. "
         "It should arrive by Friday afternoon. Anything else?")


def pieces(text, seed=0):
    rng = np.random.default_rng(seed)
    i = 0
    while i < len(text):
        n = int(rng.integers(3, 9))
        yield text[i : i + n]
        i += n


def test_streamed_text_starts_audio_after_the_first_sentence_and_plays_without_gaps(server):
    async def go():
        async with connect(server.url) as ws:
            sent_at, audio_at = [], []
            first_sentence_end = REPLY.index(".") + 1
            await ws.send(json.dumps({"text": "", "final": False, "request_id": "llm", "seed": 4}))

            async def feed():
                pos = 0
                for p in pieces(REPLY):
                    await ws.send(json.dumps({"text": p}))
                    pos += len(p)
                    sent_at.append((time.monotonic(), pos))
                    await asyncio.sleep(0.02)  # an LLM writing ~250 characters a second
                await ws.send(json.dumps({"flush": True}))

            feeder = asyncio.create_task(feed())
            done = None
            while done is None:
                m = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(m, bytes):
                    audio_at.append((time.monotonic(), len(m)))
                else:
                    done = json.loads(m)
            await feeder
            return sent_at, audio_at, done, first_sentence_end

    sent_at, audio_at, done, first_end = asyncio.run(go())
    assert done["done"] and not done["cancelled"] and done["request_id"] == "llm"
    t_first_audio = audio_at[0][0]
    t_first_sentence = next(t for t, pos in sent_at if pos > first_end)  # the piece after its period
    t_last_piece = sent_at[-1][0]
    assert t_first_sentence <= t_first_audio < t_last_piece  # started on sentence 1, not at the end
    # no gap: every chunk arrives before the client (playing from the first chunk) would need it,
    # allowing one chunk of slack
    t0 = t_first_audio
    played = 0.0
    for t, n in audio_at:
        assert t <= t0 + played + 0.100 + 0.05, "audio arrived later than real-time playback needs it"
        played += n / 2 / 24000
    assert done["audio_ms"] == pytest.approx(1000 * played, abs=0.1)
    parts = [r for r in server.srv.recent if r.tag.rid == "llm"]
    assert [r.text for r in parts] == ["Sure, I can help with that.", "Your order shipped on Monday.",
                                       "It should arrive by Friday afternoon.", "Anything else?"]


def test_next_sentence_uses_the_previous_one_as_exact_context(server):
    """Greedy: sentence 2 generated inside the reply equals what the engine gives for the same
    prompt built by hand (sentence 1's text and generated codes as a context segment)."""
    import csmstream

    text = "The weather is lovely today. Shall we walk to the park?"

    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": text, "topk": 1, "request_id": "ctx", "speaker_id": 2}))
            return await collect(ws)

    events = asyncio.run(go())
    assert events[-1][0] == "done"
    s1, s2 = [r for r in server.srv.recent if r.tag.rid == "ctx"]
    assert s1.text == "The weather is lovely today." and s2.text == "Shall we walk to the park?"
    c1, c2 = np.stack(s1.codes), np.stack(s2.codes)
    assert len(c1) > 0 and len(c2) > 0
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    want1 = np.stack(list(eng.frames(s1.text, 2, topk=1)))[: len(c1)]
    np.testing.assert_array_equal(c1, want1)
    ctx = [csmstream.Segment(2, s1.text, codes=c1)]
    want2 = np.stack(list(eng.frames(s2.text, 2, context=ctx, topk=1)))[: len(c2)]
    np.testing.assert_array_equal(c2, want2)
    # and the context matters
    alone = np.stack(list(eng.frames(s2.text, 2, topk=1)))
    assert not np.array_equal(alone[: len(c2)], c2)


def test_long_text_streams_to_the_end_within_the_window():
    """24 sentences on an engine whose window (200 positions) cannot hold them all: every sentence
    is generated, with the context trimmed from the oldest sentence so each prompt fits (sentence i
    still has seed + i)."""
    import csmstream
    from csmstream.engine.generator import FrameGenerator

    eng = csmstream.load("tiny", device="cpu", max_streams=2)
    eng.gen = FrameGenerator(eng.model, rows=2, max_seq_len=200)
    rs = RunningServer(eng).start()
    text = " ".join(f"Item {i} is ready." for i in range(24))
    try:
        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": text, "request_id": "long24", "seed": 3}))
                return await collect(ws)

        events = asyncio.run(go())
        parts = [r for r in rs.srv.recent if r.tag.rid == "long24"]
    finally:
        rs.stop()
    assert events[-1][0] == "done" and not events[-1][1]["cancelled"], events[-1]
    assert [r.text for r in parts] == [f"Item {i} is ready." for i in range(24)]
    assert all(r.finished and r.reason in ("eos", "max_frames", "guard") for r in parts)
    assert all(r.prompt_len + r.max_frames <= 200 for r in parts)
    assert max(len(r.context) for r in parts) >= 2  # context was used...
    assert min(len(r.context) for r in parts[5:]) < 4  # ...and trimmed to fit
    assert [r.seed for r in parts] == [3 + i for i in range(24)]
    assert [r.continues for r in parts] == [False] + [True] * 23  # later ones: never refused as busy
    total = sum(r.frames for r in parts) * 1920 / 24
    assert events[-1][1]["audio_ms"] == pytest.approx(total, abs=0.1)


def test_text_stream_protocol_errors(server):
    async def go():
        async with connect(server.url) as ws:
            out = []
            await ws.send(json.dumps({"flush": True}))
            out.append(json.loads(await ws.recv())["error"]["code"])
            await ws.send(json.dumps({"text": "Part one", "final": False, "request_id": "s"}))
            await ws.send(json.dumps({"text": " more", "request_id": "other"}))
            out.append(json.loads(await ws.recv())["error"]["code"])
            await ws.send(json.dumps({"text": 5}))
            out.append(json.loads(await ws.recv())["error"]["code"])
            await ws.send(json.dumps({"text": "x" * 5000}))
            out.append(json.loads(await ws.recv())["error"]["code"])
            await ws.send(json.dumps({"text": " and \ud800"}))  # a lone surrogate: sent as the escape \ud800
            err = json.loads(await ws.recv())["error"]
            out.append(err["code"])
            out.append("at character 5" in err["message"])
            await ws.send(json.dumps({"text": " and the end.", "final": True}))
            events = await collect(ws)
            return out, events

    codes, events = asyncio.run(go())
    assert codes == ["nothing_to_flush", "invalid_request_id", "invalid_text", "text_too_long", "invalid_text", True]
    assert events[-1][0] == "done" and events[-1][1]["request_id"] == "s" and any(k == "audio" for k, _ in events)


def test_a_text_stream_left_without_a_message_is_closed_and_what_it_sent_is_spoken(server):
    """A client that stalls (or forgets final=true) held its words unspoken, and its connection, for
    ever. After inactivity_timeout with no message the stream is closed as a flush would: its text
    is spoken, and its done says input_timeout. Every message restarts the wait."""
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Sure, I can help", "final": False, "request_id": "stall",
                                      "inactivity_timeout": 0.5, "seed": 3}))
            for piece in (" with", " that"):  # each within the timeout: the stream stays open
                await asyncio.sleep(0.3)
                await ws.send(json.dumps({"text": piece}))
            last = time.monotonic()
            events = await collect(ws)
            first = next(i for i, (kind, _) in enumerate(events) if kind == "audio")
            await ws.send(json.dumps({"text": "Next one.", "request_id": "next", "max_audio_ms": 160}))
            return last, events, first, await collect(ws)

    last, events, first, after = asyncio.run(go())
    kind, done = events[-1]
    assert kind == "done" and done["request_id"] == "stall" and done["input_timeout"] is True, events[-1]
    assert not done["cancelled"] and done["audio_ms"] > 0 and first == 0
    parts = [r.text for r in server.srv.recent if r.tag.rid == "stall"]
    assert parts == ["Sure, I can help with that"]  # every word it sent, none before the last piece
    assert after[-1][0] == "done" and after[-1][1]["request_id"] == "next" and "input_timeout" not in after[-1][1]
    assert server.srv.metrics.errors.get("input_timeout") == 1


async def _ends(ws, t=1.0):
    """The JSON messages that come within `t` s of each other (audio is counted, not kept)."""
    out, audio = [], 0
    try:
        while True:
            m = await asyncio.wait_for(ws.recv(), t)
            if isinstance(m, bytes):
                audio += 1
            else:
                out.append(json.loads(m))
    except TimeoutError:
        return out, audio


@pytest.mark.parametrize("then", ["plain", "new_id", "cancel", "flush", "idle"])
def test_a_failed_text_stream_drops_the_rest_of_its_turn_and_never_swallows_a_new_request(server, monkeypatch,
                                                                                          then):
    """A text stream refused (here busy) while its client is still writing: the rest of that turn is
    dropped, not spoken mid-sentence as a new request. It used to be dropped in silence until
    final/flush: a client that took the error as the end and sent its next request with no
    request_id waited for ever; a new request_id was told the failed stream was 'open'; a cancel
    answered nothing_to_cancel and left it open; and inactivity_timeout never closed it. Now each
    dropped piece of text is answered (stream_ended), and a new request_id, a cancel, final, flush
    or the timeout ends it."""
    from csmstream.engine.worker import Busy

    fail_on(monkeypatch, server.srv.worker, "submit", "REFUSED", Busy("all streams are busy (injected)"))
    nxt = f"next-{then}"

    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "This is REFUSED. And then", "final": False, "request_id": "r1",
                                      "inactivity_timeout": 0.5 if then == "idle" else 20}))
            first, _ = await _ends(ws, 0.3)
            steps = []
            if then == "plain":  # the next answer, sent as a new request without a request_id
                await ws.send(json.dumps({"text": "Hello there.", "speaker_id": 0}))
                steps.append(await _ends(ws))
                await ws.send(json.dumps({"text": " the end.", "final": True}))  # the turn's end: closes it
                steps.append(await _ends(ws))
            elif then == "cancel":
                await ws.send(json.dumps({"cancel": True}))
                steps.append(await _ends(ws))
            elif then == "flush":  # the turn's end: closes it, with nothing to answer
                await ws.send(json.dumps({"flush": True}))
                steps.append(await _ends(ws))
            elif then == "idle":
                await asyncio.sleep(1.0)  # past inactivity_timeout with no message
            await ws.send(json.dumps({"text": "Next one.", "request_id": nxt, "seed": 2, "max_audio_ms": 320}))
            return first, steps, await collect(ws)

    first, steps, after = asyncio.run(go())
    assert [(m["error"]["code"], m["request_id"]) for m in first] == [("busy", "r1")]
    assert "text stream 'r1' ends here" in first[0]["error"]["message"]
    codes = [[(m["error"]["code"], m["request_id"]) for m in got] for got, _ in steps]
    assert all(audio == 0 for _, audio in steps)  # nothing of the failed turn is spoken
    assert codes == {"plain": [[("stream_ended", None)], [("stream_ended", None)]],
                     "cancel": [[("nothing_to_cancel", None)]], "flush": [[]]}.get(then, [])
    if then == "plain":
        assert "text stream 'r1' has ended with its error (busy)" in steps[0][0][0]["error"]["message"]
        assert "closed now" in steps[1][0][0]["error"]["message"]
    if then == "cancel":
        assert "text stream is closed now" in steps[0][0][0]["error"]["message"]
    assert [k for k, _ in after if k != "audio"] == ["done"] and after[-1][1]["request_id"] == nxt
    assert after[-1][1]["audio_ms"] == 320 and not after[-1][1]["cancelled"]
    assert [r.text for r in server.srv.recent if r.tag.rid == nxt] == ["Next one."]


def test_a_reply_that_pauses_after_a_sentence_is_spoken_before_its_next_piece(server):
    """An LLM that stops after its first sentence (a tool call, a slow token): that sentence used to
    wait for the next piece, which shows whether the "." ended it; now a pause of SETTLE_S settles
    it. Its audio comes while the stream is still open, and the whole reply is the two sentences."""
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Sure, I can help with that", "final": False, "request_id": "pause",
                                      "seed": 4, "inactivity_timeout": 60}))
            await ws.send(json.dumps({"text": "."}))
            first = await asyncio.wait_for(ws.recv(), 15)  # no more text until audio has come
            await ws.send(json.dumps({"text": " Your order shipped.", "final": True}))
            return first, await collect(ws)

    first, rest = asyncio.run(go())
    assert isinstance(first, bytes)
    assert rest[-1][0] == "done" and not rest[-1][1]["cancelled"]
    assert [r.text for r in server.srv.recent if r.tag.rid == "pause"] == ["Sure, I can help with that.",
                                                                          "Your order shipped."]


def test_a_text_stream_cut_at_max_audio_ms_drops_the_rest_of_its_turn_and_says_so(server):
    """max_audio_ms ends the request (its done) while its client is still writing: the text that
    follows used to go to the ended request in silence, a new request without a request_id too."""
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "The first sentence is long enough. And", "final": False,
                                      "request_id": "cut", "max_audio_ms": 160, "seed": 1}))
            first = await collect(ws)
            await ws.send(json.dumps({"text": "Hello there."}))
            dropped = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(json.dumps({"text": "Next one.", "request_id": "after-cut", "max_audio_ms": 160}))
            return first, dropped, await collect(ws)

    first, dropped, after = asyncio.run(go())
    assert first[-1][0] == "done" and first[-1][1]["audio_ms"] == 160 and not first[-1][1]["cancelled"]
    assert dropped["error"]["code"] == "stream_ended" and dropped["request_id"] is None
    assert "text stream 'cut' has ended at max_audio_ms" in dropped["error"]["message"]
    assert after[-1][0] == "done" and after[-1][1]["request_id"] == "after-cut"
    assert [r.text for r in server.srv.recent if r.tag.rid == "after-cut"] == ["Next one."]


@pytest.mark.parametrize("value", [0, -1, 181, "5", True, 1e309])
def test_a_bad_inactivity_timeout_is_refused(server, value):
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Hi", "final": False, "inactivity_timeout": value}))
            return json.loads(await ws.recv())

    err = asyncio.run(go())["error"]
    assert err["code"] == "invalid_inactivity_timeout" and "in (0, 180]" in err["message"]


def _write_voice(d, name, text, rate=16000, channels=2, seconds=1.2):
    t = np.arange(int(rate * seconds)) / rate
    x = (np.sin(2 * np.pi * 220 * t) * 6000).astype(np.int16)
    with wave.open(str(d / f"{name}.wav"), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(x, channels).astype("<i2").tobytes())
    if text is not None:
        (d / f"{name}.txt").write_text(text)


def test_named_voices(tmp_path):
    import csmstream
    from csmstream.engine.voices import load_voices

    _write_voice(tmp_path, "anna", "Hello, my name is Anna.", rate=16000, channels=2)
    _write_voice(tmp_path, "ben", "I am Ben.", rate=44100, channels=1)
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), voices_dir=str(tmp_path)).start()
    try:
        base = rs.url.replace("ws://", "http://").replace("/ws/generate", "")
        listing = json.loads(urllib.request.urlopen(base + "/voices").read())
        assert sorted(v["name"] for v in listing["voices"]) == ["anna", "ben"]
        assert all(v["seconds"] > 1.0 for v in listing["voices"])

        async def go():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "Nice to meet you.", "voice": "anna", "request_id": "v"}))
                ok = await collect(ws)
                await ws.send(json.dumps({"text": "Hi.", "voice": "carl"}))
                return ok, json.loads(await ws.recv())

        ok, err = asyncio.run(go())
        assert ok[-1][0] == "done" and any(k == "audio" for k, _ in ok)
        assert err["error"]["code"] == "unknown_voice" and "anna" in err["error"]["message"]
        req = next(r for r in rs.srv.recent if r.tag.rid == "v")
        assert req.context[0].text == "Hello, my name is Anna." and len(req.context[0].codes) >= 15
    finally:
        rs.stop()
    # start-up errors name the problem
    _write_voice(tmp_path, "nolines", None)
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    with pytest.raises(ValueError, match="missing transcript nolines.txt"):
        load_voices(tmp_path, eng)
    (tmp_path / "broken.wav").write_bytes(b"not a wav")
    (tmp_path / "broken.txt").write_text("x")
    (tmp_path / "nolines.wav").unlink()
    with pytest.raises(ValueError, match="broken.wav: not a readable WAV"):
        load_voices(tmp_path, eng)
    with pytest.raises(ValueError, match="does not exist"):
        load_voices(tmp_path / "nope", eng)
