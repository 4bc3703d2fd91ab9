"""A /ws/generate request that names a phone call (serve --telnyx): its audio goes into the call's
media stream instead of back over the socket.

The call object is duck-typed (integrations/telnyx_bridge.TelnyxCall): `await speak(chunks)`
plays an async iterable of 24 kHz int16 PCM and returns an utterance (`.state`, `.frames` of
20 ms), `await heard(utterance)` is True once the caller heard all of it, `await interrupt()` is
barge-in, and `.ended` is set when the call is gone. The request's `done` comes once the final
mark returns (`heard: true`), or at once when it is cut off (`cancelled: true`, `heard: false`).
"""

from __future__ import annotations

import asyncio

from .connection import report_bug

CALL_CHUNK = 1920  # 80 ms at 24 kHz, one frame of the engine: one media message of four 20 ms frames
_LISTENING: set[asyncio.Task] = set()  # the loop holds tasks weakly: these wait for a caller's mark


async def stream_to_call(conn, job) -> None:
    call = job.call
    source = conn.source(job, CALL_CHUNK)
    first = await anext(source, None)
    if first is None and (job.error or job.cancelled):
        # refused, failed or cancelled before any audio: the call is not spoken into (no silent
        # utterance and no mark for a request that is answered with its error)
        await _end_unspoken(conn, job)
        return

    async def pcm():
        try:
            if first is not None:
                job.first_audio(conn.server.metrics)
            async for chunk in _at_speed(_chain(first, source), job.msg.speed):
                yield chunk
        finally:
            await source.aclose()

    job.speaking = asyncio.create_task(call.speak(pcm(), name=job.rid))
    try:
        utt = await job.speaking
    except asyncio.CancelledError:
        # the speech task was cancelled on its own: the request is cut off. But when this sender is
        # the one being cancelled (its client left), the speech task is cancelled with it, so it
        # looks the same: swallowing that left the sender running, and the connection's handler
        # waiting on it for ever (a socket, and one of its address's connection slots, held).
        if not job.speaking.cancelled() or asyncio.current_task().cancelling():
            raise
        utt = None
    except Exception:
        if not call.ended.is_set():
            raise  # a bug: _stream_or_fail makes it this request's internal_error
        utt = None  # the caller hung up before its audio could start: cut off, like a later hang-up
        await source.aclose()  # (speak never took pcm(), which would have closed it)
    if job.error or job.cancelled or utt is None or utt.state == "cut_off":
        await _end_unspoken(conn, job, 20.0 * (utt.frames if utt is not None else 0))
        return
    sent_ms = 20.0 * utt.frames
    # the utterance is queued at Telnyx: report done when the caller has heard it (or not); a
    # cancel until then is still a barge-in (connection._cancel looks in conn.playing)
    conn.playing.append(job)
    task = asyncio.create_task(_done_when_heard(conn, job, call, utt, sent_ms))
    _LISTENING.add(task)
    task.add_done_callback(_LISTENING.discard)


async def _chain(first, rest):
    if first is not None:
        yield first
    async for chunk in rest:
        yield chunk


async def _at_speed(pcm, speed: float):
    """The PCM played at `speed` (kernels/stretch.py), or as it is at 1."""
    if speed == 1:
        async for chunk in pcm:
            yield chunk
        return
    from ..kernels.stretch import TimeStretcher
    from .codec_threads import handoff

    stretcher = TimeStretcher(speed)  # on a codec thread, as a SpeedEncoder does: not the loop's CPU
    async for chunk in pcm:
        if len(out := await handoff(stretcher.process, chunk)):
            yield out
    if len(out := await handoff(lambda _: stretcher.flush(), None)):
        yield out


async def _end_unspoken(conn, job, sent_ms: float = 0.0) -> None:
    """A request whose audio was not (all) heard ends with exactly one message: its error, or a
    done that says it was cut off (a hang-up or barge-in; generation stops within one frame)."""
    job.cancel()
    if job.error:
        await conn._send_error(job)
    else:
        await conn._done(job, cancelled=True, audio_ms=sent_ms, heard=False)


async def _done_when_heard(conn, job, call, utt, sent_ms: float) -> None:
    """The request's `done` once the caller has heard it, or was cut off; a failure to find out (a
    bug) is the request's `internal_error`, never a client left waiting."""
    try:
        heard = await call.heard(utt)
    except Exception as e:
        await report_bug(conn, e, f"request {job.rid} while the call played it (whether the caller heard it all "
                         "is unknown)", job.rid)
        return
    finally:
        if job in conn.playing:
            conn.playing.remove(job)
    await conn._done(job, cancelled=not heard, audio_ms=sent_ms, heard=heard)
