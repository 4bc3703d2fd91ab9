"""What each client was recently answered, so a REST request can continue it in the same voice.

CSM keeps a voice from one utterance to the next only when it hears the earlier audio (its codes)
as context; a REST request on its own starts afresh, and without a named voice a new generation
may sound like someone else. Clients that split a reply into requests say what came before as
text (ElevenLabs' `previous_text`: pipecat's HTTP service sends the turn so far). The server keeps
the codes of the sentences it recently generated for each client address and voice, and a request
whose previous_text ends with sentences found there gets them as context, like the later
sentences of one /ws/generate request get the earlier ones. ElevenLabs' request stitching names
the earlier requests instead (`previous_request_ids`, the `request-id` header of each response):
the server keeps each request's last sentences under its id too, and a request naming ids found
there gets their sentences as context. Nothing is shared between addresses.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .job import CONTEXT_SENTENCES
from .sentences import SentenceSplitter

TAIL_CHARS = 4000  # only previous_text's end matters: its last few sentences
# what is remembered, least recently used out first: sentences' codes up to MAX_BYTES (kept as int16,
# 64 bytes a frame: ~4 kB for a 5 s sentence, so ~16,000 of them; hundreds of clients each continuing
# a reply stay within it), and for request stitching the sentence texts of MAX_REQUESTS requests
MAX_BYTES = 64 << 20
MAX_SENTENCES = 1 << 16
MAX_REQUESTS = 1 << 14


class SpokenCache:
    def __init__(self, max_sentences: int = MAX_SENTENCES, max_requests: int = MAX_REQUESTS,
                 max_bytes: int = MAX_BYTES) -> None:
        self.max_sentences, self.max_requests, self.max_bytes = max_sentences, max_requests, max_bytes
        self._codes: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (owner, voice, sentence) -> codes
        self._requests: OrderedDict[tuple, tuple] = OrderedDict()  # (owner, voice, request id) -> its sentences
        self.nbytes = 0  # of the codes kept

    def __len__(self) -> int:
        return len(self._codes)

    def remember(self, owner, voice, pairs: list[tuple[str, np.ndarray]], *, request_id: str | None = None,
                 own: int | None = None) -> None:
        """Sentences (text, codes) just generated for this owner (a client address) and voice;
        with request_id, the last `own` of them (default all: those the request itself generated)
        are remembered under it as well."""
        for text, codes in pairs:
            key = (owner, voice, text)
            old = self._codes.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            kept = _compact(codes)
            self._codes[key] = kept
            self.nbytes += kept.nbytes
        while self._codes and (len(self._codes) > self.max_sentences or self.nbytes > self.max_bytes):
            self.nbytes -= self._codes.popitem(last=False)[1].nbytes
        mine = pairs if own is None else pairs[len(pairs) - own:]
        if request_id is not None and mine:
            key = (owner, voice, request_id)
            self._requests[key] = tuple(text for text, _ in mine[-CONTEXT_SENTENCES:])
            self._requests.move_to_end(key)
            while len(self._requests) > self.max_requests:
                self._requests.popitem(last=False)

    def context_of_requests(self, owner, voice, request_ids: list[str]) -> list[tuple[str, np.ndarray]]:
        """The sentences of the named requests (oldest first, as ElevenLabs' previous_request_ids
        lists them) generated for this owner and voice, as context: at most CONTEXT_SENTENCES, the
        last ones; from the last back, stopping at the first id or sentence not found (an unknown
        id, or one forgotten, ends what came before it: the context stays what directly precedes
        the request)."""
        texts: list[str] = []
        for rid in reversed(request_ids):
            said = self._requests.get((owner, voice, rid))
            if said is None:
                break
            self._requests.move_to_end((owner, voice, rid))  # used: the most recently used now
            texts[:0] = said
        return self._found(owner, voice, texts[-CONTEXT_SENTENCES:])

    def _found(self, owner, voice, texts: list[str]) -> list[tuple[str, np.ndarray]]:
        """The last of these sentences whose codes are kept, in order, back to the first one that
        is not; each used becomes the most recently used."""
        found: list[tuple[str, np.ndarray]] = []
        for text in reversed(texts):
            codes = self._codes.get((owner, voice, text))
            if codes is None:
                break
            found.append((text, codes))
        found.reverse()
        for text, _ in found:
            self._codes.move_to_end((owner, voice, text))
        return found

    def context_for(self, owner, voice, previous_text: str | None) -> list[tuple[str, np.ndarray]]:
        """The last sentences of previous_text that were generated for this owner and voice, as
        context (at most CONTEXT_SENTENCES, in order); stops at the first one that was not."""
        if not previous_text or not previous_text.strip():
            return []
        splitter = SentenceSplitter()
        sentences = splitter.push(previous_text[-TAIL_CHARS:]) + splitter.flush()
        return self._found(owner, voice, sentences[-CONTEXT_SENTENCES:])


def _compact(codes: np.ndarray) -> np.ndarray:
    """Codes as int16 when they fit (CSM's codebooks have 2,048 entries): a quarter of int64's bytes."""
    codes = np.asarray(codes)
    if codes.size and codes.dtype.itemsize > 2 and 0 <= codes.min() and codes.max() <= np.iinfo(np.int16).max:
        return codes.astype(np.int16)
    return codes
