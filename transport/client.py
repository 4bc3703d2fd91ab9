"""Python client for /ws/generate, with the names the seed's backend uses.

    svc = SesameWebSocketService("ws://127.0.0.1:8765/ws/generate")
    async for chunk in svc.stream_tts("Hello!", speaker_id=0):   # bytes, in the chosen format
        play(chunk)
    async for chunk in svc.stream_text(llm_tokens()):            # text as it is written
        play(chunk)

A server error raises SesameTTSError (with .code and .message); a dropped connection, or a
request the server cancelled as it shut down, raises SesameConnectionError: a stream never ends
silently short. `stream_speech_http` does the same over the OpenAI-compatible HTTP port (serve
--http-port).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterable

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from .protocol import REQUEST_FIELDS, unknown_fields
from .tls import connect_options

DEFAULT_URL = "ws://127.0.0.1:8765/ws/generate"
DRAIN_S = 10.0  # how long an abandoned request's cancel may take to come back before the connection is dropped


class SesameTTSError(Exception):
    """The server refused or failed a request."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


class SesameConnectionError(SesameTTSError):
    """Could not connect, or the connection dropped before the request's done message."""

    def __init__(self, message: str) -> None:
        super().__init__("connection", message)


class SesameWebSocketService:
    """Streams TTS from a csm-stream server. One connection per stream_tts() call unless used as
    an async context manager (`async with svc: ...`), which keeps one connection open: if it drops
    (a server restart, a proxy's idle timeout), the request on it raises SesameConnectionError and
    the next one opens a new connection."""

    def __init__(self, url: str = DEFAULT_URL, *, open_timeout: float = 10.0, token: str | None = None,
                 ssl_context=None) -> None:
        """ssl_context: an ssl.SSLContext for a wss:// URL (e.g. transport/tls.client_context(CAFILE)
        for a private CA's certificate); None: the system's trust store (and $SSL_CERT_FILE)."""
        self.url, self.open_timeout, self.ssl_context = url, open_timeout, ssl_context
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ws = None
        self._kept = False  # inside `async with`: requests share one connection (reopened if it dropped)
        self._lock = asyncio.Lock()  # one request at a time on a kept connection
        self.last_done: dict | None = None  # the most recent request's done message

    async def __aenter__(self) -> SesameWebSocketService:
        self._ws = await self._connect()
        self._kept = True
        return self

    async def __aexit__(self, *exc) -> None:
        self._kept = False
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def _kept_connection(self):
        """The kept connection, opened again if it has closed since (nothing of this request has
        been sent yet, so nothing is lost or sent twice). Called holding the lock."""
        if self._ws is None or self._ws.state is not State.OPEN:
            if self._ws is not None:
                await self._ws.close()  # (already closed or closing: this only tidies up)
            self._ws = None
            self._ws = await self._connect()
        return self._ws

    async def _connect(self):
        try:
            return await connect(self.url, open_timeout=self.open_timeout, max_size=None,
                                 additional_headers=self.headers, **connect_options(self.url, self.ssl_context))
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
            raise SesameConnectionError(f"cannot connect to {self.url}: {str(e) or type(e).__name__}") from e

    async def stream_tts(self, text: str, speaker_id: int = 0, **options) -> AsyncIterator[bytes]:
        """Yield audio chunks (bytes) for one request as they arrive. options: request_id, format,
        chunk_ms, temperature, topk, seed, max_audio_ms, voice, continue_previous (see the protocol;
        continue_previous=True hears the connection's previous request as context, so it needs a
        kept connection), context (earlier turns with their audio, each made by
        `csmstream.transport.context.turn(speaker_id, text, audio, audio_format)`).

        On a kept connection (`async with svc:`) requests run one at a time, in the order they are
        made (several tasks may call this at once), and a caller that stops iterating early has its
        request cancelled and the rest of its audio read off, so the next one starts clean."""
        _check_options(options, "stream_tts")
        if options.get("final") is False:
            raise ValueError("stream_tts sends one whole text (final=false would leave it waiting for more); "
                             "for text as it is written, such as an LLM's tokens, use stream_text()")
        async for chunk in self._request({"text": text, "speaker_id": speaker_id, **options}, None):
            yield chunk

    async def stream_text(self, pieces: Iterable[str] | AsyncIterable[str], speaker_id: int = 0,
                          **options) -> AsyncIterator[bytes]:
        """Speak text as it is written: `pieces` (strings, e.g. an LLM's tokens, from an iterable
        or an async iterable) go to the server as one text stream while its audio comes back, so
        the first sentence plays while the rest is still being written. Options as for stream_tts,
        plus inactivity_timeout (s; a keep-alive goes out while `pieces` is slower than that).

        The stream closes when `pieces` ends. If `pieces` raises, the request is cancelled and
        the exception comes out here; a server error raises SesameTTSError as stream_tts does (and
        what was still being written is not sent)."""
        _check_options(options, "stream_text")
        if isinstance(pieces, (str, bytes)):
            raise TypeError("stream_text takes pieces of text (an iterable of str, e.g. an LLM's tokens); for one "
                            "whole text use stream_tts")
        idle = options.get("inactivity_timeout", 20.0)
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not idle > 0:
            idle = 20.0  # (the server refuses the value and says why; the keep-alives just need a period)
        opening = {"text": " ", "speaker_id": speaker_id, **options, "final": False}
        async for chunk in self._request(opening, lambda ws, rid: _write_pieces(ws, rid, pieces, idle)):
            yield chunk

    async def _request(self, first: dict, writer) -> AsyncIterator[bytes]:
        """One request: send `first`, run `writer(ws, request_id)` (the rest of a text stream) beside
        the reader, yield its audio until its done."""
        own = not self._kept
        if own and first.get("continue_previous"):
            raise ValueError("continue_previous=True continues the request before it on the same connection; "
                             "keep one open with `async with service:` (each request here opens its own)")
        lock = None if own else self._lock
        if lock is not None:
            await lock.acquire()
        try:
            ws = await self._connect() if own else await self._kept_connection()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        rid = first.setdefault("request_id", f"py-{secrets.token_hex(6)}")
        ended = False  # its done or error has been read, and nothing of it can follow
        task = None
        try:
            await ws.send(json.dumps(first))
            if writer is not None:
                task = asyncio.create_task(writer(ws, rid))
            async for message in ws:
                if isinstance(message, bytes):
                    yield message
                    continue
                msg = _reply(message)
                if msg is None:
                    raise SesameTTSError("invalid_reply", f"the server sent a text message that is not a csm-stream "
                                         f"reply: {message[:120]!r}; is the URL a csm-stream endpoint?")
                if "error" in msg:
                    # (a text stream may not end with an error, e.g. text_too_long, and pieces
                    # written after it are answered: _abandon in finally ends it and reads them off)
                    ended = task is None
                    raise _error(msg["error"], "error", msg.get("request_id"))
                if msg.get("done"):
                    # a text stream's done may come before the server has read all its pieces (at
                    # max_audio_ms, a cancel): their answers are read off too
                    ended = task is None or (task.done() and not msg.get("cancelled") and not msg.get("input_timeout")
                                             and first.get("max_audio_ms") is None)
                    self.last_done = msg
                    if task is not None and task.done() and not task.cancelled() and task.exception():
                        raise task.exception()  # pieces failed: the writer cancelled the request
                    if msg.get("cancelled") and msg.get("reason") == "server_shutdown":  # not this client's cancel
                        raise SesameConnectionError(f"the server at {self.url} shut down before the request "
                                                    f"finished ({msg.get('audio_ms')} ms of audio had been sent)")
                    return
            ended = True
            raise SesameConnectionError(f"connection to {self.url} closed before the request finished")
        except ConnectionClosed as e:
            ended = True
            raise SesameConnectionError(f"connection to {self.url} dropped: {e}") from e
        finally:
            try:
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait({task})
                elif task is not None and not task.cancelled():
                    task.exception()  # (taken: raised above, or outweighed by the error being raised)
                if not own and not ended:
                    await self._abandon(ws, rid)
            finally:
                if lock is not None:
                    lock.release()
                if own:
                    await ws.close()

    async def _abandon(self, ws, request_id: str) -> None:
        """The caller left a request unfinished on a kept connection: cancel it and read its
        remaining messages, so they are not taken for the next one's. The server answers the
        cancel with exactly one of: the request's done, cancelled by it (no reason given), or, when
        the request had already ended (its done or error then came first), a nothing_to_cancel
        error."""
        try:
            async with asyncio.timeout(DRAIN_S):
                await ws.send(json.dumps({"cancel": True, "request_id": request_id}))
                async for message in ws:
                    msg = (None if isinstance(message, bytes) else _reply(message)) or {}
                    if msg.get("request_id") != request_id:
                        continue
                    err = msg.get("error")
                    if (msg.get("done") and msg.get("cancelled") and "reason" not in msg) \
                            or (isinstance(err, dict) and err.get("code") == "nothing_to_cancel"):
                        return
        except (ConnectionClosed, TimeoutError):
            await ws.close()  # a connection left in an unknown state is not reused
            self._ws = None

    async def cancel(self, request_id: str | None = None) -> None:
        """Cancel on the open connection (context-manager use only)."""
        if not self._kept:
            raise RuntimeError("cancel() needs an open connection: use `async with service:`")
        if self._ws is None or self._ws.state is not State.OPEN:
            return  # (it dropped: nothing runs on it; the next request opens a new one)
        msg = {"cancel": True}
        if request_id is not None:
            msg["request_id"] = request_id
        await self._ws.send(json.dumps(msg))


