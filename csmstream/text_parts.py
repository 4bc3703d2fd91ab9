"""`say` to a server with more text than it takes in one request (serve --max-text-chars, 5,000 by
default): the text is cut into back-to-back requests at sentence ends, where the server would split
it anyway, so a long document piped into `say -` is spoken to its end instead of being refused.

A part takes the pieces as they come (so the first sentence is spoken while the rest is still being
written) until it holds `limit - SLACK` characters; from there it holds the text back until a
sentence ends, and ends at the last sentence end within `limit`. The server splits each part into
the same sentences as the whole text, and `sentences` counts those given so far, so part k can ask
for seed + (sentences before it): the seed chain of one long request.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from .transport.sentences import SentenceSplitter, split_sentences

SLACK = 600  # more than the longest sentence the splitter makes (240): one always ends inside it


def last_break(text: str, start: int, end: int) -> int:
    """Where the last sentence that the server's splitter takes whole out of text[start:end] ends
    (`start` itself when none does); `start` must be where a sentence starts. The character after
    `end` is looked at, as the splitter needs to see what follows a full stop."""
    splitter = SentenceSplitter()
    head = text[start:end + 1]
    splitter.push(head)
    cut = start + len(head) - len(splitter.pending)
    if cut > end:  # (a line break right at `end`: that sentence ends one character too late)
        splitter = SentenceSplitter()
        splitter.push(text[start:end])
        cut = end - len(splitter.pending)
    return cut


def space_cut(text: str, after: int, end: int) -> int:
    """No sentence end: the last space in text[after:end] (a word is not cut), else `end`."""
    sp = text.rfind(" ", after + 1, end)
    return sp if sp > after else end


class TextParts:
    """The text of `pieces` (an async iterable of str) as parts of at most `limit` characters:
    `await next_part()` is the next request's pieces (an async iterator), or None once the text has
    ended; read each part to its end before asking for the next."""

    def __init__(self, pieces: AsyncIterable[str], limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"the characters a request may take must be an integer >= 1, got {limit!r}")
        self.limit = limit
        self.soft = limit - SLACK if limit > 2 * SLACK else limit // 2
        self._it = pieces.__aiter__()
        self._rest = ""  # read, not yet in a part
        self._ended = False
        self.sentences = 0  # in the parts given so far
        self.parts = 0

    async def _read(self) -> bool:
        """One more piece onto the text read; False once the text has ended."""
        if self._ended:
            return False
        try:
            piece = await anext(self._it)
        except StopAsyncIteration:
            self._ended = True
            return False
        if not isinstance(piece, str):
            raise TypeError(f"each piece of text must be a str, got {type(piece).__name__}")
        self._rest += piece
        return True

    async def next_part(self) -> AsyncIterator[str] | None:
        while not self._rest.strip():  # (no request for blank text)
            if not await self._read():
                return None
        self.parts += 1
        return self._part()

    async def _part(self) -> AsyncIterator[str]:
        sent = ""  # this part's text given out so far
        base = 0  # the last sentence end known in it (the splitter runs from there)
        while True:
            text = sent + self._rest
            if len(text) <= self.soft or (self._ended and len(text) <= self.limit):
                if self._rest:  # the pieces as they come
                    piece, self._rest = self._rest, ""
                    sent = text
                    yield piece
                if self._ended:
                    break  # the end of the text
                await self._read()
                continue
            # near the limit: only whole sentences from here, and the part ends at the limit
            full = len(text) > self.limit  # (the character after the limit tells whether a sentence ends at it)
            cut = last_break(text, base, self.limit if full else len(text))
            if cut > len(sent):
                piece, self._rest = text[len(sent):cut], text[cut:]
                sent, base = text[:cut], cut
                yield piece
            if full:
                if not sent:  # not one sentence end, nothing given: cut at a space
                    cut = space_cut(text, 0, self.limit)
                    sent, self._rest = text[:cut], text[cut:]
                    yield sent
                break
            await self._read()
        self.sentences += len(split_sentences(sent))
