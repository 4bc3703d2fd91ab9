"""The project's client against the real server, and against a server that misbehaves."""

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.server import serve

from csmstream.transport.client import SesameConnectionError, SesameTTSError, SesameWebSocketService, stream_sesame_tts
from tests.servers import fail_on


def test_stream_tts_yields_the_audio_bytes(server):
    async def go():
        svc = SesameWebSocketService(server.url)
        chunks = [c async for c in svc.stream_tts("Client test.", speaker_id=1, seed=5, max_audio_ms=1000)]
        return chunks, svc.last_done

    chunks, done = asyncio.run(go())
    assert all(isinstance(c, bytes) for c in chunks) and len(chunks) >= 2
    assert all(len(c) == 4800 for c in chunks[:-1])
    assert done["done"] and done["audio_ms"] == pytest.approx(sum(map(len, chunks)) / 48, abs=0.1)
    pcm = np.frombuffer(b"".join(chunks), "<i2")
    assert pcm.std() > 0


def test_an_option_the_protocol_does_not_have_is_a_type_error_before_anything_is_sent(server):
    """Sent, the server would ignore it (and only its done would say so): a typo, or another API's
    name, is refused the way Python refuses an unknown keyword -- naming the likely one. The done
    of a request with only known options names no ignored field."""
    async def go():
        out = []
        svc = SesameWebSocketService(server.url)
        for call in (lambda: svc.stream_tts("Hi.", temprature=0.5),
                     lambda: svc.stream_text(["Hi."], output_format="ulaw_8000"),
                     lambda: svc.stream_tts("Hi.", stability=0.3)):
            with pytest.raises(TypeError) as e:
                async for _ in call():
                    pass
            out.append(str(e.value))
        connections = server.srv.metrics.connections  # (none of them connected)
        sent = [c async for c in svc.stream_tts("Known options.", seed=1, max_audio_ms=200, temperature=0.8)]
        return out, sent, svc.last_done, connections

    before = server.srv.metrics.connections
    (typo, other, unknown), sent, done, connections = asyncio.run(go())
    assert connections == before and server.srv.metrics.connections == before + 1
    assert typo.startswith("stream_tts() got an unknown option 'temprature' (did you mean 'temperature'?); the "
                           "options are request_id, format, chunk_ms, temperature")
    assert other.startswith("stream_text() got an unknown option 'output_format' (did you mean 'format'?)")
    assert unknown.startswith("stream_tts() got an unknown option 'stability'; the options are")
    assert sent and "ignored_fields" not in done


def test_stream_sesame_tts_helper_and_formats(server):
    async def go():
        return [c async for c in stream_sesame_tts("Helper.", 0, url=server.url, format="ulaw_8000",
                                                   chunk_ms=20, max_audio_ms=400)]

    chunks = asyncio.run(go())
    assert all(len(c) == 160 for c in chunks[:-1]) and len(chunks) >= 20


def test_server_error_raises_typed_exception(server):
    async def go():
        async for _ in SesameWebSocketService(server.url).stream_tts("hi", speaker_id=-3):
            pass

    with pytest.raises(SesameTTSError) as e:
        asyncio.run(go())
    assert e.value.code == "invalid_speaker_id" and "speaker_id" in e.value.message


def test_one_connection_many_requests(server):
    async def go():
        out = []
        async with SesameWebSocketService(server.url) as svc:
            for i in range(3):
                out.append(sum([len(c) async for c in svc.stream_tts(f"Turn {i}.", max_audio_ms=500)]))
        return out

    assert all(n == 500 * 48 for n in asyncio.run(go()))


def test_a_kept_connection_serves_concurrent_callers_in_turn_and_survives_one_that_stops_early(server):
    """Two tasks streaming on one kept connection: the second's recv raised websockets'
    ConcurrencyError. And a caller that stopped iterating early left the rest of its audio and its
    done in the socket, read by the next request as its own. Now callers take turns, and an
    abandoned request is cancelled and read off: each request gets exactly its own audio (the
    audio a connection of its own gets for the same request)."""
    requests = [("First caller.", 1), ("Second caller.", 2), ("Third caller.", 3)]

    async def alone(text, seed):
        return b"".join([c async for c in SesameWebSocketService(server.url).stream_tts(text, seed=seed,
                                                                                       max_audio_ms=800)])

    async def go():
        want = [await alone(t, s) for t, s in requests]
        async with SesameWebSocketService(server.url) as svc:
            async def take(text, seed):
                return b"".join([c async for c in svc.stream_tts(text, seed=seed, max_audio_ms=800)])

            together = await asyncio.gather(*(take(t, s) for t, s in requests))
            early = svc.stream_tts("A long answer, abandoned after its first chunk. " * 5, seed=9)
            first = await early.__anext__()
            await early.aclose()  # (as a `break` out of `async for` does, when the generator is collected)
            after = await take(*requests[0])
        return want, together, first, after

    want, together, first, after = asyncio.run(go())
    assert [len(w) for w in want] == [800 * 48] * 3
    assert together == want and len(first) == 4800 and after == want[0]
    cancelled = [r for r in server.srv.recent if r.text.startswith("A long answer, abandoned")]
    assert any(r.reason == "cancelled" for r in cancelled)  # (the server was told, not just left)


