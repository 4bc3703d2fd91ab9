"""Many streams from one engine, batched, for code that embeds csm-stream (no server, no socket).

    eng = csmstream.load("/path/to/csm-1b", max_streams=64)
    async with csmstream.Streamer(eng) as tts:              # asyncio
        async for pcm in tts.stream("Hello there.", seed=1):  # np.int16, 1920 samples (80 ms) a frame
            ...
    with csmstream.Streamer(eng) as tts:                    # or threads
        for pcm in tts.stream("Hi."):
            ...

`Engine.stream()` runs its own frame step for each frame of each call, so concurrent calls take
turns: N callers cost N steps a frame. A Streamer runs the server's engine thread
(engine/worker.py) instead: every tick ONE batched step for all the streams it holds (on the H200, a
step for 64 rows took 8.1 ms, one row's 6.5), with prompts prefilled in chunks between ticks so a
newcomer never stalls the others. Each stream yields what `Engine.stream()` (or `frames()`) yields
alone, the same codes for the same seed. With `sentences=True` a paragraph (or a document) is
spoken as the server speaks it: one generation a sentence, each with the sentences before it as
context -- the same audio as /ws/generate sends for the same text and seed; `stream_text` takes
the text in pieces as an LLM writes it and speaks each sentence once it is complete.

A stream is an iterator and an async iterator (and a context manager that closes it): use either,
from any thread or event loop. It is validated when made (ValueError, the engine's message); `Busy`
when every slot is taken and the waiting queue (4 x max_streams unless `max_waiting`) is full.
Leaving it early -- break, close(), a cancelled task, dropping it -- stops its generation at the
next tick and frees its slot. If generation fails, what was made is yielded first, then
`GenerationError`; a stream still running when the Streamer closes yields what was made, then
raises `StreamerClosed`.
"""

from __future__ import annotations

import asyncio
import weakref

from .engine.worker import Busy, EngineWorker, GenRequest, stall_seconds
from .plan import GenerationError, SentencePlan
from .stream import Stream, StreamerClosed, _set_all

__all__ = ["Streamer", "Stream", "Busy", "GenerationError", "StreamerClosed"]


