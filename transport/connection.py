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

from ..engine.worker import GenRequest
from . import protocol
from .encoder import SOURCE_RATE, AudioEncoder
from .ring import PcmRing

log = logging.getLogger("csmstream.server")
SAMPLES_PER_FRAME = 1920


class Job:
    """A request on a connection: its message, engine request, ring and encoder."""

    __slots__ = ("msg", "rid", "req", "ring", "encoder", "event", "t_recv", "t_first", "cancelled",
                 "src_limit", "src_sent", "call", "speaking")

    def __init__(self, msg: protocol.Generate, rid: str) -> None:
        self.msg, self.rid = msg, rid
        self.req: GenRequest | None = None
        self.ring: PcmRing | None = None
        self.encoder = AudioEncoder(msg.format, msg.chunk_ms)
        self.event = asyncio.Event()
        self.t_recv = time.perf_counter()  # reset to when its turn comes, if it queued
        self.t_first = 0.0
        self.cancelled = False
        self.src_limit = None if msg.max_audio_ms is None else msg.max_audio_ms * SOURCE_RATE // 1000
        self.src_sent = 0
        self.call = None  # a phone call's media stream (serve --telnyx), when the request names one
        self.speaking: asyncio.Task | None = None  # the call.speak() feeding it

    def wake(self) -> None:
        self.event.set()

    def cancel(self) -> None:
        self.cancelled = True
        if self.req is not None:
            self.req.cancel()
        self.event.set()


