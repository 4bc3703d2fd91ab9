"""SpokenCache: previous_text's last sentences -> the codes generated for them, per client and voice."""

import numpy as np

from csmstream.transport.job import CONTEXT_SENTENCES
from csmstream.transport.spoken import SpokenCache


def codes(i: int) -> np.ndarray:
    return np.full((3, 32), i)


def texts(found):
    return [t for t, _ in found]


def test_the_last_sentences_found_in_order_up_to_the_first_missing_one():
    c = SpokenCache()
    c.remember("1.2.3.4", (None, 0), [("One.", codes(1)), ("Two.", codes(2)), ("Three.", codes(3))])
    got = c.context_for("1.2.3.4", (None, 0), "Never said. One.  Two.\nThree.")  # the splitter's whitespace rules
    assert texts(got) == ["One.", "Two.", "Three."] and all((a == codes(i)).all() for i, (_, a) in
                                                             enumerate(got, 1))
    assert texts(c.context_for("1.2.3.4", (None, 0), "One. Not this one. Three.")) == ["Three."]
    assert c.context_for("1.2.3.4", (None, 0), "Three. Something new.") == []  # must end with what was said
    assert c.context_for("1.2.3.4", (None, 0), None) == [] and c.context_for("1.2.3.4", (None, 0), "  ") == []


def test_nothing_is_shared_between_clients_or_voices():
    c = SpokenCache()
    c.remember("a", (None, 0), [("Hello there.", codes(1))])
    assert c.context_for("b", (None, 0), "Hello there.") == []
    assert c.context_for("a", (None, 1), "Hello there.") == []
    assert c.context_for("a", ("anna", 0), "Hello there.") == []
    assert texts(c.context_for("a", (None, 0), "Hello there.")) == ["Hello there."]


def test_at_most_the_context_a_reply_uses_and_the_least_recently_used_go_first():
    c = SpokenCache(max_sentences=4)
    said = [(f"Sentence {i}.", codes(i)) for i in range(6)]
    c.remember("a", (None, 0), said)
    assert len(c) == 4  # 0 and 1 are gone
    prev = " ".join(t for t, _ in said)
    assert texts(c.context_for("a", (None, 0), prev)) == [t for t, _ in said[-CONTEXT_SENTENCES:]][-4:]
    c.context_for("a", (None, 0), "Sentence 2.")  # used: now the most recent
    c.remember("a", (None, 0), [("New.", codes(9))])
    assert texts(c.context_for("a", (None, 0), "Sentence 2.")) == ["Sentence 2."]
    assert c.context_for("a", (None, 0), "Sentence 3.") == []  # the least recently used went


def test_requests_are_remembered_by_id_with_only_their_own_sentences():
    """ElevenLabs' request stitching: a request's own sentences (not the context it heard) under its
    id; named requests give their sentences oldest first, back from the last id to the first one
    not found; per client and voice; at most the context a reply uses."""
    c = SpokenCache()
    heard = [("Heard before.", codes(0))]
    c.remember("a", (None, 0), heard + [("One.", codes(1)), ("Two.", codes(2))], request_id="r1", own=2)
    c.remember("a", (None, 0), [("Three.", codes(3))], request_id="r2")
    assert texts(c.context_of_requests("a", (None, 0), ["r1"])) == ["One.", "Two."]
    got = c.context_of_requests("a", (None, 0), ["r1", "r2"])
    assert texts(got) == ["One.", "Two.", "Three."] and all((a == codes(i)).all() for i, (_, a) in enumerate(got, 1))
    assert texts(c.context_of_requests("a", (None, 0), ["r2", "r1"])) == ["Three.", "One.", "Two."]  # as listed
    assert texts(c.context_of_requests("a", (None, 0), ["r1", "nope", "r2"])) == ["Three."]  # stops at "nope"
    assert c.context_of_requests("a", (None, 0), ["r2", "nope"]) == []  # what directly precedes is unknown
    assert c.context_of_requests("b", (None, 0), ["r1"]) == [] and c.context_of_requests("a", (None, 1), ["r1"]) == []
    assert c.context_of_requests("a", (None, 0), []) == []
    c.remember("a", (None, 0), [(f"S{i}.", codes(i)) for i in range(6)], request_id="long")
    assert texts(c.context_of_requests("a", (None, 0), ["long"])) == [f"S{i}." for i in range(6)][-CONTEXT_SENTENCES:]
    c.remember("a", (None, 0), heard, request_id="none", own=0)  # a request that generated nothing whole
    assert c.context_of_requests("a", (None, 0), ["none"]) == []


def test_the_least_recently_used_request_ids_go_first():
    c = SpokenCache(max_requests=2)
    for rid in ("r1", "r2"):
        c.remember("a", (None, 0), [(f"{rid}.", codes(1))], request_id=rid)
    c.context_of_requests("a", (None, 0), ["r1"])  # used: now the most recent
    c.remember("a", (None, 0), [("r3.", codes(3))], request_id="r3")
    assert c.context_of_requests("a", (None, 0), ["r2"]) == []
    assert texts(c.context_of_requests("a", (None, 0), ["r1", "r3"])) == ["r1.", "r3."]


def test_codes_are_kept_as_int16_within_a_byte_budget_least_recently_used_out_first():
    frames = np.arange(10 * 32).reshape(10, 32) % 2048  # a sentence of 10 frames: 640 bytes as int16
    c = SpokenCache(max_bytes=3 * 640)
    for i in range(3):
        c.remember("a", (None, 0), [(f"S{i}.", frames + i)])
    assert c.nbytes == 3 * 640 and len(c) == 3
    (_, got), = c.context_for("a", (None, 0), "S1.")  # used: S0 is now the least recently used
    assert got.dtype == np.int16 and np.array_equal(got, frames + 1)
    c.remember("a", (None, 0), [("S3.", frames)])  # over the budget: S0 goes
    assert len(c) == 3 and c.nbytes == 3 * 640
    assert c.context_for("a", (None, 0), "S0.") == []
    assert texts(c.context_for("a", (None, 0), "S1. S3.")) == ["S1.", "S3."]
    c.remember("a", (None, 0), [("S3.", frames[:5])])  # said again, shorter: replaced, its bytes recounted
    assert c.nbytes == 2 * 640 + 320 and len(c) == 3


def test_a_request_whose_sentence_was_forgotten_ends_the_context_there():
    c = SpokenCache(max_sentences=3)
    c.remember("a", (None, 0), [("One.", codes(1)), ("Two.", codes(2))], request_id="r1")
    c.remember("a", (None, 0), [("Three.", codes(3)), ("Four.", codes(4))], request_id="r2")  # "One." goes
    assert texts(c.context_of_requests("a", (None, 0), ["r1", "r2"])) == ["Two.", "Three.", "Four."]
    c.remember("a", (None, 0), [("Five.", codes(5))], request_id="r3")  # "Two." goes
    assert texts(c.context_of_requests("a", (None, 0), ["r1", "r2", "r3"])) == ["Three.", "Four.", "Five."]
