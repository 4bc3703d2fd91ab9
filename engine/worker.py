"""The engine thread: the only code that runs the model while a server is up.

Requests arrive through `submit()` (any thread; validation and prompt building happen there, so a
bad request fails at once). The thread admits them into the engine's slots, and every tick runs
ONE batched frame step over the span of active rows, the streaming Mimi decode of their frames, and
writes each request's PCM into its sink (an SPSC ring owned by the consumer).
Prefills are chunked (engine/prefill.py): each tick does one chunk of prompt for sure, and more
(the rest of that prompt, the next newcomers) only while the running calls have audio to spare, so
a newcomer never makes a playing call wait more than one chunk, and a burst of callers is admitted
as fast as the others' buffers allow.
After each tick the `notify` callback gets the requests that changed (new audio, finished), once
per tick; a server passes one that hops onto its event loop with `call_soon_threadsafe`.

Cancel is a flag (`request.cancel()`) read at the next tick boundary: generation stops within one
frame and the slot is free for the next request.

A watchdog (`stall_s`) ends what an engine thread stuck inside one tick would leave hanging -- a GPU
that stopped answering, a deadlock: the thread cannot be interrupted, so once a tick has run
`stall_s` seconds the worker gives up on it (`abandon`): it refuses new requests and ends every
request it holds with an error, touching nothing the stuck thread holds; `stalled` says why.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .prefill import FRAME_S, PrefillBudget, PrefillJob, lead

log = logging.getLogger("csmstream.engine")


class PcmSink(Protocol):
    def write(self, samples: np.ndarray) -> int: ...


@dataclass(eq=False)
class GenRequest:
    """One utterance to generate. Fields below `sink` are written by the engine thread only."""

    text: str
    speaker_id: int = 0
    context: Iterable = ()
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    max_frames: int | None = None
    sink: PcmSink | None = None  # where PCM goes; None: frames are counted, audio dropped
    tag: Any = None  # the submitter's handle (e.g. its connection job)
    keep_codes: bool = False  # keep every frame's codes in `codes` (context for the next sentence)
    max_repeats: int = 0  # > 0: stop ("guard") when the same frame repeats this many times in a row
    chunk_s: float = 0.0  # the consumer sends audio in chunks of this many seconds (for its lead)
    continues: bool = False  # a later sentence of a reply already playing: never refused for a full queue,
    # and admitted before newcomers (its listener is waiting for it; theirs have heard nothing yet)
    more: bool = False  # its reply goes on after it: once it ends well, its slot is kept for the next
    # sentence for reserve_s (newcomers wait that long), so a busy server puts no gap inside a reply
    capped: bool = False  # max_frames is the caller's budget (what is left of a reply's max_audio_ms or
    # max_frames), below the sentence's own cap: reaching it cuts the sentence short (see `whole`)
    # engine-side state
    frames: int = 0
    finished: bool = False
    reason: str = ""  # "eos" | "max_frames" | "guard" | "cancelled" | "error"
    error: str | None = None
    t_submit: float = 0.0
    t_start: float = 0.0  # prefill done
    t_first_audio: float = 0.0  # first PCM written to the sink
    t_end: float = 0.0
    frames_at_cancel: int = -1  # frames generated when cancel() was called
    prompt_len: int = 0  # positions of the prompt (text + context), set by prepare()
    codes: list = field(default_factory=list)
    _repeats: int = 0
    _cancel: bool = False
    _prepared: tuple | None = field(default=None, repr=False)
    _row: int = -1

    def cancel(self) -> None:
        """Ask the engine to stop this request at the next tick (thread-safe: a flag)."""
        if not self._cancel:
            self.frames_at_cancel = self.frames
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        return self._cancel

    @property
    def whole(self) -> bool:
        """It has ended by itself (end of speech, its own frame cap, the repeat guard), not cut
        short by a cancel, an error or a caller's budget: its codes are a whole utterance, fit to be
        heard as context (a cut one ends mid-word)."""
        return self.finished and (self.reason in ("eos", "guard") or (self.reason == "max_frames" and not self.capped))

    def heard(self) -> tuple[str, np.ndarray] | None:
        """(text, codes [frames, 32]) when it was generated whole with its codes kept: what a later
        sentence or request may hear as context; None otherwise."""
        return (self.text, np.stack(self.codes)) if self.whole and self.codes else None


# upper bounds (ms) of the frame step's duration histogram: a step past 80 ms (a frame of audio)
# means the batch no longer keeps up with real time
STEP_MS_BOUNDS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass
class WorkerStats:
    ticks: int = 0  # frame steps run
    frames: int = 0
    requests: int = 0
    active: int = 0
    waiting: int = 0
    prefilling: int = 0
    step_seconds: float = 0.0
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_chunks: int = 0
    step_ms: list = field(default_factory=lambda: [0] * (len(STEP_MS_BOUNDS) + 1))  # steps by STEP_MS_BOUNDS, +Inf

    def observe_step(self, seconds: float) -> None:
        """One frame step took `seconds`: counted, summed, and in its histogram bucket."""
        self.ticks += 1
        self.step_seconds += seconds
        self.step_ms[bisect_left(STEP_MS_BOUNDS, 1000 * seconds)] += 1  # (the first bound >= it; past all: +Inf)


STALL_S = {"cuda": 120.0, "cpu": 300.0}  # the default stall_s by device (see default_stall_s)


def default_stall_s(engine) -> float:
    """How long a tick may run before the engine counts as stuck, on `engine`'s device: 120 s on a
    GPU (a tick is milliseconds, but one that meets a shape no kernel was compiled for yet -- graphs
    off, a cold Triton cache -- compiles for seconds, and a false alarm ends every call), 300 s on a
    CPU (a long prompt's chunk through a full-size model there takes many seconds)."""
    return STALL_S["cuda" if str(getattr(engine, "device", "cpu")).startswith("cuda") else "cpu"]


def _seconds(value) -> bool:
    """Whether `value` is a finite number of seconds >= 0 (not a bool, not nan)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < float("inf")


def stall_seconds(value, engine, name: str = "stall_timeout") -> float | None:
    """A stall timeout as a user gives it (seconds; 0: no watch; None: by `engine`'s device) -> the
    worker's stall_s, or ValueError naming `name` and what is allowed."""
    if value is None:
        return default_stall_s(engine)
    if not _seconds(value):
        raise ValueError(f"{name} must be seconds >= 0 (0: no watch; unset: 120 on a GPU, 300 on a CPU), "
                         f"got {value!r}")
    return float(value) or None


RESERVE_S = 0.1  # a slot freed by a sentence whose reply goes on is kept this long for the next sentence
GOOD_ENDS = ("eos", "max_frames", "guard")  # a sentence that ended so: its reply's next one follows


class Busy(RuntimeError):
    """Every slot is taken and the waiting queue is full: try again shortly."""


class EngineWorker:
    """Owns the engine while running; start() / stop(); submit() from any thread."""

    def __init__(self, engine, notify: Callable[[list[GenRequest]], None] | None = None, *,
                 idle_wait: float = 0.05, max_waiting: int | None = None, prefill_chunk: int = 512,
                 max_prefill_s: float = FRAME_S, stall_s: float | None = None) -> None:
        """prefill_chunk: prompt tokens per prefill chunk; max_prefill_s: at most this many seconds
        of prefill a tick beyond its one chunk (engine/prefill.py); stall_s: a tick that runs this
        long is a stuck engine, and its requests are failed (None: never)."""
        if stall_s is not None and not (_seconds(stall_s) and stall_s > 0):
            raise ValueError(f"stall_s must be a number of seconds > 0, or None, got {stall_s!r}")
        self.engine = engine
        self.budget = PrefillBudget(prefill_chunk, max_tick_s=max_prefill_s)
        self.notify = notify or (lambda reqs: None)
        self.idle_wait = idle_wait
        # requests waiting for a slot, at most (beyond it submit() raises Busy at once)
        self.max_waiting = max_waiting if max_waiting is not None else 4 * engine.max_streams
        self.fault_hook: Callable[[GenRequest], None] | None = None  # test hook, called per row per tick
        self.died: BaseException | None = None
        self.stall_s = stall_s
        self.stalled: str | None = None  # why the worker gave up on its stuck thread (abandon)
        self._tick_t0 = 0.0  # when the tick in progress began; 0 between ticks
        self.stats = WorkerStats()
        self._inbox: queue.SimpleQueue[GenRequest] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # submit() vs the thread's end: a request goes into the inbox before the end, which then
        # fails it, or is refused -- never left in an inbox nobody reads (that request would hang)
        self._gate = threading.Lock()
        self._ended = False
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None  # the stall watch (stall_s)
        self._waiting: deque[GenRequest] = deque()
        self._active: dict[int, GenRequest] = {}  # row -> request
        self._prefilling: deque[tuple[GenRequest, PrefillJob]] = deque()  # admitted, prompt going in
        self.reserve_s = RESERVE_S
        self._held_back = False  # this tick a newcomer waited for a kept slot
        self._reserved: deque[float] = deque()  # until when each slot freed by a reply that goes on is kept

    # -- control -------------------------------------------------------------------------------
    def start(self) -> EngineWorker:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
            self._thread.start()
            if self.stall_s is not None:
                self._watcher = threading.Thread(target=self._watch, args=(self._thread,), name="csm-engine-watch",
                                                 daemon=True)
                self._watcher.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._watcher is not None:  # (ended by the stop flag: gone before the process may exit)
            self._watcher.join(timeout)
            self._watcher = None

    @property
    def tick_seconds(self) -> float:
        """How long the tick in progress has run (0 between ticks; any thread)."""
        t0 = self._tick_t0
        return time.perf_counter() - t0 if t0 else 0.0

    def _watch(self, thread: threading.Thread) -> None:
        """The watchdog's thread: abandon the engine thread once a tick outlives stall_s."""
        period = min(1.0, self.stall_s / 4)
        while thread.is_alive() and not self._ended:
            if self.tick_seconds > self.stall_s:
                self.abandon(f"the engine stopped: one step has run over {self.stall_s:g} s (a GPU that stopped "
                             "answering, or a deadlock); nothing can be generated until the process is restarted")
                return
            if self._stop.wait(period):  # stopping: the watch ends with the worker (no spinning on a set flag)
                return

    def abandon(self, why: str) -> int:
        """Give up on a stuck engine thread (any thread; it cannot be interrupted): refuse new
        requests and end every request it holds with the error `why`, without touching the engine
        or the thread's own structures. Returns how many were ended. Should the thread come back,
        it stops at the end of its tick and tells no one anything more."""
        with self._gate:
            if self._ended:
                return 0
            self.stalled, self._ended = why, True
        log.critical("%s (a server's /healthz and /livez now answer 503)", why)
        ended = [req for req in self._held() if not req.finished]
        for req in ended:
            req.reason, req.error, req.t_end = "error", why, time.perf_counter()
            req.finished = True
        if ended:
            self.notify(ended)
        return len(ended)

    @property
    def alive(self) -> bool:
        """The thread runs and still serves: false from the moment it ends (stopping or dying), before
        it fails what it held, so no client told of the end can still find /healthz green."""
        return self._thread is not None and self._thread.is_alive() and not self._ended

    def prepare(self, req: GenRequest) -> GenRequest:
        """Validate and build the prompt (any thread); sets req.max_frames to the effective cap, so
        the caller can size its sink before submitting. Raises ValueError on a bad request."""
        e = self.engine
        req._prepared = e._validate(req.text, req.speaker_id, req.context, req.temperature, req.topk,
                                    req.seed, req.max_frames)
        req.max_frames = req._prepared[5]
        prefix = req._prepared[6]
        req.prompt_len = len(req._prepared[0]) + (prefix.length if prefix is not None and prefix.kv is not None else 0)
        return req

    def submit(self, req: GenRequest) -> GenRequest:
        """Validate (unless prepared) and queue. Raises ValueError (the engine's message) on a bad
        request, RuntimeError when the engine thread is not running."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        if req._prepared is None:
            self.prepare(req)
        free = max(0, self.engine.max_streams - len(self._active) - len(self._prefilling))
        with self._gate:
            if self._ended or not self.alive:
                raise RuntimeError("the engine thread is not running")
            if not req.continues and self.queued() >= self.max_waiting + free:
                raise Busy(f"all {self.engine.max_streams} streams are busy and {self.max_waiting} requests are "
                           "already waiting; retry shortly")
            req.t_submit = time.perf_counter()
            self._inbox.put(req)
        self._wake.set()
        return req

    def queued(self) -> int:
        """Requests submitted and not yet admitted (approximate, read from any thread)."""
        return self._inbox.qsize() + len(self._waiting)

    def warmup(self, frames: int = 3) -> None:
        """Compile and touch every path once (prefill with and without context, step, decode)
        before serving, so the first real request does not pay for first-use setup."""
        from .prompt import Segment

        e = self.engine
        codes = np.stack(list(e.frames("Warm up.", 0, seed=0, max_frames=frames, topk=1)) or [np.zeros(32, np.int64)])
        ctx = [Segment(0, "Warm up.", codes=np.repeat(codes, 12, axis=0))]  # a context of a few dozen frames
        for _ in (e.stream if e.codec is not None else e.frames)("And again.", 0, context=ctx, seed=0,
                                                                  max_frames=frames):
            pass

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set():
                self._tick_t0 = time.perf_counter()
                try:
                    busy = self._tick()
                except Exception:  # never let one bad tick kill the server: fail the active requests
                    log.exception("engine tick failed; failing the active requests")
                    self._fail_all("internal error in the engine thread (see the server log)")
                    busy = False
                finally:
                    self._tick_t0 = 0.0
                if self.stalled is not None:  # given up on while it was stuck: its requests are ended
                    log.warning("the engine thread came back after it was given up on; it frees its slots and stops")
                    self._release_rows()
                    return
                if not busy:
                    self._wake.clear()  # clear, then look: a submit in between is never missed
                    if self._inbox.empty():
                        self._wake.wait(self.idle_wait)
        except BaseException as e:  # the thread is dying: say so loudly, fail everyone, never hang
            self._end(died=e)
            log.critical("the engine thread died (%s: %s); /healthz now answers 503", type(e).__name__, e)
            self._fail_all("the engine thread died; the server cannot generate until it is restarted")
            return
        self._end()
        self._fail_all("server shutting down", reason="cancelled")

    def _end(self, died: BaseException | None = None) -> None:
        """From here on submit() refuses; what it queued before is in the inbox for _fail_all."""
        with self._gate:
            self.died = died
            self._ended = True

    def _tick(self) -> bool:
        changed: list[GenRequest] = []
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                break
            if req.continues:  # ahead of the newcomers, behind the continuations already waiting
                i = 0
                while i < len(self._waiting) and self._waiting[i].continues:
                    i += 1
                self._waiting.insert(i, req)
            else:
                self._waiting.append(req)
        # cancellations first, so their slots are reused this tick
        for req in list(self._active.values()):
            if req._cancel:
                self._finish(req, "cancelled", changed)
        for item in [it for it in self._prefilling if it[0]._cancel]:
            self._prefilling.remove(item)
            self._finish(item[0], "cancelled", changed)
        for req in [r for r in self._waiting if r._cancel]:
            self._waiting.remove(req)
            self._finish(req, "cancelled", changed)
        self._prefill_work(changed)
        st = self.stats
        st.active, st.waiting, st.prefilling = len(self._active), len(self._waiting), len(self._prefilling)
        if self._active:
            self._step(changed)
        if changed and self.stalled is None:  # (given up on meanwhile: its requests were told already)
            self.notify(changed)
        return bool(self._active or self._prefilling or (self._waiting and not self._held_back))

    def _prefill_work(self, changed: list) -> None:
        """Prompts go in chunk by chunk, oldest first: one chunk for sure, then more while their
        estimated cost fits what the playing calls can spare (PrefillBudget.allowance)."""
        e, budget = self.engine, self.budget
        now = time.perf_counter()
        self._held_back = False
        allowance = budget.allowance([lead(r.frames, now - r.t_first_audio, r.chunk_s)
                                      for r in self._active.values() if r.sink is not None and r.t_first_audio])
        spent, first = 0.0, True
        while True:
            if self._prefilling:
                req, job = self._prefilling[0]
                n = min(job.remaining, budget.chunk_tokens)
            elif self._waiting and (held := len(self._active) + len(self._prefilling)) < e.max_streams:
                req, job = self._waiting[0], None
                if not req.continues and held + self._kept(now) >= e.max_streams:
                    self._held_back = True  # (so the thread idles, not spins, while they are kept)
                    return  # the free slots are kept for replies that go on (their next sentence is coming)
                n = min(len(req._prepared[0]), budget.chunk_tokens)
                if not first and not budget.can_grow(held + 1):
                    return
            else:
                return
            if not first and spent + budget.estimate(n) > allowance:
                return
            if job is None:
                try:
                    row = e._acquire()
                except RuntimeError:  # slots held by direct Engine.frames users: try again next tick
                    return
                self._waiting.popleft()
                if req.continues and self._reserved:
                    self._reserved.popleft()  # (the slot kept for it, or for another reply's: one is used)
                req._row = row
                job = PrefillJob(e, row, req._prepared, audio=e.codec is not None and req.sink is not None)
                self._prefilling.append((req, job))
            t0 = time.perf_counter()
            try:
                with e._lock:
                    n = job.run(n)
                    e.gen.sync()  # time the device's work (a prefill graph returns at once)
            except Exception as exc:
                log.exception("prefill failed")
                self._prefilling.remove((req, job))
                self._finish(req, "error", changed, error=f"prefill failed: {exc}")
                continue
            dt = time.perf_counter() - t0
            budget.record_prefill(n, dt)
            spent, first = spent + dt, False
            st = self.stats
            st.prefill_seconds += dt
            st.prefill_tokens += n
            st.prefill_chunks += 1
            if job.remaining == 0:
                self._prefilling.popleft()
                req.t_start = time.perf_counter()
                req._prepared = None  # the prompt is in the KV cache now; do not keep its arrays
                self._active[req._row] = req
                st.requests += 1

    def _step(self, changed: list) -> None:
        e = self.engine
        rows = sorted(self._active)
        lo, hi = rows[0], rows[-1] + 1
        active = [r in self._active for r in range(lo, hi)]
        kmax = max(self._active[r].topk for r in rows)
        t0 = time.perf_counter()
        with e._lock:
            dev_codes = e.gen.step(lo, hi, kmax, None if all(active) else active)
            codes = dev_codes.cpu().numpy()  # the one device->host copy of the tick
            audio_rows = [r for r in rows if codes[r - lo].any() and self._active[r].sink is not None]
            pcm = self._decode(dev_codes, lo, audio_rows) if e.codec is not None and audio_rows else {}
        dt = time.perf_counter() - t0
        self.budget.record_step(dt, len(rows))
        self.stats.observe_step(dt)
        self.stats.frames += len(rows)
        now = time.perf_counter()
        for r in rows:
            req = self._active[r]
            try:
                self._after_step(req, r, codes[r - lo], pcm, now, changed)
            except Exception as e:  # one request's failure ends that request only
                log.exception("request failed in the engine thread")
                self._finish(req, "error", changed, error=f"generation failed: {type(e).__name__}: {e}")

    def _after_step(self, req: GenRequest, r: int, frame: np.ndarray, pcm: dict, now: float, changed: list) -> None:
        if self.fault_hook is not None:
            self.fault_hook(req)
        if not frame.any():
            self._finish(req, "eos", changed)
            return
        req.frames += 1
        if req.keep_codes or req.max_repeats:
            if req.max_repeats and req.codes and np.array_equal(req.codes[-1], frame):
                req._repeats += 1
            else:
                req._repeats = 0
            req.codes.append(frame.copy())
        sink = req.sink
        if r in pcm and sink is not None:
            if sink.write(pcm[r]) < len(pcm[r]):
                log.warning("request sink full; audio dropped")
            if not req.t_first_audio:
                req.t_first_audio = now
        changed.append(req)
        if req.max_repeats and req._repeats >= req.max_repeats:
            self._finish(req, "guard", changed)  # a stuck, run-on sentence: stop it
        elif req.frames >= req.max_frames:
            self._finish(req, "max_frames", changed)

    def _decode(self, dev_codes, lo: int, rows: list[int]) -> dict[int, np.ndarray]:
        """Streaming decode of `rows` (sorted; dev_codes holds rows [lo, ...)) -> row -> int16 PCM.
        Rows still prefilling are ours too: their decoder state is reset when their prompt is in."""
        from ..kernels.audio import float_to_int16

        mine = set(self._active).union(req._row for req, _ in self._prefilling)
        return {r: float_to_int16(w) for r, w in self.engine._decode_rows(dev_codes, lo, rows, mine).items()}

    def _kept(self, now: float) -> int:
        """Free slots still kept for the next sentence of a reply that goes on."""
        while self._reserved and self._reserved[0] <= now:
            self._reserved.popleft()
        return len(self._reserved)

    def _finish(self, req: GenRequest, reason: str, changed: list, error: str | None = None) -> None:
        if req._row >= 0:
            if req.more and reason in GOOD_ENDS:
                self._reserved.append(time.perf_counter() + self.reserve_s)
            self._active.pop(req._row, None)
            self.engine._release(req._row)
            req._row = -1
        req.reason, req.error = reason, error
        req._prepared = None
        req.t_end = time.perf_counter()
        req.finished = True
        changed.append(req)

    def _release_rows(self) -> None:
        """Hand every slot this worker holds back to the engine, telling no one (its requests were
        ended by abandon): the engine may serve a new worker."""
        for req in [*self._active.values(), *(r for r, _ in self._prefilling)]:
            if req._row >= 0:
                self.engine._release(req._row)
                req._row = -1
        self._active.clear()
        self._prefilling.clear()

    def _held(self) -> list[GenRequest]:
        """Every request this worker holds: playing, prefilling, waiting, and those in the inbox
        (taken out of it). Copies, so another thread may read them while the engine thread runs."""
        held = [*list(self._active.values()), *(req for req, _ in list(self._prefilling)), *list(self._waiting)]
        while True:
            try:
                held.append(self._inbox.get_nowait())
            except queue.Empty:
                return held

    def _fail_all(self, message: str, reason: str = "error") -> None:
        changed: list[GenRequest] = []
        error = message if reason == "error" else None
        pending = self._held()
        self._waiting.clear()
        self._prefilling.clear()
        for req in pending:
            self._finish(req, reason, changed, error=error)
        if changed:
            self.notify(changed)
