"""Streamer.stream/frames(sentences=True): a text spoken sentence by sentence, each sentence one
generation with the sentences before it as context -- checked against the same chain built by
hand with Engine.frames/stream, and against the server's /ws/generate for the same text and seed."""

import asyncio
import json
import time

import numpy as np
import pytest

import csmstream
from csmstream import Segment
from csmstream.engine.worker import GenRequest
from csmstream.transport.sentences import split_sentences
from tests.servers import RunningServer, collect

TEXT = "Hello there, how are you today? I am calling about your order. It shipped this morning."
SEED = 5


@pytest.fixture(scope="module")
def engine():
    return csmstream.load("tiny", device="cpu", max_streams=2)


def by_hand(engine, text, speaker, seed, context=(), pcm=False, keep=4):
    """The chain by hand: sentence i generated alone (Engine.frames / stream) with seed + i and the
    last `keep` sentences before it (their codes) as context after `context`."""
    codes, audio, history = [], [], []
    for i, sentence in enumerate(split_sentences(text)):
        ctx = list(context) + [Segment(speaker, t, codes=c) for t, c in history[-keep:]] if keep else list(context)
        c = np.stack(list(engine.frames(sentence, speaker, context=ctx, seed=seed + i)))
        if pcm:
            audio.append(np.concatenate(list(engine.stream(sentence, speaker, context=ctx, seed=seed + i))))
        history.append((sentence, c))
        codes.append(c)
    return codes, audio


def test_each_sentence_is_generated_with_the_ones_before_it_as_context(engine):
    ref_codes, ref_pcm = by_hand(engine, TEXT, 1, SEED, pcm=True)
    assert len(ref_codes) == 3

    async def main():
        async with csmstream.Streamer(engine) as tts:
            s = tts.frames(TEXT, 1, seed=SEED, sentences=True)
            codes = [c async for c in s]
            pcm = [p async for p in tts.stream(TEXT, 1, seed=SEED, sentences=True)]
            chunks = [c async for c in tts.stream(TEXT, 1, seed=SEED, sentences=True, format="pcm_24000",
                                                  chunk_ms=100)]
            return codes, s.frames_made, pcm, chunks, tts.stats.requests

    codes, made, pcm, chunks, requests = asyncio.run(main())
    want = np.concatenate(ref_codes)
    assert np.array_equal(np.stack(codes), want) and made == len(want)
    assert np.array_equal(np.concatenate(pcm), np.concatenate(ref_pcm))
    # one encoder across the sentences: every chunk exactly 100 ms but the last, no seam
    assert all(len(c) == 4800 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 4800
    assert np.array_equal(np.frombuffer(b"".join(chunks), "<i2"), np.concatenate(ref_pcm))
    assert requests == 9  # three streams of three sentences, each sentence its own generation
    # and not what one generation of the whole text gives
    assert not np.array_equal(np.stack(list(engine.frames(TEXT, 1, seed=SEED)))[: len(want)], want)


def test_a_stream_of_sentences_is_what_the_server_sends_for_the_same_text_and_seed(engine):
    with csmstream.Streamer(engine) as tts:
        mine = b"".join(tts.stream(TEXT, 2, seed=SEED, sentences=True, format="ulaw_8000", chunk_ms=20))
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), warmup=False).start()
    try:
        from websockets.asyncio.client import connect

        async def ask():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": TEXT, "speaker_id": 2, "seed": SEED, "format": "ulaw_8000",
                                          "chunk_ms": 20}))
                return await collect(ws)

        events = asyncio.run(ask())
    finally:
        rs.stop()
    assert events[-1][0] == "done"
    theirs = b"".join(m for kind, m in events if kind == "audio")
    assert len(mine) > 8000 and mine == theirs


def test_max_frames_bounds_the_whole_stream_not_each_sentence(engine):
    ref = np.concatenate(by_hand(engine, TEXT, 0, SEED)[0])
    first = len(split_sentences(TEXT)[0])
    budget = engine.config.default_max_frames(first) + 10  # the first sentence whole, 10 frames of the second
    with csmstream.Streamer(engine) as tts:
        s = tts.frames(TEXT, seed=SEED, sentences=True, max_frames=budget)
        got = np.stack(list(s))
        requests = tts.stats.requests
    assert len(ref) > budget and np.array_equal(got, ref[:budget]) and s.frames_made == budget
    assert requests == 2  # the third sentence was never started


def test_context_is_trimmed_from_the_oldest_sentence_to_leave_room_for_the_next(engine):
    """A caller's context that nearly fills the model's window: each sentence keeps only as many
    earlier sentences as leave it room for its whole length (here: none), as the server does."""
    window = engine.gen.max_seq_len
    one = [Segment(0, "Earlier.", codes=np.zeros((1, 32), np.int64))]
    with csmstream.Streamer(engine) as tts:
        # n context frames leave the longest sentence, alone after them, just room for its cap
        need = max(tts._worker.prepare(GenRequest(s, context=one)).prompt_len + engine.config.default_max_frames(len(s))
                   for s in split_sentences(TEXT))
        n = window - need + 1
        ctx = [Segment(0, "Earlier.", codes=np.random.default_rng(0).integers(0, 2048, (n, 32)))]
        got = np.stack(list(tts.frames(TEXT, seed=SEED, context=ctx, sentences=True)))
    ref = np.concatenate(by_hand(engine, TEXT, 0, SEED, context=ctx, keep=0)[0])
    assert np.array_equal(got, ref)


def test_a_later_sentence_the_engine_refuses_ends_the_stream_after_the_earlier_ones(engine):
    text = "Hi. " + "This second sentence is a great deal longer than the first one, " * 2 + "so it ends late."
    first = split_sentences(text)[0]
    with csmstream.Streamer(engine) as tts:
        probe = tts._worker.prepare(GenRequest(first, context=[Segment(0, "x", codes=np.zeros((1, 32), np.int64))]))
        # the first sentence just fits (room for 5 frames), the longer second one does not at all
        n = engine.gen.max_seq_len - probe.prompt_len - 5 + 1
        ctx = [Segment(0, "x", codes=np.zeros((n, 32), np.int64))]
        want = np.stack(list(engine.frames(first, context=ctx, seed=SEED)))
        s = tts.frames(text, seed=SEED, context=ctx, sentences=True)
        got = []
        with pytest.raises(csmstream.GenerationError, match=rf"sentence 2 of {len(split_sentences(text))} was refused: .*window"):
            for c in s:
                got.append(c)
    assert len(want) == 5 and np.array_equal(np.stack(got), want)


def test_closing_mid_text_stops_the_sentence_and_starts_no_more(engine):
    first = len(by_hand(engine, TEXT, 0, SEED)[0][0])
    with csmstream.Streamer(engine) as tts:
        s = tts.frames(TEXT, seed=SEED, sentences=True)
        for i, _ in enumerate(s):
            if i == first + 2:  # three frames into the second sentence
                break
        s.close()
        deadline = time.monotonic() + 10
        while len(engine._free) < engine.max_streams and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(engine._free) == engine.max_streams and tts.stats.requests == 2
        assert list(s) == []


@pytest.mark.parametrize("text, why", [
    ("... !", "nothing to speak"),
    (42, "must be a string"),
])
def test_a_text_with_no_sentence_to_speak_is_refused_when_the_stream_is_made(engine, text, why):
    with csmstream.Streamer(engine) as tts:
        with pytest.raises(ValueError, match=why):
            tts.stream(text, sentences=True)
        with pytest.raises(ValueError, match="max_frames must be an integer >= 1"):
            tts.frames("Hello.", sentences=True, max_frames=0)
        assert tts.stats.requests == 0
