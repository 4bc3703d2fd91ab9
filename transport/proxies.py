"""Client addresses behind a reverse proxy (serve --trusted-proxies).

Behind a load balancer (deploy/nginx.conf, a Kubernetes ingress) every connection comes from the
proxy, so what the server keys by client address -- at most --max-connections-per-ip sockets, the
HTTP port's --max-requests-per-minute, what each client was answered (ElevenLabs' previous_text and
request stitching, spoken.py), the address in log lines -- would lump every caller into one. The
proxy names the client in `X-Forwarded-For` (nginx: `$proxy_add_x_forwarded_for`, which appends the
address it saw to what the client sent). That header is believed only from the proxies listed:

- a connection from any other address is its own client, whatever headers it sends (a client
  cannot pick its address to get round the limits);
- from a trusted proxy, the client is the first address from the right of X-Forwarded-For that is
  not itself a trusted proxy (the left part is the client's own say, which anyone can write); all
  of them trusted: the leftmost; no header: the proxy itself.

Sans I/O: addresses and header values in, an address out.
"""

from __future__ import annotations

import ipaddress

MAX_HOP_CHARS = 64  # a hop that is not an address is kept as a name this long at most
EXAMPLE = "127.0.0.1,10.0.0.0/8,::1"


class TrustedProxies:
    """The addresses whose X-Forwarded-For is believed: single addresses or networks, IPv4 or IPv6."""

    def __init__(self, spec: str | list[str] | None = None) -> None:
        """spec: "ADDR[/BITS],ADDR[/BITS],..." or a list of such; None or "" trusts none.
        ValueError naming the entry that is not an address or a network."""
        items = spec.split(",") if isinstance(spec, str) else list(spec or [])
        self.networks = []
        for item in (i.strip() for i in items):
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"trusted proxy {item[:60]!r} is not an IP address or network; give addresses or "
                                 f"CIDR networks separated by commas, e.g. {EXAMPLE}") from None

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({','.join(map(str, self.networks))!r})"

    def trusts(self, address: str | None) -> bool:
        return self._trusted(_parse(address) if address else None)

    def _trusted(self, ip) -> bool:
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def client(self, peer: str | None, headers) -> str | None:
        """The client's address for a connection from `peer` carrying these request headers (any
        mapping with .get; websockets' Headers with repeated fields too)."""
        if not self.trusts(peer):
            return peer
        hops = [h.strip() for value in _values(headers, "X-Forwarded-For") for h in value.split(",")]
        hops = [(h, _parse(h)) for h in hops if h]
        for hop, ip in reversed(hops):
            if not self._trusted(ip):
                return _address(hop, ip)
        return _address(*hops[0]) if hops else peer


def _values(headers, name: str) -> list[str]:
    get_all = getattr(headers, "get_all", None)  # (websockets' Headers: every line of a repeated field)
    if get_all is not None:
        return [v for v in get_all(name) if isinstance(v, str)]
    value = headers.get(name)
    return [value] if isinstance(value, str) else []


def _address(hop: str, ip) -> str:
    """A hop (and its _parse) as an address ("[::1]:80" and "1.2.3.4:80" lose the port); one that is
    not an address is kept as it is (at most MAX_HOP_CHARS): what the trusted proxy said the client was."""
    return str(ip) if ip is not None else hop[:MAX_HOP_CHARS]


def _parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    candidates = [text]
    if text.startswith("[") and "]" in text:
        candidates.append(text[1:text.index("]")])
    elif text.count(":") == 1:
        candidates.append(text.split(":", 1)[0])
    for c in candidates:
        try:
            ip = ipaddress.ip_address(c)
        except ValueError:
            continue
        mapped = getattr(ip, "ipv4_mapped", None)  # (a dual-stack socket's view of an IPv4 peer)
        return mapped if mapped is not None else ip
    return None
