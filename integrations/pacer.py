"""Outgoing media pacing, sans I/O: a short head start at once, then at most `speed` x real time.

Telnyx plays what it receives in order; sending far ahead only fills its queue, which a barge-in
then has to discard. The pacer releases queued messages while the audio sent so far stays within
`head_ms + speed * elapsed` of the moment playback (re)started. Zero-length messages (marks) go as
soon as everything before them has gone. When the caller's playback has run out and nothing is
queued, the next audio starts a new head start.
"""

from __future__ import annotations

from collections import deque


class Pacer:
    def __init__(self, head_ms: float = 100.0, speed: float = 2.0) -> None:
        if head_ms < 0 or speed <= 0:
            raise ValueError(f"head_ms must be >= 0 and speed > 0, got {head_ms}, {speed}")
        self.head_ms, self.speed = head_ms, speed
        self._q: deque[tuple[str, float]] = deque()
        self._t0: float | None = None  # when the current burst started
        self._sent_ms = 0.0  # audio sent since _t0

    def push(self, message: str, audio_ms: float = 0.0) -> None:
        self._q.append((message, audio_ms))

    def __len__(self) -> int:
        return len(self._q)

    @property
    def queued_ms(self) -> float:
        return sum(ms for _, ms in self._q)

    def playback_end(self, now: float) -> float:
        """When the caller's playback of everything sent and queued ends, if it plays in real time
        from when its burst began: a fixed moment (perhaps past) once all is sent; while some is
        still queued, at least `now` plus what is queued."""
        sent_end = now if self._t0 is None else self._t0 + self._sent_ms / 1000
        return max(now, sent_end) + self.queued_ms / 1000 if self._q else sent_end

    def clear(self) -> int:
        """Drop everything queued (barge-in); returns how many messages were dropped."""
        n = len(self._q)
        self._q.clear()
        return n

    def _restart_if_idle(self, now: float) -> None:
        if self._t0 is None or now > self._t0 + self._sent_ms / 1000:
            self._t0, self._sent_ms = now, 0.0  # caller's playback ran out: a new burst

    def pop_due(self, now: float) -> list[str]:
        out = []
        while self._q:
            msg, ms = self._q[0]
            if ms > 0:
                self._restart_if_idle(now)
                allowed = self.head_ms + self.speed * 1000 * (now - self._t0)
                if self._sent_ms + ms > allowed + 1e-9:
                    break
                self._sent_ms += ms
            self._q.popleft()
            out.append(msg)
        return out

    def next_due(self, now: float) -> float | None:
        """When pop_due would release the next message (now if already due), None if idle."""
        if not self._q:
            return None
        ms = self._q[0][1]
        if ms <= 0 or self._t0 is None or now > self._t0 + self._sent_ms / 1000:
            return now
        allowed_at = self._t0 + (self._sent_ms + ms - self.head_ms) / (self.speed * 1000)
        return max(now, allowed_at)
