"""TLS for `serve --tls-cert/--tls-key` (wss:// and https:// on the server's own ports, e.g. for
a Telnyx stream_url, a wss:// one, with no proxy in front) and for clients of a server whose certificate a private CA
signed (`say --cafile`). Each file problem is a ValueError naming the file and what is wanted,
raised before anything starts: never a prompt for a key's passphrase, never a traceback.

A handshake that fails never reaches the server's code (asyncio and uvloop drop it unless the loop
is in debug mode), so `count_handshakes` counts them on the context itself: how each ended (ok,
failed with OpenSSL's reason, or dropped: the client left or timed out first), on /metrics, and
the first failure of each reason logged with what it usually means (a client that does not trust
the certificate, plain HTTP to the TLS port, a TLS version too old)."""

from __future__ import annotations

import calendar
import logging
import os
import re
import ssl
import time
from collections import Counter

HANDSHAKE_TIMEOUT_S = 10.0  # a client that opens TCP and never finishes its TLS handshake is dropped then
WARN_DAYS = 14  # serve warns when its certificate expires sooner than this
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----")
MAX_REASONS = 16  # distinct failure reasons on /metrics; later new ones count as "other"
log = logging.getLogger("csmstream.tls")

_UNTRUSTED = ("the client does not trust this certificate: serve the whole chain (the server's certificate, "
              "then its intermediates, in --tls-cert) from a CA the client trusts, for the name it connects to")
HINTS = {  # OpenSSL's reason -> what it usually means here
    "HTTP_REQUEST": "a client spoke plain HTTP to the TLS port: it should use https:// or wss://",
    "WRONG_VERSION_NUMBER": "a client spoke something other than TLS to the TLS port (plain ws://?)",
    "UNSUPPORTED_PROTOCOL": "a client offered only TLS older than 1.2, which this server refuses",
    "NO_SHARED_CIPHER": "a client offered no cipher this server accepts",
    "TLSV1_ALERT_UNKNOWN_CA": _UNTRUSTED,
    "SSLV3_ALERT_BAD_CERTIFICATE": _UNTRUSTED,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": _UNTRUSTED,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says the certificate has expired: renew it, then SIGHUP",
}


class Handshakes:
    """How the TLS handshakes on one server context ended: ok, failed (by OpenSSL's reason, at most
    MAX_REASONS of them, then "other") and dropped (the client closed, or the handshake timeout
    struck, before either). ok and failed are counted on the event loop's thread, where handshakes
    run; dropped when the connection's SSL object is freed (at once, or at the next GC pass when a
    reference cycle holds it), on whichever thread frees it."""

    def __init__(self) -> None:
        self.ok = 0
        self.dropped = 0
        self.failed: Counter[str] = Counter()

    def fail(self, e: ssl.SSLError) -> None:
        reason = str(getattr(e, "reason", None) or type(e).__name__)
        first = reason not in self.failed
        if first and len(self.failed) >= MAX_REASONS:
            reason, first = "other", "other" not in self.failed
        self.failed[reason] += 1
        hint = HINTS.get(reason, "")
        (log.warning if first else log.debug)(
            "a TLS handshake failed: %s%s%s", reason, f" ({hint})" if hint else "",
            "; later ones of this kind are counted on /metrics (csm_tls_handshakes_total), logged with -v" if first
            else "")

    def lines(self) -> list[str]:
        """Prometheus text lines."""
        out = ["# HELP csm_tls_handshakes_total TLS handshakes on the server's ports by how they ended: ok, failed "
               "(reason: OpenSSL's) or dropped (the client left or timed out first)",
               "# TYPE csm_tls_handshakes_total counter",
               f'csm_tls_handshakes_total{{result="ok"}} {self.ok}',
               f'csm_tls_handshakes_total{{result="dropped"}} {self.dropped}']
        out += [f'csm_tls_handshakes_total{{result="failed",reason="{r}"}} {n}' for r, n in sorted(self.failed.items())]
        return out


class _Counted(ssl.SSLObject):
    """The SSL object a counted context's connections get (SSLContext.sslobject_class): its first
    handshake step counts it started, its end says how it went; one that is let go before either
    (EOF, a reset, the handshake timeout) counts as dropped."""

    handshakes: Handshakes  # set on the per-context subclass

    def do_handshake(self) -> None:
        self.__dict__.setdefault("_csm_state", "started")
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            if self._csm_state == "started":
                self._csm_state = "failed"
                self.handshakes.fail(e)
            raise
        if self._csm_state == "started":
            self._csm_state = "ok"
            self.handshakes.ok += 1

    def __del__(self) -> None:
        if self.__dict__.get("_csm_state") == "started":
            self.handshakes.dropped += 1


def count_handshakes(ctx: ssl.SSLContext) -> Handshakes:
    """Count how `ctx`'s server-side handshakes end (sets ctx.sslobject_class; asyncio and uvloop
    both create their connections' SSL objects through it). The same Handshakes again for a context
    counted already."""
    cls = ctx.sslobject_class
    if isinstance(getattr(cls, "handshakes", None), Handshakes):
        return cls.handshakes
    counted = type("CountedSSLObject", (_Counted,), {"handshakes": Handshakes()})
    ctx.sslobject_class = counted
    return counted.handshakes


