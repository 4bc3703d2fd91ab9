"""The /ws/generate message protocol, sans I/O: parse client messages, build server messages.

Client -> server (JSON text frames):
  {"text": str, "speaker_id": int = 0, ...optional fields}   a request (the seed's message)
  {"cancel": true [, "request_id": str]}                     stop all, or just that one
Server -> client:
  binary frames of audio; {"done": true, ...}; {"error": {"code", "message"}, "request_id"}.

Every problem is a ProtocolError with a stable `code` and a message that says what was wrong and
what is allowed. Unknown fields are ignored (forward compatibility), never fatal: a request's `done`
names them (`ignored_fields`, each with the field it most resembles), so a typo does not go unseen.
One exception: an unknown field that names an audio format while `format` is missing (an
ElevenLabs client's `output_format`, an OpenAI one's `response_format`) is an error, as the audio
would otherwise come in another format than the client will play it as.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field

from .sentences import speaks

# format name -> (sample rate, encoding)
FORMATS: dict[str, tuple[int, str]] = {
    "pcm_24000": (24000, "pcm"),
    "pcm_16000": (16000, "pcm"),
    "pcm_8000": (8000, "pcm"),
    "pcm_22050": (22050, "pcm"),
    "pcm_44100": (44100, "pcm"),
    "pcm_48000": (48000, "pcm"),
    "ulaw_8000": (8000, "ulaw"),
    "alaw_8000": (8000, "alaw"),
    "g722_16000": (16000, "g722"),  # G.722 at 64 kbit/s: wideband telephone audio (kernels/g722.py)
}
# compressed formats (codec_rate_kbps, ElevenLabs' names): the HTTP endpoints and the ElevenLabs
# sockets offer them (OpenAI's and ElevenLabs' clients ask for mp3 by default); /ws/generate and the
# phone path keep to the raw formats above, whose chunks are exactly chunk_ms long
MP3_FORMATS: dict[str, tuple[int, str]] = {
    f"mp3_{rate}_{kbps}": (rate, "mp3")
    for rate, kbps in ((22050, 32), (24000, 48), (44100, 32), (44100, 64), (44100, 96), (44100, 128), (44100, 192))
}
# Ogg Opus, ElevenLabs' names (24 kHz coded, played at 48 kHz; constant bit rate)
OPUS_FORMATS: dict[str, tuple[int, str]] = {f"opus_48000_{kbps}": (48000, "opus") for kbps in (32, 64, 96, 128, 192)}
# OpenAI's aac and flac (24 kHz mono; AAC-LC in ADTS at 64 kbps, FLAC lossless)
PACKET_FORMATS: dict[str, tuple[int, str]] = {"aac_24000_64": (24000, "aac"), "flac_24000": (24000, "flac")}
COMPRESSED_FORMATS = {**MP3_FORMATS, **OPUS_FORMATS, **PACKET_FORMATS}
ALL_FORMATS = {**FORMATS, **COMPRESSED_FORMATS}
BYTES_PER_SAMPLE = {"pcm": 2.0, "ulaw": 1.0, "alaw": 1.0, "g722": 0.5}  # the raw encodings
DEFAULT_FORMAT = "pcm_24000"
CHUNK_MS_RANGE = (20, 1000)
DEFAULT_CHUNK_MS = 100
DEFAULT_MAX_TEXT_CHARS = 5000
# an open text stream (and an ElevenLabs socket's input) left this long without a message is closed:
# its buffered text is spoken, then it ends (the default, and the most a client may ask for)
INACTIVITY_S, MAX_INACTIVITY_S = 20.0, 180.0
MAX_REQUEST_ID_CHARS = 128


def byte_rate(fmt: str) -> float:
    """Bytes a second of a raw format's audio (FORMATS)."""
    rate, enc = FORMATS[fmt]
    return rate * BYTES_PER_SAMPLE[enc]


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


@dataclass
class Generate:
    text: str
    speaker_id: int = 0
    request_id: str | None = None
    format: str = DEFAULT_FORMAT
    chunk_ms: int = DEFAULT_CHUNK_MS
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    max_audio_ms: int | None = None
    voice: str | None = None
    final: bool = True
    call_control_id: str | None = None  # send the audio into this phone call instead (serve --telnyx)
    inactivity_timeout: float = INACTIVITY_S  # a text stream (final=false) with no message this long is closed
    continue_previous: bool = False  # the connection's last sentences (an earlier request's) are its context
    context: list | None = None  # the client's own earlier turns (context.Turn), heard before the reply
    speed: float = 1.0  # speaking rate, pitch kept (kernels/stretch.py): 1.25 is 25% faster
    ignored: dict = field(default_factory=dict)  # the message's unknown fields -> the known one each resembles


