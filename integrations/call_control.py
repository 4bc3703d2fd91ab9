"""Telnyx Call Control: start media streaming on a call (PROTOCOLS.md §1).

    await start_streaming(call_control_id, "wss://host/telnyx", codec="PCMU", auth_token=secret)

The API key comes from TELNYX_API_KEY unless passed. HTTP errors become typed exceptions that
carry Telnyx's own error codes and messages.
"""

from __future__ import annotations

import os
from urllib.parse import quote

import httpx

API_BASE = "https://api.telnyx.com/v2"
CODECS = ("PCMU", "PCMA", "G722", "OPUS", "AMR-WB", "L16")
RATES = (8000, 16000, 22050, 24000, 48000)
WIDEBAND = ("G722", "L16", "AMR-WB")  # 16 kHz unless told otherwise; the rest 8 kHz
TRACKS = ("inbound_track", "outbound_track", "both_tracks")


class TelnyxAPIError(Exception):
    def __init__(self, status: int, errors: list[dict], message: str) -> None:
        super().__init__(message)
        self.status, self.errors = status, errors
        self.codes = [str(e.get("code")) for e in errors]


class TelnyxAuthError(TelnyxAPIError):
    """401/403: the API key is missing, wrong or not allowed."""


class TelnyxValidationError(TelnyxAPIError):
    """422: Telnyx rejected the request (e.g. 90045: streaming not possible in the call's state)."""


def streaming_body(stream_url: str, codec: str = "PCMU", *, track: str = "inbound_track",
                   sampling_rate: int | None = None, target_legs: str = "opposite", auth_token: str | None = None,
                   client_state: str | None = None) -> dict:
    if not isinstance(stream_url, str) or not stream_url.startswith(("ws://", "wss://")):
        raise ValueError(f"stream_url must be a ws:// or wss:// URL, got {stream_url!r}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)} (case-sensitive), got {codec!r}")
    if sampling_rate is None:
        sampling_rate = 16000 if codec in WIDEBAND else 8000
    if sampling_rate not in RATES:
        raise ValueError(f"sampling_rate must be one of {RATES}, got {sampling_rate!r}")
    if track not in TRACKS:
        raise ValueError(f"track must be one of {', '.join(TRACKS)}, got {track!r}")
    body = {"stream_url": stream_url, "stream_track": track, "stream_bidirectional_mode": "rtp",
            "stream_bidirectional_codec": codec, "stream_bidirectional_sampling_rate": sampling_rate,
            "stream_bidirectional_target_legs": target_legs}
    if auth_token is not None:
        if len(auth_token) > 4000:
            raise ValueError("auth_token must be at most 4000 characters")
        body["stream_auth_token"] = auth_token
    if client_state is not None:
        body["client_state"] = client_state
    return body


async def start_streaming(call_control_id: str, stream_url: str, codec: str = "PCMU", *, api_key: str | None = None,
                          base_url: str = API_BASE, timeout: float = 10.0, client: httpx.AsyncClient | None = None,
                          **options) -> dict:
    """POST actions/streaming_start; returns Telnyx's `data`. options: track, sampling_rate,
    target_legs, auth_token, client_state."""
    key = api_key or os.environ.get("TELNYX_API_KEY")
    if not key:
        raise ValueError("no Telnyx API key: set TELNYX_API_KEY or pass api_key=")
    if not call_control_id or not isinstance(call_control_id, str):
        raise ValueError(f"call_control_id must be a non-empty string, got {call_control_id!r}")
    body = streaming_body(stream_url, codec, **options)
    # (quoted: an id is one path segment; a "/" or "?" in it must not reach another endpoint)
    url = f"{base_url.rstrip('/')}/calls/{quote(call_control_id, safe=':')}/actions/streaming_start"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": "application/json"}
    own = client is None
    client = client or httpx.AsyncClient(timeout=timeout)
    try:
        resp = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as e:
        raise TelnyxAPIError(0, [], f"cannot reach Telnyx at {base_url}: {e}") from e
    finally:
        if own:
            await client.aclose()
    try:  # Telnyx answers JSON; a proxy in between may not (an HTML 502, an empty 200)
        payload = resp.json() if resp.content else None
    except ValueError:
        payload = None
    if resp.is_success:  # streaming has started, whatever the body says
        data = payload.get("data") if isinstance(payload, dict) else None
        return data if isinstance(data, dict) else {}
    errors = payload.get("errors") if isinstance(payload, dict) else None
    errors = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    detail = "; ".join(f"{e.get('code')} {e.get('title')}: {e.get('detail')}" for e in errors) or resp.text[:200]
    cls = {401: TelnyxAuthError, 403: TelnyxAuthError, 422: TelnyxValidationError}.get(resp.status_code, TelnyxAPIError)
    raise cls(resp.status_code, errors, f"Telnyx streaming_start failed ({resp.status_code}): {detail}")
