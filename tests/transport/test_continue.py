"""continue_previous on /ws/generate: a request hears the sentences the connection generated last
as context (CSM keeps a voice only across audio it hears), as the later sentences of one request
hear the earlier ones. The expectation is built with the Python API: the earlier request's
sentences generated in turn (sentence i on seed + i, after the ones before it), then the new
one with them as context."""

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from tests.servers import collect

A = "The first turn is here. It has two sentences."
A_PARTS = ["The first turn is here.", "It has two sentences."]
B = "And this one follows it."
A_MSG = {"text": A, "speaker_id": 0, "seed": 7}
B_MSG = {"text": B, "speaker_id": 1, "seed": 20, "continue_previous": True}

_REF = {}


def _reference():
    """B's audio with A's sentences as context, and alone, from the Python API."""
    if not _REF:
        import csmstream
        from csmstream import Segment

        eng = csmstream.load("tiny", device="cpu", max_streams=1)
        context = []
        for i, text in enumerate(A_PARTS):
            codes = np.stack(list(eng.frames(text, 0, context=list(context), seed=7 + i)))
            context.append(Segment(0, text, codes=codes))
        _REF["b_after_a"] = _pcm(eng.stream(B, 1, context=context, seed=20))
        _REF["b_after_a0"] = _pcm(eng.stream(B, 1, context=context[:1], seed=20))
        _REF["b_alone"] = _pcm(eng.stream(B, 1, seed=20))
        _REF["a0_ms"] = 80 * len(context[0].codes)
    return _REF


def _pcm(chunks) -> bytes:
    return np.concatenate(list(chunks)).astype("<i2").tobytes()


def _audio(events) -> bytes:
    return b"".join(b for kind, b in events if kind == "audio")


def _done(events) -> dict:
    kind, msg = events[-1]
    assert kind == "done", msg
    return msg


def test_a_request_continues_the_one_before_it_on_its_connection(server):
    ref = _reference()
    assert ref["b_after_a"] != ref["b_alone"]  # (the context changes what is generated)

    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps(A_MSG))
            first = await collect(ws)
            await ws.send(json.dumps(B_MSG))
            second = await collect(ws)
        async with connect(server.url) as ws:  # a new connection: nothing before it, nothing shared
            await ws.send(json.dumps(B_MSG))
            fresh = await collect(ws)
            await ws.send(json.dumps({**B_MSG, "continue_previous": False}))
            plain = await collect(ws)
        return first, second, fresh, plain

    first, second, fresh, plain = asyncio.run(go())
    assert "continued" not in _done(first)  # (only a request that asks is told)
    assert _audio(second) == ref["b_after_a"] and _done(second)["continued"] == 2
    assert _audio(fresh) == ref["b_alone"] and _done(fresh)["continued"] == 0
    assert _audio(plain) == ref["b_alone"] and "continued" not in _done(plain)


def test_queued_without_waiting_it_still_hears_the_whole_request_before_it(server):
    """B sent right behind A: its first sentence starts as soon as A is all generated (A still
    playing), with all of A's sentences as context."""
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({**A_MSG, "request_id": "a"}))
            await ws.send(json.dumps({**B_MSG, "request_id": "b"}))
            events = await collect(ws, until_done=2)
        i = next(k for k, (kind, m) in enumerate(events) if kind == "done")
        return events[: i + 1], events[i + 1:]

    first, second = asyncio.run(go())
    assert _done(first)["request_id"] == "a" and _done(second)["request_id"] == "b"
    assert _audio(second) == _reference()["b_after_a"] and _done(second)["continued"] == 2


def test_the_context_is_the_last_sentences_of_every_request_before(server):
    """A run of one-sentence requests: each hears the last four sentences spoken on the connection,
    across requests, as one long request's sentences hear the ones before them."""
    texts = [f"Short turn number {w}." for w in ("one", "two", "three", "four", "five", "six")]

    async def go():
        async with connect(server.url) as ws:
            for i, t in enumerate(texts):
                await ws.send(json.dumps({"text": t, "request_id": f"run{i}", "seed": i, "continue_previous": True}))
                assert _done(await collect(ws))["continued"] == min(i, 4)

    asyncio.run(go())
    reqs = {r.tag.rid: r for r in server.srv.recent if r.tag is not None and str(r.tag.rid).startswith("run")}
    for i, t in enumerate(texts):
        assert [s.text for s in reqs[f"run{i}"].context] == texts[max(0, i - 4):i]
        assert reqs[f"run{i}"].text == t


@pytest.mark.parametrize("whole", [0, 1])
def test_a_sentence_cut_at_max_audio_ms_is_not_context(server, whole):
    """max_audio_ms ends A 160 ms into its first sentence (whose frames are capped when it is
    submitted), or into its second (capped or cancelled, as the reading goes): B hears only the
    sentences before the cut, whose audio was whole."""
    ref = _reference()
    limit = (ref["a0_ms"] if whole else 0) + 160

    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({**A_MSG, "max_audio_ms": limit}))
            first = await collect(ws)
            await ws.send(json.dumps(B_MSG))
            return first, await collect(ws)

    first, second = asyncio.run(go())
    assert len(_audio(first)) == limit * 48
    assert _done(second)["continued"] == whole
    assert _audio(second) == (ref["b_after_a0"] if whole else ref["b_alone"])


