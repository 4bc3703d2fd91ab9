"""Python client for /ws/generate, with the names the seed's backend uses.

    svc = SesameWebSocketService("ws://127.0.0.1:8765/ws/generate")
    async for chunk in svc.stream_tts("Hello!", speaker_id=0):   # bytes, in the chosen format
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
from collections.abc import AsyncIterator

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

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
    an async context manager (`async with svc: ...`), which keeps one connection open."""

    def __init__(self, url: str = DEFAULT_URL, *, open_timeout: float = 10.0, token: str | None = None) -> None:
        self.url, self.open_timeout = url, open_timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ws = None
        self._lock = asyncio.Lock()  # one request at a time on a kept connection
        self.last_done: dict | None = None  # the most recent request's done message

    async def __aenter__(self) -> SesameWebSocketService:
        self._ws = await self._connect()
        return self

    async def __aexit__(self, *exc) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def _connect(self):
        try:
            return await connect(self.url, open_timeout=self.open_timeout, max_size=None,
                                 additional_headers=self.headers)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
            raise SesameConnectionError(f"cannot connect to {self.url}: {e}") from e

    async def stream_tts(self, text: str, speaker_id: int = 0, **options) -> AsyncIterator[bytes]:
        """Yield audio chunks (bytes) for one request as they arrive. options: request_id, format,
        chunk_ms, temperature, topk, seed, max_audio_ms, voice (see the protocol).

        On a kept connection (`async with svc:`) requests run one at a time, in the order they are
        made (several tasks may call this at once), and a caller that stops iterating early has its
        request cancelled and the rest of its audio read off, so the next one starts clean."""
        own = self._ws is None
        ws = await self._connect() if own else self._ws
        lock = None if own else self._lock
        if lock is not None:
            await lock.acquire()
        options.setdefault("request_id", f"py-{secrets.token_hex(6)}")
        ended = False  # its done or error has been read
        try:
            await ws.send(json.dumps({"text": text, "speaker_id": speaker_id, **options}))
            async for message in ws:
                if isinstance(message, bytes):
                    yield message
                    continue
                msg = _reply(message)
                if msg is None:
                    raise SesameTTSError("invalid_reply", f"the server sent a text message that is not a csm-stream "
                                         f"reply: {message[:120]!r}; is the URL a csm-stream endpoint?")
                ended = "error" in msg or bool(msg.get("done"))
                if "error" in msg:
                    raise _error(msg["error"], "error", msg.get("request_id"))
                if msg.get("done"):
                    self.last_done = msg
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
                if not own and not ended:
                    await self._abandon(ws, options["request_id"])
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
        if self._ws is None:
            raise RuntimeError("cancel() needs an open connection: use `async with service:`")
        msg = {"cancel": True}
        if request_id is not None:
            msg["request_id"] = request_id
        await self._ws.send(json.dumps(msg))


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
                             timeout: float = 60.0, **options) -> AsyncIterator[bytes]:
    """Stream a text's audio from the OpenAI-compatible HTTP endpoint (serve --http-port), e.g.
    url="http://127.0.0.1:8766/v1/audio/speech"; options as for stream_tts (format -> the
    response format). Bytes as they arrive (any length); the same errors as the WebSocket client."""
    import httpx

    body = {"input": text, "speaker_id": speaker_id, "response_format": options.pop("format", "pcm_24000"), **options}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as client, \
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
        raise SesameConnectionError(f"{url}: {e or type(e).__name__}") from e
