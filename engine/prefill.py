"""Chunked prefill and the engine thread's prefill budget.

A prompt can be long (a voice's reference audio, earlier sentences as context: hundreds of
positions), and a prefill runs between two frame steps, so a long one delays every running call's
next frame. `PrefillJob` feeds one prompt into its slot a chunk at a time, over as many ticks as it
takes; `PrefillBudget` decides how much prefill work a tick may do:

- always one chunk (so every newcomer makes progress and no prompt stalls the others by more than
  one chunk), and
- more chunks, from the same prompt or the next newcomers, while the estimated cost fits the time
  the running calls can spare: the least audio any of them has buffered ahead of real time, minus
  the frame step that must follow and a safety margin, and at most `max_tick_s` a tick (so the
  newcomers admitted in this tick hear their first audio soon too); and a newcomer is taken in
  beyond the guaranteed chunk only while the batch it joins would still step within a frame,
  counting a step's cost as at most proportional to its rows (on a GPU it is nearly flat, so a
  burst is in within a few ticks; on a CPU it is linear, so the batch stops growing at capacity).

Costs are learned as the server runs: exponential averages of prefill seconds per token, with a
floor of `floor_tokens` per call (a short prefill costs its kernel launches, not its length), and
of the step's seconds; the seconds per row are the last step's.
"""

from __future__ import annotations

import math

FRAME_S = 0.08  # audio per frame


class PrefillJob:
    """One prepared prompt going into `row`, in one call (`run()`) or chunk by chunk."""

    def __init__(self, engine, row: int, prepared, audio: bool) -> None:
        import torch

        tokens, mask, self.seed, self.temperature, self.topk, _, self.prefix = prepared
        self.engine, self.row, self.audio = engine, row, audio
        self.tokens, self.mask = torch.from_numpy(tokens), torch.from_numpy(mask)
        cached = self.prefix is not None and self.prefix.kv is not None
        self.offset = self.prefix.length if cached else 0  # positions copied in from the prefix cache
        self.done = 0  # prompt tokens already in the cache

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done

    def run(self, max_tokens: int | None = None) -> int:
        """Prefill the next `max_tokens` (None: all that remain; call with the engine's lock held).
        Returns how many it did; when `remaining` is 0 the row is ready to generate."""
        n = self.remaining if max_tokens is None else max(1, min(self.remaining, int(max_tokens)))
        a, b = self.done, self.done + n
        first, last = a == 0, b == len(self.tokens)
        prefix = (self.offset, self.prefix.kv) if first and self.offset else None
        e = self.engine
        e.gen.prefill(self.row, self.tokens[a:b], self.mask[a:b], seed=self.seed, temperature=self.temperature,
                      topk=self.topk, prefix=prefix, start=self.offset + a, last=last)
        self.done = b
        if last:
            if self.prefix is not None and self.prefix.kv is None:  # first use of a pinned voice: keep it
                e.prefixes.store(self.prefix.key, e.gen.cached_kv(self.row, self.prefix.length))
            if self.audio:
                e.decoder.reset(self.row)
        return n


class PrefillBudget:
    def __init__(self, chunk_tokens: int = 512, *, max_tick_s: float = FRAME_S, margin_s: float = 0.01,
                 floor_tokens: int = 64, smoothing: float = 0.2) -> None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"prefill chunk must be an integer >= 1 (tokens), got {chunk_tokens!r}")
        if not (isinstance(max_tick_s, (int, float)) and math.isfinite(max_tick_s) and max_tick_s >= 0):
            raise ValueError(f"max prefill seconds per tick must be a finite number >= 0, got {max_tick_s!r}")
        self.chunk_tokens, self.max_tick_s, self.margin_s = chunk_tokens, float(max_tick_s), margin_s
        self.floor_tokens, self.smoothing = floor_tokens, smoothing
        self.s_per_token: float | None = None  # learned; None until the first prefill is measured
        self.step_s: float | None = None  # learned seconds of one tick's frame step + decode
        self.step_s_per_row: float | None = None  # the last step's seconds per row stepped

    def estimate(self, tokens: int) -> float:
        """Expected seconds to prefill `tokens` (0 before anything was measured)."""
        return 0.0 if self.s_per_token is None else self.s_per_token * max(tokens, self.floor_tokens)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        self.s_per_token = self._avg(self.s_per_token, seconds / max(tokens, self.floor_tokens))

    def record_step(self, seconds: float, rows: int) -> None:
        self.step_s = self._avg(self.step_s, seconds)
        self.step_s_per_row = seconds / max(1, rows)  # the last step's: an average would lag a growing batch

    def can_grow(self, rows: int) -> bool:
        """Whether a batch of `rows` would still step within a frame (at most proportional cost)."""
        return self.step_s_per_row is None or self.step_s_per_row * rows <= FRAME_S - self.margin_s

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def allowance(self, leads: list[float]) -> float:
        """Seconds of prefill this tick may spend beyond its one guaranteed chunk. leads: for each
        running call that is playing, seconds of audio it has ahead of real time (see `lead`)."""
        if not leads:
            return self.max_tick_s
        spare = min(leads) - (self.step_s or 0.0) - self.margin_s
        return max(0.0, min(self.max_tick_s, spare))


def lead(frames: int, since_first_audio: float, chunk_s: float = 0.0) -> float:
    """Seconds of audio a call has ahead of real time: what it has been sent (whole chunks of
    `chunk_s` when its consumer sends in chunks) minus the time since its first audio."""
    audio = frames * FRAME_S
    if chunk_s > 0:
        audio = math.floor(audio / chunk_s + 1e-9) * chunk_s
    return audio - since_first_audio
