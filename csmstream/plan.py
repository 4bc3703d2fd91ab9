"""The sentences of a Streamer's stream (stream/frames with sentences=True, and stream_text): its
text split as the server splits it, each sentence one generation with the sentences before it as
context, the next one submitted as soon as the one before has finished generating (its codes are
the next one's context). With stream_text the text arrives in pieces (an LLM's output), read by a
thread (an iterable) or a task on the consumer's event loop (an async iterable)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from .engine.worker import Busy, GenRequest

WAIT = object()  # SentencePlan.next(): no sentence complete yet, but more text is coming


class GenerationError(RuntimeError):
    """The engine failed this stream (the message says how); the frames before it were yielded."""


class SentencePlan:
    def __init__(self, worker, context, seed, max_frames, opts, wake) -> None:
        """opts: the GenRequest fields every sentence shares (speaker_id, temperature, topk, sink,
        tag); wake(): tells the stream's consumer that something changed (from any thread)."""
        from .transport.sentences import SentenceSplitter

        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be an integer >= 1 or None, got {max_frames!r}")
        if context is None:
            context = ()
        if not isinstance(context, (list, tuple)):
            raise ValueError(f"context must be a list of csmstream.Segment, got {type(context).__name__}")
        e = worker.engine
        # each segment's audio is encoded to codes once, not again for every sentence
        self.context = [_segment(*e._context_codes(seg, i)) for i, seg in enumerate(context)]
        self.worker, self.opts, self.wake = worker, opts, wake
        self.seed, self.budget = seed, max_frames
        self.splitter = SentenceSplitter()
        self.parts: deque[str] = deque()  # sentences complete, not yet submitted
        self.total: int | None = None  # how many sentences in all, once the text is whole
        self.open = False  # more text is coming (stream_text)
        self.error: BaseException | None = None  # the text source raised this
        self.stopped = False  # the stream was closed: the source is no longer read
        self.closed = False  # the Streamer was closed before this stream ended
        self.history: list = []  # (sentence, codes) of the finished sentences
        self.submitted = 0
        self.made = 0  # frames of the finished sentences
        self.counted: GenRequest | None = None  # the last request whose frames are in `made`
        self.exhausted = False  # no sentence will follow
        self._lock = threading.Lock()  # (the source's thread feeds the text while the consumer takes it)
        self._last_piece = 0.0  # when the last piece with text came
        self._settle_tried = -1.0  # the _last_piece a pause was last taken after (not again until more text)
        self._task: asyncio.Task | None = None

    # -- the text ---------------------------------------------------------------------------------
    def whole(self, text) -> None:
        from .transport.sentences import split_sentences

        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        self.parts.extend(split_sentences(text))
        if not self.parts:
            raise ValueError("text has nothing to speak: no letter or digit in it")
        self.total = len(self.parts)

    def probe(self) -> None:
        """Check the shared arguments now (ValueError: the engine's message), before any text."""
        self.worker.prepare(self._request("Hello.", 0, 1, []))

    def feed(self, piece) -> None:
        if not isinstance(piece, str):
            raise TypeError(f"each piece of text must be a str, got {type(piece).__name__}")
        with self._lock:
            self.parts.extend(self.splitter.push(piece))
            if piece.strip():
                self._last_piece = time.monotonic()
        self.wake()

    def end(self, error: BaseException | None = None) -> None:
        with self._lock:
            if error is None:
                self.parts.extend(self.splitter.flush())
            self.error = error
            self.open = False
        self.wake()

    def settle_in(self) -> float | None:
        """Seconds until the text's pause makes what may be a sentence end one (the server's
        SETTLE_S; None: nothing waits on a pause)."""
        from .transport.job import SETTLE_S

        if not self.open or not self.splitter.may_settle or self._settle_tried == self._last_piece:
            return None  # (nothing to settle, or settled already and it was no end, as in "Dr.")
        return max(0.0, self._last_piece + SETTLE_S - time.monotonic())

    def read_in_thread(self, pieces) -> None:
        threading.Thread(target=self._pump, args=(iter(pieces),), name="csm-text", daemon=True).start()

    def _pump(self, it) -> None:
        try:
            for piece in it:
                if self.stopped:
                    return
                self.feed(piece)
        except BaseException as e:  # (the source's own failure: the consumer raises it)
            self.end(e)
            return
        self.end()

    def read_on_loop(self, pieces) -> None:
        """Start reading an async iterable of pieces on the running loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._apump(pieces))

    async def _apump(self, pieces) -> None:
        try:
            async for piece in pieces:
                self.feed(piece)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.end(e)
            return
        self.end()

    def stop(self) -> None:
        self.stopped = True
        task = self._task
        if task is not None and not task.done():
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop has closed
                pass

    def shutdown(self) -> None:
        """The Streamer is closing: no sentence follows (the stream ends with StreamerClosed)."""
        if not self.exhausted:
            self.closed = True
        self.stop()
        self.wake()

    # -- the sentences ----------------------------------------------------------------------------
    def finished(self, req: GenRequest) -> None:
        """`req`, a sentence, has ended well: count it, and keep it as context for the next ones
        (unless the max_frames budget cut it: nothing follows it then, and it is no context)."""
        if req is self.counted:
            return
        self.counted = req
        self.made += req.frames
        if (said := req.heard()) is not None:
            self.history.append(said)

    def next(self):
        """The next sentence's request, submitted; WAIT while its text is still coming; None when
        there is none (the text has ended, or the max_frames budget is spent). Raises
        GenerationError when the engine refuses it."""
        if self.budget is not None and self.made >= self.budget:
            self.exhausted = True
            return None
        with self._lock:
            due = self.settle_in()
            if due is not None and due <= 0:
                self.parts.extend(self.splitter.settle())
                self._settle_tried = self._last_piece
            if not self.parts:
                if self.open:
                    return WAIT
                self.exhausted = True
                return None
            text = self.parts.popleft()
        try:
            req = self._fit(text)
            req.continues = self.submitted > 0  # the stream is playing: not refused, nor queued behind newcomers
            req.more = bool(self.parts) or self.open  # its slot is kept a moment for the next sentence
            self.worker.submit(req)
        except (ValueError, RuntimeError) as e:  # (Busy is a RuntimeError)
            if isinstance(e, Busy) and not self.submitted:
                raise  # (stream_text's first sentence: nothing made yet, so retry later)
            of = f" of {self.total}" if self.total is not None else ""
            self.exhausted = True
            raise GenerationError(f"sentence {self.submitted + 1}{of} was refused: {e}") from e
        self.submitted += 1
        return req

    def _fit(self, text: str) -> GenRequest:
        from .transport.job import CONTEXT_SENTENCES, fit_history, sentence_cap

        left = None if self.budget is None else self.budget - self.made
        cap, capped = sentence_cap(self.worker.engine.config, text, left)
        req = fit_history(lambda history: self._request(text, self.submitted, cap, history), self.worker.prepare,
                          self.history[-CONTEXT_SENTENCES:], self.worker.engine.gen.max_seq_len)
        req.capped = capped
        return req

    def _request(self, text: str, i: int, cap: int, history: list) -> GenRequest:
        from .engine.prompt import Segment
        from .transport.job import sentence_request

        spk = self.opts["speaker_id"]
        ctx = self.context + [Segment(spk, t, codes=c) for t, c in history]
        return sentence_request(text, ctx, self.seed, i, cap, **self.opts)


def _segment(speaker_id, text, codes):
    from .engine.prompt import Segment

    return Segment(speaker_id, text, codes=codes)
