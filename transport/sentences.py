"""Sentence segmentation for text that arrives piece by piece (an LLM's output).

`SentenceSplitter.push(piece)` returns the sentences that are complete so far; `flush()` returns
the rest. Splitting the whole text at once and streaming it in any pieces give the same sentences.

A sentence ends at . ! ? or … (with any closing quotes or brackets) followed by whitespace and then
something that can start a sentence -- so a terminator at the very end of the buffer waits for the
next piece. Not an end: known abbreviations (Dr., e.g., U.S., a.m.), single-letter initials,
list markers ("1. "), decimals, prices, times, URLs and e-mail addresses (no space after their
dots), and an ellipsis or abbreviation followed by a lowercase word. A line break ends a sentence.
When the text pauses (no piece for a moment), `settle()` takes a terminator at the very end as a
sentence end after all, unless only the next piece could tell (an abbreviation, an initial, a list
marker, a number or dotted name with nothing after the dot yet): a reply that stops after its first
sentence is spoken at once, not when the next piece comes. Only a pause can make streamed text
split where the whole text would not (before a lowercase word: "Well... maybe").
Punctuation that comes alone ("...", a stray "?") is not a sentence to speak: it goes before the
next sentence, and is dropped at the very end.
Text without sentence punctuation is split at the first clause mark (, ; : –) past `clause_chars`,
else at the last space before `max_chars`, so a long run never waits for its end. Inside a
sentence, any run of whitespace becomes one space.
"""

from __future__ import annotations

import re

ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "eg", "ie", "cf",
    "approx", "inc", "ltd", "co", "corp", "no", "nos", "fig", "figs", "vol", "vols", "ch", "sec", "dept",
    "est", "min", "max", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    "mon", "tue", "tues", "wed", "thu", "thur", "thurs", "fri", "sat", "sun", "a.m", "p.m", "u.s", "u.k",
    "u.s.a", "e.u", "ph.d", "b.a", "m.a", "ave", "blvd", "rd", "hr", "hrs", "ft", "oz", "lb", "lbs", "gov",
    "gen", "col", "capt", "lt", "sgt", "rev", "hon", "pres", "op", "al", "viz", "ibid", "tel", "ext",
}
_TERMINATORS = ".!?…"
_CLOSERS = "\"'”’)]}»"
_CLAUSE = re.compile(r"[,;:–—](?=\s)")


def _squash(text: str) -> str:
    """Runs of whitespace (an LLM's line breaks, a client's doubled spaces) as one space, none at
    the ends: the model hears the words, not the layout."""
    return " ".join(text.split())


def speaks(text: str) -> bool:
    """`text` has something to say: a letter or digit (punctuation and symbols alone are not spoken)."""
    return any(c.isalnum() for c in text)


def _word_before(text: str, end: int) -> str:
    """The token (letters, digits, dots) ending just before text[end]."""
    i = end
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] == "."):
        i -= 1
    return text[i:end]


