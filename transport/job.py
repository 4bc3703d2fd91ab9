"""A request on a connection: its text (all at once, or streamed with final=false), split into
sentences; each sentence is one engine request, generated with the earlier sentences of the same
reply (their text and generated codes) as context, so the voice stays the same; the audio of all
sentences flows through one encoder, so chunks stay exact and there is no seam between them."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np

from ..engine.prompt import Segment
from ..engine.worker import GenRequest
from . import protocol
from .encoder import SOURCE_RATE, encoder_for
from .ring import PcmRing
from .sentences import SentenceSplitter

CONTEXT_SENTENCES = 4  # at most this many earlier sentences as context (prefill cost stays bounded)
REPEAT_GUARD = 12  # the same frame ~1 s in a row: a stuck, run-on sentence is stopped
SETTLE_S = 0.2  # a text stream quiet this long after a sentence's end: that end is taken (splitter.settle)


class Job:
    def __init__(self, msg: protocol.Generate, rid: str) -> None:
        self.msg, self.rid = msg, rid
        self.encoder = encoder_for(msg.format, msg.chunk_ms, msg.speed)
        self.event = asyncio.Event()
        self.t_recv = time.perf_counter()  # reset to when its turn comes, if it queued
        self.t_first = 0.0
        self.t_done = 0.0  # when its done message went out
        self.cancelled = False
        self.input_timed_out = False  # its text stream was closed by inactivity_timeout
        self.cancel_reason: str | None = None  # why the server (not the client) cancelled it
        self.error: str | None = None
        self.error_code: str | None = None  # its error's code, when it was refused (e.g. busy)
        self.error_sent = False  # its error message has gone out (a refused first sentence's: at once)
        self.src_limit = None if msg.max_audio_ms is None else src_samples(msg.max_audio_ms, msg.speed)
        self.src_sent = 0
        self.call = None  # a phone call's media stream (serve --telnyx), when the request names one
        self.speaking: asyncio.Task | None = None  # the call.speak() feeding it
        self.splitter = SentenceSplitter()
        self.open = False  # a text stream still taking text
        self.chars = 0
        self.parts: deque[str] = deque()  # sentences ready to generate
        self.active: deque[tuple[GenRequest, PcmRing]] = deque()  # submitted, in order; head streams
        self.history: list[tuple[str, np.ndarray]] = []  # (sentence, codes) generated so far
        self.before: list | None = None  # continue_previous: the earlier request's sentences (Segments), once taken
        self.continued = 0  # how many of them its first sentence had as context
        self.context: list[Segment] = []  # the client's own turns ("context"), encoded: heard before its sentences
        self.voice = None  # its named voice (engine.voices.Voice), taken at its first sentence: a reload
        # of the server's voices (SIGHUP) meanwhile does not change the voice of a reply under way
        self.done_reqs: list[GenRequest] = []
        self.n_parts = 0
        self._settle: asyncio.TimerHandle | None = None  # takes the sentence the text paused after

    @property
    def answered(self) -> bool:
        """Its one done or error has gone out (or is going): for its client it has ended, though
        the sender may not have moved on from it yet. Its request_id is free again."""
        return self.error_sent or bool(self.t_done)

    # -- text --------------------------------------------------------------------------------------
    def add_text(self, text: str) -> None:
        self.chars += len(text)
        self.parts.extend(self.splitter.push(text))
        self.event.set()
        if self._settle is not None and not text.strip():
            return  # (a keep-alive, or a space: the pause goes on)
        self._unsettle()
        if self.splitter.may_settle:
            self._settle = asyncio.get_running_loop().call_later(SETTLE_S, self._settled)

    def _unsettle(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None

    def _settled(self) -> None:
        """The text paused after what may be a sentence's end: the splitter decides without the next
        piece, so a reply that stops there is spoken now (its next piece may be seconds away)."""
        self._settle = None
        if self.open and not self.cancelled:
            self.parts.extend(self.splitter.settle())
            self.event.set()

    def flush_now(self) -> None:
        """Generate what is buffered now, even mid-sentence; the stream stays open."""
        self.parts.extend(self.splitter.flush())
        self.event.set()

    def close(self) -> None:
        self._unsettle()
        self.parts.extend(self.splitter.flush())
        self.open = False
        self.event.set()

    # -- state -------------------------------------------------------------------------------------
    @property
    def req(self) -> GenRequest | None:
        """The engine request streaming now (or the last one)."""
        if self.active:
            return self.active[0][0]
        return self.done_reqs[-1] if self.done_reqs else None

    @property
    def sentences(self) -> list[GenRequest]:
        """Every engine request of this job so far: the finished and read ones, then those still
        active (a request cancelled or cut at max_audio_ms ends with its last ones active; only
        finished ones are aligned, but all of them count in the log and the usage)."""
        return self.done_reqs + [r for r, _ in self.active]

    @property
    def generated(self) -> bool:
        """All text is in and every sentence has finished generating."""
        return not self.open and not self.parts and all(r.finished for r, _ in self.active)

    def first_audio(self, metrics) -> None:
        """Record the moment the request's first audio leaves (once) in its TTFA histogram."""
        if not self.t_first:
            self.t_first = time.perf_counter()
            metrics.ttfa_ms.observe(1000 * (self.t_first - self.t_recv))

    def wake(self) -> None:
        self.event.set()

    def cancel(self) -> None:
        self.cancelled = True
        for req, _ in self.active:
            req.cancel()
        self.event.set()

    def release(self) -> None:
        """Drop the audio buffers (rings) and the codec's state once the job is over; the engine
        requests (and through their tag, this job) live on in the server's `recent` list for
        inspection without holding audio."""
        for r, _ in self.active:
            r.sink = None
            self.done_reqs.append(r)
        self.active.clear()
        self._unsettle()
        for r in self.done_reqs:
            r.sink = None
        self.encoder.close()

    def context_for_next(self) -> list[tuple[str, np.ndarray]]:
        """Earlier sentences whose codes are complete: its history plus the active ones generated
        whole (GenRequest.whole: not one cut short by a cancel, an error or max_audio_ms)."""
        done = self.history + [said for r, _ in self.active if (said := r.heard()) is not None]
        return done[-CONTEXT_SENTENCES:]

    def ended_at(self) -> float:
        """When its latest sentence generated whole finished (0.0: none has yet)."""
        return max((r.t_end for r in self.sentences if r.whole and r.codes), default=0.0)

    def spoken(self) -> list[Segment]:
        """Its last sentences with complete codes, after those of the request it continued
        (continue_previous), if any: the context of a later request that continues it (so a run
        of short requests keeps its voice)."""
        return self._said()

    def heard_by_next(self) -> list[Segment]:
        """The context of its next sentence: `spoken()` with the client's own turns placed after
        the sentences it continued and before its own (the order they were said in: the agent's
        last reply, the caller's answer, then this reply)."""
        return self._said(self.context)

    def _said(self, between: list = ()) -> list[Segment]:
        own = [Segment(self.msg.speaker_id, t, codes=c) for t, c in self.context_for_next()]
        said = ((self.before or []) + own)[-CONTEXT_SENTENCES:]
        cut = len(said) - min(len(said), len(own))  # where its own sentences start
        return said[:cut] + list(between) + said[cut:]

    def continued_field(self) -> dict:
        """For its done (or isFinal): {"continued": N}, how many earlier sentences its first one
        heard, when it asked for continue_previous; else nothing."""
        return {"continued": self.continued} if self.msg.continue_previous else {}

    def new_request(self, text: str, context: list, max_frames: int) -> GenRequest:
        """The request for the next sentence (the caller counts it in n_parts once it is submitted)."""
        m = self.msg
        return sentence_request(text, context, m.seed, self.n_parts, max_frames, speaker_id=m.speaker_id,
                                temperature=m.temperature, topk=m.topk, tag=self, chunk_s=m.chunk_ms / 1000)


