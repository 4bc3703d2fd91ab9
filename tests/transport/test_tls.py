"""serve --tls-cert/--tls-key: wss:// and https:// on the server's own ports (transport/tls.py),
checked with a throwaway CA (trustme) against a plain server's audio for the same request; bad
certificate files are refused with the file named, before any work; clients that speak plain
text, distrust the certificate or never finish their handshake are dropped while the server
goes on serving."""

import asyncio
import json
import socket
import ssl
import time
import urllib.request

import pytest
import trustme

from csmstream.transport import tls
from csmstream.transport.client import SesameConnectionError, SesameWebSocketService, stream_speech_http


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a certificate for 127.0.0.1 it signed, and their files."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {name: str(d / f"{name}.pem") for name in ("ca", "cert", "key", "both", "other_key", "other_ca")}
    ca.cert_pem.write_to_path(files["ca"])
    trustme.CA().cert_pem.write_to_path(files["other_ca"])  # a CA that signed nothing here
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    cert.private_key_and_cert_chain_pem.write_to_path(files["both"])
    ca.issue_cert("elsewhere.example").private_key_pem.write_to_path(files["other_key"])
    return files


@pytest.fixture(scope="module")
def tls_server(pki):
    import csmstream
    from tests.servers import RunningServer

    mp = pytest.MonkeyPatch()
    mp.setattr(tls, "HANDSHAKE_TIMEOUT_S", 1.0)  # (read when the listeners start)
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), http_port=0,
                       ssl_context=tls.server_context(pki["cert"], pki["key"])).start()
    yield rs
    rs.stop()
    mp.undo()


async def _ws_audio(url: str, ctx=None, **opts) -> bytes:
    svc = SesameWebSocketService(url, ssl_context=ctx)
    return b"".join([c async for c in svc.stream_tts("Hello over TLS.", 0, seed=3, **opts)])


async def _http_audio(url: str, ctx=None) -> bytes:
    return b"".join([c async for c in stream_speech_http(url, "Hello over TLS.", 0, seed=3, ssl_context=ctx)])


