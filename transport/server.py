"""The uvloop + websockets server: /ws/generate (streaming audio), /healthz, /metrics; with an
HTTP port, also the OpenAI-compatible POST /v1/audio/speech (http_server.py).

One event loop serves every connection; one engine thread (engine/worker.py) runs the model.
Per connection, requests queue in order (at most `max_waiting` behind the running one); the next
request is handed to the engine as soon as the previous one has finished *generating*, so its
audio is ready when the previous one's last chunk has gone out: no gap between sentences.
Per request, the engine writes PCM into an SPSC ring; once per tick the engine wakes the loop, and
the sender takes exactly one chunk at a time from the ring, converts it and sends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections import deque
from itertools import count

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ..engine.voices import with_aliases
from ..engine.worker import EngineWorker, GenRequest, stall_seconds
from . import catalog, codec_threads, elevenlabs, http_speech, protocol, tls
from .connection import Connection
from .encoder import warm_codecs
from .gate import Gate, select_subprotocol
from .http_server import HttpApi
from .loopwatch import LoopWatch
from .metrics import Metrics, build_info
from .proxies import TrustedProxies
from .spoken import SpokenCache

log = logging.getLogger("csmstream.server")

CONTEXT_ENCODERS = 2
MAX_MESSAGE_BYTES = 1 << 20  # larger client messages close the connection with 1009
MAX_WAITING = 8


class StreamServer:
    """Start with `await server.start()`; `server.port` is then bound; `await server.stop()`.
    `engine` is an Engine, or a callable that makes one: then the port opens first (answering
    503 on /healthz) and the model loads in the background."""

    def __init__(self, engine, *, host: str = "127.0.0.1", port: int = 8765, max_waiting: int = MAX_WAITING,
                 max_text_chars: int = protocol.DEFAULT_MAX_TEXT_CHARS, warmup: bool = True,
                 voices: dict | None = None, voices_dir: str | None = None, routes: dict | None = None,
                 calls=None, test_chunk_delay: float = 0.0, auth_token: str | None = None,
                 allowed_origins: list[str] | None = None, max_connections_per_ip: int = 64,
                 max_requests_per_minute: int = 600, max_engine_waiting: int | None = None,
                 send_timeout: float = 10.0, socket_send_buffer: int | None = None,
                 prefill_chunk: int = 512, engine_stall_s: float | None = None,
                 http_port: int | None = None, compression: str | None = None,
                 ssl_context=None, elevenlabs_continue_previous: bool = False,
                 voice_aliases: dict[str, str] | None = None, default_voice: str | None = None,
                 trusted_proxies: str | list[str] | None = None) -> None:
        self._engine_src, self.host, self.requested_port = engine, host, port
        self.engine = None
        self.created = int(time.time())  # (GET /v1/models' "created": when this server was made)
        self.max_waiting, self.max_text_chars, self.do_warmup = max_waiting, max_text_chars, warmup
        self.voices = dict(voices or {})  # name -> engine.voices.Voice (text, codes); aliases too
        self._given_voices = dict(self.voices)  # (the constructor's: kept through a reload of voices_dir)
        self.voices_dir = voices_dir  # NAME.wav + NAME.txt pairs, encoded at start-up
        # a client's voice names for the server's voices (OpenAI's "alloy" -> "ada"), and the voice of
        # a /ws/generate or OpenAI request that names none (None: no voice prompt)
        self.voice_aliases, self.default_voice = dict(voice_aliases or {}), default_voice
        if voices_dir is None:  # (else checked once the directory is loaded, in start())
            self.voices = with_aliases(self.voices, self.voice_aliases, default_voice)
        # extra WebSocket endpoints: path -> (async handler(ws), accept(headers) -> bool), e.g. /telnyx
        self.routes = dict(routes or {})
        # live phone calls by call_control_id (an object with .get(id) -> call sink), or None
        self.calls = calls
        self.test_chunk_delay = test_chunk_delay  # test hook: sleep this long before each audio chunk
        self.gate = Gate(auth_token, allowed_origins, max_connections_per_ip, own_auth_paths=tuple(self.routes))
        # proxies whose X-Forwarded-For names the client (transport/proxies.py): limits, memory and
        # logs go by that client's address, not the proxy's
        self.proxies = TrustedProxies(trusted_proxies)
        self.max_requests_per_minute = max_requests_per_minute
        self.max_engine_waiting = max_engine_waiting
        self.prefill_chunk = prefill_chunk  # prompt tokens per prefill chunk (engine/prefill.py)
        # a frame step running this long is a stuck engine: its requests fail, health goes red (None:
        # by device, engine/worker.default_stall_s; 0: never)
        stall_seconds(engine_stall_s, None, "engine_stall_s")  # (ValueError now, not once the model is loaded)
        self.engine_stall_s = engine_stall_s
        # an ElevenLabs socket's default for its ?continue_previous= (their protocol has no such field)
        self.elevenlabs_continue_previous = elevenlabs_continue_previous
        # permessage-deflate: off unless asked for ("deflate"); audio does not compress, and zlib on
        # every message costs the event loop more than any other part of sending it
        if compression not in (None, "deflate"):
            raise ValueError(f"compression must be None or 'deflate', got {compression!r}")
        self.compression = compression
        self.http_port = http_port  # also serve plain HTTP (POST /v1/audio/speech) there; None = not
        self.ssl_context = ssl_context  # an ssl.SSLContext (transport/tls.py): both ports speak TLS (wss://, https://)
        self.scheme, self.web_scheme = ("wss", "https") if ssl_context is not None else ("ws", "http")
        self.tls_not_after: float | None = None  # when the certificate expires (Unix time), on /metrics
        # how the TLS handshakes on both ports end, on /metrics (a failed one never reaches _handle)
        self.tls_handshakes = tls.count_handshakes(ssl_context) if ssl_context is not None else None
        self.http: HttpApi | None = None
        self.connections: set = set()  # open /ws/generate and ElevenLabs connections, HTTP speech streams
        self.route_sockets: set = set()  # open connections of the extra routes (/telnyx, /telnyx/listen)
        # a client that does not take a chunk within send_timeout is cut off (slow_reader); the
        # per-connection kernel send buffer can be capped so that happens after little buffering
        self.send_timeout, self.socket_send_buffer = send_timeout, socket_send_buffer
        self.stopping = False
        self.metrics = Metrics()
        self.loop_watch = LoopWatch()  # the event loop's lag and CPU, on /metrics
        self.metrics.sources.append(self.loop_watch.lines)
        self.metrics.sources.append(self._tls_lines)
        self.metrics.sources.append(codec_threads.metric_lines)
        self.metrics.sources.append(self._engine_lines)
        if calls is not None and hasattr(calls, "metric_lines"):
            self.metrics.sources.append(calls.metric_lines)
        self.recent: deque[GenRequest] = deque(maxlen=64)  # latest requests handed to the engine (inspection)
        self.spoken = SpokenCache()  # recent sentences' codes per client and voice (ElevenLabs' previous_text)
        # requests' own context turns are encoded on worker threads, this many at a time (more would
        # only take CPU, or the GPU, from the engine thread, and the executor's threads from the rest
        # of the server; the others wait their turn on the loop)
        self.context_encoders = asyncio.Semaphore(CONTEXT_ENCODERS)
        self.ready = False
        self.worker: EngineWorker | None = None
        self._ws = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = count(1)
        self._prefix = uuid.uuid4().hex[:6]

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> StreamServer:
        self._loop = asyncio.get_running_loop()
        self._ws = await serve(self._handle, self.host, self.requested_port, process_request=self._http,
                               max_size=MAX_MESSAGE_BYTES, ping_interval=20, ping_timeout=20,
                               compression=self.compression, select_subprotocol=select_subprotocol,
                               **tls.server_options(self.ssl_context),
                               logger=logging.getLogger("csmstream.websockets"))
        self.loop_watch.starting = True
        self.loop_watch.start()
        log.info("listening on %s (/healthz says 503 until the model is ready)", self.url)
        if self.proxies:
            log.info("clients are named by X-Forwarded-For from %s", ", ".join(map(str, self.proxies.networks)))
        try:
            if self.http_port is not None:
                self.http = await HttpApi(self, self.host, self.http_port).start()
            if callable(self._engine_src):
                t0 = time.perf_counter()
                self.engine = await self._loop.run_in_executor(None, self._engine_src)
                log.info("model loaded in %.2fs", time.perf_counter() - t0)
            else:
                self.engine = self._engine_src
            if self.voices_dir is not None:
                self.voices = await self._voice_set()
                own = ", ".join(sorted(_own_voices(self.voices))) or "none"
                aliases = ", ".join(f"{a}={t}" for a, t in self.voice_aliases.items())
                log.info("voices: %s%s%s", own, f"; aliases: {aliases}" if aliases else "",
                         f"; default: {self.default_voice}" if self.default_voice else "")
            for v in self.voices.values():  # their prompts' KV is computed once, then copied per request
                self.engine.pin_voice(v.text, v.codes)
        except BaseException:
            self._ws.close()
            if self.http is not None:
                await self.http.close()
            await self.loop_watch.stop()
            raise
        self.worker = EngineWorker(self.engine, notify=self._notify_threadsafe,
                                   max_waiting=self.max_engine_waiting, prefill_chunk=self.prefill_chunk,
                                   stall_s=stall_seconds(self.engine_stall_s, self.engine)).start()
        if self.do_warmup:
            t0 = time.perf_counter()
            await self._loop.run_in_executor(None, self.worker.warmup)
            log.info("model warmed up in %.2fs", time.perf_counter() - t0)
            t0 = time.perf_counter()
            missing = await self._loop.run_in_executor(None, warm_codecs)  # nothing compiles on the loop later
            log.info("audio codecs warmed up in %.2fs%s", time.perf_counter() - t0,
                     f"; no codec library for {', '.join(missing)} (those formats get an error)" if missing else "")
        info = build_info(self.engine)
        self.metrics.sources.append(lambda: info)
        self.ready = True
        self.loop_watch.starting = False  # from now on a blocked loop delays streams: warned of
        log.info("ready: %r", self.engine)
        return self

    async def _voice_set(self) -> dict:
        """The constructor's voices, those of voices_dir (encoded off the loop) and the aliases;
        ValueError saying what is wrong."""
        from ..engine.voices import load_voices

        own = dict(self._given_voices)
        own.update(await self._loop.run_in_executor(None, load_voices, self.voices_dir, self.engine))
        return with_aliases(own, self.voice_aliases, self.default_voice)

    async def reload_voices(self) -> bool:
        """Read voices_dir again (SIGHUP): voices added, changed or removed there are in use from
        the next request on, without a restart (a reply under way keeps the voice it began with).
        A directory that will not do is logged as an ERROR and the voices in use are kept. Returns
        whether the new set is in use."""
        if self.voices_dir is None or not self.ready:
            log.warning("voices not reloaded: %s", "no voices directory (serve --voices DIR)"
                        if self.voices_dir is None else "the server is not ready yet")
            return False
        t0 = time.perf_counter()
        try:
            voices = await self._voice_set()
        except ValueError as e:
            log.error("voices not reloaded; the ones in use are kept: %s", e)
            return False
        old, new = _own_voices(self.voices), _own_voices(voices)
        changed = [n for n in new if n in old and not _same_voice(old[n], new[n])]
        for name, v in new.items():
            if name not in old or name in changed:
                self.engine.pin_voice(v.text, v.codes)
        for name, v in old.items():
            if name not in new or name in changed:
                self.engine.unpin_voice(v.text, v.codes)
        self.voices = voices
        log.info("voices reloaded from %s in %.1fs: %s; added: %s; changed: %s; removed: %s", self.voices_dir,
                 time.perf_counter() - t0, ", ".join(sorted(new)) or "none",
                 ", ".join(sorted(set(new) - set(old))) or "none", ", ".join(sorted(changed)) or "none",
                 ", ".join(sorted(set(old) - set(new))) or "none")
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful: stop accepting, let running requests finish for up to `timeout` seconds, then
        cancel what is left (each gets its done with cancelled: true), close sockets with 1001."""
        self.ready = False
        self.stopping = True
        if self._ws is not None:
            self._ws.close(close_connections=False)  # no new connections from here on
            if self.http is not None:
                self.http.stop_listening()
            deadline = time.monotonic() + timeout
            while any(c.busy for c in self.connections) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            left = [c for c in self.connections if c.busy]
            if left:
                log.warning("shutdown deadline reached: cancelling %d connection(s)' requests", len(left))
                for c in left:
                    await c.cancel_all()
                t = time.monotonic() + 2.0
                while any(c.busy for c in self.connections) and time.monotonic() < t:
                    await asyncio.sleep(0.02)
            for c in list(self.connections):
                await c.close_for_shutdown()
            # the extra routes' sockets too (a phone call's media stream, its listeners): their
            # handlers end when their socket does, and wait_closed waits for every handler
            await asyncio.gather(*(ws.close(1001, "server shutting down") for ws in list(self.route_sockets)),
                                 return_exceptions=True)
            await self._ws.wait_closed()
            if self.http is not None:
                await self.http.close()
        if self.worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        await self.loop_watch.stop()
        log.info("stopped")

    @property
    def port(self) -> int:
        return self._ws.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/ws/generate"

    @property
    def speech_url(self) -> str | None:
        """The OpenAI-compatible endpoint, when an HTTP port is served."""
        return self.http.url if self.http is not None else None

    def next_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    # -- engine -> loop --------------------------------------------------------------------------
    def _notify_threadsafe(self, reqs: list[GenRequest]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_engine, reqs)
            except RuntimeError:  # loop closing
                pass

    @staticmethod
    def _on_engine(reqs: list[GenRequest]) -> None:
        for r in reqs:
            if r.tag is not None:
                r.tag.wake()

    # -- HTTP ------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.ready and self.worker is not None and self.worker.alive

    def health(self) -> dict:
        e, w = self.engine, self.worker
        slots = e.max_streams if e is not None else 0
        active = w.stats.active + w.stats.prefilling if w is not None else 0  # requests holding a slot
        status = "ok" if self.healthy else ("stopping" if self.stopping else
                                            "engine thread died" if w is not None and w.died else
                                            "engine stalled" if w is not None and w.stalled else "warming up")
        return {"status": status, "max_streams": slots, "active": active, "free_slots": max(0, slots - active),
                "waiting": w.queued() if w is not None else 0,
                "max_text_chars": self.max_text_chars}  # (what one request may hold: say cuts longer texts so)

    def voice_name(self, requested: str | None) -> str | None:
        """The voice a request's `voice` means: a voice's own name for an alias, the default for
        None; a name the server does not know is returned as it is, for the caller to refuse."""
        if requested is None:
            return self.default_voice
        v = self.voices.get(requested)
        return requested if v is None else v.name

    def _voice_entry(self, name: str, v) -> dict:
        entry = {"name": name, "text": v.text, "seconds": round(v.seconds, 2)}
        if name != v.name:
            entry["alias_of"] = v.name
        if name == self.default_voice:
            entry["default"] = True
        return entry

    PAGE_PATHS = ("/healthz", "/livez", "/voices", "/metrics")  # what page() answers, with catalog.is_listing's

    def is_page(self, path: str) -> bool:
        return path in self.PAGE_PATHS or catalog.is_listing(path)

    def page(self, path: str) -> tuple[int, str, str] | None:
        """The plain GET pages (on the WebSocket port and the HTTP port): (status, content type,
        body), or None for any other path. Also OpenAI's and ElevenLabs' listings (catalog.py)."""
        if catalog.is_listing(path):
            if self.worker is None:  # (no model, or its voices, yet: nothing to list)
                status, obj = 503, http_speech.error_object(503, "unavailable", "the model is still loading; retry "
                                                            "when /healthz says 200")
            else:
                status, obj = catalog.listing(path, model=self.engine.name, created=self.created, voices=self.voices,
                                              default_voice=self.default_voice)
            return status, "application/json", json.dumps(obj) + "\n"
        if path == "/healthz":
            return 200 if self.healthy else 503, "application/json", json.dumps(self.health()) + "\n"
        if path == "/livez":  # (a liveness probe: red only for what a restart mends, not while loading or stopping)
            w = self.worker
            dead = w is not None and (w.died is not None or w.stalled is not None)
            return 503 if dead else 200, "application/json", json.dumps({"status": self.health()["status"]}) + "\n"
        if path == "/voices":
            body = json.dumps({"voices": [self._voice_entry(name, v) for name, v in self.voices.items()],
                               "default": self.default_voice})
            return 200, "application/json", body + "\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render(
                self.worker.stats if self.worker else None, self.healthy, self.health())
        return None

    def _engine_lines(self) -> list[str]:
        w = self.worker
        if w is None:
            return []
        name = "csm_engine_current_step_seconds"
        return [f"# HELP {name} how long the engine's step in progress has run (0 between steps; past the engine "
                "stall timeout the engine counts as stuck)", f"# TYPE {name} gauge", f"{name} {w.tick_seconds:.3f}"]

    def _tls_lines(self) -> list[str]:
        out = [] if self.tls_handshakes is None else self.tls_handshakes.lines()
        if self.tls_not_after is None:
            return out
        return out + ["# HELP csm_tls_certificate_not_after_seconds when the served TLS certificate expires (Unix "
                      "time; alert on it minus time())",
                      "# TYPE csm_tls_certificate_not_after_seconds gauge",
                      f"csm_tls_certificate_not_after_seconds {self.tls_not_after:.0f}"]

    def tune_socket(self, sock) -> None:
        """Cap a connection's kernel send buffer (socket_send_buffer), so a client that stops
        reading is noticed after little buffering."""
        if self.socket_send_buffer and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_send_buffer)

    def client_address(self, remote_address, headers) -> str | None:
        """The address a connection's client is known by: its peer's, or from a trusted proxy the
        one its X-Forwarded-For names (the same every time for the same handshake)."""
        return self.proxies.client(remote_address[0] if remote_address else None, headers)

    def _http(self, connection: ServerConnection, request):
        path = request.path.split("?", 1)[0]
        self.tune_socket(connection.transport.get_extra_info("socket"))
        ip = self.client_address(connection.remote_address, request.headers)
        websocket = "Upgrade" in request.headers
        denied = self.gate.check(path, request.headers, ip, websocket,  # (ElevenLabs' may send it in a message)
                                 first_message_auth=websocket and elevenlabs.match(path) is not None)
        cors = {} if websocket else self.gate.cors(request.headers.get("Origin"))  # (a listed origin's page)
        if denied is not None:
            log.warning("refused %s from %s: %s", path, ip, denied[1].strip())
            resp = connection.respond(*denied)
            resp.headers.update(cors)
            return resp
        page = self.page(path)
        if page is not None:
            resp = connection.respond(page[0], page[2])
            resp.headers["Content-Type"] = page[1]
            resp.headers.update(cors)
            return resp
        if elevenlabs.match(path):
            return None if self.healthy else connection.respond(503, f"{self.health()['status']}\n")
        if path in self.routes:
            _, accept = self.routes[path]
            if accept is not None and not accept(request.headers):
                log.warning("refused a %s handshake: authentication failed", path)
                return connection.respond(401, "authentication failed\n")
            return None
        if path != "/ws/generate":
            extra = "".join(f", {p}" for p in self.routes)
            return connection.respond(404, f"no route {path}; WebSocket endpoints are /ws/generate{extra}, "
                                           "/v1/text-to-speech/{voice_id}/stream-input and .../multi-stream-input, "
                                           "HTTP endpoints /healthz, /livez, /metrics, /voices, /v1/models and "
                                           "/v1/voices\n")
        if not self.healthy:
            return connection.respond(503, f"{self.health()['status']}; retry when /healthz says 200\n")
        return None  # go on with the WebSocket handshake

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0] if ws.request is not None else "/ws/generate"
        if path in self.routes:
            self.route_sockets.add(ws)
            try:
                await self.routes[path][0](ws)
            finally:
                self.route_sockets.discard(ws)
            return
        m = self.metrics
        ip = self.client_address(ws.remote_address, ws.request.headers if ws.request is not None else {})
        conn = (elevenlabs.match(path) or Connection)(self, ws)
        m.connections += 1
        m.open_connections += 1
        self.gate.opened(ip)
        self.connections.add(conn)
        try:
            await conn.run()
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self.gate.closed(ip)
            m.open_connections -= 1
            conn.abort()


def _own_voices(voices: dict) -> dict:
    """The voices by their own names (aliases left out)."""
    return {name: v for name, v in voices.items() if name == v.name}


def _same_voice(a, b) -> bool:
    return a.text == b.text and a.codes.shape == b.codes.shape and bool((a.codes == b.codes).all())
