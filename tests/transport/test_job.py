"""Job's context for what follows it: which earlier sentences a reply's next sentence, or a later
request that continues it (continue_previous), hears. Only sentences that ended well count: one
cut short (a cancel, an error, max_audio_ms) ends mid-word, and hearing it would teach the model
to trail off."""

import numpy as np

from csmstream.engine.prompt import Segment
from csmstream.engine.worker import GenRequest
from csmstream.transport import protocol
from csmstream.transport.job import CONTEXT_SENTENCES, Job


def _codes(n: int, fill: int) -> list:
    return [np.full(4, fill, dtype=np.int64) for _ in range(n)]


def _ended(text: str, reason: str, fill: int, frames: int = 3, capped: bool = False) -> GenRequest:
    req = GenRequest(text=text, keep_codes=True, capped=capped)
    req.codes = _codes(frames, fill)
    req.reason, req.finished = reason, True
    req.t_end = 100.0 + fill  # (later sentences end later)
    return req


def _job(**fields) -> Job:
    return Job(protocol.Generate(text="x", speaker_id=2, **fields), "r")


def test_finished_sentences_count_in_order_and_cut_ones_do_not():
    job = _job()
    job.history.append(("One.", np.stack(_codes(2, 1))))
    for text, reason, fill in (("Two.", "eos", 2), ("Three.", "max_frames", 3), ("Four.", "guard", 4),
                               ("Cut.", "cancelled", 5), ("Failed.", "error", 6)):
        job.active.append((_ended(text, reason, fill), None))
    job.active.append((_ended("Out of max_audio_ms.", "max_frames", 8, capped=True), None))
    running = GenRequest(text="Still going.", keep_codes=True)
    running.codes = _codes(2, 7)
    job.active.append((running, None))

    said = job.spoken()
    assert [s.text for s in said] == ["One.", "Two.", "Three.", "Four."]
    assert all(s.speaker_id == 2 for s in said)
    assert [int(s.codes[0, 0]) for s in said] == [1, 2, 3, 4]
    assert [len(s.codes) for s in said] == [2, 3, 3, 3]
    assert job.ended_at() == max(r.t_end for r, _ in list(job.active)[:3])  # (the whole ones')


def test_the_sentences_it_continued_come_first_and_only_the_last_four_are_kept():
    job = _job(continue_previous=True)
    job.before = [Segment(0, f"Before {i}.", codes=np.stack(_codes(1, 10 + i))) for i in range(3)]
    assert [s.text for s in job.spoken()] == ["Before 0.", "Before 1.", "Before 2."]
    job.active.append((_ended("Mine.", "eos", 20), None))
    job.active.append((_ended("Cut short.", "cancelled", 21), None))
    assert [s.text for s in job.spoken()] == ["Before 0.", "Before 1.", "Before 2.", "Mine."]
    job.history.append(("Earlier mine.", np.stack(_codes(1, 19))))
    assert CONTEXT_SENTENCES == 4
    assert [s.text for s in job.spoken()] == ["Before 1.", "Before 2.", "Earlier mine.", "Mine."]


def test_a_request_cut_short_before_anything_ended_leaves_no_context():
    job = _job(continue_previous=True)
    job.active.append((_ended("Stopped at once.", "cancelled", 1), None))
    assert job.spoken() == []
    assert job.context_for_next() == []
