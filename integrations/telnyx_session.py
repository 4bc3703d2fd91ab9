"""Telnyx bidirectional media streaming, sans I/O (../shared/PROTOCOLS.md §1).

Feed `receive()` every text message Telnyx sends; get typed events back. Malformed or unknown
messages become `BadMessage` events (never exceptions), so one bad frame cannot end a call.
Give `audio()` 24 kHz int16 PCM of the utterance being spoken; get back outgoing `media` messages
of whole 20 ms frames of the stream's codec (base64 of raw payload: PCMU/PCMA at 8 kHz, 160 bytes
a frame; G722 at 16 kHz, 160 bytes; L16 at its rate, 640 bytes at 16 kHz; telnyx_codecs.py): all
the whole frames one call makes, in messages of at most `media_ms` (100 ms unless set; Telnyx
takes 20 ms to 30 s a message), each a `MediaMessage` that says how much audio it holds (`.ms`).
Fewer, larger messages cost the event loop less: a message is a base64 encode, a JSON string, a
WebSocket frame and a send() system call, whatever its size.
`end_utterance()` flushes the resampler, pads the last frame with encoded silence and appends the
utterance's `mark`.
`clear()` returns the `clear` message and marks everything not yet heard as cut off.

`audio()` is `take(encode(pcm, epoch), epoch)`: `encode` is the codec's work (resampling, G.711 /
G.722 / L16), safe to run on another thread, and `take` the message framing, on the loop. The
bridge can run `encode` on the codec threads (`TelnyxCall.encode_off_loop`; off by default, as
measured in the README's "How many calls a process carries").
Every step that moves the codec on (`start_utterance`, `end_utterance`, `clear`, `end`) takes the
codec's lock and starts a new epoch, so an `encode` handed off before it runs to completion first
or does nothing, and a result of an older epoch is never taken: the bytes sent are exactly those
of calling `audio()` in the same order on one thread.

Utterances: each one ends with a mark named after it; when Telnyx echoes the mark, the caller has
heard all of it (`heard`). After a clear, Telnyx returns the queued marks too: those count as
cut off, not heard.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from dataclasses import dataclass, field
from itertools import count

import numpy as np

from ..kernels.resample import Resampler
from ..transport import protocol
from .telnyx_codecs import MediaDecoder, MediaEncoder, whole_frames

log = logging.getLogger("csmstream.telnyx")

SOURCE_RATE = 24_000
MEDIA_PREFIX = '{"event": "media", "media": {"payload": "'  # base64 needs no JSON escaping
TELNYX_ERRORS = {100002: "unknown_error", 100003: "malformed_frame", 100004: "invalid_media",
                 100005: "rate_limit_reached"}


# -- events (Telnyx -> us) --------------------------------------------------------------------------
@dataclass
class Connected:
    version: str


@dataclass
class CallStarted:
    call_control_id: str
    stream_id: str
    encoding: str
    sample_rate: int
    channels: int
    custom_parameters: dict = field(default_factory=dict)
    call_session_id: str | None = None
    from_: str | None = None
    to: str | None = None
    client_state: str | None = None


@dataclass
class CallerAudio:
    pcm: np.ndarray  # int16 at sample_rate
    track: str
    chunk: int | None
    timestamp: int | None
    sample_rate: int = 8000


@dataclass
class Dtmf:
    digit: str


@dataclass
class MarkPlayed:
    name: str
    heard: bool  # False for marks Telnyx returns after a clear (the utterance was cut off)


@dataclass
class Stopped:
    call_control_id: str | None


@dataclass
class TelnyxError:
    code: int | None
    title: str
    detail: str


@dataclass
class BadMessage:
    reason: str
    raw: str


class MediaMessage(str):
    """An outgoing media message (JSON text) that knows how much audio it carries."""

    ms: float = 0.0


@dataclass
class Utterance:
    name: str
    state: str = "speaking"  # speaking -> sent -> heard | cut_off
    frames: int = 0  # 20 ms frames of media produced

    @property
    def heard(self) -> bool:
        return self.state == "heard"


class TelnyxMediaSession:
    def __init__(self, codec: str = "PCMU", sample_rate: int | None = None, l16_byteorder: str = "big",
                 media_ms: int = 100) -> None:
        """codec: the `stream_bidirectional_codec` given to streaming_start (PCMU, PCMA, G722, L16);
        sample_rate: its `stream_bidirectional_sampling_rate` (None: 8000 for G.711, 16000 for
        G722 and L16); media_ms: the most audio one outgoing media message carries, a multiple of
        20 from 20 to 1000; ValueError for what this side cannot do."""
        if not whole_frames(media_ms):
            raise ValueError(f"media_ms must be a multiple of 20 from 20 to 1000 (ms of audio a media message), "
                             f"got {media_ms!r:.40}")
        self.frames_per_message = media_ms // 20
        self._encoder = MediaEncoder(codec, sample_rate, l16_byteorder)
        self.codec, self.sample_rate, self.l16_byteorder = codec, self._encoder.rate, l16_byteorder
        self.frame_bytes = self._encoder.frame_bytes
        self._decoder: MediaDecoder | None = None  # the caller's codec, from `start`
        self.started: CallStarted | None = None
        self.stopped = False
        rate = self.sample_rate
        self._resampler = Resampler(SOURCE_RATE, rate) if rate != SOURCE_RATE else None
        self._pending = bytearray()  # encoded bytes not yet a whole frame
        self._codec_lock = threading.Lock()  # the resampler and encoder: one thread at a time
        self._epoch = 0  # + 1 at every step that moves the codec on (see the module's docstring)
        self._ids = count(1)
        self.current: Utterance | None = None
        self.utterances: dict[str, Utterance] = {}

    # -- incoming ------------------------------------------------------------------------------------
    def receive(self, text) -> list:
        if isinstance(text, (bytes, bytearray)):
            return [self._bad("binary frame; Telnyx sends JSON text", repr(bytes(text[:60])))]
        try:
            msg = protocol.decode_json(text)
        except ValueError:
            return [self._bad("not JSON", text)]
        if not isinstance(msg, dict):
            return [self._bad("not a JSON object", text)]
        event = msg.get("event")
        handler = getattr(self, f"_on_{event}", None) if isinstance(event, str) else None
        if handler is None:
            return [self._bad(f"unknown event {event!r:.40}", text)]
        try:
            return handler(msg)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:  # (int(1e999): Overflow)
            return [self._bad(f"malformed {event} message ({type(e).__name__}: {e})", text)]

    def _bad(self, reason: str, raw) -> BadMessage:
        raw = raw if isinstance(raw, str) else str(raw)
        log.warning("telnyx: ignoring bad message: %s", reason)
        log.debug("telnyx: the bad message was: %.200s", raw)  # may carry caller audio: debug only
        return BadMessage(reason, raw[:200])

    def _on_connected(self, msg) -> list:
        return [Connected(str(msg.get("version", "")))]

    def _on_start(self, msg) -> list:
        s = msg["start"]
        fmt = s.get("media_format") or {}
        ev = CallStarted(call_control_id=str(s["call_control_id"]), stream_id=str(msg.get("stream_id", "")),
                         encoding=str(fmt.get("encoding", "PCMU")), sample_rate=int(fmt.get("sample_rate", 8000)),
                         channels=int(fmt.get("channels", 1)), custom_parameters=dict(s.get("custom_parameters") or {}),
                         call_session_id=s.get("call_session_id"), from_=s.get("from"), to=s.get("to"),
                         client_state=s.get("client_state"))
        self.started = ev
        out: list = [ev]
        try:  # the rate matters to L16 only (G.711 is 8 kHz audio; G.722 16 kHz, on an 8 kHz RTP clock)
            rate = ev.sample_rate if ev.encoding == "L16" else None
            self._decoder = MediaDecoder(ev.encoding, rate, self.l16_byteorder)
        except ValueError as e:
            out.append(self._bad(f"caller audio is not decoded here ({e}); caller audio events will be skipped",
                                 json.dumps(fmt)))
        return out

    def _on_media(self, msg) -> list:
        if self.started is None:
            return [self._bad("media before start", json.dumps(msg)[:200])]
        media = msg["media"]
        try:
            raw = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            return [self._bad("media payload is not base64", str(media.get("payload"))[:200])]
        if self._decoder is None:
            return []
        chunk, ts = media.get("chunk"), media.get("timestamp")
        return [CallerAudio(self._decoder.decode(raw), str(media.get("track", "inbound")),
                            int(chunk) if chunk is not None else None, int(ts) if ts is not None else None,
                            self._decoder.rate)]

    def _on_mark(self, msg) -> list:
        name = str(msg["mark"]["name"])
        u = self.utterances.get(name)
        if u is not None and u.state == "sent":
            u.state = "heard"
        return [MarkPlayed(name, heard=u is not None and u.state == "heard")]

    def _on_dtmf(self, msg) -> list:
        return [Dtmf(str(msg["dtmf"]["digit"]))]

    def _on_stop(self, msg) -> list:
        self.end()
        return [Stopped((msg.get("stop") or {}).get("call_control_id"))]

    def end(self) -> None:
        """The call is over (stop, or the socket dropped): nothing more goes out; whatever was
        not heard is cut off."""
        self.stopped = True
        for u in self.utterances.values():
            if u.state in ("speaking", "sent"):
                u.state = "cut_off"
        self._pending.clear()
        with self._codec_lock:
            self._epoch += 1  # an encode handed off before this does nothing

    def _on_error(self, msg) -> list:
        p = msg.get("payload") or {}
        code = p.get("code")
        title = str(p.get("title") or TELNYX_ERRORS.get(code, "error"))
        log.warning("telnyx error %s %s: %s", code, title, p.get("detail"))
        return [TelnyxError(code, title, str(p.get("detail", "")))]

    # -- outgoing ------------------------------------------------------------------------------------
    @property
    def speaking(self) -> bool:
        """Whether `audio()` would take PCM now (an utterance is being spoken, the call is on)."""
        return not self.stopped and self.current is not None and self.current.state == "speaking"

    @property
    def epoch(self) -> int:
        """What `encode` and `take` are given: it changes at every step that moves the codec on."""
        return self._epoch

    def start_utterance(self, name: str | None = None) -> Utterance:
        if self.current is not None and self.current.state == "speaking":
            raise RuntimeError(f"utterance {self.current.name!r} is still being spoken; end or clear it first")
        u = Utterance(name or f"utt-{next(self._ids)}")
        self.utterances[u.name] = u
        self.current = u
        with self._codec_lock:
            self._epoch += 1
            if self._resampler is not None:
                self._resampler.reset()
        self._pending.clear()
        return u

    def audio(self, pcm24k: np.ndarray) -> list[str]:
        """24 kHz int16 PCM of the current utterance -> whole 20 ms media messages."""
        if not self.speaking:
            return []
        epoch = self._epoch
        return self.take(self.encode(np.asarray(pcm24k, np.int16), epoch), epoch)

    def encode(self, pcm24k: np.ndarray, epoch: int) -> bytes | None:
        """The payload bytes of 24 kHz int16 PCM (resampled, encoded), or None when the session
        has moved on since `epoch` (nothing done). Safe on any thread (the codec's lock)."""
        with self._codec_lock:
            if epoch != self._epoch:
                return None
            pcm = self._resampler.process(pcm24k) if self._resampler is not None else pcm24k
            return self._encoder.encode(pcm)

    def take(self, payload: bytes | None, epoch: int) -> list[str]:
        """What `encode(pcm, epoch)` returned -> whole 20 ms media messages; nothing when the
        utterance is no longer being spoken or the session has moved on since `epoch`."""
        if payload is None or epoch != self._epoch or not self.speaking:
            return []
        self._pending += payload
        return self._frames()

    def end_utterance(self) -> list[str]:
        """The rest of the utterance (the resampler's tail, padded to a whole frame with codec
        silence) and its mark."""
        u = self.current
        if self.stopped or u is None or u.state != "speaking":
            return []
        with self._codec_lock:
            self._epoch += 1
            if self._resampler is not None:
                self._pending += self._encoder.encode(self._resampler.flush())
            self._pending += self._encoder.pad(len(self._pending))
        out = self._frames()
        u.state = "sent"
        out.append(json.dumps({"event": "mark", "mark": {"name": u.name}}))
        return out

    def clear(self) -> str:
        """The `clear` message; everything not yet heard is cut off."""
        for u in self.utterances.values():
            if u.state in ("speaking", "sent"):
                u.state = "cut_off"
        self._pending.clear()
        with self._codec_lock:
            self._epoch += 1
            self._encoder.drop()
            if self._resampler is not None:
                self._resampler.reset()
        return json.dumps({"event": "clear"})

    def _frames(self) -> list[str]:
        out = []
        size = self.frame_bytes
        n = len(self._pending) // size
        for i in range(0, n, self.frames_per_message):
            k = min(self.frames_per_message, n - i)
            payload = base64.b64encode(self._pending[i * size : (i + k) * size]).decode("ascii")
            m = MediaMessage(MEDIA_PREFIX + payload + '"}}')  # == json.dumps of the message, without its cost
            m.ms = 20.0 * k
            out.append(m)
        del self._pending[: n * size]
        self.current.frames += n
        return out
