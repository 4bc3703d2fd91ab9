"""What TLS (`serve --tls-cert`) costs the event loop, beside plain WebSocket, in one run.

    .venv/bin/python -m pytest bench/test_tls.py --benchmark-only -s

A websockets server on uvloop (as `serve` runs) sends a burst of messages to a client in another
thread, once over TLS and once plain, alternately: Telnyx media messages (20 ms of mu-law, ~230
bytes of JSON) and /ws/generate's 100 ms PCM chunks (4,800 bytes). The server's loop thread's CPU
time (time.thread_time) over each burst, per message, goes to extra_info and stdout: the event
loop's cost of encrypting, next to its cost of sending. The benchmark's own timing is the wall time
of a burst (the client's decryption included). Nothing here asserts a time.
"""

import asyncio
import base64
import json
import threading
import time

import numpy as np
import pytest

MESSAGES = 500
KINDS = {
    "telnyx_media": json.dumps({"event": "media", "media": {"payload": base64.b64encode(bytes(160)).decode()}}),
    "pcm_chunk": bytes(range(256)) * 18 + bytes(192),  # 4,800 bytes
}


class _Servers:
    """Two websockets servers (plain, TLS) on one uvloop thread; each answers {"kind", "n"} with n
    messages of that kind, then {"cpu": loop thread seconds spent sending them}."""

    def __init__(self, ssl_context) -> None:
        self.ssl_context = ssl_context
        self.ports: dict[str, int] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handler(self, ws) -> None:
        async for request in ws:
            ask = json.loads(request)
            payload = KINDS[ask["kind"]]
            t0 = time.thread_time()
            for _ in range(ask["n"]):
                await ws.send(payload)
            await ws.send(json.dumps({"cpu": time.thread_time() - t0}))

    def _run(self) -> None:
        import uvloop
        from websockets.asyncio.server import serve

        async def main() -> None:
            self._stop = asyncio.Event()
            async with serve(self._handler, "127.0.0.1", 0, compression=None) as plain, \
                    serve(self._handler, "127.0.0.1", 0, compression=None, ssl=self.ssl_context) as tls:
                self.ports = {"plain": plain.sockets[0].getsockname()[1], "tls": tls.sockets[0].getsockname()[1]}
                self._loop = asyncio.get_running_loop()
                self._ready.set()
                await self._stop.wait()

        uvloop.run(main())

    def start(self) -> "_Servers":
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import trustme

    from csmstream.transport.tls import server_context

    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(d / "both.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    srv = _Servers(server_context(str(d / "both.pem"))).start()
    yield srv, str(d / "ca.pem")
    srv.stop()


@pytest.mark.parametrize("kind", list(KINDS))
def test_loop_cpu_per_message_tls_vs_plain(benchmark, servers, kind):
    from websockets.sync.client import connect

    from csmstream.transport.tls import client_context

    srv, ca = servers
    clients = {"plain": connect(f"ws://127.0.0.1:{srv.ports['plain']}", compression=None, max_size=None),
               "tls": connect(f"wss://127.0.0.1:{srv.ports['tls']}", compression=None, max_size=None,
                              ssl=client_context(ca))}
    cpu: dict[str, list[float]] = {"plain": [], "tls": []}

    def burst(mode: str) -> None:
        ws = clients[mode]
        ws.send(json.dumps({"kind": kind, "n": MESSAGES}))
        for _ in range(MESSAGES):
            ws.recv()
        cpu[mode].append(json.loads(ws.recv())["cpu"] / MESSAGES)

    try:
        for _ in range(3):  # warm both (TLS session, websockets' buffers)
            burst("plain")
            burst("tls")
        cpu = {"plain": [], "tls": []}
        for _ in range(10):  # alternately, so drift on a shared machine hits both
            burst("plain")
            burst("tls")
        benchmark.pedantic(lambda: burst("tls"), rounds=5)
    finally:
        for ws in clients.values():
            ws.close()
    us = {mode: 1e6 * float(np.median(v)) for mode, v in cpu.items()}
    benchmark.group = f"tls-{kind}"
    benchmark.extra_info.update({f"loop_cpu_us_per_message_{m}": round(v, 2) for m, v in us.items()})
    print(f"\n{kind}: the loop's CPU per message: plain {us['plain']:.1f} us, TLS {us['tls']:.1f} us "
          f"(x{us['tls'] / us['plain']:.2f}; medians of 10 bursts of {MESSAGES})")
