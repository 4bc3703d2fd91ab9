"""Plain HTTP/1.1 on a port of its own (serve --http-port): the OpenAI-compatible streaming speech
endpoint POST /v1/audio/speech (http_speech.py) and the GET pages /healthz, /metrics, /voices.

Each connection is one asyncio stream serving request after request (keep-alive). A speech
request becomes the same Job as a /ws/generate request (sentences, context, encoder), streamed by
`SpeechStream`, a Connection whose audio goes out as chunks of a chunked HTTP body. While it
streams, the connection is watched: a client that hangs up cancels its generation within a frame,
one that stops reading is cut off after the server's send_timeout. The response head goes out with
the first audio, so an error found before then (engine busy, prompt too long) gets its own status;
after it, an SSE stream gets an `error` event and a raw stream is cut off unfinished (how HTTP says
a body failed). Same auth, origin and per-address limits as the WebSocket port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from . import http_speech as hs, tls
from .alignment import Aligner, absolute_seconds
from .connection import Connection, bug_message
from .gate import PerMinute
from .job import Job

log = logging.getLogger("csmstream.http")
HEAD_TIMEOUT = 10.0  # a request's head and body must arrive within this once it has begun
IDLE_TIMEOUT = 30.0  # a keep-alive connection with no request for this long is closed
READ_SIZE = 65536
LINGER_S = 2.0  # at most this long reading a closing client's leftover input
PAGES = ("POST /v1/audio/speech and GET /v1/models (OpenAI), POST /v1/text-to-speech/{voice_id}[/stream]"
         "[/with-timestamps] and GET /v1/voices (ElevenLabs), GET /healthz, /metrics, /voices")


def put(writer: asyncio.StreamWriter, data: bytes) -> None:
    """writer.write, but to a connection the client has already reset: ConnectionResetError, as a
    read would say (uvloop raises RuntimeError there, plain asyncio drops the bytes with a warning)."""
    if writer.transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    writer.write(data)


class _Gone(Exception):
    """The client hung up or stopped reading."""


class HttpApi:
    def __init__(self, server, host: str, port: int) -> None:
        self.server, self.host, self.requested_port = server, host, port
        self._srv: asyncio.Server | None = None
        self._clients: set[asyncio.Task] = set()
        self._rate: dict[str, PerMinute] = {}  # per address (requests per minute)

    async def start(self) -> HttpApi:
        self._srv = await asyncio.start_server(self._client, self.host, self.requested_port, limit=READ_SIZE,
                                               **tls.server_options(self.server.ssl_context))
        log.info("listening on %s (OpenAI-compatible speech)", self.url)
        return self

    @property
    def url(self) -> str:
        return f"{self.server.web_scheme}://{self.host}:{self.port}{hs.SPEECH_PATH}"

    @property
    def port(self) -> int:
        return self._srv.sockets[0].getsockname()[1]

    def stop_listening(self) -> None:
        if self._srv is not None:
            self._srv.close()

    async def close(self) -> None:
        """Close every connection left (idle keep-alives; streams have ended or been cut by now)."""
        self.stop_listening()
        for t in list(self._clients):
            t.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    # -- a connection ------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv, task = self.server, asyncio.current_task()
        peer = writer.get_extra_info("peername")
        addr = peer[0] if peer else None
        # a trusted proxy's connection carries many clients' requests: not limited as one client's; each
        # request is counted by the client its X-Forwarded-For names (_answer)
        ip = None if srv.proxies.trusts(addr) else addr
        if srv.gate.full(ip):
            await self._refuse(writer, 429, "too_many_connections", f"too many connections from {ip}: at most "
                               f"{srv.gate.max_per_ip} at once")
            await self._linger(reader, writer)
            writer.close()
            return
        srv.tune_socket(writer.get_extra_info("socket"))
        self._clients.add(task)
        srv.gate.opened(ip)
        srv.metrics.connections += 1
        srv.metrics.open_connections += 1
        buf = bytearray()
        try:
            try:
                while await self._request(reader, writer, buf, addr):
                    pass
                await self._linger(reader, writer)
            except (_Gone, ConnectionError):
                pass
            except Exception:  # a bug: this connection ends, the server goes on
                log.exception("HTTP connection from %s failed", addr)
        except asyncio.CancelledError:
            pass  # the server is closing
        finally:
            self._clients.discard(task)
            srv.gate.closed(ip)
            srv.metrics.open_connections -= 1
            writer.close()

    @staticmethod
    async def _linger(reader, writer) -> None:
        """Close our side first and read what the client still sends (a request we will not
        answer) until it closes: closing with unread input would reset the connection, and the
        client could lose the response it has not read yet."""
        try:
            writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await reader.read(READ_SIZE):
                    pass
        except (OSError, RuntimeError, TimeoutError):
            pass

    @staticmethod
    async def _read_more(reader: asyncio.StreamReader, buf: bytearray, deadline: float) -> bool:
        """Append what arrives before the deadline (TimeoutError after it); False at end of stream."""
        data = await asyncio.wait_for(reader.read(READ_SIZE), max(0.0, deadline - time.monotonic()))
        buf += data
        return bool(data)

    async def _refuse(self, writer, status: int, code: str, message: str, keep: bool = False, extra=None) -> bool:
        self.server.metrics.error(code)
        log.info("http %d %s: %s", status, code, message, extra={"status": status, "code": code})
        put(writer, hs.error_response(status, code, message, keep_alive=keep, extra=extra))
        await writer.drain()
        return keep

    async def _request(self, reader, writer, buf: bytearray, peer: str | None) -> bool:
        """Read and answer one request; True to keep the connection for the next one."""
        deadline = time.monotonic() + (HEAD_TIMEOUT if buf else IDLE_TIMEOUT)
        while (end := buf.find(b"\r\n\r\n")) < 0 and len(buf) <= hs.MAX_HEAD_BYTES:
            try:
                if not await self._read_more(reader, buf, deadline):
                    return False
            except TimeoutError:
                if not buf:
                    return False  # idle keep-alive: close quietly
                return await self._refuse(writer, 408, "request_timeout", f"the request head did not arrive in "
                                          f"{HEAD_TIMEOUT:.0f} s")
            deadline = min(deadline, time.monotonic() + HEAD_TIMEOUT)  # it has begun
        if end < 0 or end > hs.MAX_HEAD_BYTES:
            return await self._refuse(writer, 431, "head_too_large", f"request heads are limited to "
                                      f"{hs.MAX_HEAD_BYTES} bytes")
        try:
            req = hs.parse_head(bytes(buf[:end]))
        except hs.HttpError as e:
            return await self._refuse(writer, e.status, e.code, e.message)
        del buf[:end + 4]
        if len(buf) < req.content_length and "100-continue" in (req.headers.get("Expect") or "").lower():
            put(writer, hs.response_head(100, {}))  # curl waits for this before sending a larger body
        while len(buf) < req.content_length:
            try:
                if not await self._read_more(reader, buf, deadline):
                    return False
            except TimeoutError:
                return await self._refuse(writer, 408, "request_timeout", f"the body ({req.content_length} bytes) "
                                          f"did not arrive in {HEAD_TIMEOUT:.0f} s")
        body = bytes(buf[:req.content_length])
        del buf[:req.content_length]
        return await self._answer(req, body, reader, writer, buf, peer)

    async def _answer(self, req: hs.HttpRequest, body: bytes, reader, writer, buf: bytearray, peer) -> bool:
        srv = self.server
        keep = req.keep_alive and not srv.stopping
        ip = srv.proxies.client(peer, req.headers)  # (from a trusted proxy: the client it names)
        cors = srv.gate.cors(req.headers.get("Origin"))  # (a browser page's: only for --allowed-origins)
        if req.method == "OPTIONS":
            return await self._preflight(req, writer, keep, cors)

        def refuse(status: int, code: str, message: str, extra: dict | None = None):  # (a page there reads it too)
            return self._refuse(writer, status, code, message, keep, {**(extra or {}), **cors})

        denied = srv.gate.check(req.path, req.headers, ip, websocket=False)
        if denied is not None:
            return await refuse(denied[0], "unauthorized" if denied[0] == 401 else "forbidden",
                                denied[1].strip())
        page = srv.page(req.path) if req.method in ("GET", "HEAD") else None
        if page is not None:
            out = hs.response(page[0], page[2].encode(), page[1], keep_alive=keep, extra=cors)
            put(writer, out[:out.index(b"\r\n\r\n") + 4] if req.method == "HEAD" else out)
            await writer.drain()
            return keep
        if req.method not in ("GET", "HEAD") and srv.is_page(req.path):
            return await refuse(405, "method_not_allowed", f"{req.method} {req.path[:80]}: this page "
                                "answers GET (and HEAD)", {"Allow": "GET, HEAD"})
        eleven = hs.ELEVENLABS_PATH.match(req.path) is not None
        if req.path != hs.SPEECH_PATH and not eleven:
            return await refuse(404, "not_found", f"no route {req.path[:80]}; this port serves {PAGES} "
                                "(WebSocket endpoints are on the main port)")
        if req.method != "POST":
            return await refuse(405, "method_not_allowed", f"{req.method} {req.path[:80]}: use POST "
                                "with a JSON body", {"Allow": "POST"})
        if not srv.healthy:
            return await refuse(503, "unavailable", f"{srv.health()['status']}; retry when /healthz "
                                "says 200", {"Retry-After": "1"})
        if ip is not None and not self._allow(ip):
            return await refuse(429, "rate_limited", f"at most {srv.max_requests_per_minute} "
                                "requests per minute per address; wait and retry")
        try:
            limits = {"voices": srv.voices, "max_text_chars": srv.max_text_chars,
                      "topk_max": srv.engine.config.codebook_size}
            speech = (hs.parse_elevenlabs(req.path, req.query, body, **limits) if eleven
                      else hs.parse_speech(body, **limits, default_voice=srv.default_voice))
        except hs.HttpError as e:
            return await refuse(e.status, e.code, e.message)
        except Exception as e:  # a bug on this body: its 500 (not a connection closed without a word)
            log.error("HTTP %s %s failed inside the server", req.method, req.path[:80], exc_info=e)
            return await refuse(500, "internal_error", bug_message(e, "this request"))
        srv.metrics.requests += 1
        if speech.gen.request_id is None:  # a proxy's id for it, if any (else the server makes one)
            speech.gen.request_id = hs.header_request_id(req.headers)
        chunked = req.version != "HTTP/1.0"  # 1.0 has no chunked bodies: the stream ends with the connection
        keep = keep and chunked
        stream = SpeechStream(srv, writer, speech, keep, ip, chunked=chunked, cors=cors)
        srv.connections.add(stream)  # shutdown waits for it like for a WebSocket
        watcher = asyncio.create_task(self._watch(reader, buf, stream))
        try:
            return await stream.run() and keep
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            srv.connections.discard(stream)

    async def _preflight(self, req: hs.HttpRequest, writer, keep: bool, cors: dict[str, str]) -> bool:
        """OPTIONS: a browser asks whether its page may send the request it is about to (without
        credentials, so before the token's check). Yes for an allowed origin, with what it may send."""
        origin = req.headers.get("Origin")
        if origin is None:  # not a browser's preflight: what this port answers
            put(writer, hs.no_content(keep_alive=keep, extra={"Allow": "GET, HEAD, POST, OPTIONS"}))
            await writer.drain()
            return keep
        if not cors:
            return await self._refuse(writer, 403, "forbidden", f"origin {origin[:80]!r} may not call this server "
                                      "from a browser; serve --allowed-origins lists the origins that may", keep)
        asked = (req.headers.get("Access-Control-Request-Headers") or "")[:1000]
        put(writer, hs.no_content(keep_alive=keep, extra={
            **cors, "Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS",
            **({"Access-Control-Allow-Headers": asked} if asked else {}), "Access-Control-Max-Age": "600"}))
        await writer.drain()
        return keep

    def _allow(self, ip: str) -> bool:
        if len(self._rate) > 4096:  # forget addresses quiet for a minute (bounded memory)
            now = time.monotonic()
            self._rate = {a: r for a, r in self._rate.items() if r.times and now - r.times[-1] <= 60}
        if ip not in self._rate:
            self._rate[ip] = PerMinute(self.server.max_requests_per_minute)
        return self._rate[ip].allow()

    @staticmethod
    async def _watch(reader, buf: bytearray, stream: SpeechStream) -> None:
        """While a response streams: end of input means the client hung up; anything else it sends
        (a pipelined request) is kept for after."""
        while len(buf) <= hs.MAX_HEAD_BYTES + hs.MAX_BODY_BYTES:
            try:
                data = await reader.read(READ_SIZE)
            except ConnectionError:  # a reset (not an orderly close): gone all the same
                data = b""
            if not data:
                stream.client_gone()
                return
            buf += data


class SpeechStream(Connection):
    """One speech request's response: the Connection machinery (sentences, engine, encoder) with
    the audio written as chunked HTTP (raw bytes, or server-sent events)."""

    CLIENT_GONE = (_Gone, ConnectionError)

    def __init__(self, server, writer: asyncio.StreamWriter, speech: hs.Speech, keep_alive: bool,
                 client=None, *, chunked: bool = True, cors: dict[str, str] | None = None) -> None:
        super().__init__(server, None)
        self.cors = cors or {}  # a browser page's CORS headers (gate.cors), on whatever head goes out
        self.writer, self.speech, self.keep_alive, self.client = writer, speech, keep_alive, client
        self.chunked = chunked  # False for an HTTP/1.0 client: raw body bytes, ended by closing
        self.rid = speech.gen.request_id or server.next_request_id()
        self.started = False  # the response head is out
        self.complete = False  # a whole response is out: the connection can take another request
        self.gone = False
        self.aligner: Aligner | None = None  # ElevenLabs' with-timestamps
        self.b64 = hs.Base64Stream()  # with-timestamps as one JSON object: its audio_base64, as it comes
        self.heard = 0  # how many sentences of job.history it heard as context (the rest are its own)

    async def run(self) -> bool:
        job = Job(self.speech.gen, self.rid)
        if job.msg.context:  # the client's own turns (OpenAI's route), encoded before the response starts
            try:
                if not await self._encode_context(job):  # refused: its 400 is out
                    return self.complete
            except self.CLIENT_GONE:
                pass
            if self.gone:  # hung up meanwhile: nothing to generate
                self._account(job, True, None)
                return False
        if self.speech.continues:  # what this client was answered before, in this voice, as context: the
            # requests it names (ElevenLabs: previous_text is then ignored), or the end of its previous_text
            spoken, key, ids = self.server.spoken, self._voice_key(), self.speech.previous_request_ids
            job.history = (spoken.context_of_requests(self.client, key, ids) if ids
                           else spoken.context_for(self.client, key, self.speech.previous_text))
            self.heard = len(job.history)
            if ids or (self.speech.previous_text or "").strip():  # (not a first request's "")
                self.server.metrics.continuations["yes" if job.history else "no"] += 1
        if self.speech.timestamps:
            self.aligner = Aligner(job)
        job.add_text(self.speech.gen.text)
        job.close()
        self.jobs.append(job)
        try:
            await self._stream_or_fail(job)  # a bug: this request's 500 (or its cut body), the server goes on
        except self.CLIENT_GONE:
            pass
        finally:
            if not job.t_done and not job.error:  # cut short (hung up, not reading, server closing)
                job.cancel()
                self._account(job, True, None)
            self._pop(job)
        return self.complete

    def _voice_key(self) -> tuple:
        return self.speech.gen.voice, self.speech.gen.speaker_id

    def client_gone(self) -> None:
        self.gone = True
        for job in self.jobs:
            job.cancel()  # generation stops at the next tick

    async def close_for_shutdown(self) -> None:
        pass  # a stream ends by itself (done, or cut short when cancelled)

    def _cut(self) -> None:
        self.client_gone()
        self.writer.transport.abort()

    async def _write(self, data: bytes) -> None:
        if self.gone:
            raise _Gone
        try:
            put(self.writer, data)
            await asyncio.wait_for(self.writer.drain(), self.server.send_timeout)
        except TimeoutError:
            self._slow_reader(self.rid)
            self._cut()
            raise _Gone from None
        except ConnectionError:
            self._cut()
            raise _Gone from None

    def _head(self) -> bytes:
        """The response head, the first time (then nothing)."""
        if self.started:
            return b""
        self.started = True
        return hs.stream_head(self.speech, self.rid, keep_alive=self.keep_alive, chunked=self.chunked,
                              extra=self.cors)

    def _piece_of_body(self, data: bytes) -> bytes:
        return hs.chunk(data) if self.chunked else data

    @property
    def _end_of_body(self) -> bytes:
        return hs.LAST_CHUNK if self.chunked else b""  # (1.0: closing the connection ends it)

    def _body(self, job: Job, audio: bytes) -> bytes:
        """Audio bytes as the next piece of the body (the head, and a WAV header or the opening of
        a JSON object, go with the first)."""
        if self.speech.wav and not self.started:
            audio = hs.wav_header() + audio  # a part of the audio (inside SSE events too)
        opening = b'{"audio_base64": "' if self.speech.timestamps == "json" and not self.started else b""
        data = opening + (self._piece(job, audio) if audio else b"")
        return self._head() + (self._piece_of_body(data) if data else b"")

    def _piece(self, job: Job, audio: bytes) -> bytes:
        mode = self.speech.timestamps
        if mode is None:
            return hs.sse_audio(audio) if self.speech.sse else audio
        got = self.aligner.advance(job.encoder.duration_ms(audio))
        if mode == "lines":
            return hs.timestamped_line(audio, None if got is None else absolute_seconds(*got[:2]))
        return self.b64.feed(audio)  # the alignment goes at the end (the aligner keeps it all)

    def _closing(self, job: Job, audio_ms: float, ttfa: float | None) -> bytes:
        """What ends a complete body: the SSE done event, or the rest of a with-timestamps object."""
        if self.speech.sse:
            reqs = job.sentences
            n_in, n_out = sum(r.prompt_len for r in reqs), sum(r.frames for r in reqs)
            return self._piece_of_body(hs.sse({"type": "speech.audio.done", "usage": {
                "input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out},
                "request_id": self.rid, "audio_ms": round(audio_ms, 1),
                "ttfa_ms": None if ttfa is None else round(ttfa, 2)}))
        if self.speech.timestamps == "json":
            align = json.dumps(absolute_seconds(self.aligner.chars, self.aligner.edges or [0.0])).encode()
            return self._piece_of_body(self.b64.finish() + b'", "alignment": ' + align +
                                       b', "normalized_alignment": ' + align + b"}")
        return b""

    async def _deliver(self, job: Job, chunk: bytes) -> None:
        await self._write(self._body(job, chunk))

    async def _done(self, job: Job, *, cancelled: bool, audio_ms: float | None = None, **extra) -> None:
        audio_ms, ttfa = self._account(job, cancelled, audio_ms)
        if cancelled:  # the client left, or the server is stopping: the audio is cut short
            if self.gone:
                return
            if not self.started:
                await self._error("unavailable", "the server is shutting down; retry elsewhere")
            elif self.speech.sse:
                await self._error("cancelled", "the server is shutting down; the audio is incomplete")
            else:
                self._cut()
            return
        if self.speech.continues:  # remembered before the body ends: a client that has the whole reply
            # and sends its next request at once, on any connection, finds it
            self.server.spoken.remember(self.client, self._voice_key(), job.history, request_id=self.rid,
                                        own=len(job.history) - self.heard)
        await self._write(self._body(job, b"") + self._closing(job, audio_ms, ttfa) + self._end_of_body)
        self.complete = True

    async def _error(self, code: str, message: str, rid: str | None = None) -> None:
        self.server.metrics.error(code)
        log.info("request %s: error %s: %s", self.rid, code, message, extra={"request_id": self.rid, "code": code})
        if self.gone:
            return
        if not self.started:
            self.started = True
            status = hs.STATUS_OF.get(code, 400)
            retry = {"Retry-After": "1"} if status == 503 else {}
            await self._write(hs.error_response(status, code, message, keep_alive=self.keep_alive,
                                                extra={**retry, **self.cors}))
            self.complete = True
        elif self.speech.sse:
            event = hs.sse({"type": "error", "error": {"code": code, "message": message}})
            await self._write(self._piece_of_body(event) + self._end_of_body)
            self.complete = True
        else:
            self._cut()  # the 200 is out: an unfinished chunked body is how HTTP says it failed