def test_a_kept_connection_that_drops_fails_its_request_and_the_next_one_reconnects(server):
    """A voice agent keeps one connection for a whole call; a server restart or a proxy's idle
    timeout drops it. The request running on it raises SesameConnectionError (never ends silently
    short); every later request used to fail the same way on the dead socket, until the caller
    built a new service. Now the next request opens a new connection."""
    async def go():
        async with SesameWebSocketService(server.url) as svc:
            first = [c async for c in svc.stream_tts("Before the drop.", seed=1, max_audio_ms=400)]
            svc._ws.transport.abort()  # dropped between two requests
            await asyncio.sleep(0.05)
            second = [c async for c in svc.stream_tts("After the drop.", seed=2, max_audio_ms=400)]
            got = []
            with pytest.raises(SesameConnectionError, match="dropped"):
                async for c in svc.stream_tts("A long answer, cut off by the network. " * 4, seed=3):
                    got.append(c)
                    svc._ws.transport.abort()  # dropped mid-request
            await svc.cancel()  # (nothing runs on a dropped connection: no error)
            third = [c async for c in svc.stream_tts("And after that one.", seed=4, max_audio_ms=400)]
            return first, second, got, third

    first, second, got, third = asyncio.run(go())
    assert [sum(map(len, x)) for x in (first, second, third)] == [400 * 48] * 3
    assert len(got) == 1


def test_dropped_connection_raises_not_silent():
    async def handler(ws):
        await ws.recv()
        await ws.send(b"\x00\x00" * 100)
        await ws.close()  # goes away mid-request, without done

    async def go():
        async with serve(handler, "127.0.0.1", 0) as srv:
            port = srv.sockets[0].getsockname()[1]
            got = []
            with pytest.raises(SesameConnectionError) as e:
                async for c in SesameWebSocketService(f"ws://127.0.0.1:{port}/ws/generate").stream_tts("hi"):
                    got.append(c)
            return got, e.value

    got, err = asyncio.run(go())
    assert len(got) == 1 and err.code == "connection"


@pytest.mark.parametrize("reply, code, message", [
    ("Welcome to the echo server", "invalid_reply", "not a csm-stream reply: 'Welcome to the echo server'"),
    ("[1, 2]", "invalid_reply", "is the URL a csm-stream endpoint?"),
    ('{"error": "quota exceeded"}', "error", "quota exceeded"),
    ('{"error": {"message": "no code"}}', "error", "no code"),
])
def test_a_reply_that_is_not_csm_streams_is_a_typed_error(reply, code, message):
    """Another kind of server at the URL (or a proxy's page) raised a bare ValueError or
    AttributeError from inside the client; it is a SesameTTSError that says what came."""
    async def handler(ws):
        await ws.recv()
        await ws.send(reply)
        await ws.recv()  # (wait for the client to go)

    async def go():
        async with serve(handler, "127.0.0.1", 0) as srv:
            port = srv.sockets[0].getsockname()[1]
            with pytest.raises(SesameTTSError) as e:
                async for _ in SesameWebSocketService(f"ws://127.0.0.1:{port}/ws/generate").stream_tts("hi"):
                    pass
            return e.value

    err = asyncio.run(go())
    assert err.code == code and message in err.message and not isinstance(err, SesameConnectionError)


@pytest.mark.parametrize("status, body, code, message", [
    (502, b'{"error": "bad gateway"}', "http_502", "bad gateway"),  # a proxy's JSON: error is a string
    (503, b"<html>down</html>", "http_503", "<html>down</html>"),
])
def test_the_http_client_types_a_proxys_error_page_too(status, body, code, message):
    from csmstream.transport.client import stream_speech_http
    from tests.servers import CannedHttp

    async def go(port):
        url = f"http://127.0.0.1:{port}/v1/audio/speech"
        with pytest.raises(SesameTTSError) as e:
            async for _ in stream_speech_http(url, "hi"):
                pass
        return e.value

    with CannedHttp(status, body) as port:
        err = asyncio.run(go(port))
    assert (err.code, err.message) == (code, message)


