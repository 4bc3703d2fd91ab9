"""Telnyx media streams over a WebSocket: one TelnyxCall per call, found by call_control_id.

Mount `handle_telnyx_media(ws, registry)` at the URL you give Telnyx as `stream_url` (a
`websockets` connection, or any object with async `send` and async iteration of text messages,
or Starlette/FastAPI's `send_text` / `iter_text`). Each call registers itself in the registry when
Telnyx's `start` arrives; `speak()` plays 24 kHz PCM chunks into it (paced, with a mark at the
end), `interrupt()` is barge-in: the TTS feed is cancelled, `clear` goes out at once, and nothing
queued for the utterance follows.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from collections.abc import AsyncIterable, Callable
from functools import partial
from typing import ClassVar
from urllib.parse import parse_qsl

import numpy as np
from websockets.exceptions import ConnectionClosed

from ..transport.codec_threads import handoff
from .pacer import Pacer
from .telnyx_codecs import check
from .telnyx_session import (
    BadMessage,
    CallerAudio,
    CallStarted,
    MarkPlayed,
    MediaMessage,
    Stopped,
    TelnyxMediaSession,
    Utterance,
)

log = logging.getLogger("csmstream.telnyx")
AUTH_HEADER = "x-telnyx-streaming-auth-token"
# a mark not back this long after its audio should have finished playing is taken as lost (heard: False)
MARK_GRACE_S = 10.0


class UnknownCall(LookupError):
    pass


STREAM_OPTIONS = ("codec", "sampling_rate", "l16_byteorder")


def query_items(query: str, allowed: tuple[str, ...], what: str = "") -> list[tuple[str, str]]:
    """A URL query's (key, value) pairs, or ValueError naming an unknown key and the allowed ones."""
    items = parse_qsl(query, keep_blank_values=True)
    for key, _ in items:
        if key not in allowed:
            raise ValueError(f"unknown {what}parameter {key!r:.40}; allowed: {', '.join(allowed)}")
    return items


def stream_options(query: str, codec: str = "PCMU", sampling_rate: int | None = None,
                   l16_byteorder: str = "big") -> dict:
    """The media format of one call: the defaults given, overridden by the stream URL's query
    (`wss://host/telnyx?codec=G722`, `?codec=L16&sampling_rate=24000`), so that each call's
    stream_url can name the codec its streaming_start asked for. ValueError says what is wrong."""
    opts = {"codec": codec, "sampling_rate": sampling_rate, "l16_byteorder": l16_byteorder}
    for key, value in query_items(query, STREAM_OPTIONS, "stream URL "):
        if key == "sampling_rate":
            if not (value.isascii() and value.isdigit()) or len(value) > 6:
                raise ValueError(f"sampling_rate must be a whole number of Hz, got {value!r:.40}")
            value = int(value)
        elif key == "codec" and value != opts["codec"]:
            opts["sampling_rate"] = None  # the new codec's own default unless given too
        opts[key] = value
    opts["sampling_rate"] = check(opts["codec"], opts["sampling_rate"], opts["l16_byteorder"])
    return opts


def auth_ok(headers, token: str | None) -> bool:
    """True when no token is configured, or the handshake carried the matching header."""
    if not token:
        return True
    got = headers.get(AUTH_HEADER) if headers is not None else None
    return isinstance(got, str) and hmac.compare_digest(got.encode(), token.encode())


def websockets_auth(token: str | None):
    """A `process_request` for websockets' serve(): refuse the handshake (401) without the
    matching x-telnyx-streaming-auth-token header."""

    def process_request(connection, request):
        if not auth_ok(request.headers, token):
            log.warning("telnyx: refused a media-stream handshake without the right %s", AUTH_HEADER)
            return connection.respond(401, f"missing or wrong {AUTH_HEADER}\n")
        return None

    return process_request