def _file(flag: str, path: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{flag} needs a file path, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {str(path)!r}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{flag} {str(path)!r}: not readable by this process")
    return str(path)


def _no_passphrase() -> str:
    raise ValueError("the key is encrypted; give an unencrypted PEM key (openssl pkey -in KEY -out PLAIN)")


def server_context(cert: str, key: str | None = None) -> ssl.SSLContext:
    """A server's TLS context (TLS 1.2 or newer) from a PEM certificate chain (the server's own
    certificate first, then any intermediates) and its PEM private key (`key`; None: the key is
    in the certificate file)."""
    cert = _file("--tls-cert", cert)
    if key is not None:
        key = _file("--tls-key", key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ValueError as e:
        raise ValueError(f"--tls-key {key or cert!r}: {e}") from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            why = "the key does not belong to the certificate"
        else:
            why = (f"not a PEM certificate chain with its PEM private key ({e.reason or e}): give the certificate "
                   "in --tls-cert and its key in --tls-key, or both in the --tls-cert file")
        raise ValueError(f"cannot use --tls-cert {cert!r}{f' with --tls-key {key!r}' if key else ''}: {why}") from None
    return ctx


def reload(ctx: ssl.SSLContext, cert: str, key: str | None = None) -> None:
    """Load the certificate and key again into the live `ctx` (serve's SIGHUP: a renewed
    certificate, no restart). They are checked on a fresh context first: on a ValueError the
    live one is left as it was. Connections already open keep their session; new handshakes get
    the new certificate."""
    server_context(cert, key)
    ctx.load_cert_chain(cert, key, password=_no_passphrase)


def server_options(ctx: ssl.SSLContext | None) -> dict:
    """The listening socket's keywords (asyncio, websockets' serve) for a server context, or plain
    TCP: a client that never finishes its handshake is dropped after HANDSHAKE_TIMEOUT_S."""
    return {"ssl": ctx, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT_S} if ctx is not None else {}


def connect_options(url: str, ctx: ssl.SSLContext | None) -> dict:
    """websockets' connect() keyword for `ctx` (a client context), or none: for a ws:// URL, or
    when the system's trust store will do."""
    return {"ssl": ctx} if ctx is not None and url.startswith("wss:") else {}


def client_context(cafile: str) -> ssl.SSLContext:
    """A client's TLS context that trusts the certificates in `cafile` (PEM), as well as the
    system's: for a server whose certificate a private CA signed."""
    cafile = _file("--cafile", cafile)
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=cafile)
    except ssl.SSLError as e:
        raise ValueError(f"--cafile {cafile!r}: no PEM certificate in it ({e.reason or e})") from None
    return ctx


def not_after(cert: str) -> float:
    """When the first certificate of a PEM file (the server's own, in a chain) expires, as a Unix
    time: read from its DER (Certificate > TBSCertificate > Validity > notAfter), so no X.509
    library is needed. ValueError when the file holds no certificate this can read."""
    with open(cert, encoding="ascii", errors="replace") as f:
        m = _PEM.search(f.read())
    if m is None:
        raise ValueError(f"{cert!r}: no PEM certificate in it")
    der = ssl.PEM_cert_to_DER_cert(m.group(0))
    try:
        _, i, _ = _tlv(der, 0)  # Certificate
        tag, i, _ = _tlv(der, i)  # TBSCertificate
        tag, j, n = _tlv(der, i)
        if tag == 0xA0:  # [0] version, then the serial number
            tag, j, n = _tlv(der, j + n)
        for _ in range(3):  # serial number, signature algorithm, issuer
            j += n
            tag, j, n = _tlv(der, j)
        if tag != 0x30:
            raise ValueError("no validity")
        tag, j, n = _tlv(der, j)  # notBefore
        tag, j, n = _tlv(der, j + n)  # notAfter
        stamp = der[j:j + n].decode("ascii")
    except (IndexError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{cert!r}: cannot read its certificate's expiry ({e})") from None
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 1950-2049
        year = int(stamp[:2])
        stamp = f"{1900 + year if year >= 50 else 2000 + year}{stamp[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"{cert!r}: its notAfter is not a time (tag {tag:#x})")
    return float(calendar.timegm(time.strptime(stamp.rstrip("Z")[:14], "%Y%m%d%H%M%S")))


def _tlv(der: bytes, i: int) -> tuple[int, int, int]:
    """The DER element at i: (tag, where its content starts, its length)."""
    tag, n = der[i], der[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(der[i:i + k], "big")
        i += k
    return tag, i, n


def expiry_note(cert: str, now: float | None = None) -> tuple[float, str, bool]:
    """(notAfter, a line for the log, whether to warn: it expires within WARN_DAYS or has)."""
    end = not_after(cert)
    days = (end - (time.time() if now is None else now)) / 86400
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))
    if days < 0:
        return end, f"the TLS certificate in {cert} EXPIRED on {when}: clients will refuse it", True
    return end, f"the TLS certificate in {cert} is valid until {when} ({days:.0f} days)", days < WARN_DAYS