class Streamer:
    """The engine thread for one engine: `start()`/`close()`, or use it as a (async) context manager."""

    def __init__(self, engine, *, prefill_chunk: int = 512, max_waiting: int | None = None,
                 voices=None, stall_timeout: float | None = None) -> None:
        """engine: from `csmstream.load()`; its max_streams is how many streams run at once.
        prefill_chunk: prompt positions prefilled at a time between two ticks (>= 1).
        max_waiting: streams that may wait for a slot beyond those (default 4 x max_streams).
        voices: a directory of named voices, NAME.wav + NAME.txt pairs as for `serve --voices`:
        encoded now, their prompts' KV cached (engine.pin_voice); a stream picks one with voice=NAME.
        stall_timeout: seconds one tick may run before the engine counts as stuck (a GPU that stopped
        answering): every stream then ends with GenerationError and new ones are refused, instead of
        waiting forever (None: 120 on GPU, 300 on CPU; 0: never)."""
        from .engine.engine import Engine

        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an Engine from csmstream.load(), got {type(engine).__name__} "
                            "(e.g. Streamer(csmstream.load('tiny')))")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 prompt position, got {prefill_chunk}")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.voices: dict = {}  # name -> engine.voices.Voice
        if voices is not None:
            from .engine.voices import load_voices

            self.voices = load_voices(voices, engine)  # (ValueError naming what is wrong with the directory)
            for v in self.voices.values():
                engine.pin_voice(v.text, v.codes)
        self._worker = EngineWorker(engine, self._notify, prefill_chunk=prefill_chunk, max_waiting=max_waiting,
                                    stall_s=stall_seconds(stall_timeout, engine))
        self._started = self._closed = False
        self._plans: weakref.WeakSet[SentencePlan] = weakref.WeakSet()  # streams of sentences, to end on close

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "not started"
        return f"Streamer({self.engine!r}, {state})"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Streamer:
        if self._closed:
            raise RuntimeError("this Streamer is closed; make a new one")
        if not self._started:
            self._worker.start()
            self._started = True
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine thread: streams still running end with StreamerClosed (blocks until then)."""
        if self._started and not self._closed:
            for plan in list(self._plans):  # streams between sentences, or waiting for text
                plan.shutdown()
            self._worker.stop(timeout)
        self._closed = True

    def __enter__(self) -> Streamer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> Streamer:
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.close)  # (joins the engine thread: not on the event loop)

    @property
    def stats(self):
        """The engine thread's counters (engine/worker.WorkerStats): ticks, frames, active, waiting, ..."""
        return self._worker.stats

    # -- streams ---------------------------------------------------------------------------------
    def stream(self, text: str, speaker_id: int = 0, *, context=(), temperature: float = 0.9, topk: int = 50,
               seed: int | None = None, max_frames: int | None = None, format: str | None = None,
               chunk_ms: int | None = None, sentences: bool = False, voice: str | None = None,
               speed: float = 1.0) -> Stream:
        """Speech as int16 PCM, 24 kHz mono, 1920 samples an 80 ms frame, batched with the other
        streams; arguments and their errors are those of `Engine.stream()`.

        speed: 0.25..4, the speaking rate with the pitch kept (kernels/stretch.py), as the
        server's `speed`; PCM then comes in pieces of varying length as the stretcher makes them.

        format: instead, bytes in that format (any of /ws/generate's and the HTTP port's:
        "ulaw_8000" for a phone, "pcm_16000", "g722_16000", "mp3_44100_128", ...) in chunks of
        `chunk_ms` (20..1000, default 100), each exactly that long but the last, as the server
        sends them.

        sentences: speak the text sentence by sentence, as the server does: each sentence is
        its own generation with the sentences before it (up to 4, as many as fit the window) as
        context after `context`, so the voice carries on; sentence i of a seeded stream has seed
        + i, and max_frames bounds the whole stream. For paragraphs and longer: one generation
        of a long text drifts and is cut at the model's window.

        voice: one of this Streamer's voices (voices=DIR): its turn goes first in the context, as
        the server puts it for a request's "voice"."""
        return self._submit(self._pcm_stream(format, chunk_ms, speed), text, speaker_id, context, voice, temperature,
                            topk, seed, max_frames, sentences)

    def frames(self, text: str, speaker_id: int = 0, *, context=(), temperature: float = 0.9, topk: int = 50,
               seed: int | None = None, max_frames: int | None = None, sentences: bool = False,
               voice: str | None = None) -> Stream:
        """The audio codes, np.int64 (32,) an 80 ms frame (no audio decoded), batched like stream()
        (`sentences` as there)."""
        return self._submit(Stream(codes=True), text, speaker_id, context, voice, temperature, topk, seed,
                            max_frames, sentences)

    def stream_text(self, pieces, speaker_id: int = 0, *, context=(), temperature: float = 0.9, topk: int = 50,
                    seed: int | None = None, max_frames: int | None = None, format: str | None = None,
                    chunk_ms: int | None = None, codes: bool = False, voice: str | None = None,
                    speed: float = 1.0) -> Stream:
        """Text as it is written (an LLM's tokens): `pieces` is an iterable of str (read by a
        thread of its own, so a blocking one never holds up the audio) or an async iterable (read
        on the event loop that iterates the stream: use `async for`). Each sentence is spoken as
        soon as it is complete -- a sentence end the text pauses after for 0.2 s counts, as on the
        server -- as with sentences=True; the stream ends when the pieces do and all is spoken.
        If the pieces raise, the sentence speaking is stopped, what was made is yielded, then
        that exception. codes=True: the frames' codes instead of audio. The other arguments are
        stream()'s, checked now (ValueError)."""
        if isinstance(pieces, (str, bytes)):
            raise ValueError("pieces must be an iterable of str pieces as they are written, not one "
                             f"{type(pieces).__name__}: for a whole text use stream(text, sentences=True)")
        is_async = hasattr(pieces, "__aiter__")
        if not is_async and not hasattr(pieces, "__iter__"):
            raise ValueError(f"pieces must be an iterable or an async iterable of str, got {type(pieces).__name__}")
        if codes and (format is not None or chunk_ms is not None or speed != 1):
            raise ValueError("format, chunk_ms and speed are for audio: with codes=True the frames' codes come")
        stream = Stream(codes=True) if codes else self._pcm_stream(format, chunk_ms, speed)
        plan = self._plan(stream, speaker_id, context, voice, temperature, topk, seed, max_frames)
        plan.open = True
        plan.probe()
        if is_async:
            stream._async_source = pieces
        else:
            plan.read_in_thread(pieces)
        return stream

    def _with_voice(self, voice, speaker_id, stream: Stream, context):
        """`context` with the named voice's turn first (as the server puts it), or as it was; the
        stream notes the caller's turns (Stream.spoken continues them)."""
        if isinstance(context, (list, tuple)):
            stream._given = list(context)
        if voice is None:
            return context
        v = self.voices.get(voice) if isinstance(voice, str) else None
        if v is None:
            have = (f"has {', '.join(sorted(self.voices))}" if self.voices else
                    "has none: Streamer(engine, voices=DIR) loads NAME.wav + NAME.txt pairs")
            raise ValueError(f"unknown voice {voice!r}; this Streamer {have}")
        from .engine.prompt import Segment

        return [Segment(speaker_id, v.text, codes=v.codes), *(context or ())]

    def _pcm_stream(self, format, chunk_ms, speed) -> Stream:
        if self.engine.codec is None:
            raise ValueError("this engine has no codec to turn codes into audio (frames(), or stream_text with "
                             "codes=True, give the codes)")
        if format is None and chunk_ms is not None:
            raise ValueError("chunk_ms goes with format=...: without one, PCM comes a frame (80 ms) at a time")
        from .kernels.speed import check_speed

        speed = check_speed(speed)
        if format is not None:
            return Stream(codes=False, encoder=_encoder(format, chunk_ms, speed))
        return Stream(codes=False, encoder=None if speed == 1 else _Stretched(speed))

    def _running(self) -> None:
        if not self._started or self._closed:
            raise RuntimeError("this Streamer is not running: use `with Streamer(engine) as tts:` (or `async "
                               "with`), or call start() first" + ("; it was closed" if self._closed else ""))

    def _plan(self, stream: Stream, speaker_id, context, voice, temperature, topk, seed, max_frames) -> SentencePlan:
        self._running()
        context = self._with_voice(voice, speaker_id, stream, context)
        box = stream._box
        opts = dict(speaker_id=speaker_id, temperature=temperature, topk=topk, sink=None if stream.codes else box,
                    tag=box)
        stream._plan = plan = SentencePlan(self._worker, context, seed, max_frames, opts, box.wake)
        self._plans.add(plan)
        return plan

    def _submit(self, stream: Stream, text, speaker_id, context, voice, temperature, topk, seed, max_frames,
                sentences) -> Stream:
        if sentences:
            plan = self._plan(stream, speaker_id, context, voice, temperature, topk, seed, max_frames)
            plan.whole(text)
            try:
                stream._begin(plan.next())
            except GenerationError as e:  # the first sentence: refused at once, as a single request is
                raise e.__cause__ from None
            return stream
        self._running()
        context = self._with_voice(voice, speaker_id, stream, context)
        box = stream._box
        # its codes are kept (stream.spoken); a max_frames given is the caller's budget (capped)
        req = GenRequest(text, speaker_id, context=context, temperature=temperature, topk=topk, seed=seed,
                         max_frames=max_frames, sink=None if stream.codes else box, keep_codes=True, tag=box,
                         capped=max_frames is not None)
        stream._begin(self._worker.submit(req))  # ValueError, Busy, or RuntimeError if the thread died
        return stream

    @staticmethod
    def _notify(reqs: list[GenRequest]) -> None:
        """Engine thread, once a tick: wake each changed stream's consumer (a thread, or its event
        loop: one call_soon_threadsafe a loop a tick)."""
        loops: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        for req in reqs:
            box = req.tag
            box.ready.set()
            if box.loop is not None:
                loops.setdefault(box.loop, []).append(box.event)
        for loop, events in loops.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # that loop is closed: nobody awaits on it any more
                pass