def src_samples(ms: int, speed: float) -> int:
    """Generated (24 kHz) samples that play for `ms` at `speed`: max_audio_ms caps the audio sent."""
    return ms * SOURCE_RATE // 1000 if speed == 1 else int(ms * speed * SOURCE_RATE / 1000)


def sentence_request(text: str, context: list, seed: int | None, i: int, max_frames: int, **fields) -> GenRequest:
    """Sentence i of a reply: seed + i when seeded, its codes kept (the next sentences' context),
    stopped by the repeat guard; `fields` are the reply's own (speaker_id, temperature, ...)."""
    return GenRequest(text=text, context=context, seed=None if seed is None else seed + i, max_frames=max_frames,
                      keep_codes=True, max_repeats=REPEAT_GUARD, **fields)


def sentence_cap(config, text: str, left: int | None) -> tuple[int, bool]:
    """A sentence's frame cap, and whether it is capped (GenRequest.capped): its own, which scales
    with its length, or `left` of the reply's budget (max_audio_ms, max_frames) when that is less:
    reaching it then cuts the sentence short."""
    own = config.default_max_frames(len(text))
    return (left, True) if left is not None and left < own else (own, False)


def fit_history(make, prepare, history: list, window: int) -> GenRequest:
    """A sentence's request with as much of the reply so far as fits: `make(history)` builds it
    with those earlier (text, codes) sentences as context, `prepare(req)` checks it (ValueError: the
    prompt does not fit the model's `window`). The oldest sentence is dropped until the prompt is
    accepted and leaves room for the sentence's cap (the max_frames it was made with); with no
    history left, prepare's ValueError goes up."""
    while True:
        req = make(history)
        cap = req.max_frames
        try:
            prepare(req)
        except ValueError:
            if not history:
                raise
            history = history[1:]  # the prompt does not fit at all: drop the oldest sentence
            continue
        if not history or req.prompt_len + cap <= window:
            return req
        history = history[1:]