# the fields of a /ws/generate request message; any other is ignored, and named in its done
REQUEST_FIELDS = ("text", "speaker_id", "request_id", "format", "chunk_ms", "temperature", "topk", "seed",
                  "max_audio_ms", "voice", "final", "call_control_id", "inactivity_timeout", "continue_previous",
                  "context", "speed")
MAX_IGNORED = 16  # unknown fields a done names at most
# other APIs' names for these fields (OpenAI's, ElevenLabs', common ones), as ignored_fields' hints
OTHER_NAMES = {"output_format": "format", "response_format": "format", "encoding": "format", "sample_rate": "format",
               "input": "text", "voice_id": "voice", "speaker": "speaker_id", "top_k": "topk", "max_duration_ms":
               "max_audio_ms", "voice_settings": "speed", "previous_text": "continue_previous"}


@dataclass
class Cancel:
    request_id: str | None = None


@dataclass
class Append:
    """More text for the open text stream (a request sent with final=false)."""

    text: str
    final: bool = False
    request_id: str | None = None


@dataclass
class Flush:
    """Close the open text stream: generate what is buffered, then done."""

    request_id: str | None = None


def decode_json(data: str | bytes):
    """json.loads, where every way a client's text can fail to be JSON is a ValueError saying why:
    bad syntax, bytes that are not UTF-8, nesting too deep (a RecursionError from json), and
    an integer over Python's 4,300-digit limit (a plain ValueError from json)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise ValueError(str(e).split("; use sys.set_int_max_str_digits")[0]) from None


def digits_value(s: str, max_digits: int = 9) -> int | None:
    """The number an ASCII-digit string of at most `max_digits` digits spells (a speaker number, a
    seed in a URL), else None. (str.isdigit() alone takes '²', which int() refuses, and int()
    refuses past 4,300 digits.)"""
    return int(s) if 0 < len(s) <= max_digits and s.isascii() and s.isdigit() else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse(data: str | bytes, *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS, topk_max: int = 2048,
          streaming: bool = False) -> Generate | Cancel | Append | Flush:
    """One client message -> Generate | Cancel (| Append | Flush while a text stream is open, i.e.
    streaming=True), or ProtocolError."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("binary_not_allowed", "binary frames are not accepted from clients; send JSON text "
                            'messages such as {"text": "Hello", "speaker_id": 0}')
    try:
        msg = decode_json(data)
    except ValueError as e:
        raise ProtocolError("invalid_json", f"message is not valid JSON ({e}); send a JSON object such as "
                            '{"text": "Hello", "speaker_id": 0}') from None
    if not isinstance(msg, dict):
        raise ProtocolError("invalid_message", f"message must be a JSON object, got {type(msg).__name__}; "
                            'send {"text": ..., "speaker_id": ...} or {"cancel": true}')
    rid = request_id_of(msg)
    if "cancel" in msg:
        if msg["cancel"] is not True:
            raise ProtocolError("invalid_cancel", f'cancel must be true, got {msg["cancel"]!r:.40}', rid)
        return Cancel(rid)
    if streaming:
        return _stream_message(msg, rid)
    if msg.get("flush") is True:
        raise ProtocolError("nothing_to_flush", "flush closes a text stream, and none is open; open one with "
                            '{"text": "...", "final": false}', rid)
    if "text" not in msg:
        raise ProtocolError("missing_text", 'a request needs "text" (a non-empty string); to stop audio send '
                            '{"cancel": true}', rid)
    misnamed(msg, "format", ALL_FORMATS, DEFAULT_FORMAT, REQUEST_FIELDS,
             lambda code, why: ProtocolError(code, why, rid))
    g = request_from(msg, rid, max_text_chars, topk_max)
    g.ignored = unknown_fields(msg, REQUEST_FIELDS)
    if g.context:
        from .context import TURN_FIELDS

        for i, turn in enumerate(msg["context"]):
            g.ignored.update({f"context[{i}].{k}": v and f"context[{i}].{v}"
                              for k, v in unknown_fields(turn, TURN_FIELDS).items()})
    g.ignored = dict(list(g.ignored.items())[:MAX_IGNORED])
    return g


def unknown_fields(msg: dict, known: tuple[str, ...]) -> dict[str, str | None]:
    """The keys of `msg` not in `known` (at most MAX_IGNORED, each cut to 60 characters, anything
    unprintable as "?": they are logged), each with the known field it most resembles -- a typo's
    likely meaning -- or None."""
    out = {}
    for k in msg:
        if k not in known and len(out) < MAX_IGNORED:
            close = difflib.get_close_matches(k.lower(), known, n=1, cutoff=0.75)
            hint = OTHER_NAMES.get(k) if OTHER_NAMES.get(k) in known else close[0] if close else None
            out["".join(c if c.isprintable() else "?" for c in k[:60])] = hint
    return out