def test_unreachable_server_raises_connection_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed

    async def go():
        async for _ in SesameWebSocketService(f"ws://127.0.0.1:{port}/ws/generate").stream_tts("hi"):
            pass

    with pytest.raises(SesameConnectionError, match="cannot connect"):
        asyncio.run(go())


def test_error_reply_is_json_with_request_id(server):
    async def go():
        from websockets.asyncio.client import connect

        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "", "request_id": "mine"}))
            return json.loads(await ws.recv())

    msg = asyncio.run(go())
    assert msg["request_id"] == "mine" and msg["error"]["code"] == "invalid_text"


REPLY = "Sure, I can help with that. Your order shipped on Monday. Anything else?"


def _close(a: bytes, b: bytes) -> bool:
    """Equal length and within 2 LSB (a batched Mimi decode may move a sample by float rounding)."""
    x, y = np.frombuffer(a, "<i2").astype(int), np.frombuffer(b, "<i2").astype(int)
    return len(x) == len(y) > 0 and np.abs(x - y).max() <= 2


def _tokens(text, n=5):
    return [text[i:i + n] for i in range(0, len(text), n)]


def test_stream_text_plays_the_first_sentence_while_the_rest_is_still_being_written(server):
    """The pieces go out while audio comes back: the generator below does not write its second half
    until audio has arrived (were the pieces sent only after the first audio, or the audio read only
    after the last piece, it would wait for ever). The audio is that of the whole text sent at once."""
    first_audio = asyncio.Event()

    async def llm():
        toks = _tokens(REPLY)
        for i, t in enumerate(toks):
            if i == len(toks) // 2:
                await asyncio.wait_for(first_audio.wait(), 30)
            await asyncio.sleep(0.005)
            yield t

    async def go():
        want = b"".join([c async for c in SesameWebSocketService(server.url).stream_tts(REPLY, seed=7)])
        got = []
        async with SesameWebSocketService(server.url) as svc:
            async for c in svc.stream_text(llm(), seed=7, request_id="st-1"):
                got.append(c)
                first_audio.set()
            done = svc.last_done
            after = b"".join([c async for c in svc.stream_tts("Next one.", seed=2, max_audio_ms=400)])
        return want, b"".join(got), done, after

    want, got, done, after = asyncio.run(go())
    assert _close(got, want)
    assert done["request_id"] == "st-1" and not done["cancelled"] and "input_timeout" not in done
    assert [r.text for r in server.srv.recent if r.tag.rid == "st-1"] == \
        ["Sure, I can help with that.", "Your order shipped on Monday.", "Anything else?"]
    assert len(after) == 400 * 48


def test_stream_text_keeps_a_slow_writer_s_stream_open(server):
    """Pieces slower than inactivity_timeout: keep-alives hold the stream open (without them the
    server closes it and each later piece would be a request of its own)."""
    async def slow():
        for t in ["Hello there, ", "this is ", "a slow writer."]:
            await asyncio.sleep(0.7)
            yield t

    async def go():
        svc = SesameWebSocketService(server.url)
        n = sum([len(c) async for c in svc.stream_text(slow(), inactivity_timeout=0.5, request_id="st-slow")])
        return n, svc.last_done

    n, done = asyncio.run(go())
    assert n > 0 and "input_timeout" not in done and not done["cancelled"]
    assert [r.text for r in server.srv.recent if r.tag.rid == "st-slow"] == ["Hello there, this is a slow writer."]


