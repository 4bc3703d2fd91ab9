"""The caller's side of a call, for the voice agent of an in-process deployment (serve --telnyx).

There Telnyx streams the call to csm-stream itself, so the agent that sends text to /ws/generate
with a `call_control_id` would not hear the caller. It connects here instead:

    ws://HOST:PORT/telnyx/listen?call_control_id=v2:...&format=pcm_16000

and gets, as JSON text frames and binary frames:
- `{"event": "start", "call_control_id", "from", "to", "custom_parameters", "client_state",
  "encoding", "sample_rate", "format"}` once the call's media stream is there (it may come up to
  `wait` seconds, default 10, after the listener: answering a call and connecting its stream race),
  and `frame_ms`;
- the caller's audio as binary frames of 16-bit little-endian mono PCM in `format` (`pcm_16000`
  by default; `pcm_8000`, `pcm_24000`), decoded from the call's codec and resampled, `frame_ms` a
  frame (20 by default, as Telnyx sends it; up to 1000 in steps of 20): what speech recognition and
  barge-in detection run on. Larger frames cost the server's event loop less (a frame is a send,
  whatever its size) at the price of that much latency; before any other event the audio so far
  goes out, in a shorter frame if need be, so everything stays in order;
- `{"event": "dtmf", "digit"}` for each key pressed; `{"event": "mark", "name", "heard"}` as each
  utterance spoken into the call finishes playing (heard) or is cut off;
- `{"event": "stop"}` when the call ends, then the socket closes (1000).
A query it cannot serve, or a call that never appears, closes the socket with 1008 and the reason.
A listener that falls more than MAX_BEHIND events (about 4 s of audio) behind, or takes nothing
for SEND_TIMEOUT_S, is cut off with 1008 (`slow_listener`): the call goes on. Any number may
listen to one call.
"""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np

from ..kernels.resample import Resampler
from ..transport.protocol import close_reason
from .telnyx_bridge import CallRegistry, UnknownCall, query_items, socket_gone
from .telnyx_codecs import whole_frames
from .telnyx_session import CallerAudio, Dtmf, MarkPlayed, Stopped

log = logging.getLogger("csmstream.telnyx")

FORMATS = {"pcm_8000": 8000, "pcm_16000": 16000, "pcm_24000": 24000}
OPTIONS = ("call_control_id", "format", "wait", "frame_ms")
MAX_WAIT_S = 60.0
MAX_BEHIND = 200  # queued events: 200 x 20 ms of caller audio
SEND_TIMEOUT_S = 5.0  # a listener that takes nothing for this long is cut off


class SlowListener(Exception):
    pass


def listen_options(query: str) -> dict:
    """call_control_id (required), format, wait, frame_ms; ValueError saying what is wrong."""
    opts: dict = {"format": "pcm_16000", "wait": 10.0, "frame_ms": "20"}
    opts.update(query_items(query, OPTIONS))
    if not opts.get("call_control_id"):
        raise ValueError("call_control_id is required: the call to listen to (?call_control_id=v2:...)")
    if opts["format"] not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {opts['format']!r:.40}")
    try:
        wait = float(opts["wait"])
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_S:
        raise ValueError(f"wait must be seconds in 0..{MAX_WAIT_S:.0f}, got {opts['wait']!r:.40}")
    opts["wait"] = wait
    frame_ms = opts["frame_ms"]
    if not (frame_ms.isascii() and frame_ms.isdigit() and whole_frames(int(frame_ms))):
        raise ValueError(f"frame_ms must be a multiple of 20 from 20 to 1000 (ms of caller audio a frame), "
                         f"got {frame_ms!r:.40}")
    opts["frame_ms"] = int(frame_ms)
    return opts