def test_wss_and_https_carry_the_same_audio_as_a_plain_server(tls_server, server, pki):
    assert tls_server.url.startswith("wss://127.0.0.1:") and tls_server.srv.speech_url.startswith("https://127.0.0.1:")
    ctx = tls.client_context(pki["ca"])
    want = asyncio.run(_ws_audio(server.url))  # the plain server (tests/conftest.py), same tiny weights
    assert len(want) > 4800
    assert asyncio.run(_ws_audio(tls_server.url, ctx)) == want
    assert asyncio.run(_http_audio(tls_server.srv.speech_url, ctx)) == want
    health = f"https://127.0.0.1:{tls_server.srv.port}/healthz"
    with urllib.request.urlopen(health, context=ctx, timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_clients_that_cannot_speak_to_it_are_dropped_and_it_keeps_serving(tls_server, pki, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(SesameConnectionError, match="CERTIFICATE_VERIFY_FAILED"):  # no CA given: not trusted
        asyncio.run(_ws_audio(tls_server.url))
    with pytest.raises(SesameConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(_http_audio(tls_server.srv.speech_url))
    with pytest.raises(SesameConnectionError, match="cannot connect"):  # plain text to a TLS port
        asyncio.run(_ws_audio(tls_server.url.replace("wss://", "ws://")))
    # a client that opens TCP and never says a word is dropped after the handshake timeout
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10)
              for port in (tls_server.srv.port, tls_server.srv.http.port)]
    t0 = time.monotonic()
    for s in silent:
        with s:
            assert s.recv(1) == b""  # closed by the server
    assert time.monotonic() - t0 < 8
    assert len(asyncio.run(_ws_audio(tls_server.url, tls.client_context(pki["ca"])))) > 4800


def test_bad_certificate_files_are_refused_naming_the_file(pki, tmp_path):
    assert isinstance(tls.server_context(pki["both"]), ssl.SSLContext)  # the key inside the certificate file
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        ((pki["cert"], pki["other_key"]), "the key does not belong to the certificate"),
        ((pki["cert"], None), "not a PEM certificate chain with its PEM private key"),
        ((str(junk), pki["key"]), "not a PEM certificate chain"),
        ((str(tmp_path / "nope.pem"), None), "--tls-cert '.*nope.pem': no such file"),
        ((pki["cert"], str(tmp_path)), "--tls-key '.*': no such file"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            tls.server_context(*args)
    with pytest.raises(ValueError, match="--cafile '.*junk.pem': no PEM certificate in it"):
        tls.client_context(str(junk))


def test_an_encrypted_key_is_refused_not_asked_for(pki, tmp_path):
    """OpenSSL would prompt on the terminal for the passphrase (a server under systemd would hang)."""
    from cryptography.hazmat.primitives import serialization

    with open(pki["key"], "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValueError, match="the key is encrypted; give an unencrypted PEM key"):
        tls.server_context(pki["cert"], str(locked))


def test_say_trusts_the_servers_ca_with_cafile_and_says_what_to_do_without_it(tls_server, pki, tmp_path, monkeypatch):
    import subprocess
    import sys
    import wave

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    for url in (tls_server.url, tls_server.srv.speech_url):
        path = tmp_path / "tls.wav"
        cmd = [sys.executable, "-m", "csmstream", "say", "Hello over TLS.", "--url", url, "--seed", "3",
               "--out", str(path)]
        out = subprocess.run(cmd + ["--cafile", pki["ca"]], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        with wave.open(str(path)) as w:
            assert w.getnframes() > 2400
        path.unlink()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr
        assert "the server's TLS certificate is not trusted here: pass --cafile CA.pem" in out.stderr
        assert not path.exists()
    out = subprocess.run([sys.executable, "-m", "csmstream", "say", "Hi.", "--url",
                          tls_server.url.replace("wss://", "ws://"), "--out", str(tmp_path / "x.wav")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "One that serves TLS (serve --tls-cert) needs wss://" in out.stderr


def test_bench_over_tls_with_cafile_reads_the_audio_and_the_servers_metrics(tls_server, pki, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    out = subprocess.run([sys.executable, "-m", "csmstream", "bench", "--url", tls_server.url, "--cafile", pki["ca"],
                          "--concurrency", "2", "--requests", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    calls = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(calls) == 2 and all(c["error"] is None and c["audio_ms"] > 0 for c in calls)
    assert "server memory" in out.stdout  # /metrics was read over https with the CA too


def test_not_after_reads_the_certificates_expiry_as_an_x509_library_does(tmp_path):
    """UTCTime (years to 2049) and GeneralizedTime (2050 on) notAfter, the server's certificate
    first in a chain or after its key; cryptography's parse is the reference."""
    import datetime

    from cryptography import x509

    ca = trustme.CA()
    cases = [None, datetime.datetime(2051, 3, 4, 5, 6, 7), datetime.datetime(2027, 1, 2, 3, 4, 5),
             datetime.datetime(2049, 12, 31, 23, 59, 59)]
    for i, end in enumerate(cases):
        leaf = ca.issue_cert("127.0.0.1", **({} if end is None else {"not_after": end}))
        want = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).not_valid_after_utc.timestamp()
        for blob in (leaf.private_key_and_cert_chain_pem, leaf.cert_chain_pems[0]):
            path = tmp_path / f"{i}.pem"
            blob.write_to_path(str(path))
            assert tls.not_after(str(path)) == want
    path = tmp_path / "soon.pem"
    ca.issue_cert("127.0.0.1", not_after=datetime.datetime(2030, 1, 10)).cert_chain_pems[0].write_to_path(str(path))
    at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC).timestamp()
    assert tls.expiry_note(str(path), now=at)[1:] == (
        f"the TLS certificate in {path} is valid until 2030-01-10 00:00 UTC (9 days)", True)
    assert tls.expiry_note(str(path), now=at - 30 * 86400)[2] is False
    end, line, warn = tls.expiry_note(str(path), now=at + 10 * 86400)
    assert warn and line == f"the TLS certificate in {path} EXPIRED on 2030-01-10 00:00 UTC: clients will refuse it"
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="cannot read its certificate's expiry"):
        tls.not_after(str(tmp_path / "junk.pem"))
    (tmp_path / "text.pem").write_text("hello\n")
    with pytest.raises(ValueError, match="no PEM certificate in it"):
        tls.not_after(str(tmp_path / "text.pem"))


def _until(what, timeout=10.0):
    """Poll `what()` (the server counts on its own thread) until it is true; collect garbage between
    polls: a dropped handshake is counted when its connection's objects are freed."""
    import gc

    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "the server's counts never got there"
        gc.collect()
        time.sleep(0.05)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_every_handshake_is_counted_by_how_it_ended_and_a_failure_says_what_it_means(pki, loop, caplog):
    """A failed TLS handshake never reaches the server's handlers: it is counted on the context
    (tls.count_handshakes), with OpenSSL's reason, on both event loops serve may run."""
    import csmstream
    from tests.servers import RunningServer

    ctx = tls.server_context(pki["cert"], pki["key"])
    mp = pytest.MonkeyPatch()
    mp.setattr(tls, "HANDSHAKE_TIMEOUT_S", 1.0)
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1), loop=loop, ssl_context=ctx).start()
    try:
        hs = rs.srv.tls_handshakes
        assert tls.count_handshakes(ctx) is hs  # counted once, whoever asks again
        port = rs.srv.port
        with caplog.at_level("DEBUG", logger="csmstream.tls"):
            # a client that trusts the CA: ok
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=tls.client_context(pki["ca"]),
                                        timeout=10) as r:
                assert r.status == 200
            _until(lambda: hs.ok == 1)
            # plain HTTP to the TLS port, twice: failed, HTTP_REQUEST; the first is a warning with a hint
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert s.recv(100) == b""  # closed with no HTTP answer
            _until(lambda: hs.failed["HTTP_REQUEST"] == 2)
            # a client that does not trust the certificate says so in its alert
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with pytest.raises(ssl.SSLCertVerificationError):
                    ssl.create_default_context(cafile=pki["other_ca"]).wrap_socket(raw, server_hostname="127.0.0.1")
            _until(lambda: hs.failed["TLSV1_ALERT_UNKNOWN_CA"] == 1)
            # one that opens TCP and never speaks: dropped at the handshake timeout
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert s.recv(1) == b""
            _until(lambda: hs.dropped == 1)
        assert hs.ok == 1 and dict(hs.failed) == {"HTTP_REQUEST": 2, "TLSV1_ALERT_UNKNOWN_CA": 1}
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "csmstream.tls"]
        assert len(warned) == 2 and "plain HTTP to the TLS port" in warned[0] and "does not trust" in warned[1]
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=tls.client_context(pki["ca"]),
                                    timeout=10) as r:
            text = r.read().decode()
        assert 'csm_tls_handshakes_total{result="ok"} 2' in text  # (this request's own handshake too)
        assert 'csm_tls_handshakes_total{result="failed",reason="HTTP_REQUEST"} 2' in text
        assert 'csm_tls_handshakes_total{result="failed",reason="TLSV1_ALERT_UNKNOWN_CA"} 1' in text
        assert 'csm_tls_handshakes_total{result="dropped"} 1' in text
    finally:
        rs.stop()
        mp.undo()


def test_failure_reasons_past_the_cap_count_as_other():
    hs = tls.Handshakes()
    for i in range(tls.MAX_REASONS + 3):
        e = ssl.SSLError(1, "handshake failure")
        e.reason = f"REASON_{i}"
        hs.fail(e)
    hs.fail(ssl.SSLError(1, "no reason given"))  # (OpenSSL always names one; the class name stands in)
    assert len(hs.failed) == tls.MAX_REASONS + 1 and hs.failed["other"] == 4
    assert hs.failed["REASON_0"] == 1 and "REASON_16" not in hs.failed
