"""ElevenLabs' multi-context socket, /v1/text-to-speech/{voice_id}/multi-stream-input (the protocol
is described in elevenlabs.py): up to MAX_CONTEXTS utterances at once on one connection, each its
own Job streamed by its own task."""

from __future__ import annotations

import asyncio
import json
import time

from websockets.exceptions import ConnectionClosed

from . import protocol
from .connection import PlaybackClock
from .elevenlabs import ElevenLabsBase, Stream
from .job import Job

MAX_CONTEXTS = 5  # ElevenLabs' limit
MAX_CONTEXT_ID = 128
DEFAULT_CONTEXT = "default"
MAX_FAILED = 64  # failed contexts remembered per connection (their late text is dropped; see _on_failed)


class MultiContextConnection(ElevenLabsBase):
    """multi-stream-input: contexts are independent utterances, each its own Job streamed by its
    own task (so one waiting for text never holds up another), each on its own playback clock."""

    def __init__(self, server, ws) -> None:
        super().__init__(server, ws)
        self.contexts: dict[str, Stream] = {}  # live: opened, isFinal not yet sent
        self.tasks: set[asyncio.Task] = set()
        # contexts that failed mid-turn (error, isFinal) -> when their client last wrote to them: the
        # rest of that turn's text is dropped, not spoken as a new context (see _on_failed)
        self.failed: dict[str, float] = {}
        self.closing = False  # close_socket: no new contexts; the socket closes when the last ends
        self.finals_sending = 0  # isFinals on their way: their contexts are detached, not yet ended
        self.spoken_at = 0.0  # when the sentences in self.spoken (an ended context's) finished generating

    async def _serve(self) -> None:
        try:
            await self._receive()  # (a bug on one message is its internal_error; the contexts go on)
        finally:
            for t in list(self.tasks):
                t.cancel()

    def _queued_after(self, job: Job) -> Job | None:
        return None  # contexts run side by side, not in turn

    def _clock_of(self, job: Stream) -> PlaybackClock:
        return job.clock

    def _spoken_before(self, job: Job) -> list:
        """continue_previous here: contexts run side by side, and a voice agent opens one per turn
        (leaving the last one open, or closing it), so a new context hears the context that most
        recently finished a sentence, live or ended: the turn before it."""
        said, at = self.spoken, self.spoken_at
        for other in self.contexts.values():
            if other is not job and (t := other.ended_at()) > at:
                said, at = other.spoken(), t
        return list(said)

    async def _idle(self, now: float) -> None:
        for job in self.contexts.values():
            if job.open and now - job.last_message >= self.inactivity:
                job.close()  # its buffered text is still spoken, then isFinal
        for cid in [c for c, t in self.failed.items() if now - t >= self.inactivity]:
            del self.failed[cid]
        if not self.contexts and not self.finals_sending and now - self.last_message >= self.inactivity:
            await self._time_out()

    async def _on_message(self, message) -> None:
        self.last_message = now = time.monotonic()
        msg = await self._decode(message, '{"text": "Hello ", "context_id": "c1"}')
        if msg is None:
            return
        if msg.get("close_socket") is True:
            self.closing = True
            for job in self.contexts.values():
                job.close()
            await self._close_if_done()
            return
        cid, text = msg.get("context_id", DEFAULT_CONTEXT), msg.get("text")
        if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CONTEXT_ID:
            await self._error("invalid_message", f"context_id must be a string of 1 to {MAX_CONTEXT_ID} characters, "
                              f"got {cid!r:.40}")
            return
        if text is not None and not isinstance(text, str):
            await self._error("invalid_message", f"text must be a string, got {type(text).__name__}", cid=cid)
            return
        if text and (why := protocol.text_problem(text)) is not None:
            await self._error("invalid_message", why, cid=cid)
            return
        job = self.contexts.get(cid)
        if job is None and cid in self.failed:
            self._on_failed(cid, msg, now)
            return
        if job is None and not text and not (msg.get("flush") is True or msg.get("close_context") is True):
            return  # {"text": ""} (with no context, or a closed one): a keep-alive; it opens nothing
        if job is None:
            job = await self._open(cid, text, msg)
            if job is None:
                return
        elif text:
            if not job.open:
                await self._error("context_closed", f"context {cid!r} is closed (its audio is still being sent); "
                                  "open a new context_id for more text", cid=cid)
                return
            if job.chars + len(text) > self.server.max_text_chars:
                await self._error("text_too_long", f"context {cid!r} would exceed {self.server.max_text_chars} "
                                  "characters; close it and open a new one", cid=cid)
                return
            job.take(text)
        job.last_message = now  # any message for a context keeps it alive ({"text": ""} only that)
        if msg.get("close_context") is True:
            if msg.get("immediate") is True:
                job.cancel()  # barge-in: generation stops at the next tick, buffered text is dropped
            job.close()
        elif job.open and msg.get("flush") is True:
            job.flush_now()

    def _on_failed(self, cid: str, msg: dict, now: float) -> None:
        """A message for a context that failed (refused as busy, or its generation failed) while its
        client was still writing its turn: the client has had the error and the context's isFinal.
        Its text is the rest of that failed turn, so it is dropped (spoken as a new context it would
        start mid-sentence and end with a second isFinal); the turn's flush or close_context ends
        that, and the id opens a new context again. Nothing is sent: the error said so."""
        del self.failed[cid]
        if not (msg.get("flush") is True or msg.get("close_context") is True):
            self.failed[cid] = now  # (re-inserted: the dict stays ordered by last message)

    async def _open(self, cid: str, text: str | None, msg: dict) -> Stream | None:
        if not text:  # a flush or close_context
            await self._error("context_not_found", f"no open context {cid!r}; a context opens with its first "
                              'text message ({"text": " ", "context_id": ...})', cid=cid)
            return None
        if self.closing:
            await self._error("socket_closing", "close_socket was sent; no new contexts on this connection", cid=cid)
            return None
        if len(self.contexts) >= MAX_CONTEXTS:
            await self._error("max_active_conversations", f"at most {MAX_CONTEXTS} contexts at once per connection "
                              f"(open: {', '.join(self.contexts)}); close one first", cid=cid)
            return None
        if not self._rate.allow():
            await self._error("rate_limited", f"at most {self.server.max_requests_per_minute} new contexts per "
                              "minute per connection; wait and retry", cid=cid)
            return None
        if text and len(text) > self.server.max_text_chars:
            await self._error("text_too_long", f"at most {self.server.max_text_chars} characters per context", cid=cid)
            return None
        try:
            speed = self.opening_speed(msg)  # (a context's first message may carry its voice_settings)
        except protocol.ProtocolError as e:
            await self._error(e.code, e.message, cid=cid)
            return None
        job = self._new_job(text, speed)
        job.context_id = cid
        self.contexts[cid] = job
        task = asyncio.create_task(self._play(cid, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job

    async def _play(self, cid: str, job: Stream) -> None:
        """Stream one context's audio, then its isFinal (also after a failure, so every context ends)."""
        try:
            await self._stream_or_fail(job)
            if job.error:
                await self._final(job)
        except ConnectionClosed:
            return  # the client is gone; the connection's handler cancels the rest
        finally:
            if (t := job.ended_at()) > self.spoken_at:  # (for a continue_previous context to come)
                self.spoken, self.spoken_at = job.spoken(), t
            job.release()
            self._detach(job)  # (the client left before its isFinal)
            if job in self.jobs:
                self.jobs.remove(job)
        await self._close_if_done()

    def _detach(self, job: Stream) -> None:
        """The context's isFinal goes now: from here its id names no live context, so the client's
        next message for it (which may come as soon as it reads that isFinal) opens a new one -- or,
        after a failure mid-turn, is the rest of that turn (_on_failed)."""
        cid = job.context_id
        if self.contexts.get(cid) is job:
            del self.contexts[cid]
            if job.error and job.open and job.mid_turn:
                self.failed[cid] = time.monotonic()
                while len(self.failed) > MAX_FAILED:
                    del self.failed[next(iter(self.failed))]

    async def _close_if_done(self) -> None:
        if self.closing and not self.contexts and not self.finals_sending:
            await self.ws.close(1000)

    async def _final(self, job: Stream) -> None:
        self._detach(job)
        self.finals_sending += 1  # (close_socket waits for it: the socket closes after the last isFinal)
        try:
            await self._send_timed(job, json.dumps(self._final_message(job, contextId=job.context_id)))
        finally:
            self.finals_sending -= 1

    def _audio(self, job: Stream, chunk: bytes) -> dict:
        return {**super()._audio(job, chunk), "contextId": job.context_id}

    async def _done(self, job, *, cancelled: bool, audio_ms=None, **extra) -> None:
        self._account(job, cancelled, audio_ms)
        await self._final(job)

    async def _error(self, code: str, message: str, rid: str | None = None, *, cid: str | None = None) -> None:
        self.server.metrics.error(code)
        if cid is None and rid is not None:
            cid = next((c for c, j in self.contexts.items() if j.rid == rid), None)
        job = self.contexts.get(cid) if rid is not None and cid is not None else None
        if job is not None and job.open and job.mid_turn:
            message += (f" (context {cid!r} ends here with its isFinal; the rest of its text is dropped until its "
                        "flush or close_context)")
        reply = {"error": code, "message": message}
        if cid is not None:
            reply["contextId"] = cid
        await self.ws.send(json.dumps(reply))