async def _write_pieces(ws, rid: str, pieces, idle: float) -> None:
    """A text stream's pieces, one message each, then its flush; a keep-alive ({"text": ""}) when
    the next piece is slower than half of inactivity_timeout. A piece that is not a string, or
    `pieces` raising, cancels the request (its done comes back) and is re-raised."""
    it = pieces.__aiter__() if hasattr(pieces, "__aiter__") else _aiter(pieces)
    try:
        while True:
            nxt = asyncio.ensure_future(anext(it))
            try:
                while not (await asyncio.wait({nxt}, timeout=idle / 2))[0]:
                    await ws.send(json.dumps({"text": ""}))
            finally:
                if not nxt.done():
                    nxt.cancel()
                elif not nxt.cancelled():
                    nxt.exception()  # (taken below; or, cancelled as it ended, never read: no warning)
            try:
                piece = nxt.result()
            except StopAsyncIteration:
                break
            if not isinstance(piece, str):
                raise TypeError(f"stream_text pieces must be strings, got {type(piece).__name__}")
            if piece:
                await ws.send(json.dumps({"text": piece}))
        await ws.send(json.dumps({"flush": True, "request_id": rid}))
    except ConnectionClosed:
        raise
    except Exception:
        await ws.send(json.dumps({"cancel": True, "request_id": rid}))
        raise


