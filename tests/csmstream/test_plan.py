"""Streams of sentences (csmstream/plan.py): Streamer.stream/frames(sentences=True) speak a whole
text sentence by sentence, each sentence one generation with the sentences before it as context --
checked against the same chain built by hand with Engine.frames/stream, and against the server's
/ws/generate for the same text and seed; stream_text takes the text in pieces as an LLM writes it."""

import asyncio
import json
import threading
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


_BY_HAND: dict = {}  # (text, speaker, seed, pcm) -> by_hand's result without a context: computed once


def by_hand(engine, text, speaker, seed, context=(), pcm=False, keep=4):
    """The chain by hand: sentence i generated alone (Engine.frames / stream) with seed + i and the
    last `keep` sentences before it (their codes) as context after `context`."""
    key = (id(engine), text, speaker, seed, pcm)
    if not context and keep == 4 and key in _BY_HAND:
        return _BY_HAND[key]
    codes, audio, history = [], [], []
    for i, sentence in enumerate(split_sentences(text)):
        ctx = list(context) + [Segment(speaker, t, codes=c) for t, c in history[-keep:]] if keep else list(context)
        c = np.stack(list(engine.frames(sentence, speaker, context=ctx, seed=seed + i)))
        if pcm:
            audio.append(np.concatenate(list(engine.stream(sentence, speaker, context=ctx, seed=seed + i))))
        history.append((sentence, c))
        codes.append(c)
    if not context and keep == 4:
        _BY_HAND[key] = codes, audio
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
        refused = rf"sentence 2 of {len(split_sentences(text))} was refused: .*window"
        with pytest.raises(csmstream.GenerationError, match=refused):
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


def test_a_later_sentence_is_never_refused_for_a_full_queue_and_goes_before_newcomers(engine):
    """Both slots busy and no queue (max_waiting=0): the next sentence of a stream that is playing
    still goes in (at the first free slot), while a newcomer is refused with Busy."""
    want = by_hand(engine, TEXT, 0, SEED)[0]
    with csmstream.Streamer(engine, max_waiting=0) as tts:
        a = tts.frames(TEXT, seed=SEED, sentences=True)
        b = tts.frames("Another caller holds the other slot.", seed=1, max_frames=2000)
        got = [next(a) for _ in range(len(want[0]))]
        _poll(lambda: a.req.finished)
        c = tts.frames("A newcomer takes the slot that freed.", seed=2, max_frames=2000)
        _poll(lambda: c.req.frames > 0)  # both slots busy again, nobody waiting
        got.append(next(a))  # hands a's second sentence over: it waits for a slot, not refused
        with pytest.raises(csmstream.Busy):
            tts.frames("Yet another newcomer.", seed=3)
        b.close()  # a slot frees: the second sentence has it
        got += list(a)
        c.close()
    assert np.array_equal(np.stack(got), np.concatenate(want))


def _poll(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def ada_voice_dir(tmp_path):
    """A voices directory with one voice, "ada": a second of a 220 Hz tone and its transcript."""
    from csmstream.wav import write_wav

    voices = tmp_path / "voices"
    voices.mkdir()
    t = np.arange(16000) / 16000
    write_wav(voices / "ada.wav", [(8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)], 16000)
    (voices / "ada.txt").write_text("A short voice prompt.")
    return voices


def test_a_named_voice_is_the_servers_voice_for_the_same_text_and_seed(engine, tmp_path):
    """Streamer(engine, voices=DIR) + voice=NAME: the voice's turn opens each sentence's context,
    its KV cached, and the audio is what /ws/generate sends with "voice" for that text and seed."""
    from websockets.asyncio.client import connect

    voices = ada_voice_dir(tmp_path)
    with csmstream.Streamer(engine, voices=voices) as tts:
        hits = engine.prefixes.hits
        mine = b"".join(tts.stream(TEXT, 1, seed=SEED, voice="ada", sentences=True, format="pcm_16000"))
        assert sorted(tts.voices) == ["ada"] and engine.prefixes.hits - hits >= 2  # (its KV, cached at the first)
        plain = b"".join(tts.stream(TEXT, 1, seed=SEED, sentences=True, format="pcm_16000"))
        with pytest.raises(ValueError, match="unknown voice 'bob'; this Streamer has ada"):
            tts.stream("Hi.", voice="bob")
    with csmstream.Streamer(engine) as tts, pytest.raises(ValueError, match="has none: Streamer.engine, voices=DIR"):
        tts.frames("Hi.", voice="ada")
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), warmup=False, voices_dir=str(voices))
    rs.start()
    try:
        async def ask():
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": TEXT, "speaker_id": 1, "seed": SEED, "voice": "ada",
                                          "format": "pcm_16000"}))
                return await collect(ws)

        events = asyncio.run(ask())
    finally:
        rs.stop()
    theirs = b"".join(m for kind, m in events if kind == "audio")
    assert events[-1][0] == "done" and len(mine) > 16000 and mine == theirs and mine != plain


# -- stream_text: the text in pieces -------------------------------------------------------------
def words(text):
    for w in text.split(" "):
        yield w + " "


async def awords(text):
    for w in text.split(" "):
        await asyncio.sleep(0)
        yield w + " "


