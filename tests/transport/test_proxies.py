"""transport/proxies.py: behind a trusted load balancer the client is the one its X-Forwarded-For
names (per-client limits, previous_text memory); nobody else's X-Forwarded-For is believed. Unit
checks on the sans-I/O rule, then a real server on both ports with connections that arrive, as
through nginx, from a trusted loopback address."""

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from csmstream.transport.proxies import TrustedProxies
from tests.servers import RunningServer, collect


def xff(*values):
    return Headers([("X-Forwarded-For", v) for v in values])


def test_only_a_trusted_peers_header_is_believed_and_the_rightmost_untrusted_hop_is_the_client():
    p = TrustedProxies("127.0.0.1, 10.0.0.0/8,::1")
    assert p.client("203.0.113.9", xff("198.51.100.1")) == "203.0.113.9"  # not a proxy: its own say is ignored
    assert p.client("127.0.0.1", xff("198.51.100.1")) == "198.51.100.1"
    # nginx appends the address it saw to what the client sent: the client's own part cannot win
    assert p.client("127.0.0.1", xff("6.6.6.6, 198.51.100.1")) == "198.51.100.1"
    assert p.client("127.0.0.1", xff("198.51.100.1, 10.1.2.3")) == "198.51.100.1"  # a second trusted hop
    assert p.client("127.0.0.1", xff("198.51.100.1", "10.1.2.3")) == "198.51.100.1"  # repeated header lines
    assert p.client("127.0.0.1", xff("10.9.9.9, 10.1.2.3")) == "10.9.9.9"  # all trusted: the leftmost
    assert p.client("127.0.0.1", Headers()) == "127.0.0.1" and p.client("127.0.0.1", xff(" , ")) == "127.0.0.1"
    assert p.client("::1", xff("[2001:db8::1]:443")) == "2001:db8::1"  # IPv6 with a port, through a v6 proxy
    assert p.client("127.0.0.1", xff("198.51.100.1:5060")) == "198.51.100.1"
    assert p.client("::ffff:127.0.0.1", xff("198.51.100.1")) == "198.51.100.1"  # a dual-stack socket's view
    assert p.client("127.0.0.1", xff("unknown")) == "unknown" and len(p.client("127.0.0.1", xff("x" * 500))) == 64
    assert p.client(None, xff("198.51.100.1")) is None
    assert p.client("127.0.0.1", {"X-Forwarded-For": "198.51.100.1"}) == "198.51.100.1"  # a plain mapping


def test_no_proxies_trusts_nobody_and_a_bad_entry_is_named():
    for spec in (None, "", " , ", []):
        p = TrustedProxies(spec)
        assert not p and p.client("127.0.0.1", xff("198.51.100.1")) == "127.0.0.1"
    assert TrustedProxies(["192.168.0.0/16"]).trusts("192.168.4.4")
    assert not TrustedProxies("192.168.0.0/16").trusts("192.169.0.1") and not TrustedProxies("::1").trusts("1.0.0.1")
    for bad in ("nginx", "10.0.0.0/33", "127.0.0.1;10.0.0.1", "1.2.3"):
        with pytest.raises(ValueError, match="is not an IP address or network") as e:
            TrustedProxies(f"127.0.0.1,{bad}")
        assert bad[:10] in str(e.value) and "10.0.0.0/8" in str(e.value)


@pytest.fixture(scope="module")
def behind():
    """A server on tiny whose loopback peers are a trusted proxy: two sockets per client address,
    three requests a minute per client on the HTTP port."""
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), http_port=0, trusted_proxies="127.0.0.1",
                       max_connections_per_ip=2, max_requests_per_minute=3).start()
    yield rs
    rs.stop()


def test_websocket_limits_count_each_forwarded_client_not_the_proxy(behind):
    async def go():
        def open_as(client):
            return connect(behind.url, additional_headers={"X-Forwarded-For": f"6.6.6.6, {client}"})

        a1, a2, b1 = await open_as("198.51.100.1"), await open_as("198.51.100.1"), await open_as("198.51.100.2")
        with pytest.raises(InvalidStatus) as e:  # a third from the same client
            await open_as("198.51.100.1")
        assert e.value.response.status_code == 429 and b"198.51.100.1" in e.value.response.body
        await b1.send(json.dumps({"text": "Hi.", "max_audio_ms": 160}))
        assert (await collect(b1))[-1][0] == "done"  # the others are served
        assert behind.srv.gate.open == {"198.51.100.1": 2, "198.51.100.2": 1}
        for ws in (a1, a2, b1):
            await ws.close()

    asyncio.run(go())
    for _ in range(100):  # (the handlers finish after the close)
        if not behind.srv.gate.open:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert not behind.srv.gate.open


def test_http_requests_on_one_proxy_connection_are_limited_per_forwarded_client(behind):
    """nginx carries many clients' requests on its kept-alive upstream connections: the per-minute
    limit counts each client named; the connections themselves are not one client's."""
    url = behind.srv.speech_url
    body = {"input": "Hi.", "response_format": "pcm", "max_audio_ms": 80}
    with httpx.Client(timeout=60) as one_connection:
        def post(client):
            return one_connection.post(url, json=body, headers={"X-Forwarded-For": client}).status_code

        assert [post("198.51.100.7") for _ in range(3)] == [200, 200, 200]
        assert post("198.51.100.7") == 429  # its fourth in a minute
        assert post("198.51.100.8") == 200  # another client through the same proxy connection
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b, httpx.Client(timeout=60) as c:
        # three connections from the proxy at once, over max_connections_per_ip (2): none refused
        assert [cl.get(url.replace("/v1/audio/speech", "/healthz")).status_code for cl in (a, b, c)] == [200] * 3


def test_previous_text_memory_is_kept_per_forwarded_client(behind):
    base = behind.srv.speech_url.rsplit("/audio/speech", 1)[0]

    def say(client, text, **body):
        r = httpx.post(f"{base}/text-to-speech/1/stream?output_format=pcm_16000", headers={"X-Forwarded-For": client},
                       json={"text": text, "seed": 3, **body}, timeout=60)
        assert r.status_code == 200

    say("198.51.100.20", "The first sentence.", previous_text="")
    spoken = behind.srv.spoken
    assert [t for t, _ in spoken.context_for("198.51.100.20", (None, 1), "The first sentence.")] == \
        ["The first sentence."]
    assert spoken.context_for("127.0.0.1", (None, 1), "The first sentence.") == []  # not the proxy's
    assert spoken.context_for("198.51.100.21", (None, 1), "The first sentence.") == []
