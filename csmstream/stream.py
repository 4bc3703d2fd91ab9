"""A Streamer's stream (csmstream/streamer.py): what the engine thread hands it each tick (its
mailbox) and how it is read (iteration from a thread or an event loop). It is one generation, or
with a plan (csmstream/plan.py: sentences=True, stream_text) one generation a sentence."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from .engine.worker import GOOD_ENDS, GenRequest
from .plan import WAIT, GenerationError, SentencePlan


class StreamerClosed(RuntimeError):
    """The Streamer was closed while this stream was running; the frames before it were yielded."""


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class _Mailbox:
    """What the engine thread hands a stream: its PCM (the request's sink) and the wake-ups. The
    request holds this, not the Stream, so a Stream its consumer drops is freed (and cancelled)."""

    __slots__ = ("chunks", "ready", "loop", "event")

    def __init__(self) -> None:
        self.chunks: deque = deque()  # PCM written, not yet yielded (the sentences' in order)
        self.ready = threading.Event()  # set each tick the request changed: a thread consumer waits on it
        self.loop: asyncio.AbstractEventLoop | None = None  # an async consumer's loop, once it iterates
        self.event: asyncio.Event | None = None

    def write(self, samples) -> int:
        self.chunks.append(samples)  # (a fresh array each frame; deque appends are thread-safe)
        return len(samples)

    def wake(self) -> None:
        """From any thread (the text source's): the consumer looks again."""
        self.ready.set()
        loop, event = self.loop, self.event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(_set_all, [event])
            except RuntimeError:  # that loop is closed: nobody awaits on it any more
                pass


class Stream:
    """One stream of a Streamer: iterate it (for / async for); close() or aclose() to stop early;
    `spoken` is what a next turn continues (its context=) to keep the voice."""

    def __init__(self, codes: bool, encoder=None) -> None:
        self.codes = codes  # yields codes (frames()) rather than PCM (stream())
        self.req: GenRequest | None = None  # the request generating now (or the last one)
        self._box = _Mailbox()
        self._reqs: deque[GenRequest] = deque()  # frames(): requests whose codes are not all taken
        self._taken = 0  # codes taken from the first of them
        self._stopped = False  # the consumer ended it early
        self._encoder = encoder  # stream(format=...): PCM becomes these chunks (on the consumer's side)
        self._out: deque[bytes] = deque()  # encoded chunks not yet yielded
        self._flushed = False  # the encoder's last (short) chunk is out
        self._plan: SentencePlan | None = None  # sentences: what comes after the current one
        self._failed: GenerationError | None = None  # a later sentence the engine refused
        self._async_source = None  # stream_text's async iterable, read once an event loop iterates
        self._given: list = []  # the caller's context= turns (not a voice='s): what `spoken` continues

    def _begin(self, req: GenRequest) -> None:
        self.req = req
        if self.codes:
            self._reqs.append(req)

    def __repr__(self) -> str:
        req = self.req
        state = "stopped" if self._stopped else (req.reason or "running") if req is not None else "waiting for text"
        return f"Stream({'frames' if self.codes else 'pcm'}, {self.frames_made} frames, {state})"

    @property
    def frames_made(self) -> int:
        """Frames generated so far (all sentences')."""
        plan, req = self._plan, self.req
        if plan is None:
            return req.frames if req is not None else 0
        return plan.made + (req.frames if req is not None and req is not plan.counted else 0)

    @property
    def spoken(self) -> list:
        """What a next turn continues, so it keeps this voice (CSM keeps a voice only across audio
        it hears as context): the last sentences (up to 4) of this stream generated whole, as
        csmstream.Segment with their codes, after the context= turns it continued. Pass it as the
        next stream's context=, as /ws/generate's continue_previous does across requests. A
        sentence cut short (close(), an error, the max_frames budget) is not among them, nor is a
        voice= turn (give voice= again: it goes first). Read once the stream has ended (earlier:
        what has been generated whole by then)."""
        from .engine.prompt import Segment
        from .transport.job import CONTEXT_SENTENCES

        plan, req, given = self._plan, self.req, self._given
        if plan is not None and given:
            given = plan.context[len(plan.context) - len(given):]  # (their audio encoded once, by the plan)
        own = [Segment(plan.opts["speaker_id"], t, codes=c) for t, c in plan.history] if plan is not None else []
        if req is not None and (plan is None or req is not plan.counted) and (said := req.heard()) is not None:
            own.append(Segment(req.speaker_id, said[0], codes=said[1]))
        return (list(given) + own)[-CONTEXT_SENTENCES:]

    # -- reading ---------------------------------------------------------------------------------
    def _next(self):
        """The next frame (or chunk) if one is ready; None if not yet; raises StopIteration at the end."""
        self._advance()
        over = self._over()  # (looked at before taking: what was written before the end is taken)
        item = self._take()
        if item is not None:
            return item
        return self._end() if over else None

    def _advance(self) -> None:
        """With a plan: once the current sentence has finished generating well, count it and submit
        the next one (so it generates while the current one's audio is still being read)."""
        plan = self._plan
        if plan is None or self._stopped or self._failed is not None or plan.exhausted:
            return
        req = self.req
        if plan.error is not None or plan.closed:  # the text source failed, or the Streamer closed: stop
            plan.exhausted = True  # here (what was made is still read)
            if req is not None:
                req.cancel()
            return
        if req is not None:
            if not req.finished:
                return
            if req.reason not in GOOD_ENDS:
                plan.exhausted = True
                return
            plan.finished(req)
        try:
            nxt = plan.next()
        except GenerationError as e:
            self._failed = e
            return
        if nxt is not None and nxt is not WAIT:
            self._begin(nxt)
            if self._stopped:  # closed from another thread meanwhile
                nxt.cancel()

    def _over(self) -> bool:
        """No more frames will be written for this stream."""
        req, plan = self.req, self._plan
        if req is not None and not req.finished:
            return False
        if plan is None or self._stopped or self._failed is not None:
            return True
        return plan.exhausted

    def _take(self):
        if self._out:
            return self._out.popleft()
        if self.codes:
            while self._reqs:
                head = self._reqs[0]
                done = head.finished  # (before looking: codes are appended before it is set)
                if self._taken < len(head.codes):
                    self._taken += 1
                    return head.codes[self._taken - 1]
                if not done:
                    return None
                self._reqs.popleft()
                self._taken = 0
            return None
        chunks = self._box.chunks
        if self._encoder is None:
            return chunks.popleft() if chunks else None
        while not self._out and chunks:
            self._out.extend(self._encoder.feed(chunks.popleft()))
        return self._out.popleft() if self._out else None

    def _end(self):
        """After the last frame: the encoder's tail, then how the stream ended."""
        if self._encoder is not None and not self._flushed:  # (after a failure too: nothing made is lost)
            self._flushed = True
            self._out.extend(self._encoder.finish())
            if self._out:
                return self._out.popleft()
        plan, req = self._plan, self.req
        if self._stopped:
            raise StopIteration
        if plan is not None and plan.error is not None:
            raise plan.error
        if self._failed is not None:
            raise self._failed
        if req is not None and req.reason == "error":
            raise GenerationError(req.error or "generation failed")
        if (req is not None and req.reason == "cancelled") or (plan is not None and plan.closed):
            raise StreamerClosed(f"the Streamer was closed while this stream ran ({self.frames_made} frames made)")
        raise StopIteration

    def _wait_s(self) -> float | None:
        """How long to sleep before looking again with nothing woken: until a text pause counts."""
        plan = self._plan
        return plan.settle_in() if plan is not None else None

    def __iter__(self) -> Stream:
        return self

    def __next__(self):
        if self._stopped:
            raise StopIteration
        if self._async_source is not None:
            raise TypeError("this stream reads an async iterable of text: iterate it with `async for`")
        box = self._box
        while True:
            box.ready.clear()  # clear, then look: a tick in between sets it again
            item = self._next()
            if item is not None:
                return item
            box.ready.wait(self._wait_s())

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self):
        if self._stopped:
            raise StopAsyncIteration
        box = self._box
        if box.event is None:
            box.event = asyncio.Event()
            box.loop = asyncio.get_running_loop()  # (after the event: the engine thread reads both)
        if self._async_source is not None:
            self._plan.read_on_loop(self._async_source)
        while True:
            box.event.clear()
            try:
                item = self._next()
            except StopIteration:
                raise StopAsyncIteration from None
            if item is not None:
                return item
            try:
                wait = self._wait_s()
                if wait is None:
                    await box.event.wait()
                else:
                    try:
                        await asyncio.wait_for(box.event.wait(), wait)
                    except TimeoutError:
                        pass
            except BaseException:  # the consuming task was cancelled: so is the generation
                self.close()
                raise

    # -- ending early ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop generating (at the next tick) and free the slot; the iteration ends."""
        if not self._stopped:
            self._stopped = True
            if self._plan is not None:
                self._plan.stop()
            if self.req is not None and not self.req.finished:
                self.req.cancel()
            self._box.chunks.clear()
            self._out.clear()
            self._reqs.clear()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> Stream:  # `with tts.stream(...) as s:` closes it however the block ends
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # dropped unfinished (a `break` out of the loop): free its slot
        plan = self.__dict__.get("_plan")
        if plan is not None:
            plan.stop()
        req = self.__dict__.get("req")
        if req is not None and not req.finished:
            req.cancel()
