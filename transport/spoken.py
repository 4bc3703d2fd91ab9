"""What each client was recently answered, so a REST request can continue it in the same voice.

CSM keeps a voice from one utterance to the next only when it hears the earlier audio (its codes)
as context; a REST request on its own starts afresh, and without a named voice a new generation
may sound like someone else. Clients that split a reply into requests say what came before as
text (ElevenLabs' `previous_text`: pipecat's HTTP service sends the turn so far). The server keeps
the codes of the sentences it recently generated for each client address and voice, and a request
whose previous_text ends with sentences found there gets them as context, like the later
sentences of one /ws/generate request get the earlier ones. Nothing is shared between addresses.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .job import CONTEXT_SENTENCES
from .sentences import SentenceSplitter

TAIL_CHARS = 4000  # only previous_text's end matters: its last few sentences
MAX_SENTENCES = 1024  # remembered in all, least recently used out first (~10-30 kB of codes each)


class SpokenCache:
    def __init__(self, max_sentences: int = MAX_SENTENCES) -> None:
        self.max_sentences = max_sentences
        self._codes: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (owner, voice, sentence) -> codes

    def __len__(self) -> int:
        return len(self._codes)

    def remember(self, owner, voice, pairs: list[tuple[str, np.ndarray]]) -> None:
        """Sentences (text, codes) just generated for this owner (a client address) and voice."""
        for text, codes in pairs:
            key = (owner, voice, text)
            self._codes[key] = codes
            self._codes.move_to_end(key)
        while len(self._codes) > self.max_sentences:
            self._codes.popitem(last=False)

    def context_for(self, owner, voice, previous_text: str | None) -> list[tuple[str, np.ndarray]]:
        """The last sentences of previous_text that were generated for this owner and voice, as
        context (at most CONTEXT_SENTENCES, in order); stops at the first one that was not."""
        if not previous_text or not previous_text.strip():
            return []
        splitter = SentenceSplitter()
        sentences = splitter.push(previous_text[-TAIL_CHARS:]) + splitter.flush()
        found: list[tuple[str, np.ndarray]] = []
        for text in reversed(sentences[-CONTEXT_SENTENCES:]):
            codes = self._codes.get((owner, voice, text))
            if codes is None:
                break
            found.append((text, codes))
        found.reverse()
        for text, _ in found:  # used: the most recently used now, in order
            self._codes.move_to_end((owner, voice, text))
        return found