class Connection:
    def __init__(self, server, ws) -> None:
        self.server, self.ws = server, ws
        self.jobs: deque[Job] = deque()  # head: the one streaming now
        self.playing: list[Job] = []  # call requests fully queued at Telnyx, waiting for their mark
        self._work = asyncio.Event()
        self._clock_t0 = 0.0  # client playback clock, for underrun accounting
        self._clock_ms = 0.0

    # -- reader ----------------------------------------------------------------------------------
    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        try:
            async for message in self.ws:
                await self._on_message(message)
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass

    def abort(self) -> None:
        """The client is gone: cancel everything it asked for (the engine frees slots next tick)."""
        for job in self.jobs:
            if not job.cancelled:
                job.cancel()
                self.server.metrics.cancelled += 1
        self.jobs.clear()

    async def _on_message(self, message) -> None:
        srv = self.server
        try:
            msg = protocol.parse(message, max_text_chars=srv.max_text_chars,
                                 topk_max=srv.engine.config.codebook_size)
        except protocol.ProtocolError as e:
            await self._error(e.code, e.message, e.request_id)
            return
        if isinstance(msg, protocol.Cancel):
            await self._cancel(msg.request_id)
            return
        rid = msg.request_id or srv.next_request_id()
        if not msg.final:
            await self._error("not_supported", "final=false (incremental text) is not supported by this "
                              "server version; send each sentence as its own request with final=true", rid)
            return
        if msg.voice is not None and msg.voice not in srv.voices:
            known = ", ".join(sorted(srv.voices)) or "none are configured"
            await self._error("unknown_voice", f"unknown voice {msg.voice!r}; available: {known}", rid)
            return
        call = None
        if msg.call_control_id is not None:
            call = srv.calls.get(msg.call_control_id) if srv.calls is not None else None
            if call is None or call.ended.is_set():
                why = ("this server has no phone-call endpoint (start it with csm-stream serve --telnyx)"
                       if srv.calls is None else "no live Telnyx media stream for that call; Telnyx connects "
                       "to /telnyx after streaming_start")
                await self._error("unknown_call", f"unknown call {msg.call_control_id!r}: {why}", rid)
                return
        if any(j.rid == rid for j in self.jobs):
            await self._error("duplicate_request_id", f"request_id {rid!r} is already queued or running on this "
                              "connection; use a new id per request", rid)
            return
        if len(self.jobs) > srv.max_waiting:
            await self._error("queue_full", f"{srv.max_waiting} requests are already waiting on this connection; "
                              "wait for a done message before sending more", rid)
            return
        job = Job(msg, rid)
        job.call = call
        self.jobs.append(job)
        srv.metrics.requests += 1
        self._work.set()

    async def _cancel(self, rid: str | None) -> None:
        targets = [j for j in [*self.playing, *self.jobs] if not j.cancelled and (rid is None or j.rid == rid)]
        if not targets:
            what = f"request {rid!r} is not running or queued" if rid else "no request is running or queued"
            await self._error("nothing_to_cancel", f"nothing to cancel: {what}", rid)
            return
        for j in targets:
            j.cancel()
            if j.speaking is not None:  # its audio is (being) queued at Telnyx
                await j.call.interrupt()  # barge-in: clear goes to Telnyx now, the rest is dropped

    async def _error(self, code: str, message: str, rid: str | None = None) -> None:
        self.server.metrics.error(code)
        log.info("request %s: error %s: %s", rid, code, message)
        await self.ws.send(protocol.error(code, message, rid))

    # -- sender ----------------------------------------------------------------------------------
    async def _sender(self) -> None:
        while True:
            while not self.jobs:
                self._work.clear()
                await self._work.wait()
            job = self.jobs[0]
            job.t_recv = max(job.t_recv, time.perf_counter())  # its turn starts now (ttfa from here)
            if not job.cancelled and job.req is None and not await self._submit(job):
                self._pop(job)
                continue
            await self._stream(job)
            self._pop(job)

    def _pop(self, job: Job) -> None:
        if self.jobs and self.jobs[0] is job:
            self.jobs.popleft()
        if not self.jobs:
            self._clock_t0 = 0.0  # idle: the next audio starts a new playback

    async def _submit(self, job: Job) -> bool:
        srv, msg = self.server, job.msg
        req = GenRequest(text=msg.text, speaker_id=msg.speaker_id, context=srv.voices.get(msg.voice, ()),
                         temperature=msg.temperature, topk=msg.topk, seed=msg.seed, tag=job,
                         max_frames=None if msg.max_audio_ms is None else max(1, math.ceil(msg.max_audio_ms / 80)))
        try:
            srv.worker.prepare(req)
            job.ring = PcmRing(req.max_frames * SAMPLES_PER_FRAME)
            req.sink = job.ring
            job.req = req
            srv.worker.submit(req)
            srv.recent.append(req)
        except (ValueError, RuntimeError) as e:
            job.req = None
            await self._error("invalid_request" if isinstance(e, ValueError) else "unavailable", str(e), job.rid)
            return False
        return True

    async def _stream(self, job: Job) -> None:
        if job.call is not None:
            from .call_stream import stream_to_call

            await stream_to_call(self, job)
            return
        enc = job.encoder
        while True:
            if job.cancelled:
                await self._done(job, cancelled=True)
                return
            req = job.req
            if req.finished and len(self.jobs) > 1 and not self.jobs[1].cancelled and self.jobs[1].req is None:
                await self._submit_next()  # generate the next sentence while this one drains
            while not job.cancelled:
                n = enc.chunk_in
                if job.src_limit is not None:
                    n = min(n, job.src_limit - job.src_sent)
                    if n <= 0:
                        req.cancel()  # reached max_audio_ms: stop generating, end normally
                        break
                pcm = job.ring.read(n)
                if pcm is None:
                    break
                job.src_sent += n
                for chunk in enc.feed(pcm):
                    await self._send_audio(job, chunk)
            limit_hit = job.src_limit is not None and job.src_sent >= job.src_limit
            if job.cancelled:
                continue
            if req.finished or limit_hit:
                if req.reason == "error":
                    await self._error("generation_failed", req.error or "generation failed", job.rid)
                    return
                rest = job.ring.read_all()
                if job.src_limit is not None:
                    rest = rest[: max(0, job.src_limit - job.src_sent)]
                job.src_sent += len(rest)
                for chunk in enc.feed(rest) + enc.finish():
                    await self._send_audio(job, chunk)
                await self._done(job, cancelled=req.reason == "cancelled" and not limit_hit)
                return
            if job.ring.available() >= enc.chunk_in:
                continue
            job.event.clear()
            if req.finished or job.ring.available() >= enc.chunk_in or job.cancelled:
                continue
            await job.event.wait()

    async def _submit_next(self) -> None:
        nxt = self.jobs[1]
        if not await self._submit(nxt):
            self.jobs.remove(nxt)

    async def _send_audio(self, job: Job, chunk: bytes) -> None:
        now = time.perf_counter()
        if not job.t_first:
            job.t_first = now
            self.server.metrics.ttfa_ms.observe(1000 * (now - job.t_recv))
        if not self._clock_t0:
            self._clock_t0, self._clock_ms = now, 0.0  # playback starts now
        elif now > self._clock_t0 + self._clock_ms / 1000:
            # the client's playback ran dry before this chunk: an audible gap
            self.server.metrics.underruns += 1
            self._clock_t0, self._clock_ms = now, 0.0
        self._clock_ms += 1000 * len(chunk) / (job.encoder.rate * (2 if job.encoder.encoding == "pcm" else 1))
        await self.ws.send(chunk)

    async def _done(self, job: Job, *, cancelled: bool, audio_ms: float | None = None, **extra) -> None:
        m = self.server.metrics
        audio_ms = job.encoder.audio_ms if audio_ms is None else audio_ms
        ttfa = 1000 * (job.t_first - job.t_recv) if job.t_first else None
        req = job.req
        if cancelled:
            m.cancelled += 1
        else:
            m.completed += 1
        m.audio_seconds += audio_ms / 1000
        if req is not None and req.t_end and audio_ms > 0:
            m.rtf.observe((req.t_end - req.t_start) / (audio_ms / 1000))
        log.info("request %s: %s, %.0f ms audio, ttfa %s ms, %d frames", job.rid,
                 "cancelled" if cancelled else (req.reason if req else "done"), audio_ms,
                 "-" if ttfa is None else f"{ttfa:.1f}", req.frames if req else 0)
        try:
            await self.ws.send(protocol.done(job.rid, audio_ms, ttfa, cancelled, **extra))
        except ConnectionClosed:
            pass  # the client left; its requests are cancelled by the handler