class _Stretched:
    """stream(speed=...) without a format: the PCM played at that speed, still int16 arrays (an
    encoder's feed / finish, for Stream)."""

    def __init__(self, speed: float) -> None:
        from .kernels.stretch import TimeStretcher

        self.stretcher = TimeStretcher(speed)

    def feed(self, pcm) -> list:
        out = self.stretcher.process(pcm)
        return [out] if len(out) else []

    def finish(self) -> list:
        out = self.stretcher.flush()
        return [out] if len(out) else []


def _encoder(fmt, chunk_ms, speed: float = 1.0):
    """stream(format=...)'s encoder; chunk_ms None is the server's default."""
    from .transport.encoder import encoder_for
    from .transport.protocol import ALL_FORMATS, CHUNK_MS_RANGE, DEFAULT_CHUNK_MS

    chunk_ms = DEFAULT_CHUNK_MS if chunk_ms is None else chunk_ms
    if fmt not in ALL_FORMATS:
        raise ValueError(f"format must be one of {', '.join(ALL_FORMATS)}, got {fmt!r}")
    lo, hi = CHUNK_MS_RANGE
    if isinstance(chunk_ms, bool) or not isinstance(chunk_ms, int) or not lo <= chunk_ms <= hi:
        raise ValueError(f"chunk_ms must be an integer from {lo} to {hi}, got {chunk_ms!r}")
    return encoder_for(fmt, chunk_ms, speed)


