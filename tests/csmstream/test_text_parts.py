"""csmstream/text_parts.py: a text longer than a server takes in one request, cut into requests at
sentence ends. Checked against the server's own sentence splitting of the whole text, and against
a greedy packing of its sentences computed here."""

import asyncio
import random

import pytest

from csmstream.text_parts import SLACK, TextParts
from csmstream.transport.sentences import split_sentences

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango").split()
TRICKY = ["Dr. Smith came at 3 p.m. today.", "It cost $3.50, e.g. a coffee.", "See www.example.com now!",
          "Well... maybe.",
          "1. First item", "\u201cReally?\u201d she asked.", "Caf\u00e9 au lait, s'il vous pla\u00eet."]


def _text(rng: random.Random, n: int, *, tricky: bool = True) -> str:
    out = []
    for _ in range(n):
        if tricky and rng.random() < 0.2:
            out.append(rng.choice(TRICKY))
        else:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 18)))
            out.append(words.capitalize() + rng.choice(".!?"))
    sep = [" "] * (n - 1)
    if tricky:
        sep = [rng.choice([" ", " ", " ", "  ", "\n", " \n "]) for _ in range(n - 1)]
    return "".join(s + p for s, p in zip(out, sep + [""], strict=True))


def _pieces(rng: random.Random, text: str, how: str) -> list[str]:
    if how == "whole":
        return [text]
    if how == "chars":
        return list(text)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // rng.randint(3, 40))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]


async def _aiter(pieces):
    for p in pieces:
        yield p


def _parts(pieces, limit) -> tuple[list[str], list[int], int]:
    """Each part's text, the sentences counted before each part, the total counted."""
    async def run():
        tp = TextParts(_aiter(pieces), limit)
        texts, before = [], []
        while (part := await tp.next_part()) is not None:
            before.append(tp.sentences)
            texts.append("".join([p async for p in part]))
        return texts, before, tp.sentences
    return asyncio.run(run())


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("how", ["whole", "chars", "random"])
def test_parts_are_the_text_cut_at_the_servers_sentence_ends_within_the_limit(seed, how):
    rng = random.Random(seed * 7 + len(how))
    limit = rng.choice([500, 700, 1300, 2 * SLACK + 1, 5000])
    text = _text(rng, rng.randint(5, 160))
    texts, before, total = _parts(_pieces(rng, text, how), limit)
    assert "".join(texts) == text  # nothing lost, nothing added, in order
    assert all(0 < len(t) <= limit for t in texts)
    sentences = split_sentences(text)
    per_part = [split_sentences(t) for t in texts]
    assert [s for p in per_part for s in p] == sentences  # every cut is where the server splits anyway
    assert total == len(sentences)
    assert before == [sum(len(p) for p in per_part[:k]) for k in range(len(texts))]  # seed + sentences before
    assert len(texts) >= -(-len(text) // limit)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("how", ["whole", "random"])
def test_each_part_takes_every_sentence_that_fits(seed, how):
    """Clean text (one space between sentences): the parts are the greedy packing of its sentences,
    computed here from split_sentences alone -- a part ends only when the next sentence (with the
    space after it) would pass the limit."""
    rng = random.Random(100 + seed)
    limit = rng.choice([500, 800, 1500])
    text = _text(rng, rng.randint(20, 120), tricky=False)
    expected, cur = [], ""
    sentences = split_sentences(text)
    for i, s in enumerate(sentences):
        if cur and len(cur) + len(s) + (i < len(sentences) - 1) > limit:  # (with the space after it)
            expected.append(cur)
            cur = ""
        cur += s + " "
    expected.append(cur.rstrip(" "))
    texts, _, _ = _parts(_pieces(rng, text, how), limit)
    assert texts == expected


def test_the_first_part_passes_pieces_on_as_they_come():
    """Below the limit a part forwards each piece before the next one is read: the first sentence
    is spoken while the rest is still being written."""
    reads = []

    async def source():
        for i in range(5):
            reads.append(i)
            yield f"Piece {i} of the reply. "

    async def run():
        tp = TextParts(source(), 5000)
        part = await tp.next_part()
        seen = []
        async for piece in part:
            seen.append((piece, len(reads)))
        return seen
    seen = asyncio.run(run())
    assert seen == [(f"Piece {i} of the reply. ", i + 1) for i in range(5)]


def test_text_with_no_sentence_end_is_cut_at_a_space_and_blank_text_makes_no_part():
    words = " ".join(["word"] * 300)  # 1,499 characters, no full stop, no clause mark
    texts, _, _ = _parts([words], 200)
    assert "".join(texts) == words and all(len(t) <= 200 for t in texts)
    assert all(not t.endswith("wor") and t.strip().split(" ")[-1] == "word" for t in texts)
    assert _parts(["   ", "\n", ""], 100)[0] == []
    assert _parts([], 100)[0] == []


def test_bad_limits_and_pieces_are_refused():
    for bad in (0, -5, True, 2.5, "100"):
        with pytest.raises(ValueError, match="an integer >= 1"):
            TextParts(_aiter([]), bad)
    with pytest.raises(TypeError, match="must be a str, got bytes"):
        _parts(["Hello. ", b"there"], 100)


def _sentence(n: int, letter: str) -> str:
    """A sentence of exactly n characters: words of five letters, the last one cut to fit."""
    body = " ".join([letter * 5] * n)[: n - 2].rstrip()
    return letter.upper() + body + letter * (n - 2 - len(body)) + "."


@pytest.mark.parametrize("how", ["whole", "chars"])
def test_a_part_that_ends_exactly_at_the_limit_keeps_its_last_sentence(how):
    """Three sentences and their spaces fill 500 characters exactly: they are one part (the
    splitter must see past the limit to know the third one ended there)."""
    s = [_sentence(n, c) for n, c in ((160, "a"), (170, "b"), (167, "c"), (90, "d"))]
    assert [len(x) for x in s] == [160, 170, 167, 90] and split_sentences(" ".join(s)) == s
    text = " ".join(s)
    texts, before, _ = _parts(_pieces(random.Random(0), text, how), 500)
    assert texts == [" ".join(s[:3]) + " ", s[3]] and before == [0, 3]
