"""Stream.spoken: what a voice agent's next turn continues, so it keeps the voice (embedded use's
continue_previous). The expectation is the chain built by hand with Engine.frames/stream (each
sentence on seed + i after the ones before it: tests/csmstream/test_plan.by_hand)."""

import asyncio

import numpy as np
import pytest

import csmstream
from csmstream import Segment
from csmstream.transport.sentences import split_sentences
from tests.csmstream.test_plan import SEED, TEXT, ada_voice_dir, by_hand
from tests.servers import RunningServer, collect

NEXT = "Is there anything else? Have a good day."


@pytest.fixture(scope="module")
def engine():
    return csmstream.load("tiny", device="cpu", max_streams=2)


def _as_given(spoken) -> list:
    return [(s.speaker_id, s.text, s.codes) for s in spoken]


def test_a_turn_after_spoken_sounds_as_one_long_reply_and_spoken_slides_on(engine):
    sentences = split_sentences(TEXT)
    ref_codes, _ = by_hand(engine, TEXT, 1, SEED)
    turn1 = [Segment(1, t, codes=c) for t, c in zip(sentences, ref_codes, strict=True)]
    _, want_pcm = by_hand(engine, NEXT, 1, 9, context=turn1, pcm=True)

    async def main():
        async with csmstream.Streamer(engine) as tts:
            first = tts.stream(TEXT, 1, seed=SEED, sentences=True)
            _ = [p async for p in first]
            second = tts.stream(NEXT, 1, seed=9, sentences=True, context=first.spoken)
            pcm = [p async for p in second]
            return first.spoken, pcm, second.spoken

    spoken1, pcm, spoken2 = asyncio.run(main())
    assert [(s.speaker_id, s.text) for s in spoken1] == [(1, t) for t in sentences]
    assert all(np.array_equal(s.codes, c) for s, c in zip(spoken1, ref_codes, strict=True))
    assert np.array_equal(np.concatenate(pcm), np.concatenate(want_pcm))
    alone = np.concatenate(by_hand(engine, NEXT, 1, 9, pcm=True)[1])
    assert np.concatenate(pcm).tobytes() != alone.tobytes()  # (the context changes what is generated)
    # the last four of the whole conversation: the given turns first, then its own
    assert [s.text for s in spoken2] == (sentences + split_sentences(NEXT))[-4:]


def test_one_generation_is_spoken_whole_unless_max_frames_cut_it(engine):
    text = "Thanks for calling."
    want = np.stack(list(engine.frames(text, 2, seed=3)))
    with csmstream.Streamer(engine) as tts:
        whole = tts.stream(text, 2, seed=3)
        _ = list(whole)
        cut = tts.frames(text, 2, seed=3, max_frames=len(want) - 1)
        _ = list(cut)
        given = [Segment(0, "Before.", codes=np.zeros((2, 32), np.int64))]
        after_cut = tts.frames(text, 2, seed=3, max_frames=2, context=given)
        _ = list(after_cut)
    [seg] = whole.spoken
    assert (seg.speaker_id, seg.text) == (2, text) and np.array_equal(seg.codes, want)
    assert cut.spoken == []  # its audio stops mid-word: no context
    assert _as_given(after_cut.spoken) == _as_given(given)  # what it continued is still what comes next


def test_a_sentence_cut_short_is_not_spoken_but_those_before_it_are(engine):
    sentences = split_sentences(TEXT)
    ref_codes, _ = by_hand(engine, TEXT, 0, SEED)
    budget = len(ref_codes[0]) + 3  # the first sentence whole, 3 frames of the second
    with csmstream.Streamer(engine) as tts:
        budgeted = tts.frames(TEXT, seed=SEED, sentences=True, max_frames=budget)
        assert len(list(budgeted)) == budget
        closed = tts.frames(TEXT, seed=SEED, sentences=True)
        for i, _ in enumerate(closed):
            if i == len(ref_codes[0]) + 1:  # two frames into the second sentence
                break
        closed.close()
        assert list(closed) == []
    for s in (budgeted, closed):
        [seg] = s.spoken
        assert seg.text == sentences[0] and np.array_equal(seg.codes, ref_codes[0])


def test_a_named_voice_is_not_spoken_and_the_server_continues_the_same_way(engine, tmp_path):
    """voice= goes first in every turn, so it is not among what a turn continues; the spoken
    turns are what /ws/generate's continue_previous hears on a connection: the same audio."""
    import json

    from websockets.asyncio.client import connect

    voices = ada_voice_dir(tmp_path)
    with csmstream.Streamer(engine, voices=voices) as tts:
        first = tts.stream(TEXT, 1, seed=SEED, voice="ada", sentences=True, format="pcm_16000")
        _ = b"".join(first)
        mine = b"".join(tts.stream(NEXT, 1, seed=9, voice="ada", sentences=True, format="pcm_16000",
                                   context=first.spoken))
    assert [s.text for s in first.spoken] == split_sentences(TEXT)

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), warmup=False, voices_dir=str(voices))
    rs.start()
    try:
        async def ask():
            async with connect(rs.url) as ws:
                common = {"speaker_id": 1, "voice": "ada", "format": "pcm_16000"}
                await ws.send(json.dumps({**common, "text": TEXT, "seed": SEED}))
                await collect(ws)
                await ws.send(json.dumps({**common, "text": NEXT, "seed": 9, "continue_previous": True}))
                return await collect(ws)

        events = asyncio.run(ask())
    finally:
        rs.stop()
    assert events[-1][0] == "done" and events[-1][1]["continued"] == 3
    assert mine == b"".join(m for kind, m in events if kind == "audio")
