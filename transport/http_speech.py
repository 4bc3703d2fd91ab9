"""The OpenAI-compatible speech endpoint over plain HTTP/1.1, sans I/O: parse a request head and
an OpenAI `POST /v1/audio/speech` body, build the streamed response (chunked transfer encoding).

A client that speaks OpenAI's speech API (its SDKs, or curl) switches to csm-stream by changing
the base URL; the audio streams back as it is generated instead of arriving all at the end:

    POST /v1/audio/speech  {"model": "csm-1b", "input": "Hello!", "voice": "0",
                            "response_format": "pcm", "stream_format": "audio" | "sse"}

- `input`: the text (required). `model` is accepted and ignored (one model per server).
- `voice`: a named voice (serve --voices), an alias of one (serve --voice-alias alloy=ada) or a
  speaker number ("0", "1", or an integer); other names, OpenAI's own (alloy, ...) among them, are
  refused with the list of what exists; none (or null) is the server's --default-voice, if any.
- `response_format`: `wav` (default; 24 kHz 16-bit mono, streamed with open-ended sizes), `pcm`
  (raw 24 kHz 16-bit little-endian, as OpenAI's pcm), `mp3` (24 kHz mono, 48 kbps), `opus` (Ogg
  Opus, 32 kbps), `aac` (ADTS, 64 kbps), `flac` (lossless), or any /ws/generate format
  (`pcm_16000`, `ulaw_8000`, ...) or ElevenLabs mp3/opus name (`mp3_44100_128`, `opus_48000_64`):
  every format OpenAI names.
- `stream_format`: `audio` (default: the bytes themselves) or `sse` (server-sent events
  `speech.audio.delta` with base64 audio, then `speech.audio.done`; an `error` event on failure).
- `speed`: 0.25 to 4 (default 1), as OpenAI's: the audio is played faster or slower with its pitch
  kept (kernels/stretch.py; CSM itself speaks at one rate). `instructions` must be empty: CSM
  takes no style prompt.
- csm-stream's own fields pass through: speaker_id, temperature, topk, seed, max_audio_ms,
  chunk_ms, request_id and context (the client's own earlier turns with their audio, as on
  /ws/generate: encoded before the response starts, a 400 `invalid_context` if refused), all
  checked exactly as there; and `previous_text`, as ElevenLabs' REST has it (below): a request
  that sends it ("" on a first one) is remembered, and the sentences of it found among this
  client's remembered ones are its context (one voice across requests: `say` of a long text to
  this port sends it).
Errors are JSON in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

ElevenLabs' REST speech is parsed here too (`parse_elevenlabs`): POST
/v1/text-to-speech/{voice_id}[/stream]?output_format=... with {"text", "seed", ...}, streamed the
same way as raw audio (mp3_44100_128, ElevenLabs' default, included), its request named in a
`request-id` header for ElevenLabs' request stitching (`previous_request_ids`, spoken.py); the
`/with-timestamps` variants return JSON with the audio in base64 and the (estimated) character
alignment: one object for the whole reply, or with `/stream/with-timestamps` one object per line
per chunk.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote

from . import protocol

SPEECH_PATH = "/v1/audio/speech"
ELEVENLABS_PATH = re.compile(r"^/v1/text-to-speech/([^/]+)(/stream)?(/with-timestamps)?$")  # ElevenLabs' REST
ELEVENLABS_DEFAULT_FORMAT = "mp3_44100_128"
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1 << 20
MAX_HEADERS = 100
DEFAULT_RESPONSE_FORMAT = "wav"
RESPONSE_FORMATS = {"wav": "pcm_24000", "pcm": "pcm_24000", "mp3": "mp3_24000_48", "opus": "opus_48000_32",
                    "aac": "aac_24000_64", "flac": "flac_24000", **{f: f for f in protocol.ALL_FORMATS}}
MAX_PREVIOUS_REQUESTS = 3  # ElevenLabs' limit on previous_request_ids
PASSED_THROUGH = ("speaker_id", "temperature", "topk", "seed", "max_audio_ms", "chunk_ms", "request_id", "context",
                  "speed")
REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}
# engine errors and server bugs; others are the client's (400)
STATUS_OF = {"busy": 503, "unavailable": 503, "generation_failed": 500, "internal_error": 500}
HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_DIGITS = re.compile(r"[0-9]+")  # (str.isdigit() also takes '²', which int() refuses)


class HttpError(Exception):
    """A request this endpoint refuses: HTTP status, a stable code, and what is allowed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Headers(dict):
    """Header name (any case) -> value; a repeated header keeps its last value."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def __contains__(self, name) -> bool:
        return super().__contains__(name.lower())


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str
    version: str
    headers: Headers
    content_length: int

    @property
    def keep_alive(self) -> bool:
        conn = (self.headers.get("Connection") or "").lower()
        return "keep-alive" in conn if self.version == "HTTP/1.0" else "close" not in conn


def parse_head(raw: bytes) -> HttpRequest:
    """The bytes before the blank line that ends a request head -> HttpRequest, or HttpError."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1].startswith(b"/"):
        raise HttpError(400, "invalid_http", f"malformed request line {lines[0][:80]!r}; expected e.g. "
                        "'POST /v1/audio/speech HTTP/1.1'")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, "http_version", f"{version[:20]!r} is not supported; use HTTP/1.1 (or 1.0)")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too_many_headers", f"at most {MAX_HEADERS} header lines are accepted")
    headers = Headers()
    lengths = set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "invalid_http", f"malformed header line {line[:60]!r}")
        key, val = name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")
        if key == "content-length":
            lengths.add(val)
        headers[key] = val
    if "transfer-encoding" in headers:
        raise HttpError(411, "length_required", "request bodies must come with Content-Length "
                        "(chunked request bodies are not accepted)")
    if len(lengths) > 1 or (lengths and not _DIGITS.fullmatch(next(iter(lengths)))):
        raise HttpError(400, "invalid_http", f"invalid Content-Length {sorted(lengths)!r:.80}")
    digits = next(iter(lengths), "0")
    if len(digits) > 18 or int(digits) > MAX_BODY_BYTES:  # (int() refuses past 4,300 digits)
        size = digits if len(digits) <= 18 else f"a {len(digits)}-digit number of"
        raise HttpError(413, "body_too_large", f"the body is {size} bytes; at most {MAX_BODY_BYTES} are accepted")
    n = int(digits)
    path, _, query = target.partition("?")
    return HttpRequest(method.upper(), path, query, version, headers, n)


