"""The project's client against the real server, and against a server that misbehaves."""

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.server import serve

from csmstream.transport.client import SesameConnectionError, SesameTTSError, SesameWebSocketService, stream_sesame_tts


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
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from csmstream.transport.client import stream_speech_http

    class Proxy(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    async def go():
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/audio/speech"
        with pytest.raises(SesameTTSError) as e:
            async for _ in stream_speech_http(url, "hi"):
                pass
        return e.value

    try:
        err = asyncio.run(go())
    finally:
        httpd.shutdown()
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
