"""A request's own context turns: the conversation CSM should hear before it speaks.

CSM is a conversational model: it takes earlier turns (who spoke, what they said, and the audio of
it) as context, and its prosody follows them, the caller's last words included. The Python API
takes them as `Segment`s; on /ws/generate a request carries them as

    "context": [{"speaker_id": 1, "text": "I'd like to move my booking.",
                 "audio": "<base64>", "audio_format": "pcm_16000"}, ...]

oldest first: at most MAX_TURNS turns and MAX_SECONDS of audio in all, each turn's audio 80 ms (one
frame) or more, in one of AUDIO_FORMATS (raw little-endian 16-bit PCM at those rates, or G.711 at
8 kHz as a phone call carries it; pcm_24000 when not given), within the socket's 1 MiB a message
(base64 makes that ~16 s of pcm_24000; 30 s of ulaw_8000 is 320 KB). `parse_turns` checks and decodes them
on the event loop (sans I/O, no model); the server encodes them with the model's codec off the loop
(`encode_turns`) before the request is queued.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from .protocol import FORMATS, misnamed

MAX_TURNS = 8
MAX_SECONDS = 30.0
MIN_SECONDS = 0.08  # one frame of the codec
# the raw formats a request's audio may come in, but G.722 (no client records a turn in it): name -> rate,
# the PCM ones by rate, then G.711
AUDIO_FORMATS = {name: rate for name, (rate, enc) in sorted(FORMATS.items(), key=lambda f: (f[1][1] != "pcm", f[1][0]))
                 if enc != "g722"}
DEFAULT_AUDIO_FORMAT = "pcm_24000"
TURN_FIELDS = ("speaker_id", "text", "audio", "audio_format")  # a turn's other keys are ignored (and named in done)


@dataclass
class Turn:
    """One context turn as the client sent it, its audio decoded to int16 at `rate`."""

    speaker_id: int
    text: str
    pcm: np.ndarray
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.rate


def parse_turns(value, bad, max_text_chars: int, text_problem) -> list[Turn]:
    """A request's "context" -> its Turns; `bad(code, message)` makes the error to raise (code
    invalid_context), `text_problem(text)` says what makes a text unspeakable (protocol's)."""
    def fail(message: str):
        return bad("invalid_context", message)

    example = '[{"speaker_id": 1, "text": "...", "audio": "<base64 PCM>", "audio_format": "pcm_16000"}]'
    if not isinstance(value, list) or not value:
        raise fail(f"context must be a non-empty list of turns like {example}, got {_short(value)}")
    if len(value) > MAX_TURNS:
        raise fail(f"context has {len(value)} turns; at most {MAX_TURNS} are allowed (send the latest ones)")
    turns = [_turn(t, i, fail, max_text_chars, text_problem, example) for i, t in enumerate(value)]
    total = sum(t.seconds for t in turns)
    if total > MAX_SECONDS:
        raise fail(f"context holds {total:.1f} s of audio; at most {MAX_SECONDS:.0f} s are allowed in all "
                   "(send the latest turns, or shorter ones)")
    return turns


def _turn(t, i: int, fail, max_text_chars: int, text_problem, example: str) -> Turn:
    where = f"context[{i}]"
    if not isinstance(t, dict):
        raise fail(f"{where} must be an object like {example[1:-1]}, got {_short(t)}")
    misnamed(t, "audio_format", FORMATS, DEFAULT_AUDIO_FORMAT, TURN_FIELDS, lambda code, why: fail(why),
             would="its audio would be read as", where=f"{where}.")
    sid = t.get("speaker_id", 0)
    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
        raise fail(f"{where}.speaker_id must be an integer >= 0 (who spoke), got {_short(sid)}")
    text = t.get("text")
    if not isinstance(text, str) or not text.strip():
        raise fail(f"{where}.text must be a non-empty string (the words of its audio), got {_short(text)}")
    if (why := text_problem(text)) is not None:
        raise fail(f"{where}.text: {why}")
    if len(text) > max_text_chars:
        raise fail(f"{where}.text is {len(text)} characters; at most {max_text_chars} are allowed")
    fmt = t.get("audio_format", DEFAULT_AUDIO_FORMAT)
    if not isinstance(fmt, str) or fmt not in AUDIO_FORMATS:
        raise fail(f"{where}.audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {_short(fmt)}")
    audio = t.get("audio")
    if not isinstance(audio, str) or not audio:
        raise fail(f"{where}.audio must be the turn's audio as a base64 string ({fmt}), got {_short(audio)}")
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise fail(f"{where}.audio is not valid base64 (standard alphabet, with padding)") from None
    pcm = _decode(raw, fmt, where, fail)
    rate = AUDIO_FORMATS[fmt]
    if len(pcm) < MIN_SECONDS * rate:
        raise fail(f"{where}.audio is {1000 * len(pcm) / rate:.0f} ms of {fmt}; a turn needs at least "
                   f"{1000 * MIN_SECONDS:.0f} ms")
    return Turn(sid, text, pcm, rate)


def _decode(raw: bytes, fmt: str, where: str, fail) -> np.ndarray:
    if fmt.startswith("pcm_") and len(raw) % 2:
        raise fail(f"{where}.audio is {len(raw)} bytes: {fmt} is 16-bit little-endian PCM, 2 bytes a sample")
    from .decoder import AudioDecoder  # (G.711's numba kernels: only when a request needs them)

    return AudioDecoder(fmt).decode(raw)


def turn(speaker_id: int, text: str, audio, audio_format: str = DEFAULT_AUDIO_FORMAT) -> dict:
    """One turn as a request's "context" carries it, for a client: `audio` is the format's bytes,
    or an array of them (e.g. what it recorded of the caller): int16 samples for a pcm_* format,
    uint8 G.711 bytes for ulaw_8000 / alaw_8000."""
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}")
    if isinstance(audio, np.ndarray):
        want = np.int16 if audio_format.startswith("pcm_") else np.uint8
        if audio.dtype != want:
            raise ValueError(f"{audio_format} audio as an array is {np.dtype(want).name}, got {audio.dtype.name}")
        audio = audio.astype("<i2" if want is np.int16 else np.uint8).tobytes()
    return {"speaker_id": speaker_id, "text": text, "audio": base64.b64encode(bytes(audio)).decode("ascii"),
            "audio_format": audio_format}


def _short(value) -> str:
    if isinstance(value, (list, dict)):
        return f"an empty {type(value).__name__}" if not value else f"a {type(value).__name__}"
    return f"{value!r:.40}"


def encode_turns(turns: list[Turn], engine) -> list:
    """Turns -> `Segment`s with the codes of their audio, resampled to 24 kHz and encoded with the
    engine's codec (seconds of model work: run it off the event loop). ValueError when the model has
    no codec or a turn's audio is refused by it."""
    from ..engine.prompt import Segment
    from ..engine.voices import to_24k

    if engine.codec is None:
        raise ValueError("this model has no codec to encode context audio; send the context's turns to a server "
                         "with a full CSM checkpoint")
    return [Segment(t.speaker_id, t.text, codes=engine.codec.encode_context(to_24k(t.pcm, t.rate),
                                                                            what=f"context[{i}].audio"))
            for i, t in enumerate(turns)]