@pytest.mark.parametrize("how", ["raises", "not_str", "server_refuses", "max_audio_ms"])
def test_stream_text_that_ends_early_raises_and_leaves_a_kept_connection_clean(server, monkeypatch, how):
    """The writer fails (its exception comes out, the request is cancelled), the server refuses a
    sentence (SesameTTSError), or max_audio_ms ends the request while pieces are still coming: in
    every case the next request on the same connection gets exactly its own audio."""
    from csmstream.engine.worker import Busy

    fail_on(monkeypatch, server.srv.worker, "submit", "REFUSED", Busy("all streams are busy (injected)"))

    async def pieces():
        if how == "server_refuses":  # refused at once; the burst after it is answered (stream_ended)
            yield "REFUSED here. "
            for t in _tokens("And it goes on for a while longer. " * 20, 2):
                yield t
            return
        yield "The first sentence is fine. A second one. "
        await asyncio.sleep(0.3)
        if how == "raises":
            raise RuntimeError("the LLM failed")
        if how == "not_str":
            yield 5
        for t in _tokens("And it goes on for a while longer. " * 3):
            await asyncio.sleep(0.01)
            yield t

    async def go():
        want = b"".join([c async for c in SesameWebSocketService(server.url).stream_tts("Next one.", seed=2)])
        async with SesameWebSocketService(server.url) as svc:
            got = 0
            try:
                opts = {"max_audio_ms": 240} if how == "max_audio_ms" else {}
                async for c in svc.stream_text(pieces(), seed=3, **opts):
                    got += len(c)
                err = None
            except Exception as e:
                err = e
            after = b"".join([c async for c in svc.stream_tts("Next one.", seed=2)])
        return want, got, err, after

    want, got, err, after = asyncio.run(go())
    if how == "raises":
        assert isinstance(err, RuntimeError) and str(err) == "the LLM failed"
    elif how == "not_str":
        assert isinstance(err, TypeError) and "must be strings, got int" in str(err)
    elif how == "server_refuses":
        assert isinstance(err, SesameTTSError) and err.code == "busy"
    else:
        assert err is None and got == 240 * 48
    assert _close(after, want)


def test_stream_tts_refuses_final_false_and_stream_text_a_whole_string():
    svc = SesameWebSocketService("ws://127.0.0.1:9/ws/generate")  # (refused before connecting)

    async def drain(gen):
        async for _ in gen:
            pass

    with pytest.raises(ValueError, match="use stream_text"):
        asyncio.run(drain(svc.stream_tts("Hi", final=False)))
    with pytest.raises(TypeError, match="for one whole text use stream_tts"):
        asyncio.run(drain(svc.stream_text("Hi there.")))


@pytest.mark.parametrize("end", ["error", "done_at_max_audio_ms"])
def test_stream_text_reads_off_the_answers_to_pieces_the_server_got_after_the_end(end):
    """A scripted server that answers a text stream's second piece, after the request has ended,
    the way csm-stream does (stream_ended): that answer must not be read as the next request's.
    The client's cancel after such an end is answered with nothing_to_cancel."""
    seen = []

    async def handler(ws):
        opening = json.loads(await ws.recv())
        rid = opening["request_id"]
        seen.append(opening)
        await ws.recv()  # the first piece
        if end == "error":
            await ws.send(json.dumps({"error": {"code": "busy", "message": "full"}, "request_id": rid}))
        else:
            await ws.send(b"\x00\x00" * 2400)
            await ws.send(json.dumps({"done": True, "request_id": rid, "audio_ms": 100.0, "ttfa_ms": 1.0,
                                      "cancelled": False}))
        while True:
            msg = json.loads(await ws.recv())
            seen.append(msg)
            if msg.get("cancel"):
                break
            if "text" in msg:  # a piece of the ended stream: answered as the server does
                await ws.send(json.dumps({"error": {"code": "stream_ended", "message": "dropped"}, "request_id": None}))
        await ws.send(json.dumps({"error": {"code": "nothing_to_cancel", "message": "ended"}, "request_id": rid}))
        nxt = json.loads(await ws.recv())
        await ws.send(b"\x01\x00" * 2400)
        await ws.send(json.dumps({"done": True, "request_id": nxt["request_id"], "audio_ms": 100.0, "ttfa_ms": 1.0,
                                  "cancelled": False}))
        await ws.wait_closed()

    async def pieces():
        yield "One. "
        yield "Two. "  # the server answers this one after the end
        await asyncio.sleep(0.2)  # (the end comes back while the writer waits here)
        yield "Three."

    async def go():
        async with serve(handler, "127.0.0.1", 0) as srv:
            async with SesameWebSocketService(f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/ws/generate") as svc:
                opts = {"max_audio_ms": 100} if end != "error" else {}
                try:
                    async for _ in svc.stream_text(pieces(), **opts):
                        pass
                    err = None
                except SesameTTSError as e:
                    err = e
                return err, b"".join([c async for c in svc.stream_tts("Next.")])

    err, after = asyncio.run(go())
    assert (err.code if err else None) == ("busy" if end == "error" else None)
    assert after == b"\x01\x00" * 2400
    assert seen[0]["final"] is False and seen[-1] == {"cancel": True, "request_id": seen[0]["request_id"]}
    assert not any(m.get("text") == "Three." for m in seen)  # the writer stopped at the end