class CallRegistry:
    """Live calls by call_control_id; `wait_for` covers the race between answering a call and
    Telnyx connecting its media stream."""

    COUNTERS: ClassVar[dict[str, tuple[str, str]]] = {  # name in counts -> (Prometheus name, help)
        "calls": ("csm_telnyx_calls_total", "Telnyx media streams started"),
        "refused": ("csm_telnyx_streams_refused_total", ("media streams closed at once (a stream URL asking for "
                                                         "a format this server cannot speak)")),
        "caller_frames": ("csm_telnyx_caller_frames_total", "media messages of caller audio received and decoded"),
        "media_sent": ("csm_telnyx_media_sent_total", ("media messages sent into calls (whole 20 ms frames, at "
                                                       "most media_ms each)")),
        "media_ms": ("csm_telnyx_media_milliseconds_total", "milliseconds of audio sent into calls"),
        "utterances": ("csm_telnyx_utterances_total", "utterances started"),
        "heard": ("csm_telnyx_utterances_heard_total", "utterances whose mark came back (heard to the end)"),
        "marks_lost": ("csm_telnyx_marks_lost_total", ("utterances whose mark never came back (reported not heard "
                                                       f"{MARK_GRACE_S:.0f} s after their audio's end)")),
        "clears": ("csm_telnyx_clears_total", "barge-ins: clear messages sent"),
        "bad_messages": ("csm_telnyx_bad_messages_total", "messages from Telnyx that were ignored as malformed"),
    }

    def __init__(self) -> None:
        self._calls: dict[str, TelnyxCall] = {}
        self._waiters: dict[str, list[tuple[asyncio.Future, Callable | None]]] = {}  # (future, listener)
        self.counts: Counter[str] = Counter()  # see COUNTERS

    def metric_lines(self) -> list[str]:
        """Prometheus text lines: the calls on the line now, their listeners, and the counters."""
        listeners = sum(len(c.listeners) for c in self._calls.values())
        out = ["# HELP csm_telnyx_calls_active Telnyx calls with a live media stream",
               "# TYPE csm_telnyx_calls_active gauge", f"csm_telnyx_calls_active {len(self._calls)}",
               "# HELP csm_telnyx_listeners /telnyx/listen sockets following a live call",
               "# TYPE csm_telnyx_listeners gauge", f"csm_telnyx_listeners {listeners}"]
        for key, (name, help_) in self.COUNTERS.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {self.counts[key]}"]
        return out

    def add(self, call: TelnyxCall) -> None:
        self._calls[call.call_control_id] = call
        for f, listener in self._waiters.pop(call.call_control_id, []):
            if not f.done():
                if listener is not None:  # attached now, before the call's next message is handled
                    call.listeners.append(listener)
                f.set_result(call)

    def remove(self, call: TelnyxCall) -> None:
        if self._calls.get(call.call_control_id) is call:
            del self._calls[call.call_control_id]

    def get(self, call_control_id: str) -> TelnyxCall | None:
        return self._calls.get(call_control_id)

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self):
        """The live calls (a snapshot)."""
        return iter(list(self._calls.values()))

    async def wait_for(self, call_control_id: str, timeout: float = 5.0,
                       listener: Callable | None = None) -> TelnyxCall:
        """The call once its media stream has started. `listener` (see TelnyxCall.listeners) is
        attached the moment the call is registered: a waiter woken by the start would otherwise
        attach only when the loop gets to it, missing what the stream handled in between (after
        a stall, a backlog of the caller's audio)."""
        call = self._calls.get(call_control_id)
        if call is not None:
            if listener is not None:
                call.listeners.append(listener)
            return call
        fut = asyncio.get_running_loop().create_future()
        entry = (fut, listener)
        self._waiters.setdefault(call_control_id, []).append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise UnknownCall(f"no Telnyx media stream for call {call_control_id!r} connected within {timeout:g} s; "
                              "start streaming on the call (streaming_start) with this server's stream_url") from None
        finally:
            ws = self._waiters.get(call_control_id)
            if ws and entry in ws:
                ws.remove(entry)


def socket_gone(e: Exception) -> bool:
    """The call's socket went away (websockets, an OS error, Starlette's WebSocketDisconnect), as
    opposed to a bug."""
    return isinstance(e, (OSError, ConnectionClosed)) or type(e).__name__ == "WebSocketDisconnect"