@dataclass
class Speech:
    """A checked speech request: the /ws/generate request it maps to, and how to send it back."""

    gen: protocol.Generate
    wav: bool  # wrap the PCM in a WAV header
    sse: bool  # server-sent events instead of raw bytes
    timestamps: str | None = None  # ElevenLabs' with-timestamps: "json" (one object) or "lines" (one a chunk)
    continues: bool = False  # the route continues earlier requests: remember its codes (ElevenLabs' REST)
    previous_text: str | None = None  # what came before, to find as context among them
    previous_request_ids: list[str] | None = None  # ElevenLabs' request stitching: the requests before it
    elevenlabs: bool = False  # ElevenLabs' route: its response names the request in a `request-id` header


def parse_speech(body: bytes, *, voices, max_text_chars: int = protocol.DEFAULT_MAX_TEXT_CHARS,
                 topk_max: int = 2048, default_voice: str | None = None) -> Speech:
    """An OpenAI speech request body -> Speech, or HttpError (400) saying what is wrong. A body
    with no "voice" gets `default_voice` (a name in `voices`; None: no voice prompt)."""
    def bad(code: str, message: str) -> HttpError:
        return HttpError(400, code, message)

    msg = _json_object(body, '{"model": "csm-1b", "input": "Hello!", "voice": "0"}')
    text = msg.get("input")
    if not isinstance(text, str) or not text.strip():
        raise bad("invalid_input", f'"input" must be a non-empty string (the text to speak), got {text!r:.40}')
    model = msg.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("invalid_model", f'"model" must be a string (it is ignored: one model per server), got {model!r:.40}')
    fmt = msg.get("response_format", DEFAULT_RESPONSE_FORMAT)
    fmt = DEFAULT_RESPONSE_FORMAT if fmt is None else fmt
    if not isinstance(fmt, str) or fmt not in RESPONSE_FORMATS:
        raise bad("invalid_format", f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {fmt!r:.40}")
    stream = msg.get("stream_format")
    stream = "audio" if stream is None else stream
    if stream not in ("audio", "sse"):
        raise bad("invalid_stream_format", f'stream_format must be "audio" or "sse", got {stream!r:.40}')
    if msg.get("instructions") not in (None, ""):
        raise bad("unsupported_instructions", "instructions are not available: CSM takes no style prompt; use a "
                  "named voice, or earlier turns over /ws/generate, to steer it")
    previous = _previous_text(msg)
    req = {k: msg[k] for k in PASSED_THROUGH if k in msg}
    req.update(text=text, format=RESPONSE_FORMATS[fmt])
    voice = msg.get("voice")
    _voice(req, default_voice if voice is None else voice, voices, "OpenAI's")
    return Speech(_generate(req, max_text_chars, topk_max), wav=fmt == "wav", sse=stream == "sse",
                  continues=previous is not None, previous_text=previous)


def parse_elevenlabs(path: str, query: str, body: bytes, *, voices,
                     max_text_chars: int = protocol.DEFAULT_MAX_TEXT_CHARS, topk_max: int = 2048) -> Speech:
    """ElevenLabs' REST text-to-speech, `POST /v1/text-to-speech/{voice_id}[/stream][/with-timestamps]
    ?output_format=` with {"text", "seed", ...} -> Speech (streamed either way), or HttpError (400).
    previous_text gets the codes of its last sentences as context when this server generated them
    for this client and voice (spoken.py); voice_settings.speed is the speaking rate (0.25-4); model_id,
    the rest of voice_settings and ElevenLabs' other settings are accepted and ignored."""
    route = ELEVENLABS_PATH.match(path)
    voice_id = unquote(route.group(1))
    timestamps = None if route.group(3) is None else "lines" if route.group(2) else "json"
    msg = _json_object(body, '{"text": "Hello!", "model_id": "csm-1b"}')
    text = msg.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HttpError(400, "invalid_input",
                        f'"text" must be a non-empty string (the text to speak), got {text!r:.40}')
    fmt = parse_qs(query).get("output_format", [ELEVENLABS_DEFAULT_FORMAT])[-1]
    if fmt not in protocol.ALL_FORMATS:
        raise HttpError(400, "unsupported_format", f"output_format {fmt!r:.40} is not available here; use one "
                        f"of {', '.join(protocol.ALL_FORMATS)}")
    previous, ids = _previous_text(msg), _previous_request_ids(msg)
    req = {"text": text, "format": fmt}
    if msg.get("seed") is not None:
        req["seed"] = msg["seed"]
    if (speed := protocol.voice_settings_speed(msg, lambda code, why: HttpError(400, code, why))) is not None:
        req["speed"] = speed
    _voice(req, voice_id, voices, "ElevenLabs'")
    return Speech(_generate(req, max_text_chars, topk_max), wav=False, sse=False, timestamps=timestamps,
                  continues=True, previous_text=previous, previous_request_ids=ids, elevenlabs=True)


def _json_object(body: bytes, example: str) -> dict:
    """The body as a JSON object, or HttpError (400) with an example of one."""
    try:
        msg = protocol.decode_json(body)
    except ValueError as e:
        raise HttpError(400, "invalid_json", f"the body is not valid JSON ({e}); send e.g. {example}") from None
    if not isinstance(msg, dict):
        raise HttpError(400, "invalid_message", f"the body must be a JSON object, got {type(msg).__name__}")
    return msg


def _previous_text(msg: dict) -> str | None:
    """The body's previous_text (the text spoken before this request), or None; HttpError (400)
    when it is not a string."""
    previous = msg.get("previous_text")
    if previous is not None and not isinstance(previous, str):
        raise HttpError(400, "invalid_previous_text", f'"previous_text" must be a string (the text spoken before '
                        f"this request), got {type(previous).__name__}")
    return previous


def _previous_request_ids(msg: dict) -> list[str] | None:
    """ElevenLabs' previous_request_ids: at most MAX_PREVIOUS_REQUESTS request ids (the `request-id`
    headers of earlier responses), oldest first; None when absent; HttpError (400) when malformed."""
    ids = msg.get("previous_request_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) > MAX_PREVIOUS_REQUESTS or not all(map(protocol.is_request_id, ids)):
        raise HttpError(400, "invalid_previous_request_ids", f'"previous_request_ids" must be a list of at most '
                        f"{MAX_PREVIOUS_REQUESTS} request ids (strings of 1-{protocol.MAX_REQUEST_ID_CHARS} "
                        f"printable characters: the request-id headers of earlier responses), got {ids!r:.60}")
    return ids


def header_request_id(headers) -> str | None:
    """An `X-Request-Id` request header (a proxy's: nginx's $request_id, an ingress's), as the id of
    a request whose body names none, so the server's log lines and the response carry the id the
    proxy logged; None when absent or not a valid request id (the server then makes one)."""
    rid = headers.get("X-Request-Id")
    return rid if protocol.is_request_id(rid) else None


def _voice(req: dict, voice, voices, whose: str) -> None:
    """A named voice, or a speaker number ("0", 1), into the request; HttpError if neither."""
    if isinstance(voice, str) and voice in voices:
        req["voice"] = voices[voice].name  # (an alias's voice: the name its requests are remembered by)
    elif voice is not None:
        sid = protocol.digits_value(voice) if isinstance(voice, str) else voice
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0:
            known = ", ".join(sorted(voices)) or "none are configured"
            raise HttpError(400, "unknown_voice", f"unknown voice {voice!r:.40}: use a named voice ({known}) or a "
                            f'speaker number such as "0" ({whose} voice names exist here only as the server maps them: '
                            f"serve --voice-alias NAME=VOICE)")
        if req.setdefault("speaker_id", sid) != sid:
            raise HttpError(400, "invalid_speaker_id", f"voice {voice!r:.40} and speaker_id {req['speaker_id']!r:.20} "
                            "disagree; send one of them")


def _generate(req: dict, max_text_chars: int, topk_max: int) -> protocol.Generate:
    try:
        return protocol.request_from(req, protocol.request_id_of(req), max_text_chars, topk_max,
                                     protocol.ALL_FORMATS)
    except protocol.ProtocolError as e:
        raise HttpError(400, e.code, e.message) from None


# -- responses -----------------------------------------------------------------------------------
def header_value(value: str) -> str:
    """A header field's value as HTTP allows it: visible ASCII and spaces as they are, anything else
    (a request id in another script; never a line break) percent-encoded."""
    return value if value.isascii() and value.isprintable() else quote(value, safe=HEADER_SAFE)


def response_head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    lines += [f"{k}: {header_value(str(v))}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def response(status: int, body: bytes, content_type: str, *, keep_alive: bool, extra: dict | None = None) -> bytes:
    """A whole (non-streamed) response."""
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
               "Connection": "keep-alive" if keep_alive else "close", **(extra or {})}
    return response_head(status, headers) + body


def no_content(*, keep_alive: bool, extra: dict | None = None) -> bytes:
    """A 204: a head alone (no Content-Length, which a 204 must not carry)."""
    return response_head(204, {"Connection": "keep-alive" if keep_alive else "close", **(extra or {})})


def error_object(status: int, code: str, message: str) -> dict:
    """An error as OpenAI's API writes it (the shape every error of the HTTP port has)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, code: str, message: str, *, keep_alive: bool = False,
                   extra: dict | None = None) -> bytes:
    body = json.dumps(error_object(status, code, message)) + "\n"
    return response(status, body.encode(), "application/json", keep_alive=keep_alive, extra=extra)


def stream_head(speech: Speech, request_id: str, *, keep_alive: bool, chunked: bool = True,
                extra: dict | None = None) -> bytes:
    """The 200 head of a streamed speech response: chunked, as its length is not known up front;
    for an HTTP/1.0 client, which knows no chunked bodies, plain bytes ended by closing the
    connection (the caller passes keep_alive=False with chunked=False)."""
    fmt = speech.gen.format
    rate, enc = protocol.ALL_FORMATS[fmt]
    if speech.sse:
        ctype = "text/event-stream"
    elif speech.timestamps:
        ctype = "application/json" if speech.timestamps == "json" else "application/x-ndjson"
    elif speech.wav:
        ctype = "audio/wav"
    else:
        ctype = {"ulaw": "audio/basic", "alaw": "audio/x-alaw-basic", "mp3": "audio/mpeg", "g722": "audio/G722",
                 "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac"}.get(enc, "audio/pcm")
    framing = {"Transfer-Encoding": "chunked"} if chunked else {}
    stitching = {"request-id": request_id} if speech.elevenlabs else {}  # (what ElevenLabs' SDKs read)
    return response_head(200, {"Content-Type": ctype, **framing, "Cache-Control": "no-store",
                               "Connection": "keep-alive" if keep_alive else "close", **stitching,
                               "X-Request-Id": request_id, "X-Audio-Format": fmt, "X-Sample-Rate": str(rate),
                               **(extra or {})})


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body (never empty: an empty chunk ends the body)."""
    return b"%X\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def wav_header(rate: int = 24000) -> bytes:
    """A 16-bit mono PCM WAV header for a stream of unknown length: both sizes 0xFFFFFFFF, which
    players read as "until the end of the data"."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))


def sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def sse_audio(data: bytes) -> bytes:
    return sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


def timestamped_line(audio: bytes, alignment: dict | None) -> bytes:
    """One line of ElevenLabs' /stream/with-timestamps: a chunk's audio and the alignment that
    ends in it (null when none does)."""
    return json.dumps({"audio_base64": base64.b64encode(audio).decode("ascii"), "alignment": alignment,
                       "normalized_alignment": alignment}).encode() + b"\n"


class Base64Stream:
    """Base64 of a byte stream, written as it comes: whole 3-byte groups now, the rest later, so
    the pieces join into the base64 of the whole (ElevenLabs' /with-timestamps audio_base64)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        data = self._rest + data
        cut = len(data) - len(data) % 3
        self._rest = data[cut:]
        return base64.b64encode(data[:cut])

    def finish(self) -> bytes:
        out, self._rest = base64.b64encode(self._rest), b""
        return out