def hinted(ignored: dict[str, str | None]) -> str:
    """unknown_fields' result as a log line reads it: "temprature (did you mean temperature?), foo"."""
    return ", ".join(k + (f" (did you mean {v}?)" if v else "") for k, v in ignored.items())


def misnamed(msg: dict, name: str, formats, default: str, known: tuple[str, ...], bad,
             would: str = "the audio would come as", where: str = "") -> None:
    """bad(f"invalid_{name}", why) raised when `name` is missing from `msg` but an unknown field of
    it names one of `formats` other than `default`: the audio would be `default`, which is not what
    the client meant (an ElevenLabs client's output_format, an OpenAI one's response_format)."""
    if name in msg:
        return
    for k, v in msg.items():
        if k not in known and isinstance(v, str) and v in formats and v != default:
            fix = json.dumps({name: v})
            raise bad(f"invalid_{name}", f"{where}{name} is not given, so {would} {default}, but {where}{k[:40]} "
                      f"names {v}; here it is called {name}: send {fix}")


def is_request_id(rid) -> bool:
    """A valid request id: a non-empty string of at most MAX_REQUEST_ID_CHARS printable characters."""
    return isinstance(rid, str) and 0 < len(rid) <= MAX_REQUEST_ID_CHARS and rid.isprintable()


def request_id_of(msg: dict) -> str | None:
    """The message's request_id (None if it has none), or ProtocolError if it is not a valid one."""
    rid = msg.get("request_id")
    if rid is not None and not is_request_id(rid):
        raise ProtocolError("invalid_request_id", f"request_id must be a non-empty string of at most "
                            f"{MAX_REQUEST_ID_CHARS} printable characters (no line breaks or other control "
                            f"characters: it is logged and sent back in headers), got {rid!r:.60}")
    return rid