class _Feed:
    """One listener's queue of the call's events (None: the call is over)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(MAX_BEHIND)
        self.overflow = False

    def __call__(self, ev) -> None:
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.overflow = True


async def _close(ws, code: int, reason: str) -> None:
    await ws.close(code, close_reason(reason))


async def _call_or_hang_up(ws, registry: CallRegistry, ccid: str, wait: float, feed):
    """The call once its stream is there, with `feed` among its listeners from its registration on;
    None if the listener's socket closes first."""
    closed = getattr(ws, "wait_closed", None)
    if closed is None:
        return await registry.wait_for(ccid, wait, feed)
    waiting, hung_up = asyncio.ensure_future(registry.wait_for(ccid, wait, feed)), asyncio.ensure_future(closed())
    try:
        await asyncio.wait({waiting, hung_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung_up.cancel()
        if not waiting.done():
            waiting.cancel()
    call = waiting.result() if waiting.done() and not waiting.cancelled() else None
    if call is not None and hung_up.done() and not hung_up.cancelled():  # both at once: the listener is gone
        call.listeners.remove(feed)
        return None
    return call


async def handle_listener(ws, registry: CallRegistry, query: str) -> None:
    """Serve one listener until the call ends or the listener leaves."""
    try:
        opts = listen_options(query)
    except ValueError as e:
        log.warning("telnyx listen: refused: %s", e)
        await _close(ws, 1008, str(e))
        return
    ccid, rate = opts["call_control_id"], FORMATS[opts["format"]]
    feed = _Feed()
    try:
        call = await _call_or_hang_up(ws, registry, ccid, opts["wait"], feed)
    except UnknownCall as e:
        await _close(ws, 1008, str(e))
        return
    if call is None:
        return  # the listener left (or the server closed it) while waiting for the call
    resamplers: dict[int, Resampler] = {}
    frame = rate * opts["frame_ms"] // 1000  # samples a binary frame
    audio = bytearray()  # caller audio not sent yet (less than a frame)

    async def send(message) -> None:
        try:
            await asyncio.wait_for(ws.send(message), SEND_TIMEOUT_S)
        except TimeoutError:
            raise SlowListener(f"slow_listener: took nothing for {SEND_TIMEOUT_S:.0f} s") from None
        if feed.overflow:
            raise SlowListener(f"slow_listener: more than {MAX_BEHIND} events behind")

    async def send_event(message: str) -> None:  # the audio before it first
        if audio:
            await send(bytes(audio))
            audio.clear()
        await send(message)

    try:
        if call.ended.is_set():
            feed(None)
        started = call.session.started
        await send(json.dumps({
            "event": "start", "call_control_id": ccid, "from": started.from_, "to": started.to,
            "custom_parameters": started.custom_parameters, "client_state": started.client_state,
            "encoding": started.encoding, "sample_rate": started.sample_rate, "format": opts["format"],
            "frame_ms": opts["frame_ms"]}))
        while True:
            ev = await feed.queue.get()
            if isinstance(ev, CallerAudio):
                pcm = ev.pcm
                if ev.sample_rate != rate:
                    r = resamplers.get(ev.sample_rate) or resamplers.setdefault(ev.sample_rate,
                                                                                Resampler(ev.sample_rate, rate))
                    pcm = r.process(pcm)
                audio += np.asarray(pcm, "<i2").tobytes()
                whole = len(audio) // (2 * frame) * 2 * frame
                for i in range(0, whole, 2 * frame):
                    await send(bytes(audio[i : i + 2 * frame]))
                del audio[:whole]
            elif isinstance(ev, Dtmf):
                await send_event(json.dumps({"event": "dtmf", "digit": ev.digit}))
            elif isinstance(ev, MarkPlayed):
                await send_event(json.dumps({"event": "mark", "name": ev.name, "heard": ev.heard}))
            elif ev is None or isinstance(ev, Stopped):
                await send_event(json.dumps({"event": "stop"}))
                await ws.close(1000)
                return
    except SlowListener as e:
        log.warning("telnyx listen %s: %s; cut off", ccid, e)
        await _close(ws, 1008, str(e))
    except Exception as e:  # the listener left
        if socket_gone(e):
            log.info("telnyx listen %s: listener gone (%s)", ccid, type(e).__name__)
        else:  # a bug: the log gets its traceback, the listener a close saying so; the call goes on
            log.error("telnyx listen %s: serving the listener failed", ccid, exc_info=e)
            try:
                await _close(ws, 1011, f"internal error ({type(e).__name__}); the server log has the traceback")
            except Exception:
                pass
    finally:
        call.listeners.remove(feed)
