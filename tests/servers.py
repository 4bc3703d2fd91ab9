"""A real server on a free loopback port, in its own thread and event loop (like production:
tests talk to it over TCP with the websockets client and the project's client)."""

import asyncio
import json
import threading
import time


class RunningServer:
    """loop: "uvloop" (the default: `serve` runs on it) or "asyncio"."""

    def __init__(self, engine_or_factory, loop: str = "uvloop", **kw):
        from csmstream.transport.server import StreamServer

        self.srv = StreamServer(engine_or_factory, port=0, **kw)
        self._loop_factory = None
        if loop == "uvloop":
            import uvloop

            self._loop_factory = uvloop.new_event_loop
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        async def main():
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.srv.start()
            except BaseException as e:  # surface start failures to the test
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.srv.stop()

        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            runner.run(main())

    def start(self, timeout=120):
        self._thread.start()
        assert self._ready.wait(timeout), "server did not start"
        if self._error:
            raise self._error
        return self

    def stop(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def url(self):
        return self.srv.url


async def collect(ws, *, until_done=1):
    """Read messages until `until_done` done/error messages; returns a list of events:
    ("audio", bytes) | ("done", dict) | ("error", dict)."""
    events, ends = [], 0
    while ends < until_done:
        m = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(m, bytes):
            events.append(("audio", m))
            continue
        msg = json.loads(m)
        kind = "done" if msg.get("done") else "error"
        events.append((kind, msg))
        ends += 1
    return events


async def as_written(text: str, every: float = 0.01):
    """`text` as an LLM writes it: word by word (each with a space after it), one every `every` s."""
    for word in text.split(" "):
        await asyncio.sleep(every)
        yield word + " "


def fail_on(monkeypatch, worker, method: str, marker: str, exc: BaseException) -> None:
    """Make `worker.<method>` (submit or prepare) raise `exc` for a request whose text contains
    `marker` (a refusal or a bug injected into one sentence); every other request goes through."""
    real = getattr(worker, method)

    def failing(req):
        if marker in req.text:
            raise exc
        return real(req)

    monkeypatch.setattr(worker, method, failing)


def wait_finished(req, timeout: float = 10.0) -> bool:
    """Poll (from a test thread) until the engine has finished `req`; returns whether it did."""
    t = time.monotonic()
    while not req.finished and time.monotonic() - t < timeout:
        time.sleep(0.005)
    return req.finished


async def wait_until(cond, timeout: float = 10.0) -> None:
    """Poll (inside an event loop) until cond() holds; fails the test after `timeout` seconds."""
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "condition not met in time"
        await asyncio.sleep(0.005)


def floor_frame_time(monkeypatch, rs: RunningServer, seconds: float = 0.01) -> None:
    """Make every decode step of `rs`'s engine take at least `seconds` (for this test only), so a
    test that cancels a request mid-sentence cannot race a fast machine: tiny can generate a
    whole sentence in 0.2 s, before a barge-in or a stalled socket is even noticed. 10 ms a
    frame is still 8x faster than real time, so pacing and gap-free playback are unaffected."""
    gen = rs.srv.engine.gen
    step = gen.step

    def step_at_least(*args, **kwargs):
        t = time.perf_counter()
        out = step(*args, **kwargs)
        rest = seconds - (time.perf_counter() - t)
        if rest > 0:
            time.sleep(rest)
        return out

    monkeypatch.setattr(gen, "step", step_at_least)


class CannedHttp:
    """A plain HTTP server on a free loopback port that answers every GET and POST with one canned
    response (a proxy's page, an older server's /healthz): `with CannedHttp(200, b"{}") as port:`."""

    def __init__(self, status: int, body: bytes, only_path: str | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Page(BaseHTTPRequestHandler):
            def _answer(self):
                if self.command == "POST":
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                found = only_path is None or self.path == only_path
                self.send_response(status if found else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)

    def __enter__(self) -> int:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.httpd.server_address[1]

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