async def _aiter(pieces: Iterable[str]):
    for piece in pieces:
        yield piece


def _reply(message: str) -> dict | None:
    """A server text message as the dict every csm-stream reply is, or None for anything else
    (another kind of server at that URL)."""
    try:
        msg = json.loads(message)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _error(err, code: str, request_id: str | None) -> SesameTTSError:
    """SesameTTSError from an error object ({"code", "message"}; any other shape is its message)."""
    if not isinstance(err, dict):
        err = {"message": str(err)[:200]}
    return SesameTTSError(str(err.get("code") or code), str(err.get("message") or ""), request_id)


async def stream_sesame_tts(text: str, speaker_id: int = 0, url: str = DEFAULT_URL, **options) -> AsyncIterator[bytes]:
    """One-shot helper: stream a text's audio chunks from the server at `url`."""
    async for chunk in SesameWebSocketService(url).stream_tts(text, speaker_id, **options):
        yield chunk


async def stream_speech_http(url: str, text: str, speaker_id: int = 0, *, token: str | None = None,
                             timeout: float = 60.0, ssl_context=None, **options) -> AsyncIterator[bytes]:
    """Stream a text's audio from the OpenAI-compatible HTTP endpoint (serve --http-port), e.g.
    url="http://127.0.0.1:8766/v1/audio/speech"; options as for stream_tts (format -> the
    response format, context as there; ssl_context as for SesameWebSocketService), and
    previous_text (the text spoken before: the voice carries on from it, see README). Bytes as
    they arrive (any length); the same errors as the WebSocket client."""
    import httpx

    body = {"input": text, "speaker_id": speaker_id, "response_format": options.pop("format", "pcm_24000"), **options}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(timeout=timeout, verify=ssl_context or True) as client, \
                client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                try:
                    err = r.json()["error"]
                except (ValueError, KeyError, TypeError):
                    err = {"message": r.text[:200]}
                raise _error(err, f"http_{r.status_code}", r.headers.get("x-request-id"))
            async for chunk in r.aiter_raw():
                yield chunk
    except httpx.TransportError as e:  # refused, reset, or a body cut off unfinished
        raise SesameConnectionError(f"{url}: {str(e) or type(e).__name__}") from e


OPTIONS = tuple(f for f in REQUEST_FIELDS if f not in ("text", "speaker_id"))  # what **options may name


def _check_options(options: dict, who: str) -> None:
    """TypeError, as for a keyword Python does not know, for an option that is no request field: sent,
    the server would ignore it (a typo such as temprature, or another API's output_format)."""
    unknown = unknown_fields(options, OPTIONS)
    if unknown:
        name, hint = next(iter(unknown.items()))
        maybe = f" (did you mean {hint!r}?)" if hint else ""
        raise TypeError(f"{who}() got an unknown option {name!r}{maybe}; the options are {', '.join(OPTIONS)}")
