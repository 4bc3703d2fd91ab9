"""Character timing of a reply's audio, as ElevenLabs' endpoints return it ("alignment").

CSM has no aligner, so the timing is estimated: a sentence's characters (and a space after it)
are spread evenly over its audio, which is known exactly once the sentence has been generated
(its frames x 80 ms, divided by the request's speed). Sentence starts are exact (at a speed other
than 1, to within the stretcher's ~8 ms search); positions inside a sentence are estimates. A
sentence's alignment is given with the chunk that completes its audio, never ahead of the audio.
"""

from __future__ import annotations

from .connection import FRAME_MS


class Aligner:
    """Follows one Job's chunks out; `advance` says which sentences' audio is now all out. The
    encoder's delay (MP3's priming samples) shifts every sentence later in the audio sent."""

    def __init__(self, job) -> None:
        self.job = job
        self.sent_ms = 0.0  # audio sent so far
        self.aligned = 0  # sentences (job.done_reqs) already aligned
        self.end_ms = job.encoder.delay_ms  # where the next sentence's audio starts
        self.chars: list[str] = []  # everything aligned so far (a whole reply's alignment at the end)
        self.edges: list[float] = []  # ... and its edges (one more than chars, once there are any)

    def advance(self, chunk_ms: float) -> tuple[list[str], list[float], float] | None:
        """A chunk of `chunk_ms` goes out: (characters, edges, base) for the sentences whose audio
        ends in it, or None. edges has one more entry than characters: character i spans edges[i]
        to edges[i+1], in ms from the start of the job's audio; base is where the previous
        alignment ended (0 for the first)."""
        self.sent_ms += chunk_ms
        first = len(self.chars)
        base = self.edges[-1] if self.edges else 0.0
        reqs = self.job.done_reqs
        while self.aligned < len(reqs):
            req = reqs[self.aligned]
            end = self.end_ms + req.frames * FRAME_MS / self.job.msg.speed  # (its audio as played)
            if end > self.sent_ms + 1.0:  # its audio is not all out yet
                break
            text = req.text + " "
            start = self.end_ms
            self.edges[len(self.chars):] = [start + (end - start) * i / len(text) for i in range(len(text) + 1)]
            self.chars += text
            self.aligned += 1
            self.end_ms = end
        if len(self.chars) == first:
            return None
        return self.chars[first:], self.edges[first:], base


def relative_ms(chars: list[str], edges: list[float], base: float) -> dict:
    """ElevenLabs' WebSocket shape: whole milliseconds from where the previous alignment ended
    (clients add each message's end to a running total)."""
    rounded = [round(e - base) for e in edges]
    return {"chars": chars, "charStartTimesMs": rounded[:-1],
            "charDurationsMs": [b - a for a, b in zip(rounded[:-1], rounded[1:], strict=True)]}


def absolute_seconds(chars: list[str], edges: list[float]) -> dict:
    """ElevenLabs' REST shape: seconds from the start of the response's audio."""
    secs = [round(e / 1000, 3) for e in edges]
    return {"characters": chars, "character_start_times_seconds": secs[:-1],
            "character_end_times_seconds": secs[1:]}
