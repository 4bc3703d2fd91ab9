"""The alignment estimate against hand-computed timelines (the endpoint tests check it against
the engine's frames; these pin the arithmetic and the encoder-delay shift)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from csmstream.transport.alignment import Aligner, absolute_seconds, relative_ms


def job(*sentences: tuple[str, int], delay_ms: float = 0.0, speed: float = 1.0):
    reqs = [SimpleNamespace(text=t, frames=f) for t, f in sentences]
    return SimpleNamespace(done_reqs=reqs, encoder=SimpleNamespace(delay_ms=delay_ms), msg=SimpleNamespace(speed=speed))


def test_a_sentence_is_aligned_with_the_chunk_that_completes_its_audio():
    a = Aligner(job(("Hi.", 5)))  # 400 ms; "Hi. " is 4 characters: 100 ms each
    assert [a.advance(100) for _ in range(3)] == [None, None, None]
    chars, edges, base = a.advance(100)
    assert (chars, edges, base) == (list("Hi. "), [0, 100, 200, 300, 400], 0.0)
    assert a.advance(100) is None  # given once


def test_at_a_speed_a_sentence_lasts_its_frames_over_the_speed():
    a = Aligner(job(("Hi.", 5), ("Yo.", 2), speed=2.0))  # 400 ms played in 200, then 160 in 80
    assert a.advance(198) is None  # (1 ms of slack: sent sizes are rounded)
    chars, edges, base = a.advance(2)
    assert (chars, edges, base) == (list("Hi. "), [0, 50, 100, 150, 200], 0.0)
    chars, edges, base = a.advance(80)
    assert (chars, edges, base) == (list("Yo. "), [200, 220, 240, 260, 280], 200.0)


def test_sentences_ending_in_one_chunk_come_together_and_the_next_counts_from_there():
    j = job(("A.", 3), ("Bb.", 2))  # 240 ms over "A. ", then 160 ms over "Bb. "
    a = Aligner(j)
    chars, edges, base = a.advance(500)
    assert chars == list("A. Bb. ") and base == 0.0
    assert edges == pytest.approx([0, 80, 160, 240, 280, 320, 360, 400])
    assert relative_ms(chars, edges, base) == {
        "chars": list("A. Bb. "), "charStartTimesMs": [0, 80, 160, 240, 280, 320, 360],
        "charDurationsMs": [80, 80, 80, 40, 40, 40, 40]}
    j.done_reqs.append(SimpleNamespace(text="C", frames=1))  # 80 ms over "C "
    chars, edges, base = a.advance(0)  # already sent (500 ms > 480)
    assert (chars, base) == (list("C "), 400.0)
    assert relative_ms(chars, edges, base) == {"chars": ["C", " "], "charStartTimesMs": [0, 40],
                                               "charDurationsMs": [40, 40]}
    assert absolute_seconds(chars, edges) == {"characters": ["C", " "], "character_start_times_seconds": [0.4, 0.44],
                                              "character_end_times_seconds": [0.44, 0.48]}


def test_an_encoder_delay_shifts_the_speech_later_and_holds_its_alignment_back():
    a = Aligner(job(("Hi.", 5), delay_ms=46.0))  # the speech is 46..446 ms of the stream
    assert a.advance(440) is None  # its last 6 ms are not out yet
    chars, edges, base = a.advance(10)
    assert edges == pytest.approx([46, 146, 246, 346, 446]) and base == 0.0
    assert relative_ms(chars, edges, base)["charStartTimesMs"] == [46, 146, 246, 346]  # from the stream's start
    assert absolute_seconds(chars, edges)["character_start_times_seconds"] == [0.046, 0.146, 0.246, 0.346]


def test_rounding_never_loses_or_gains_time():
    a = Aligner(job(("Seven chars here.", 7)))  # 560 ms over 18 characters: 31.1 ms each
    chars, edges, base = a.advance(560)
    r = relative_ms(chars, edges, base)
    assert sum(r["charDurationsMs"]) == 560 and r["charStartTimesMs"][0] == 0
    assert all(s + d == n for s, d, n in zip(r["charStartTimesMs"], r["charDurationsMs"],
                                             r["charStartTimesMs"][1:] + [560], strict=True))