class SentenceSplitter:
    def __init__(self, max_chars: int = 240, clause_chars: int = 120) -> None:
        if not 20 <= clause_chars <= max_chars:
            raise ValueError(f"need 20 <= clause_chars <= max_chars, got {clause_chars}, {max_chars}")
        self.max_chars, self.clause_chars = max_chars, clause_chars
        self._buf = ""
        self._carry = ""  # punctuation that came alone ("...", a stray "?"): put before the next sentence

    @property
    def pending(self) -> str:
        return self._buf

    def push(self, piece: str) -> list[str]:
        self._buf += piece
        return self._take(final=False)

    def flush(self) -> list[str]:
        out = self._take(final=True)
        rest = self._speakable(_squash(self._buf))
        self._buf = self._carry = ""  # (punctuation left alone at the end: nothing to say)
        return out + ([rest] if rest else [])

    @property
    def may_settle(self) -> bool:
        """The buffer ends in a terminator (or its closing quote): settle() may take a sentence."""
        end = self._buf.rstrip()[-1:]
        return bool(end) and end in _TERMINATORS + _CLOSERS

    def settle(self) -> list[str]:
        """The sentence that ends the buffer, if the text has paused there (see the module doc)."""
        text = self._buf.rstrip(" \t")
        spaced, j = len(text) < len(self._buf), len(text)
        i = j
        while i > 0 and (text[i - 1] in _TERMINATORS or text[i - 1] in _CLOSERS):
            i -= 1
        t = next((k for k in range(i, j) if text[k] in _TERMINATORS), None)
        if t is None or not text[:t].strip() or not self._is_break(text, t, j, "X"):
            return []  # (X: any next word that is not lowercase)
        if not spaced and text[t] == "." and t == i:  # "3." may go on "50", "example." "com", "me@x." "org"
            word = text[:t].rsplit(None, 1)[-1]
            if word[-1].isdigit() or any(c in word for c in ".@/:"):
                return []
        if not spaced and text[t:j].endswith("..") and not text[t:j].endswith("..."):
            return []  # an ellipsis on its way
        sentence = self._speakable(_squash(text[:j]))
        self._buf = ""
        return [sentence] if sentence else []

    def _speakable(self, sentence: str) -> str | None:
        """`sentence` with any punctuation carried before it, or None (carried on) when it has no
        letter or digit: "." or "..." alone is not a sentence to speak (the model would make noise
        of it), so it goes with the next one."""
        if not speaks(sentence):
            self._carry = f"{self._carry} {sentence}".strip()
            return None
        sentence, self._carry = f"{self._carry} {sentence}".strip(), ""
        return sentence

    def _take(self, final: bool) -> list[str]:
        out = []
        while True:
            cut = self._find_break(final)
            if cut is None:
                break
            sentence = self._speakable(_squash(self._buf[:cut]))
            self._buf = self._buf[cut:].lstrip()
            if sentence:
                out.append(sentence)
        return out

    def _find_break(self, final: bool) -> int | None:
        text = self._buf
        n = len(text)
        i = 0
        while i < n:
            c = text[i]
            if c == "\n":
                if text[:i].strip():
                    return i + 1
            elif c in _TERMINATORS:
                j = i + 1
                while j < n and (text[j] in _TERMINATORS or text[j] in _CLOSERS):
                    j += 1
                # what follows the terminator run decides; at the end of the buffer, wait (unless final)
                k = j
                while k < n and text[k] in " \t":
                    k += 1
                if j == n or k == n:
                    return n if final else self._length_break()
                if (k > j or text[k] == "\n") and self._is_break(text, i, j, text[k]):
                    return j
                i = j
                continue
            i += 1
        return None if final else self._length_break()

    def _is_break(self, text: str, i: int, j: int, nxt: str) -> bool:
        run = text[i:j]
        if nxt.islower():
            return False  # "e.g. this", "well... maybe", "3 p.m. tomorrow"
        if run.startswith(".") and run.rstrip(_CLOSERS) == ".":
            word = _word_before(text, i)
            bare = word.lower().strip(".")
            if bare in ABBREVIATIONS or (len(bare) == 1 and bare.isalpha()):
                return False  # Dr. Smith, J. R. R. Tolkien, U.S. Army
            if bare.isdigit() and len(bare) <= 2 and (i - len(word) == 0 or text[i - len(word) - 1] == "\n"):
                return False  # "1. First item" at a line start
        return True

    def _length_break(self) -> int | None:
        text = self._buf
        if len(text) > self.clause_chars:
            # the first clause mark past clause_chars (known as soon as the space after it arrives,
            # so streaming and whole-text splitting agree)
            for m in _CLAUSE.finditer(text, self.clause_chars - 1, self.max_chars):
                return m.end()
        if len(text) > self.max_chars:
            sp = text.rfind(" ", 0, self.max_chars)
            return sp if sp > 0 else self.max_chars
        return None


def split_sentences(text: str, **kw) -> list[str]:
    """All sentences of a complete text."""
    s = SentenceSplitter(**kw)
    return s.push(text) + s.flush()