def test_a_bad_continue_previous_is_one_clear_error_and_the_connection_serves_on(server):
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Hello.", "continue_previous": "yes", "request_id": "x"}))
            bad = json.loads(await ws.recv())
            await ws.send(json.dumps({"text": "Hello.", "max_audio_ms": 160}))
            return bad, await collect(ws)

    bad, after = asyncio.run(go())
    assert bad == {"error": {"code": "invalid_continue_previous",
                             "message": "continue_previous must be true or false, got 'yes'"}, "request_id": "x"}
    assert _done(after)["cancelled"] is False and _audio(after)


def test_the_python_client_continues_on_a_kept_connection_only(server):
    from csmstream.transport.client import SesameWebSocketService

    async def go():
        svc = SesameWebSocketService(server.url)
        with pytest.raises(ValueError, match="continue_previous=True continues the request before it on the same "
                                             "connection; keep one open with `async with service:`"):
            async for _ in svc.stream_tts(B, 1, seed=20, continue_previous=True):
                pass
        async with svc:
            _ = [c async for c in svc.stream_tts(A, 0, seed=7)]
            after = b"".join([c async for c in svc.stream_tts(B, 1, seed=20, continue_previous=True)])
            return after, svc.last_done

    after, done = asyncio.run(go())
    assert after == _reference()["b_after_a"] and done["continued"] == 2


# -- ElevenLabs' multi-stream-input: a voice agent opens a context per turn --------------------------

EL_SEED = 7  # the socket's ?seed=: sentence i of every context is generated on seed 7 + i


def _el_reference():
    """B (speaker 0, the socket's seed) after A's sentences, and alone, from the Python API."""
    if "el_after_a" not in _REF:
        import csmstream
        from csmstream import Segment

        eng = csmstream.load("tiny", device="cpu", max_streams=1)
        context = []
        for i, text in enumerate(A_PARTS):
            codes = np.stack(list(eng.frames(text, 0, context=list(context), seed=EL_SEED + i)))
            context.append(Segment(0, text, codes=codes))
        _REF["el_after_a"] = _pcm(eng.stream(B, 0, context=context, seed=EL_SEED))
        _REF["el_alone"] = _pcm(eng.stream(B, 0, seed=EL_SEED))
    return _REF


def _el_url(server, query: str = "") -> str:
    return server.url.replace("/ws/generate", f"/v1/text-to-speech/0/multi-stream-input?seed={EL_SEED}{query}")


async def _el_turn(ws, cid: str, text: str, end: str = "close_context") -> None:
    """A turn as pipecat's ElevenLabs service sends one: open the context, its text, then flush
    (the context is left open) or close_context."""
    for msg in ({"text": " "}, {"text": text + " "}, {end: True}):
        await ws.send(json.dumps({**msg, "context_id": cid}))


def _context_reqs(server, cid: str) -> list:
    return [r for r in server.srv.recent if getattr(r.tag, "context_id", None) == cid]


def test_a_new_elevenlabs_context_hears_the_turn_before_it_left_open_or_ended(server):
    from tests.servers import wait_until
    from tests.transport.test_elevenlabs import read_contexts

    ref = _el_reference()
    assert ref["el_after_a"] != ref["el_alone"]

    async def go():
        async with connect(_el_url(server, "&continue_previous=true")) as ws:
            await _el_turn(ws, "open-1", A, end="flush")  # left open, as pipecat leaves a turn's context
            await wait_until(lambda: len([r for r in _context_reqs(server, "open-1") if r.finished]) == 2, 60)
            await _el_turn(ws, "open-2", B)
            audio, finals, other, _ = await read_contexts(ws, 1)
            # open-1 is still open, open-2 has ended; open-2 generated last, so open-3 hears it
            await _el_turn(ws, "open-3", B)
            _, third_final, more, _ = await read_contexts(ws, 1)
            await ws.send(json.dumps({"context_id": "open-1", "close_context": True}))
            _, first_final, rest, _ = await read_contexts(ws, 1)
        return audio["open-2"], finals + third_final + first_final, other + more + rest

    second, finals, other = asyncio.run(go())
    assert other == []
    assert second == ref["el_after_a"]
    assert [(f["contextId"], f["continued"]) for f in finals] == [("open-2", 2), ("open-3", 3), ("open-1", 0)]
    [third] = _context_reqs(server, "open-3")
    assert [s.text for s in third.context] == A_PARTS + [B]


def test_elevenlabs_contexts_start_afresh_unless_the_socket_or_the_server_says(server):
    from tests.transport.test_elevenlabs import read_contexts

    async def two_turns(query: str, tag: str):
        async with connect(_el_url(server, query)) as ws:
            await _el_turn(ws, f"{tag}-a", A)
            await read_contexts(ws, 1)
            await _el_turn(ws, f"{tag}-b", B)
            audio, [final], _, _ = await read_contexts(ws, 1)
        return audio[f"{tag}-b"], final

    ref = _el_reference()
    audio, final = asyncio.run(two_turns("", "plain"))
    assert audio == ref["el_alone"] and "continued" not in final  # (ElevenLabs' own isFinal, unchanged)
    server.srv.elevenlabs_continue_previous = True  # serve --elevenlabs-continue-previous
    try:
        audio, final = asyncio.run(two_turns("", "default-on"))
        assert audio == ref["el_after_a"] and final["continued"] == 2
        audio, final = asyncio.run(two_turns("&continue_previous=false", "off"))
        assert audio == ref["el_alone"] and "continued" not in final
    finally:
        server.srv.elevenlabs_continue_previous = False
