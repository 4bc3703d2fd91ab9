"""Who may connect: bearer-token auth, browser Origin checks and per-address connection limits,
decided at the HTTP handshake (before any WebSocket work).

- With a token configured, every endpoint but /healthz and /livez needs `Authorization: Bearer TOKEN`
  (the ElevenLabs-compatible path also takes ElevenLabs' `xi-api-key: TOKEN` header); Telnyx
  endpoints keep their own x-telnyx-streaming-auth-token check. Compared in constant time.
  A browser's WebSocket cannot set headers, so a WebSocket handshake may carry the token as the
  subprotocol after "bearer" instead: `new WebSocket(url, ["bearer", TOKEN])` (Sec-WebSocket-Protocol;
  the server answers "bearer" and never echoes the token). The token must then be made of the
  characters a subprotocol allows (letters, digits, `-._~` and a few more, as `openssl rand -hex` gives).
  ElevenLabs' WebSocket paths also take it, as ElevenLabs does, in the first message's `xi_api_key`
  (or `authorization: "Bearer TOKEN"`) when the handshake offers none: the connection waits at
  most AUTH_WAIT_S for that message, and closes it (1008) if it does not carry the token.
- With allowed origins configured, a request carrying an Origin header (browsers always send one)
  must match one of them; the HTTP port's answers to those origins carry CORS headers (and it
  answers their preflight OPTIONS, which browsers send without credentials), so a page there can
  read them. With none configured, no other origin's page can.
- At most `max_connections_per_ip` open connections (WebSocket, or HTTP on the HTTP port) per
  client address (behind a trusted proxy, the address its X-Forwarded-For names: proxies.py).
"""

from __future__ import annotations

import hmac
import time
from collections import Counter, deque

OPEN_PATHS = ("/healthz", "/livez")
AUTH_WAIT_S = 10.0  # an ElevenLabs socket that offered no credential must send its first message within this
# the response headers a page may read besides the simple ones (http_speech.stream_head's, Retry-After)
EXPOSED = "X-Request-Id, X-Audio-Format, X-Sample-Rate, request-id, Retry-After"


class PerMinute:
    """At most `limit` events in any 60 seconds (a sliding window of their times)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.times: deque[float] = deque()

    def allow(self) -> bool:
        """Count one more event now if the window has room; False (not counted) if not."""
        now = time.monotonic()
        while self.times and now - self.times[0] > 60:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


BEARER_SUBPROTOCOL = "bearer"


def token_ok(headers, token: str) -> bool:
    """The request carries `token` as `Authorization: Bearer` (or ElevenLabs' `xi-api-key`, or a
    browser's subprotocols "bearer", TOKEN); compared in constant time."""
    return _same(offered_token(headers), token)


def offers_credential(headers) -> bool:
    """The handshake offers a token in any of the ways token_ok reads (right or wrong)."""
    return offered_token(headers) is not None


def offered_token(headers) -> str | None:
    """The token a request offers: `Authorization: Bearer`, else `xi-api-key`, else a subprotocol."""
    bearer = _bearer(headers.get("Authorization"))
    if bearer is not None:
        return bearer
    return headers.get("xi-api-key") or subprotocol_token(headers)


def message_token_ok(msg: dict, token: str) -> bool:
    """A first message's ElevenLabs credential (`xi_api_key`, or `authorization`: "Bearer TOKEN")
    is `token`; compared in constant time."""
    got = msg.get("xi_api_key")
    return _same(got if isinstance(got, str) and got else _bearer(msg.get("authorization")), token)


def _bearer(value) -> str | None:
    return value[7:].strip() if isinstance(value, str) and value.startswith("Bearer ") else None


def _same(got: str | None, token: str) -> bool:
    return got is not None and hmac.compare_digest(got.encode(), token.encode())


def subprotocol_token(headers) -> str | None:
    """The entry after "bearer" in a handshake's Sec-WebSocket-Protocol list(s), if any."""
    values = headers.get_all("Sec-WebSocket-Protocol") if hasattr(headers, "get_all") else \
        [headers.get("Sec-WebSocket-Protocol") or ""]
    offered = [p.strip() for v in values for p in v.split(",") if p.strip()]
    if BEARER_SUBPROTOCOL in offered[:-1]:
        return offered[offered.index(BEARER_SUBPROTOCOL) + 1]
    return None


def select_subprotocol(connection, offered) -> str | None:
    """websockets' hook: answer "bearer" to a browser that sent its token that way (a browser
    fails a handshake whose answer names none of the subprotocols it offered); else none."""
    return BEARER_SUBPROTOCOL if BEARER_SUBPROTOCOL in offered else None


class Gate:
    def __init__(self, token: str | None = None, allowed_origins: list[str] | None = None,
                 max_connections_per_ip: int = 64, own_auth_paths: tuple[str, ...] = ()) -> None:
        self.token = token or None
        self.allowed_origins = {o.rstrip("/") for o in allowed_origins} if allowed_origins else None
        self.max_per_ip = max_connections_per_ip
        self.own_auth_paths = tuple(own_auth_paths)
        self.open: Counter[str] = Counter()

    def check(self, path: str, headers, ip: str | None, websocket: bool,
              first_message_auth: bool = False) -> tuple[int, str] | None:
        """None to let the request through, else (HTTP status, message). first_message_auth: a
        handshake that offers no credential at all goes through, its first message to carry one
        (ElevenLabs' xi_api_key / authorization fields: the connection checks them, auth_pending)."""
        if path in OPEN_PATHS:
            return None
        deferred = first_message_auth and not offers_credential(headers)
        if self.token and path not in self.own_auth_paths and not deferred and not token_ok(headers, self.token):
            return 401, "missing or wrong credentials: send 'Authorization: Bearer <token>'\n"
        origin = headers.get("Origin")
        if self.allowed_origins is not None and origin is not None and origin.rstrip("/") not in self.allowed_origins:
            return 403, f"origin {origin!r} is not allowed\n"
        if websocket and self.full(ip):
            return 429, f"too many connections from {ip}: at most {self.max_per_ip} at once\n"
        return None

    def cors(self, origin: str | None) -> dict[str, str]:
        """The CORS headers of an HTTP response to a browser page at `origin`: only for the origins
        --allowed-origins lists (with none listed, no page elsewhere may read the answers)."""
        if origin is None or self.allowed_origins is None or origin.rstrip("/") not in self.allowed_origins:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": EXPOSED}

    def full(self, ip: str | None) -> bool:
        """This address already holds its most connections."""
        return ip is not None and self.open[ip] >= self.max_per_ip

    def opened(self, ip: str | None) -> None:
        if ip is not None:
            self.open[ip] += 1

    def closed(self, ip: str | None) -> None:
        if ip is not None:
            self.open[ip] -= 1
            if self.open[ip] <= 0:
                del self.open[ip]
