"""One /ws/generate connection: a reader (parses messages, queues or cancels requests) and a
sender (streams the head request's audio chunk by chunk, then its `done`, then the next).

Errors in a message are answered with an `error` message; the connection keeps serving.
A request ends with `done` (also when cancelled), or with an `error` carrying its request_id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from websockets.exceptions import ConnectionClosed

from ..engine.prompt import Segment
from ..engine.worker import Busy
from . import protocol
from .context import encode_turns
from .gate import PerMinute
from .job import Job, fit_history, sentence_cap
from .ring import PcmRing

log = logging.getLogger("csmstream.server")
SAMPLES_PER_FRAME = 1920
SENDER_STOP_S = 5.0  # how long a closing connection waits for its sender to stop
FRAME_MS = 80


async def report_bug(conn, exc: Exception, what: str, rid: str | None = None, note: str = "") -> None:
    """A server bug hit while handling `what` (a request, a message): the log gets the traceback, the
    client an `internal_error` naming it (and `note`), and `conn` goes on serving its other requests."""
    log.error("%s failed inside the server", what, exc_info=exc)
    await conn._error("internal_error", bug_message(exc, what) + note, rid)


def bug_message(exc: Exception, what: str) -> str:
    return (f"the server failed on {what} ({type(exc).__name__}: {exc!s:.200}): a server bug, not a bad request; "
            "the server log has the traceback, and this connection goes on serving")


class PlaybackClock:
    """Where a client's playback stands if it plays every chunk as it comes: a chunk that arrives
    after the audio before it has run out is an underrun (an audible gap)."""

    def __init__(self) -> None:
        self.t0 = 0.0  # when the current stretch of playback started (0: not playing)
        self.ms = 0.0  # audio sent since then

    def reset(self) -> None:
        self.t0 = 0.0

    def advance(self, now: float, ms: float) -> bool:
        """A chunk of `ms` milliseconds goes out at `now`; True if playback had run dry."""
        dry = bool(self.t0) and now > self.t0 + self.ms / 1000
        if dry or not self.t0:
            self.t0, self.ms = now, 0.0  # playback (re)starts with this chunk
        self.ms += ms
        return dry


class Connection:
    # what a client leaving raises while its request streams: not a bug (_stream_or_fail lets it through)
    CLIENT_GONE: tuple[type[Exception], ...] = (ConnectionClosed,)

    def __init__(self, server, ws) -> None:
        self.server, self.ws = server, ws
        self.jobs: deque[Job] = deque()  # head: the one streaming now
        self.playing: list[Job] = []  # call requests fully queued at Telnyx, waiting for their mark
        self.open_job: Job | None = None  # the text stream taking text now (final=false)
        self._rate = PerMinute(server.max_requests_per_minute)
        self._work = asyncio.Event()
        self.clock = PlaybackClock()  # the client's playback, for underrun accounting
        self._input_timer: asyncio.TimerHandle | None = None  # closes open_job after its inactivity_timeout
        self.spoken: list[Segment] = []  # the last sentences generated here: context for continue_previous

    # -- reader ----------------------------------------------------------------------------------
    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        try:
            await self._receive()
        finally:
            if self._input_timer is not None:
                self._input_timer.cancel()
            sender.cancel()
            # bounded: a sender that ignored its cancel (a bug) must not keep this connection open
            done, _ = await asyncio.wait({sender}, timeout=SENDER_STOP_S)
            if not done:
                log.error("a bug: this connection's sender ignored its cancel for %.0f s; the connection is "
                          "released without it", SENDER_STOP_S)
            elif not sender.cancelled():
                sender.exception()  # (taken: the client leaving, or a bug already reported where it happened)

    async def _receive(self) -> None:
        """Each client message to _on_message, until the client closes."""
        async for message in self.ws:
            await self._take(message)

    async def _take(self, message) -> None:
        try:
            await self._on_message(message)
        except ConnectionClosed:
            raise
        except Exception as e:  # a bug: this message fails, the connection and its requests go on
            await report_bug(self, e, "this message")
        finally:
            self._watch_input()

    @property
    def busy(self) -> bool:
        """Requests queued, streaming, or playing into a call."""
        return bool(self.jobs or self.playing)

    async def cancel_all(self) -> None:
        """The server is stopping and its deadline has passed: cancel everything; each done says
        reason "server_shutdown" (a client can tell it from its own cancel, and not take the audio
        as whole)."""
        for job in [*self.playing, *self.jobs]:
            job.cancel_reason = "server_shutdown"
        await self._cancel(None, quiet=True)

    async def close_for_shutdown(self) -> None:
        await self.ws.close(1001, "server shutting down")

    def abort(self) -> None:
        """The client is gone: cancel everything it asked for (the engine frees slots next tick)."""
        for job in self.jobs:
            if not job.cancelled:
                job.cancel()
                self.server.metrics.cancelled += 1
            job.release()
        self.jobs.clear()

    async def _on_message(self, message) -> None:
        srv = self.server
        limits = {"max_text_chars": srv.max_text_chars, "topk_max": srv.engine.config.codebook_size}
        try:
            msg = protocol.parse(message, **limits, streaming=self.open_job is not None)
            ended = self._ended_stream()
            if ended is not None and isinstance(msg, (protocol.Append, protocol.Flush)) \
                    and msg.request_id not in (None, ended.rid):
                self.open_job = None  # a new request_id: not the rest of the ended turn, a new request
                msg = protocol.parse(message, **limits)
        except protocol.ProtocolError as e:
            await self._error(e.code, e.message, e.request_id)
            return
        if isinstance(msg, protocol.Cancel):
            await self._cancel(msg.request_id)
            return
        if isinstance(msg, (protocol.Append, protocol.Flush)):
            await self._stream_text(msg)
            return
        rid = msg.request_id or srv.next_request_id()
        if not self._rate.allow():
            await self._error("rate_limited", f"at most {srv.max_requests_per_minute} requests per minute per "
                              "connection; wait and retry", rid)
            return
        if msg.voice is not None and msg.voice not in srv.voices:
            known = ", ".join(sorted(srv.voices)) or "none are configured"
            await self._error("unknown_voice", f"unknown voice {msg.voice!r:.60}; available: {known}", rid)
            return
        msg.voice = srv.voice_name(msg.voice)  # an alias's voice; the server's default for none
        if msg.ignored:
            log.info("request %s: ignoring unknown field(s) %s", rid, protocol.hinted(msg.ignored),
                     extra={"request_id": rid})
        call = None
        if msg.call_control_id is not None:
            call = srv.calls.get(msg.call_control_id) if srv.calls is not None else None
            if call is None or call.ended.is_set():
                why = ("this server has no phone-call endpoint (start it with csm-stream serve --telnyx)"
                       if srv.calls is None else "no live Telnyx media stream for that call; Telnyx connects "
                       "to /telnyx after streaming_start")
                await self._error("unknown_call", f"unknown call {msg.call_control_id!r:.60}: {why}", rid)
                return
        if any(j.rid == rid and not j.answered for j in self.jobs):
            await self._error("duplicate_request_id", f"request_id {rid!r} is already queued or running on this "
                              "connection; use a new id per request", rid)
            return
        if sum(not j.answered for j in self.jobs) > srv.max_waiting:
            await self._error("queue_full", f"{srv.max_waiting} requests are already waiting on this connection; "
                              "wait for a done message before sending more", rid)
            return
        job = Job(msg, rid)
        if msg.context and not await self._encode_context(job):  # (this connection's next messages wait)
            return
        job.call = call
        job.add_text(msg.text)
        if msg.final:
            job.close()
        else:
            job.open = True
            self.open_job = job
        self.jobs.append(job)
        srv.metrics.requests += 1
        self._work.set()

    def _watch_input(self) -> None:
        """After each message: an open text stream is closed once it has had no message for its
        inactivity_timeout (a client that stalls or forgets final=true would otherwise hold the
        words it sent, unspoken, and this connection's later requests, for ever)."""
        if self._input_timer is not None:
            self._input_timer.cancel()
            self._input_timer = None
        job = self.open_job
        if job is not None:
            self._input_timer = asyncio.get_running_loop().call_later(job.msg.inactivity_timeout, self._input_idle,
                                                                      job)

    def _input_idle(self, job: Job) -> None:
        self._input_timer = None
        if job is not self.open_job:
            return
        if self._ended_stream() is job:  # its request has ended: stop dropping the rest of its text
            log.info("request %s: no text for %g s (inactivity_timeout): the text stream of this ended request is "
                     "closed", job.rid, job.msg.inactivity_timeout, extra={"request_id": job.rid})
            self.open_job = None
            return
        log.info("request %s: no text for %g s (inactivity_timeout): closing its text stream; what it sent is "
                 "spoken", job.rid, job.msg.inactivity_timeout, extra={"request_id": job.rid})
        self.server.metrics.error("input_timeout")
        job.input_timed_out = True
        job.close()
        self.open_job = None

    def _ended_stream(self) -> Job | None:
        """The open text stream, if its request has already ended (refused, failed, or cut at
        max_audio_ms) or is ending, while its client may still be sending the rest of that turn."""
        job = self.open_job
        return job if job is not None and (job.error is not None or job.t_done or job.cancelled) else None

    def _stream_note(self, job: Job) -> str:
        """What a failed request's error adds when it is the open text stream: what becomes of the
        text its client is still sending."""
        if job is not self.open_job:
            return ""
        return (f"; text stream {job.rid!r} ends here: its further text is dropped (each message answered with "
                "stream_ended) until final=true, flush or cancel; a message with a new request_id starts a new "
                "request")

    async def _drop_text(self, job: Job, msg) -> None:
        """Text for a stream whose request has ended: the rest of that turn, dropped (spoken as a new
        request it would start mid-sentence). Once the request's error or done is out, each piece of
        text is answered, so a client that took that as the stream's end and sent a new request
        without a request_id is told, not left waiting for audio that never comes; a bare flush,
        the turn's end, closes it without a reply (nothing was dropped)."""
        closes = isinstance(msg, protocol.Flush) or msg.final
        if closes:
            self.open_job = None
        if isinstance(msg, protocol.Flush) or not job.answered:
            return  # (before its end is out: the error or done that follows covers this text)
        how = (f" with its error ({job.error_code or 'generation_failed'})" if job.error is not None else
               " at max_audio_ms" if job.src_limit is not None and job.src_sent >= job.src_limit else "")
        after = ("the stream is closed now: the next message starts a new request" if closes else
                 "its further text is dropped too, until final=true, flush or cancel; a message with a new "
                 "request_id starts a new request")
        await self._error("stream_ended", f"text stream {job.rid!r} has ended{how}, so this text was dropped; {after}",
                          msg.request_id)

    async def _stream_text(self, msg) -> None:
        job = self.open_job
        if self._ended_stream() is job:
            await self._drop_text(job, msg)
            return
        if msg.request_id is not None and msg.request_id != job.rid:
            await self._error("invalid_request_id", f"text stream {job.rid!r} is open; its text must go to it "
                              "(omit request_id, or close it with {\"flush\": true} first)", msg.request_id)
            return
        if isinstance(msg, protocol.Append):
            if job.chars + len(msg.text) > self.server.max_text_chars:
                await self._error("text_too_long", f"this text stream would exceed {self.server.max_text_chars} "
                                  "characters; close it and open a new one", job.rid)
                return
            job.add_text(msg.text)
            if not msg.final:
                return
        job.close()
        self.open_job = None

    async def _cancel(self, rid: str | None, quiet: bool = False) -> None:
        ended = self._ended_stream()
        if ended is not None and rid in (None, ended.rid):
            self.open_job = None  # its request has ended; the cancel ends its text stream too
        else:
            ended = None
        targets = [j for j in [*self.playing, *self.jobs]
                   if not j.cancelled and not j.answered and (rid is None or j.rid == rid)]
        if not targets:
            if quiet:
                return
            what = f"request {rid!r} is not running or queued" if rid else "no request is running or queued"
            if ended is not None:
                what = (f"request {ended.rid!r} has already ended; its text stream is closed now (the next message "
                        "starts a new request)")
            await self._error("nothing_to_cancel", f"nothing to cancel: {what}", rid)
            return
        for j in targets:
            j.cancel()
            if j is self.open_job:
                self.open_job = None
            if j.speaking is not None:  # its audio is (being) queued at Telnyx
                await j.call.interrupt()  # barge-in: clear goes to Telnyx now, the rest is dropped

    async def _error(self, code: str, message: str, rid: str | None = None) -> None:
        self.server.metrics.error(code)
        log.info("request %s: error %s: %s", rid, code, message, extra={"request_id": rid, "code": code})
        await self.ws.send(protocol.error(code, message, rid))

    async def _encode_context(self, job: Job) -> bool:
        """The request's own context turns -> job.context: encoded with the model's codec off the
        loop, CONTEXT_ENCODERS requests at a time. False (its invalid_context error sent) when the
        codec refuses them."""
        srv, msg = self.server, job.msg
        try:
            async with srv.context_encoders:
                t0 = time.perf_counter()
                job.context = await asyncio.get_running_loop().run_in_executor(None, encode_turns, msg.context,
                                                                               srv.engine)
        except ValueError as e:
            await self._error("invalid_context", str(e), job.rid)
            return False
        finally:
            msg.context = None  # (their decoded audio is not needed any more: up to ~1 MB a request)
        srv.metrics.context_turns += len(job.context)
        srv.metrics.context_seconds += time.perf_counter() - t0
        return True

    # -- sender ----------------------------------------------------------------------------------
    async def _sender(self) -> None:
        while True:
            while not self.jobs:
                self._work.clear()
                await self._work.wait()
            job = self.jobs[0]
            job.t_recv = max(job.t_recv, time.perf_counter())  # its turn starts now (ttfa from here)
            await self._stream_or_fail(job)
            self._pop(job)

    async def _stream_or_fail(self, job: Job) -> None:
        """_stream, where a bug ends only this request: the client gets an `internal_error` naming
        it (never a request that hangs on a dead sender), the log the traceback, and the
        connection goes on with its next request. A client that left ends it as before."""
        try:
            await self._stream(job)
        except self.CLIENT_GONE:
            raise
        except Exception as e:
            job.error = job.error or f"internal error ({type(e).__name__})"
            job.cancel()  # its engine requests stop at the next tick
            if job.error_sent:  # (its client has had its one error already)
                log.error("request %s failed inside the server after its error was sent", job.rid, exc_info=e)
                return
            job.error_sent = True
            await report_bug(self, e, f"request {job.rid}", job.rid, self._stream_note(job))

    def _pop(self, job: Job) -> None:
        if said := job.spoken():  # (kept for a continue_previous request to come)
            self.spoken = said
        job.release()
        if self.jobs and self.jobs[0] is job:
            self.jobs.popleft()
        if not self.jobs:
            self.clock.reset()  # idle: the next audio starts a new playback

    def _queued_after(self, job: Job) -> Job | None:
        """The request that plays after `job` on this connection (its first sentence is handed to
        the engine as soon as `job` is all generated), or None."""
        return self.jobs[1] if len(self.jobs) > 1 and self.jobs[0] is job else None

    def _clock_of(self, job: Job) -> PlaybackClock:
        """The playback clock `job`'s audio runs on: one per connection, as its requests play in
        turn."""
        return self.clock

    async def _submit_part(self, job: Job) -> bool:
        """Hand the job's next sentence to the engine, with the reply so far as context (trimmed
        from the oldest sentence until the prompt fits the window with room for this sentence)."""
        srv = self.server
        text = job.parts[0]
        # the per-sentence cap scales with the sentence; max_audio_ms bounds the whole request
        left = None if job.src_limit is None else max(1, math.ceil((job.src_limit - job.src_sent) / SAMPLES_PER_FRAME))
        cap, capped = sentence_cap(srv.engine.config, text, left)
        if job.voice is None and job.msg.voice is not None:
            job.voice = srv.voices.get(job.msg.voice)  # (once: a reply keeps its voice through a voices reload)
        v = job.voice
        voice = [Segment(job.msg.speaker_id, v.text, codes=v.codes)] if v is not None else []

        def make(history):
            return job.new_request(text, voice + history, cap)

        later = job.n_parts > 0  # a later sentence: its reply is playing
        if job.msg.continue_previous and job.before is None:
            job.before = self._spoken_before(job)
        try:
            req = fit_history(make, srv.worker.prepare, job.heard_by_next(), srv.engine.gen.max_seq_len)
            req.capped = capped
            if not later and job.before:
                job.continued = max(0, len(req.context) - len(voice) - len(job.context))
            ring = PcmRing(req.max_frames * SAMPLES_PER_FRAME)
            req.sink = ring
            req.continues = later  # not refused, nor queued behind newcomers
            req.more = len(job.parts) > 1 or job.open  # its slot is kept a moment for the next sentence
            srv.worker.submit(req)
        except Exception as e:
            if isinstance(e, (ValueError, RuntimeError)):  # refused: a bad prompt, full, or stopping
                job.error, job.error_code = str(e), ("invalid_request" if isinstance(e, ValueError) else
                                                     "busy" if isinstance(e, Busy) else "unavailable")
            elif later:  # a bug on a later sentence: handled like a refusal
                log.error("request %s: a later sentence failed inside the server", job.rid, exc_info=e)
                job.error, job.error_code = bug_message(e, f"request {job.rid}"), "internal_error"
            else:
                raise  # a bug on the first sentence: _stream_or_fail makes it the request's internal_error
            if later:  # what the earlier sentences generated plays out first (source drains it), then
                job.parts.clear()  # _stream sends this error
                job.event.set()
            else:
                await self._send_error(job)
                job.cancel()
            return False
        job.parts.popleft()
        job.n_parts += 1
        job.active.append((req, ring))
        srv.recent.append(req)
        return True

    def _spoken_before(self, job: Job) -> list[Segment]:
        """What was generated on this connection before `job` (continue_previous): the request
        queued ahead of it (all generated by now: _pump starts `job` only then), else the last one
        that ended here."""
        ahead = list(self.jobs)
        i = next((k for k, j in enumerate(ahead) if j is job), 0)
        for j in reversed(ahead[:i]):
            if said := j.spoken():
                return said
        return list(self.spoken)

    async def _pump(self, job: Job) -> None:
        """Keep the engine one sentence ahead: the first sentence as soon as it is complete, the
        next one when the current one has finished generating, and the next request's first
        sentence when this one is all generated."""
        if job.cancelled or job.error:
            return
        if job.parts and (not job.active or (len(job.active) == 1 and job.active[0][0].finished)):
            await self._submit_part(job)
        nxt = self._queued_after(job) if job.generated else None
        if nxt is not None and nxt.parts and not nxt.active and not nxt.cancelled and not nxt.error:
            await self._submit_part(nxt)

    async def source(self, job: Job, unit):
        """The job's 24 kHz PCM as it is generated, in pieces of `unit` samples (shorter at the end
        of a sentence), sentence after sentence; ends when all is generated and read, on cancel, on
        error, or at max_audio_ms. `unit` is a number, or a callable asked before each piece."""
        size = unit if callable(unit) else lambda: unit
        while not job.cancelled and (not job.error or job.active):  # (a refused sentence: the rest drains)
            await self._pump(job)
            want = size()
            if job.active:
                req, ring = job.active[0]
                n = want
                if job.src_limit is not None:
                    n = min(n, job.src_limit - job.src_sent)
                    if n <= 0:  # reached max_audio_ms: stop generating, end normally
                        for r, _ in job.active:
                            r.cancel()
                        return
                pcm = ring.read(n)
                if pcm is not None:
                    job.src_sent += n
                    yield pcm
                    continue
                if req.finished:
                    if req.reason == "cancelled":  # by the server (shutting down)
                        job.cancelled = True
                        return
                    rest = ring.read_all()
                    if job.src_limit is not None:
                        rest = rest[: max(0, job.src_limit - job.src_sent)]
                    if req.reason == "error":  # what it generated before failing still goes out, then the error
                        if len(rest):
                            job.src_sent += len(rest)
                            yield rest
                        job.error = req.error or "generation failed"
                        return
                    job.active.popleft()
                    req.sink = None
                    if (said := req.heard()) is not None:  # (one cut at max_audio_ms is no context)
                        job.history.append(said)
                    job.done_reqs.append(req)
                    if len(rest):
                        job.src_sent += len(rest)
                        yield rest
                    continue
            elif not job.open and not job.parts:
                return
            job.event.clear()
            if job.cancelled or (job.active and (job.active[0][1].available() >= want or job.active[0][0].finished)) \
                    or (not job.active and (job.parts or not job.open)):
                continue
            await job.event.wait()

    async def _stream(self, job: Job) -> None:
        if job.call is not None:
            from .call_stream import stream_to_call

            await stream_to_call(self, job)
            return
        enc = job.encoder
        async for pcm in self.source(job, lambda: enc.chunk_in):  # (a SpeedEncoder's grows after its first chunk)
            for chunk in await enc.feed_async(pcm):
                await self._send_audio(job, chunk)
        if job.error:
            if not job.cancelled:
                for chunk in enc.finish():  # what was generated before the failure is not lost
                    await self._send_audio(job, chunk)
            await self._send_error(job)
            return
        if job.cancelled:
            await self._done(job, cancelled=True)
            return
        for chunk in enc.finish():
            await self._send_audio(job, chunk)
        await self._done(job, cancelled=False)

    async def _send_error(self, job: Job) -> None:
        """End a failed request with its error, once: a refused first sentence had it at once, and a
        request that failed and was then cancelled by its client still gets it (not nothing: that
        client would wait for ever). A request ends with exactly one error or done."""
        if not job.error_sent:
            job.error_sent = True
            await self._error(job.error_code or "generation_failed", job.error + self._stream_note(job), job.rid)

    async def _send_audio(self, job: Job, chunk: bytes) -> None:
        if self.server.test_chunk_delay:
            await asyncio.sleep(self.server.test_chunk_delay)
        job.first_audio(self.server.metrics)
        if self._clock_of(job).advance(time.perf_counter(), job.encoder.duration_ms(chunk)):
            self.server.metrics.underruns += 1  # the client's playback ran dry before this chunk
        await self._deliver(job, chunk)

    async def _deliver(self, job: Job, chunk: bytes) -> None:
        """Put one chunk on the wire (a WebSocket binary message here)."""
        await self._send_timed(job, chunk)

    async def _send_timed(self, job: Job, message) -> None:
        """Send one message of `job`'s; a client that does not take it within send_timeout is cut off."""
        try:
            await asyncio.wait_for(self.ws.send(message), self.server.send_timeout)
        except TimeoutError:
            # the client stopped reading: do not buffer for it without bound; free its slot and drop it
            self._slow_reader(job.rid)
            job.cancel()
            self.ws.transport.abort()
            raise ConnectionClosed(None, None) from None

    def _slow_reader(self, rid: str) -> None:
        self.server.metrics.error("slow_reader")
        log.warning("request %s: client not reading for %.0f s; cancelling and closing", rid, self.server.send_timeout,
                    extra={"request_id": rid, "code": "slow_reader"})

    async def _done(self, job: Job, *, cancelled: bool, audio_ms: float | None = None, **extra) -> None:
        audio_ms, ttfa = self._account(job, cancelled, audio_ms)
        if job.input_timed_out:
            extra["input_timeout"] = True
        if cancelled and job.cancel_reason is not None:
            extra["reason"] = job.cancel_reason
        extra.update(job.continued_field())
        if job.msg.ignored:  # (a typo in a field name is not silently lost)
            extra["ignored_fields"] = job.msg.ignored
        try:
            await self.ws.send(protocol.done(job.rid, audio_ms, ttfa, cancelled, **extra))
        except ConnectionClosed:
            pass  # the client left; its requests are cancelled by the handler

    def _account(self, job: Job, cancelled: bool, audio_ms: float | None) -> tuple[float, float | None]:
        """A request has ended: metrics and the log line; returns (audio_ms, ttfa_ms)."""
        m = self.server.metrics
        audio_ms = job.encoder.audio_ms if audio_ms is None else audio_ms
        ttfa = 1000 * (job.t_first - job.t_recv) if job.t_first else None
        reqs = job.sentences
        if cancelled:
            m.cancelled += 1
        else:
            m.completed += 1
        m.audio_seconds += audio_ms / 1000
        if reqs and reqs[-1].t_end and reqs[0].t_start and audio_ms > 0:
            m.rtf.observe((reqs[-1].t_end - reqs[0].t_start) / (audio_ms / 1000))
        frames, outcome = sum(r.frames for r in reqs), "cancelled" if cancelled else "done"
        log.info("request %s: %s, %.0f ms audio in %d sentence(s), ttfa %s ms, %d frames", job.rid, outcome, audio_ms,
                 len(reqs), "-" if ttfa is None else f"{ttfa:.1f}", frames,
                 extra={"request_id": job.rid, "outcome": outcome, "audio_ms": round(audio_ms, 1),
                        "ttfa_ms": None if ttfa is None else round(ttfa, 1), "sentences": len(reqs), "frames": frames})
        job.t_done = time.perf_counter()
        return audio_ms, ttfa