def text_problem(text: str) -> str | None:
    """What makes a string that JSON allows unspeakable, or None: an unpaired \\uD800-\\uDFFF escape
    decodes to a lone surrogate, which has no UTF-8 form (no tokenizer can take it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"text is not valid Unicode: an unpaired surrogate \\u{ord(text[e.start]):04x} at character "
                f"{e.start}; a \\uD800-\\uDBFF escape must be followed by a \\uDC00-\\uDFFF one")
    return None


def _stream_message(msg: dict, rid) -> Append | Flush:
    if msg.get("flush") is True:
        return Flush(rid)
    if "text" not in msg:
        raise ProtocolError("missing_text", 'a text stream is open: send {"text": "more text"}, '
                            '{"text": "...", "final": true} or {"flush": true} to close it, or {"cancel": true}', rid)
    text, final = msg["text"], msg.get("final", False)
    if not isinstance(text, str):
        raise ProtocolError("invalid_text", f"text must be a string, got {text!r:.40}", rid)
    if (why := text_problem(text)) is not None:
        raise ProtocolError("invalid_text", why, rid)
    if not isinstance(final, bool):
        raise ProtocolError("invalid_final", f"final must be true or false, got {final!r:.40}", rid)
    return Append(text, final, rid)


def request_from(msg: dict, rid: str | None = None, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
                 topk_max: int = 2048, formats: dict = FORMATS) -> Generate:
    """A request object (a dict with "text") -> Generate, every field checked (the HTTP endpoint
    maps its own field names onto these and validates through here too, with ALL_FORMATS)."""
    def bad(code: str, message: str):
        return ProtocolError(code, message, rid)

    text = msg["text"]
    opening = msg.get("final") is False  # a text stream may open with nothing but a space
    if not isinstance(text, str) or (not text.strip() and not opening):
        raise bad("invalid_text", f"text must be a non-empty string, got {text!r:.40}")
    if (why := text_problem(text)) is not None:
        raise bad("invalid_text", why)
    if not opening and not speaks(text):  # (a stream may open with its first "...")
        raise bad("invalid_text", f"text has nothing to speak, got {text!r:.40}: it needs a letter or digit "
                  "(punctuation and symbols alone are not spoken)")
    if len(text) > max_text_chars:
        raise bad("text_too_long", f"text is {len(text)} characters; at most {max_text_chars} are allowed "
                  "per request (split it into sentences and send them one after another)")
    g = Generate(text=text, request_id=rid)
    sid = msg.get("speaker_id", 0)
    if not _is_int(sid) or sid < 0:
        raise bad("invalid_speaker_id", f"speaker_id must be an integer >= 0, got {sid!r:.40}")
    g.speaker_id = sid
    fmt = msg.get("format", DEFAULT_FORMAT)
    if not isinstance(fmt, str) or fmt not in formats:
        compressed = isinstance(fmt, str) and fmt in COMPRESSED_FORMATS  # (a list or dict cannot be looked up)
        where = (" (mp3, opus, aac and flac are sent by the HTTP and ElevenLabs endpoints; this one sends raw "
                 "audio in chunks of exactly chunk_ms)") if compressed else ""
        raise bad("invalid_format", f"format must be one of {', '.join(formats)}, got {fmt!r:.40}{where}")
    g.format = fmt
    ms = msg.get("chunk_ms", DEFAULT_CHUNK_MS)
    lo, hi = CHUNK_MS_RANGE
    if not _is_int(ms) or not lo <= ms <= hi:
        raise bad("invalid_chunk_ms", f"chunk_ms must be an integer in {lo}..{hi}, got {ms!r:.40}")
    g.chunk_ms = ms
    t = msg.get("temperature", 0.9)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise bad("invalid_temperature", f"temperature must be a finite number > 0, got {t!r:.40}")
    g.temperature = float(t)
    k = msg.get("topk", 50)
    if not _is_int(k) or not 1 <= k <= topk_max:
        raise bad("invalid_topk", f"topk must be an integer in 1..{topk_max} (1 is greedy), got {k!r:.40}")
    g.topk = k
    seed = msg.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad("invalid_seed", f"seed must be an integer or null, got {seed!r:.40}")
    g.seed = seed
    mx = msg.get("max_audio_ms")
    if mx is not None and (not _is_int(mx) or mx < 1):
        raise bad("invalid_max_audio_ms", f"max_audio_ms must be an integer >= 1 or null, got {mx!r:.40}")
    g.max_audio_ms = mx
    voice = msg.get("voice")
    if voice is not None and (not isinstance(voice, str) or not voice):
        raise bad("invalid_voice", f"voice must be a non-empty string naming a voice prompt, got {voice!r:.40}")
    g.voice = voice
    final = msg.get("final", True)
    if not isinstance(final, bool):
        raise bad("invalid_final", f"final must be true or false, got {final!r:.40}")
    g.final = final
    ccid = msg.get("call_control_id")
    if ccid is not None and (not isinstance(ccid, str) or not ccid):
        raise bad("invalid_call_control_id", f"call_control_id must be a non-empty string, got {ccid!r:.60}")
    g.call_control_id = ccid
    idle = msg.get("inactivity_timeout", INACTIVITY_S)
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 < idle <= MAX_INACTIVITY_S:
        raise bad("invalid_inactivity_timeout", f"inactivity_timeout must be a number of seconds in "
                  f"(0, {MAX_INACTIVITY_S:.0f}], got {idle!r:.40}")
    g.inactivity_timeout = float(idle)
    cont = msg.get("continue_previous", False)
    if not isinstance(cont, bool):
        raise bad("invalid_continue_previous", f"continue_previous must be true or false, got {cont!r:.40}")
    g.continue_previous = cont
    g.speed = speed_of(msg.get("speed"), bad)
    if msg.get("context") is not None:
        from .context import parse_turns  # (context.py takes its formats from this module)

        g.context = parse_turns(msg["context"], bad, max_text_chars, text_problem)
    return g


def speed_of(value, bad) -> float:
    """A request's `speed` (None: 1), or bad("invalid_speed", why) raised."""
    if value is None:
        return 1.0
    from ..kernels.speed import check_speed

    try:
        return check_speed(value)
    except ValueError as e:
        raise bad("invalid_speed", str(e)) from None


def voice_settings_speed(msg: dict, bad) -> float | None:
    """ElevenLabs' voice_settings.speed of a message (a REST body, a socket's opening message): None
    when not given, else checked as `speed` is; a voice_settings that is not an object is refused
    (its other settings are accepted and ignored)."""
    settings = msg.get("voice_settings")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise bad("invalid_voice_settings", f'voice_settings must be an object (e.g. {{"speed": 1.1}}), got '
                  f"{type(settings).__name__}")
    return None if settings.get("speed") is None else speed_of(settings["speed"], bad)


def close_reason(text: str) -> str:
    """`text` cut to what a WebSocket close frame can carry (123 bytes of UTF-8: a longer reason is
    a protocol error, and the peer would get a bare close without it)."""
    return text.encode()[:123].decode(errors="ignore")


def done(request_id: str, audio_ms: float, ttfa_ms: float | None, cancelled: bool, **extra) -> str:
    """The end of a request. extra: e.g. heard (phone-call requests)."""
    msg = {"done": True, "request_id": request_id, "audio_ms": round(audio_ms, 1),
           "ttfa_ms": None if ttfa_ms is None else round(ttfa_ms, 2), "cancelled": cancelled}
    msg.update(extra)
    return json.dumps(msg)


def error(code: str, message: str, request_id: str | None = None) -> str:
    return json.dumps({"error": {"code": code, "message": message}, "request_id": request_id})
