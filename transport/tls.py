"""TLS for `serve --tls-cert/--tls-key` (wss:// and https:// on the server's own ports, e.g. for
a Telnyx stream_url, a wss:// one, with no proxy in front) and for clients of a server whose certificate a private CA
signed (`say --cafile`). Each file problem is a ValueError naming the file and what is wanted,
raised before anything starts: never a prompt for a key's passphrase, never a traceback."""

from __future__ import annotations

import os
import ssl

HANDSHAKE_TIMEOUT_S = 10.0  # a client that opens TCP and never finishes its TLS handshake is dropped then


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
