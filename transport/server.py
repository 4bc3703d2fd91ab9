"""The uvloop + websockets server: /ws/generate (streaming audio), /healthz, /metrics.

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
import time
import uuid
from collections import deque
from itertools import count

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ..engine.worker import EngineWorker, GenRequest
from . import elevenlabs, protocol
from .connection import Connection
from .metrics import Metrics

log = logging.getLogger("csmstream.server")

MAX_MESSAGE_BYTES = 1 << 20  # larger client messages close the connection with 1009
MAX_WAITING = 8


class StreamServer:
    """Start with `await server.start()`; `server.port` is then bound; `await server.stop()`.
    `engine` is an Engine, or a callable that makes one: then the port opens first (answering
    503 on /healthz) and the model loads in the background."""

    def __init__(self, engine, *, host: str = "127.0.0.1", port: int = 8765, max_waiting: int = MAX_WAITING,
                 max_text_chars: int = protocol.DEFAULT_MAX_TEXT_CHARS, warmup: bool = True,
                 voices: dict | None = None, voices_dir: str | None = None, routes: dict | None = None,
                 calls=None, test_chunk_delay: float = 0.0) -> None:
        self._engine_src, self.host, self.requested_port = engine, host, port
        self.engine = None
        self.max_waiting, self.max_text_chars, self.do_warmup = max_waiting, max_text_chars, warmup
        self.voices = dict(voices or {})  # name -> engine.voices.Voice (text, codes)
        self.voices_dir = voices_dir  # NAME.wav + NAME.txt pairs, encoded at start-up
        # extra WebSocket endpoints: path -> (async handler(ws), accept(headers) -> bool), e.g. /telnyx
        self.routes = dict(routes or {})
        # live phone calls by call_control_id (an object with .get(id) -> call sink), or None
        self.calls = calls
        self.test_chunk_delay = test_chunk_delay  # test hook: sleep this long before each audio chunk
        self.metrics = Metrics()
        self.recent: deque[GenRequest] = deque(maxlen=256)  # latest requests handed to the engine
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
                               logger=logging.getLogger("csmstream.websockets"))
        log.info("listening on ws://%s:%d/ws/generate (/healthz says 503 until the model is ready)",
                 self.host, self.port)
        try:
            if callable(self._engine_src):
                t0 = time.perf_counter()
                self.engine = await self._loop.run_in_executor(None, self._engine_src)
                log.info("model loaded in %.2fs", time.perf_counter() - t0)
            else:
                self.engine = self._engine_src
            if self.voices_dir is not None:
                from ..engine.voices import load_voices

                self.voices.update(await self._loop.run_in_executor(None, load_voices, self.voices_dir, self.engine))
                log.info("voices: %s", ", ".join(sorted(self.voices)) or "none")
        except BaseException:
            self._ws.close()
            raise
        self.worker = EngineWorker(self.engine, notify=self._notify_threadsafe).start()
        if self.do_warmup:
            t0 = time.perf_counter()
            await self._loop.run_in_executor(None, self.worker.warmup)
            log.info("model warmed up in %.2fs", time.perf_counter() - t0)
        self.ready = True
        log.info("ready: %r", self.engine)
        return self

    async def stop(self) -> None:
        self.ready = False
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        if self.worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        log.info("stopped")

    @property
    def port(self) -> int:
        return self._ws.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws/generate"

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
    def _http(self, connection: ServerConnection, request):
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(200, "ok\n") if self.ready else connection.respond(503, "warming up\n")
        if path == "/voices":
            body = json.dumps({"voices": [{"name": v.name, "text": v.text, "seconds": round(v.seconds, 2)}
                                          for v in self.voices.values()]})
            resp = connection.respond(200, body + "\n")
            resp.headers["Content-Type"] = "application/json"
            return resp
        if path == "/metrics":
            resp = connection.respond(200, self.metrics.render(self.worker.stats if self.worker else None,
                                                               self.ready))
            resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return resp
        if elevenlabs.match(path):
            return None if self.ready else connection.respond(503, "warming up\n")
        if path in self.routes:
            _, accept = self.routes[path]
            if accept is not None and not accept(request.headers):
                log.warning("refused a %s handshake: authentication failed", path)
                return connection.respond(401, "authentication failed\n")
            return None
        if path != "/ws/generate":
            extra = "".join(f", {p}" for p in self.routes)
            return connection.respond(404, f"no route {path}; WebSocket endpoints are /ws/generate{extra}, "
                                           "HTTP endpoints /healthz and /metrics\n")
        if not self.ready:
            return connection.respond(503, "warming up; retry when /healthz says 200\n")
        return None  # go on with the WebSocket handshake

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0] if ws.request is not None else "/ws/generate"
        if path in self.routes:
            await self.routes[path][0](ws)
            return
        m = self.metrics
        if elevenlabs.match(path):
            m.connections += 1
            m.open_connections += 1
            conn = elevenlabs.ElevenLabsConnection(self, ws)
            try:
                await conn.run()
            except ConnectionClosed:
                pass
            finally:
                m.open_connections -= 1
                conn.abort()
            return
        m.connections += 1
        m.open_connections += 1
        conn = Connection(self, ws)
        try:
            await conn.run()
        except ConnectionClosed:
            pass
        finally:
            m.open_connections -= 1
            conn.abort()
