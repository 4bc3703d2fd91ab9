"""A Streamer's stream (csmstream/streamer.py): what the engine thread hands it each tick (its
mailbox), how it is read (iteration from a thread or an event loop), and, with sentences=True,
the sentences it speaks one generation after another."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import numpy as np

from .engine.worker import GenRequest


class GenerationError(RuntimeError):
    """The engine failed this stream (the message says how); the frames before it were yielded."""


class StreamerClosed(RuntimeError):
    """The Streamer was closed while this stream was running; the frames before it were yielded."""


class _Sentences:
    """stream(sentences=True): the text's sentences, each one generation (GenRequest) with the
    earlier ones as context, submitted when the one before has finished (its codes are the next
    one's context)."""

    def __init__(self, worker, text, context, seed, max_frames, opts) -> None:
        from .transport.sentences import split_sentences

        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be an integer >= 1 or None, got {max_frames!r}")
        self.parts = split_sentences(text)
        if not self.parts:
            raise ValueError("text has nothing to speak: no letter or digit in it")
        self.worker, self.context, self.opts = worker, list(context or ()), opts
        self.seed, self.budget = seed, max_frames
        self.history: list = []  # (sentence, codes) generated so far
        self.done = 0  # sentences submitted
        self.frames_before = 0  # frames of the sentences before the current one

    def first(self) -> GenRequest:
        return self._submit(0)  # its ValueError, Busy: the caller's, at once

    def _submit(self, made: int) -> GenRequest:
        """Submit the next sentence, `made` frames into the stream."""
        from .engine.prompt import Segment
        from .transport.job import CONTEXT_SENTENCES, REPEAT_GUARD, fit_history

        text, i, spk = self.parts[self.done], self.done, self.opts["speaker_id"]
        cap = self.worker.engine.config.default_max_frames(len(text))
        if self.budget is not None:
            cap = min(cap, self.budget - made)

        def make(history):
            ctx = self.context + [Segment(spk, t, codes=c) for t, c in history]
            return GenRequest(text, context=ctx, seed=None if self.seed is None else self.seed + i, max_frames=cap,
                              keep_codes=True, max_repeats=REPEAT_GUARD, **self.opts)

        req = fit_history(make, self.worker.prepare, self.history[-CONTEXT_SENTENCES:],
                          self.worker.engine.gen.max_seq_len)
        self.worker.submit(req)
        self.done += 1
        return req

    def next(self, req: GenRequest) -> GenRequest | None:
        """After `req` (the current sentence) ended well and was all read: the next sentence's
        request, submitted; None when there is none, or the max_frames budget is spent (asked
        again, None again). Raises GenerationError when the engine refuses it."""
        made = self.frames_before + req.frames
        if self.done == len(self.parts) or (self.budget is not None and made >= self.budget):
            return None
        if req.codes:
            self.history.append((req.text, np.stack(req.codes)))
        try:
            nxt = self._submit(made)
        except (ValueError, RuntimeError) as e:  # (Busy is a RuntimeError)
            raise GenerationError(f"sentence {self.done + 1} of {len(self.parts)} was refused: {e}") from e
        self.frames_before = made
        return nxt


class _Mailbox:
    """What the engine thread hands a stream: its PCM (the request's sink) and the wake-ups. The
    request holds this, not the Stream, so a Stream its consumer drops is freed (and cancelled)."""

    __slots__ = ("chunks", "ready", "loop", "event")

    def __init__(self) -> None:
        self.chunks: deque = deque()  # PCM written, not yet yielded
        self.ready = threading.Event()  # set each tick the request changed: a thread consumer waits on it
        self.loop: asyncio.AbstractEventLoop | None = None  # an async consumer's loop, once it iterates
        self.event: asyncio.Event | None = None

    def write(self, samples) -> int:
        self.chunks.append(samples)  # (a fresh array each frame; deque appends are thread-safe)
        return len(samples)


_ENDED = object()  # Stream._take: the current request is over and all of it was taken
GOOD_ENDS = ("eos", "max_frames", "guard")  # a sentence that ended so: the next one follows


class Stream:
    """One stream of a Streamer: iterate it (for / async for); close() or aclose() to stop early."""

    def __init__(self, codes: bool, encoder=None) -> None:
        self.codes = codes  # yields codes (frames()) rather than PCM (stream())
        self.req: GenRequest | None = None
        self._box = _Mailbox()
        self._taken = 0  # codes yielded (frames())
        self._stopped = False  # the consumer ended it early
        self._encoder = encoder  # stream(format=...): PCM becomes these chunks (on the consumer's side)
        self._out: deque[bytes] = deque()  # encoded chunks not yet yielded
        self._flushed = False  # the encoder's last (short) chunk is out
        self._plan: _Sentences | None = None  # sentences=True: the sentences after the current one
        self._failed: GenerationError | None = None  # a later sentence the engine refused

    def __repr__(self) -> str:
        req = self.req
        state = "stopped" if self._stopped else (req.reason or "running") if req is not None else "new"
        return f"Stream({'frames' if self.codes else 'pcm'}, {req.frames if req else 0} frames, {state})"

    @property
    def frames_made(self) -> int:
        """Frames generated so far (all sentences')."""
        return self.req.frames + (self._plan.frames_before if self._plan is not None else 0)

    def _next(self):
        """The next frame (or chunk) if one is ready; None if not yet; raises StopIteration at the end."""
        while True:
            item = self._take()
            if item is not _ENDED:
                return item
            if not self._advance():
                return self._end()

    def _advance(self) -> bool:
        """The current request has ended and all of it was taken: with sentences=True, go on to the
        next sentence (True), unless it ended badly, the stream was closed, or it was the last."""
        if self._plan is None or self._stopped or self._failed is not None or self.req.reason not in GOOD_ENDS:
            return False
        try:
            req = self._plan.next(self.req)
        except GenerationError as e:
            self._failed = e
            return False
        if req is None:
            return False
        self.req, self._taken = req, 0
        if self._stopped:  # closed from another thread meanwhile
            req.cancel()
        return True

    def _take(self):
        """The current request's next frame (or chunk): None if not yet, _ENDED once it has ended
        and everything it made was taken."""
        if self._out:
            return self._out.popleft()
        box = self._box
        for _ in range(2):  # once more after seeing the end: frames written just before it
            done = self.req.finished
            if self.codes:
                if self._taken < len(self.req.codes):
                    self._taken += 1
                    return self.req.codes[self._taken - 1]
            elif self._encoder is None:
                if box.chunks:
                    return box.chunks.popleft()
            else:
                while not self._out and box.chunks:
                    self._out.extend(self._encoder.feed(box.chunks.popleft()))
                if self._out:
                    return self._out.popleft()
            if not done:
                return None
        return _ENDED

    def _end(self):
        """After the last request: the encoder's tail, then how the stream ended."""
        if self._encoder is not None and not self._flushed:  # (after a failure too: nothing made is lost)
            self._flushed = True
            self._out.extend(self._encoder.finish())
            if self._out:
                return self._out.popleft()
        if self._failed is not None:
            raise self._failed
        reason = self.req.reason
        if reason == "error":
            raise GenerationError(self.req.error or "generation failed")
        if reason == "cancelled" and not self._stopped:
            raise StreamerClosed(f"the Streamer was closed while this stream ran ({self.req.frames} frames made)")
        raise StopIteration

    def __iter__(self) -> Stream:
        return self

    def __next__(self):
        if self._stopped:
            raise StopIteration
        box = self._box
        while True:
            box.ready.clear()  # clear, then look: a tick in between sets it again
            item = self._next()
            if item is not None:
                return item
            box.ready.wait()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self):
        if self._stopped:
            raise StopAsyncIteration
        box = self._box
        if box.event is None:
            box.event = asyncio.Event()
            box.loop = asyncio.get_running_loop()  # (after the event: the engine thread reads both)
        while True:
            box.event.clear()
            try:
                item = self._next()
            except StopIteration:
                raise StopAsyncIteration from None
            if item is not None:
                return item
            try:
                await box.event.wait()
            except BaseException:  # the consuming task was cancelled: so is the generation
                self.close()
                raise

    def close(self) -> None:
        """Stop generating (at the next tick) and free the slot; the iteration ends."""
        if not self._stopped:
            self._stopped = True
            if self.req is not None and not self.req.finished:
                self.req.cancel()
            self._box.chunks.clear()
            self._out.clear()

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
        req = self.__dict__.get("req")
        if req is not None and not req.finished:
            req.cancel()