class _TextSocket:
    """websockets (send / async for), Starlette (send_text / iter_text) or recv()-style objects."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.send = getattr(ws, "send_text", None) or ws.send

    def __aiter__(self):
        ws = self.ws
        if hasattr(ws, "iter_text"):
            return ws.iter_text().__aiter__()
        if hasattr(ws, "__aiter__"):
            return ws.__aiter__()
        return self._receive_loop()

    async def _receive_loop(self):
        recv = getattr(ws := self.ws, "receive_text", None) or getattr(ws, "recv", None) or ws.receive
        while True:
            yield await recv()


class TelnyxCall:
    def __init__(self, ws, registry: CallRegistry | None = None, *, codec: str = "PCMU",
                 sampling_rate: int | None = None, l16_byteorder: str = "big", head_ms: float = 100.0,
                 speed: float = 2.0, on_event: Callable | None = None, media_ms: int = 100) -> None:
        self.sock = _TextSocket(ws)
        self.registry = registry
        self.session = TelnyxMediaSession(codec, sampling_rate, l16_byteorder, media_ms)
        # True: the codec's work (resampling, encoding) on the codec threads, the loop keeping the
        # framing. It costs the loop 13-27 % less while the loop has time to spare, but each chunk then
        # waits for a thread and the GIL back, and once the loop is busy that wait grows past the
        # chunk's 80 ms: at 150-200 G722 calls on 2 cores the calls fell further behind real time
        # than with the work here (README, "How many calls a process carries"). Off until a call's
        # work can stay in order on one thread without a round trip a chunk.
        self.encode_off_loop = False
        self.pacer = Pacer(head_ms, speed)
        self.on_event = on_event
        self.call_control_id: str | None = None
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self._wake = asyncio.Event()
        self._feeding: asyncio.Task | None = None
        self._heard: dict[str, asyncio.Future] = {}
        self.sent_media = 0
        self.listeners: list[Callable] = []  # each gets every event, then None when the call is over

    # -- running the stream ------------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        try:
            async for text in self.sock:
                for ev in self.session.receive(text):
                    self._handle(ev)
                if self.session.stopped:
                    break
        except Exception as e:  # the socket dropped (or a bug: the call cannot go on; say so, with its traceback)
            gone = socket_gone(e)
            log.log(logging.INFO if gone else logging.ERROR, "telnyx stream %s ended: %s: %s", self.call_control_id,
                    type(e).__name__, e, exc_info=not gone)
        finally:
            self._end()
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, Exception):
                pass

    def _count(self, key: str, n: int = 1) -> None:
        if self.registry is not None:
            self.registry.counts[key] += n

    def _handle(self, ev) -> None:
        if isinstance(ev, CallerAudio):
            self._count("caller_frames")
        elif isinstance(ev, BadMessage):
            self._count("bad_messages")
        elif isinstance(ev, CallStarted):
            self._count("calls")
            self.call_control_id = ev.call_control_id
            if self.registry is not None:
                self.registry.add(self)
            self.started.set()
            log.info("telnyx call %s: media stream %s started (caller %s %d Hz; we send %s %d Hz)",
                     ev.call_control_id, ev.stream_id, ev.encoding, ev.sample_rate, self.session.codec,
                     self.session.sample_rate, extra={"call_control_id": ev.call_control_id})
        elif isinstance(ev, MarkPlayed):
            f = self._heard.get(ev.name)
            if f is not None and not f.done():
                f.set_result(ev.heard)
                self._count("heard", int(ev.heard))
        elif isinstance(ev, Stopped):
            log.info("telnyx call %s: stream stopped", self.call_control_id,
                     extra={"call_control_id": self.call_control_id})
        for listen in list(self.listeners):
            listen(ev)
        if self.on_event is not None:
            try:
                self.on_event(self, ev)
            except Exception:
                log.exception("on_event callback failed")
        if isinstance(ev, Stopped):
            self._end()  # (after the listeners had the Stopped: the None that ends their events comes last)

    def _end(self) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        self.session.end()
        self.pacer.clear()
        if self._feeding is not None and not self._feeding.done():
            self._feeding.cancel()  # a call that drops mid-utterance cancels generation
        for f in self._heard.values():
            if not f.done():
                f.set_result(False)
        if self.registry is not None and self.call_control_id:
            self.registry.remove(self)
        for listen in list(self.listeners):
            listen(None)
        self._wake.set()

    async def _writer(self) -> None:
        """Send what the pacer has due. If sending fails (the socket dropped under it, or a bug),
        the call can no longer be heard: it ends (its speakers are cut off and their generation
        cancelled, heard() answers False, the handler returns) instead of going silent for ever."""
        try:
            await self._write_due()
        except Exception as e:
            if not self.ended.is_set():
                gone = socket_gone(e)  # a hang-up the reader has not seen yet
                log.log(logging.INFO if gone else logging.ERROR, "telnyx stream %s: sending failed (%s: %s); "
                        "ending the call's stream", self.call_control_id, type(e).__name__, e, exc_info=not gone)
                self._end()

    async def _write_due(self) -> None:
        while not self.ended.is_set():
            for msg in self.pacer.pop_due(time.monotonic()):
                await self._send(msg)
            due = self.pacer.next_due(time.monotonic())
            self._wake.clear()
            if due is None:
                await self._wake.wait()
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, due - time.monotonic()))
                except TimeoutError:
                    pass

    async def _send(self, msg: str) -> None:
        if self.session.stopped:
            return  # nothing goes out after stop
        if isinstance(msg, MediaMessage):
            self.sent_media += 1
            self._count("media_sent")
            self._count("media_ms", int(msg.ms))
        await self.sock.send(msg)

    # -- speaking ----------------------------------------------------------------------------------
    async def speak(self, chunks: AsyncIterable, name: str | None = None) -> Utterance:
        """Play 24 kHz int16 PCM chunks (bytes or arrays) as one utterance; returns once it is all
        queued (or cut off). `await call.heard(utt)` waits for its mark."""
        if self.ended.is_set():
            raise UnknownCall(f"call {self.call_control_id!r} has ended")
        u = self.session.start_utterance(name)
        self._count("utterances")
        self._heard[u.name] = asyncio.get_running_loop().create_future()
        self._feeding = task = asyncio.create_task(self._feed(u, chunks))
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled() or asyncio.current_task().cancelling():
                # we were cancelled ourselves (the request's client left), not interrupted: what is
                # queued still plays, and the utterance ends there with its mark. Left "speaking", it
                # refused every later utterance: the call could not be spoken into again.
                self._queue_end()
                raise
        return u

    def _queue_end(self) -> None:
        """The current utterance's tail and mark, after what is queued (nothing if it has ended)."""
        for m in self.session.end_utterance():
            self.pacer.push(m, getattr(m, "ms", 0.0))  # media; then the mark
        self._wake.set()

    async def _feed(self, u: Utterance, chunks: AsyncIterable) -> None:
        try:
            async for chunk in chunks:
                pcm = np.frombuffer(chunk, "<i2") if isinstance(chunk, (bytes, bytearray)) else np.asarray(chunk)
                for m in await self._media(pcm):
                    self.pacer.push(m, m.ms)
                self._wake.set()
                if u.state != "speaking":
                    break
            self._queue_end()
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _media(self, pcm: np.ndarray) -> list:
        """A chunk's media messages. With `encode_off_loop` its codec work (resampling, encoding)
        runs on a codec thread and only the framing here (the session's epochs keep the bytes
        those of encoding it here)."""
        session = self.session
        if not (self.encode_off_loop and session.speaking):
            return session.audio(pcm)
        epoch = session.epoch
        payload = await handoff(partial(session.encode, epoch=epoch), pcm.astype(np.int16, copy=False))
        return session.take(payload, epoch)

    async def heard(self, u: Utterance, timeout: float | None = None) -> bool:
        """True once the caller has heard the whole utterance (its mark came back); False when it
        was cut off or the call ended. With a timeout, TimeoutError after it. Without, False also
        when the mark has not come back MARK_GRACE_S after the audio queued for the caller should
        have finished playing: a mark Telnyx lost must not leave the request waiting for ever."""
        fut = self._heard[u.name]
        if timeout is not None:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        while not fut.done():
            now = time.monotonic()
            wait = self.pacer.playback_end(now) + MARK_GRACE_S - now  # (later while audio is still queued)
            if wait <= 0:
                log.warning("telnyx call %s: the mark of utterance %r did not come back %.0f s after its audio "
                            "ended; reporting it not heard", self.call_control_id, u.name, MARK_GRACE_S,
                            extra={"call_control_id": self.call_control_id})
                self._count("marks_lost")
                fut.set_result(False)
                break
            try:
                await asyncio.wait_for(asyncio.shield(fut), wait)
            except TimeoutError:
                pass
        return fut.result()

    async def interrupt(self) -> None:
        """Barge-in: stop the TTS feed, send `clear` now, drop what is queued."""
        if self._feeding is not None and not self._feeding.done():
            self._feeding.cancel()
        self.pacer.clear()
        if self.session.stopped:
            return
        msg = self.session.clear()
        self._count("clears")
        for name, f in self._heard.items():
            if not f.done() and self.session.utterances[name].state == "cut_off":
                f.set_result(False)
        await self._send(msg)


async def handle_telnyx_media(ws, registry: CallRegistry, *, codec: str = "PCMU", on_event: Callable | None = None,
                              **kw) -> TelnyxCall:
    """Serve one Telnyx media-stream connection until it stops; returns the finished call.
    codec (and sampling_rate, l16_byteorder in kw) must be what streaming_start asked for:
    PCMU/PCMA at 8 kHz, G722 at 16 kHz, L16 at 8/16/22.05/24/48 kHz."""
    call = TelnyxCall(ws, registry, codec=codec, on_event=on_event, **kw)
    await call.run()
    return call