def test_text_in_pieces_is_spoken_as_the_whole_text_is_from_a_thread_or_an_event_loop(engine):
    want = np.concatenate(by_hand(engine, TEXT, 1, SEED)[0])

    async def from_loop(tts):
        codes = [c async for c in tts.stream_text(awords(TEXT), 1, seed=SEED, codes=True)]
        chunks = [c async for c in tts.stream_text(awords(TEXT), 1, seed=SEED, format="ulaw_8000", chunk_ms=20)]
        return codes, chunks

    with csmstream.Streamer(engine) as tts:
        got = np.stack(list(tts.stream_text(words(TEXT), 1, seed=SEED, codes=True)))
        whole = b"".join(tts.stream(TEXT, 1, seed=SEED, sentences=True, format="ulaw_8000", chunk_ms=20))
        codes, chunks = asyncio.run(from_loop(tts))
    assert np.array_equal(got, want) and np.array_equal(np.stack(codes), want)
    assert all(len(c) == 160 for c in chunks[:-1]) and b"".join(chunks) == whole


def test_a_sentence_is_spoken_while_the_source_still_holds_back_the_rest(engine):
    """The source gives one sentence, then blocks until the consumer has heard audio: its sentence
    end counts once the text pauses (as on the server), so the audio comes without the rest."""
    heard = threading.Event()
    timed_out = []

    def source():
        yield "Hello there, how are you today?"
        timed_out.append(not heard.wait(30))  # (30 s: only if the sentence waited for more text)
        yield " It shipped this morning."

    with csmstream.Streamer(engine) as tts:
        n = 0
        for _ in tts.stream_text(source(), seed=SEED, codes=True):
            heard.set()
            n += 1
    assert timed_out == [False]
    assert n == sum(len(c) for c in by_hand(engine, "Hello there, how are you today? It shipped this morning.", 0,
                                            SEED)[0])


def test_a_pause_after_what_may_not_end_a_sentence_is_waited_out_without_spinning(engine, monkeypatch):
    """"Please ask Dr." pauses: the pause settles nothing (the next word tells), and the consumer
    then sleeps until text comes -- it does not poll the plan in a loop -- and "Dr. Smith" stays
    one sentence."""
    from csmstream.plan import SentencePlan

    calls = []
    real = SentencePlan.next
    monkeypatch.setattr(SentencePlan, "next", lambda self: (calls.append(1), real(self))[1])
    go = threading.Event()
    text = "Hello there. Please ask Dr. Smith about it."

    def source():
        yield "Hello there. Please ask Dr."
        go.wait(30)
        yield " Smith about it."

    want = by_hand(engine, text, 0, SEED)[0]
    with csmstream.Streamer(engine) as tts:
        s = tts.stream_text(source(), seed=SEED, codes=True)
        frames = []
        reader = threading.Thread(target=lambda: frames.extend(s))
        reader.start()
        _poll(lambda: len(frames) == len(want[0]) and s.req.finished)  # "Hello there." is all spoken
        time.sleep(0.6)  # the pause is taken (after 0.2 s): "Dr." may go on, so no sentence yet
        before = len(calls)
        time.sleep(0.5)
        idle_calls = len(calls) - before
        go.set()
        reader.join(60)
    assert idle_calls < 5  # (a loop polling the plan would make thousands)
    assert [len(w) for w in want] == [len(want[0]), len(frames) - len(want[0])]
    assert np.array_equal(np.stack(frames), np.concatenate(want))


def test_a_source_that_fails_stops_the_stream_after_what_was_made_then_raises_its_error(engine):
    first = len(by_hand(engine, TEXT, 0, SEED)[0][0])
    made = threading.Event()

    def source():
        yield split_sentences(TEXT)[0] + " And then"
        made.wait(30)
        raise OSError("the LLM's connection dropped")

    with csmstream.Streamer(engine) as tts:
        got = []
        with pytest.raises(OSError, match="connection dropped"):
            for c in tts.stream_text(source(), seed=SEED, codes=True):
                got.append(c)
                if len(got) == first:
                    made.set()
        assert len(got) == first and tts.stats.requests == 1  # "And then" was never spoken
        deadline = time.monotonic() + 10
        while len(engine._free) < engine.max_streams and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine._free) == engine.max_streams


def test_closing_the_streamer_ends_a_stream_waiting_for_text_instead_of_leaving_it_hanging(engine):
    async def main():
        async def stalled():
            yield "Hi there."
            await asyncio.sleep(3600)
            yield "never"

        async with csmstream.Streamer(engine) as tts:
            s = tts.stream_text(stalled(), seed=1, codes=True)
            frames = [await s.__anext__()]  # its first sentence is under way

            async def rest():
                async for c in s:
                    frames.append(c)

            task = asyncio.create_task(rest())
            while not s.req.finished:  # the first sentence is all spoken: now it waits for text
                await asyncio.sleep(0.01)
        with pytest.raises(csmstream.StreamerClosed):
            await asyncio.wait_for(task, 10)
        return frames, s.req.frames

    frames, made = asyncio.run(main())
    assert len(frames) == made > 0


def test_bad_pieces_and_arguments_are_refused_with_what_is_allowed(engine):
    with csmstream.Streamer(engine) as tts:
        with pytest.raises(ValueError, match="not one str: for a whole text use stream"):
            tts.stream_text("Hello there.")
        with pytest.raises(ValueError, match="iterable or an async iterable of str, got int"):
            tts.stream_text(5)
        with pytest.raises(ValueError, match="temperature"):
            tts.stream_text(words("Hi."), temperature=-1)
        with pytest.raises(ValueError, match="with codes=True the frames' codes come"):
            tts.stream_text(words("Hi."), codes=True, format="ulaw_8000")
        with pytest.raises(TypeError, match="each piece of text must be a str, got bytes"):
            list(tts.stream_text(iter(["Hello. ", b"there"]), codes=True))
        with pytest.raises(TypeError, match="iterate it with `async for`"):
            next(tts.stream_text(awords("Hi."), codes=True))
        assert tts.stats.requests <= 1  # (the bytes piece came after a sentence that may have started)
