"""Sentence segmentation on real-looking assistant text: a table of cases, each checked on the
whole text and streamed in LLM-sized pieces (the two must agree)."""

import random

import pytest

from csmstream.transport.sentences import SentenceSplitter, split_sentences

CASES = [
    # plain
    ("Hello there. How are you?", ["Hello there.", "How are you?"]),
    ("Yes! That works.", ["Yes!", "That works."]),
    ("Really? I did not know that.", ["Really?", "I did not know that."]),
    ("One sentence only", ["One sentence only"]),
    ("Ends without a space.", ["Ends without a space."]),
    ("  Leading and trailing spaces.   Second one.  ", ["Leading and trailing spaces.", "Second one."]),
    ("Wait?! What happened?", ["Wait?!", "What happened?"]),
    # abbreviations
    ("Dr. Smith will see you now. Please come in.", ["Dr. Smith will see you now.", "Please come in."]),
    ("Mr. and Mrs. Jones arrived. They were late.", ["Mr. and Mrs. Jones arrived.", "They were late."]),
    ("Bring fruit, e.g. apples or pears. Thanks.", ["Bring fruit, e.g. apples or pears.", "Thanks."]),
    ("Use a tool, i.e. a hammer. Go.", ["Use a tool, i.e. a hammer.", "Go."]),
    ("The U.S. Army is large. It has many units.", ["The U.S. Army is large.", "It has many units."]),
    ("She moved to the U.K. last year.", ["She moved to the U.K. last year."]),
    ("Call me at 3 p.m. tomorrow. Bye.", ["Call me at 3 p.m. tomorrow.", "Bye."]),
    ("We open at 9 a.m. Monday through Friday.", ["We open at 9 a.m. Monday through Friday."]),
    ("Apples, pears, etc. are fine. Anything else?", ["Apples, pears, etc. are fine.", "Anything else?"]),
    ("Prof. Lee teaches math. St. Louis is nice.", ["Prof. Lee teaches math.", "St. Louis is nice."]),
    ("It was Acme Inc. that won. Good for them.", ["It was Acme Inc. that won.", "Good for them."]),
    ("See Fig. 3 for details. It helps.", ["See Fig. 3 for details.", "It helps."]),
    ("J. R. R. Tolkien wrote it. Read it.", ["J. R. R. Tolkien wrote it.", "Read it."]),
    ("Meet me on Jan. 5 at noon. Deal?", ["Meet me on Jan. 5 at noon.", "Deal?"]),
    ("It's approx. ten miles away. Not far.", ["It's approx. ten miles away.", "Not far."]),
    ("Order No. 5 shipped. Track it online.", ["Order No. 5 shipped.", "Track it online."]),
    ("Tom Jr. is here. So is Sr. Tom.", ["Tom Jr. is here.", "So is Sr. Tom."]),
    ("Barcelona vs. Madrid is tonight. Watch it.", ["Barcelona vs. Madrid is tonight.", "Watch it."]),
    # numbers, prices, times
    ("Pi is about 3.14. That is close enough.", ["Pi is about 3.14.", "That is close enough."]),
    ("It costs $4.99. Want it?", ["It costs $4.99.", "Want it?"]),
    ("The total is $1,234.56 today. Pay now.", ["The total is $1,234.56 today.", "Pay now."]),
    ("Your appointment is at 10:30. Don't be late.", ["Your appointment is at 10:30.", "Don't be late."]),
    ("Version 2.0.1 is out. Update soon.", ["Version 2.0.1 is out.", "Update soon."]),
    ("It grew 12.5% last year. Impressive.", ["It grew 12.5% last year.", "Impressive."]),
    ("Call 555.123.4567 now. We're open.", ["Call 555.123.4567 now.", "We're open."]),
    ("The score was 3-2. We won!", ["The score was 3-2.", "We won!"]),
    # ellipses
    ("Well... I think so. Yes.", ["Well...", "I think so.", "Yes."]),
    ("Hmm... let me check. Okay.", ["Hmm... let me check.", "Okay."]),
    ("Wait… what? Oh no.", ["Wait… what?", "Oh no."]),
    ("And then... nothing.", ["And then... nothing."]),
    # quotes and brackets
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("She asked, 'Why?' Nobody knew.", ["She asked, 'Why?'", "Nobody knew."]),
    ("(See the note above.) Then continue.", ["(See the note above.)", "Then continue."]),
    ("It is “great.” I agree.", ["It is “great.”", "I agree."]),
    ("The list [see below.] Next part.", ["The list [see below.]", "Next part."]),
    ('"Hello!" she said.', ['"Hello!" she said.']),
    # lists and line breaks
    ("Steps:\n1. Open the app.\n2. Tap settings.", ["Steps:", "1. Open the app.", "2. Tap settings."]),
    ("1. First item\n2. Second item", ["1. First item", "2. Second item"]),
    ("- milk\n- eggs\n- bread", ["- milk", "- eggs", "- bread"]),
    ("Title\n\nBody text here.", ["Title", "Body text here."]),
    ("Option A. Option B. Option C.", ["Option A. Option B. Option C."]),  # single letters read as initials
    # URLs and e-mail
    ("Visit example.com. Then sign up.", ["Visit example.com.", "Then sign up."]),
    ("Go to https://example.com/a.b?c=d.e for more. Thanks!", ["Go to https://example.com/a.b?c=d.e for more.",
                                                              "Thanks!"]),
    ("Email me at jane.doe@mail.example.org. I reply fast.", ["Email me at jane.doe@mail.example.org.",
                                                             "I reply fast."]),
    ("The file is report.final.pdf in the folder.", ["The file is report.final.pdf in the folder."]),
    # emoji and unicode
    ("Great job! 🎉 See you soon.", ["Great job!", "🎉 See you soon."]),
    ("I love it 😍. Do you?", ["I love it 😍.", "Do you?"]),
    ("Café au lait, s'il vous plaît. Merci!", ["Café au lait, s'il vous plaît.", "Merci!"]),
    ("¿Dónde está? Aquí.", ["¿Dónde está?", "Aquí."]),
    # mixed and conversational
    ("Sure! I can help with that. What's your account number?",
     ["Sure!", "I can help with that.", "What's your account number?"]),
    ("Okay, so your balance is $52.10, and your next bill is due on Oct. 3. Anything else?",
     ["Okay, so your balance is $52.10, and your next bill is due on Oct. 3.", "Anything else?"]),
    ("I'm sorry -- that didn't work. Let's try again.", ["I'm sorry -- that didn't work.", "Let's try again."]),
    ("Thanks for calling ACME. How can I help you today?", ["Thanks for calling ACME.", "How can I help you today?"]),
    ("The answer is no. the next one is yes.", ["The answer is no. the next one is yes."]),
    ("A.I. is everywhere now. Really.", ["A.I. is everywhere now.", "Really."]),
    ("He won in 2019. In 2020 he lost.", ["He won in 2019.", "In 2020 he lost."]),
    ("Ok.", ["Ok."]),
    ("", []),
    ("   ", []),
    # punctuation alone is not spoken: it goes before the next sentence, or is dropped at the end
    ("Hello. . . World", ["Hello.", ". . World"]),
    ("Okay. ... Sure.", ["Okay.", "... Sure."]),
    ("Hi! ?? Yes.", ["Hi!", "?? Yes."]),
    ("Thanks. ...", ["Thanks."]),
    ("...", []),
]

LONG_NO_PUNCT = ("so what we can do is move your appointment to next week and then we will call you back "
                 "when the technician is available and confirm the exact time with you by phone or by text "
                 "message whichever you prefer and if anything changes we will let you know right away")


@pytest.mark.parametrize("text,want", CASES, ids=[str(i) for i in range(len(CASES))])
def test_table(text, want):
    assert split_sentences(text) == want


@pytest.mark.parametrize("text,want", CASES, ids=[str(i) for i in range(len(CASES))])
def test_streamed_in_llm_pieces_gives_the_same_sentences(text, want):
    rng = random.Random(len(text))
    for _ in range(3):
        s, got, i = SentenceSplitter(), [], 0
        while i < len(text):
            n = rng.randint(1, 8)
            got += s.push(text[i : i + n])
            i += n
        got += s.flush()
        assert got == want


def test_table_has_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_text_without_punctuation_is_split_on_word_boundaries():
    parts = split_sentences(LONG_NO_PUNCT)
    assert len(parts) >= 2 and all(len(p) <= 240 for p in parts)
    assert " ".join(parts) == LONG_NO_PUNCT  # nothing lost, words intact
    clause = split_sentences("word " * 30 + "and then, more words follow " * 8)
    assert clause[0].endswith(",") and len(clause[0]) >= 120


def test_sentences_are_released_as_soon_as_they_are_known():
    s = SentenceSplitter()
    assert s.push("Hello there.") == []  # could still be "Hello there.com" or an abbreviation
    assert s.push(" H") == ["Hello there."]
    assert s.push("ow are you? I am") == ["How are you?"]
    assert s.flush() == ["I am"]


def test_whitespace_runs_inside_a_sentence_become_one_space():
    # ElevenLabs' SDK chunker doubles spaces after punctuation; LLMs write tabs and line breaks
    text = "Hello there,  how are\tyou?   I am  fine, thank you.\n\nBye."
    want = ["Hello there, how are you?", "I am fine, thank you.", "Bye."]
    assert split_sentences(text) == want
    sp = SentenceSplitter()
    got = [s for piece in ["Hello there,", "  how", " are\t", "you?  ", " I am  fine,", " thank you.\n\nBye."]
           for s in sp.push(piece)]
    assert got + sp.flush() == want


@pytest.mark.parametrize("buf, settled", [
    ("Sure, I can help with that.", "Sure, I can help with that."),  # an LLM's " Your" is still to come
    ("Sure, I can help with that.  ", "Sure, I can help with that."),
    ("Really?!", "Really?!"),
    ('He said "stop."', 'He said "stop."'),
    ("(see above).", "(see above)."),
    ("Well...", "Well..."),
    ("Well..", None),  # the third dot may be on its way
    ("Wait\u2026", "Wait\u2026"),
    ("It costs $3. ", "It costs $3."),  # a space after it: the number has ended
    ("It costs $3.", None),  # "$3.50" may follow
    ("Go to www.example.", None),  # ".com" may follow
    ("Write to jane@mail.", None),  # ".org" may follow
    ("See https://example.", None),
    ("Ask Dr.", None),  # an abbreviation: "Smith" may follow
    ("Ask Dr. ", None),
    ("J.", None),  # an initial
    ("U.S.", None),
    ("1.", None),  # a list marker
    ("No terminator yet", None),
    ("", None),
])
def test_a_pause_after_a_sentence_end_settles_it_unless_only_the_next_piece_can_tell(buf, settled):
    s = SentenceSplitter()
    assert s.push(buf) == []  # (push alone waits for the next piece)
    assert s.may_settle == (buf.strip() != "" and buf.rstrip()[-1] in ".!?\u2026\"')")
    assert s.settle() == ([settled] if settled else [])
    assert s.pending == ("" if settled else buf)


@pytest.mark.parametrize("text,want", CASES, ids=[str(i) for i in range(len(CASES))])
def test_a_pause_after_every_piece_only_splits_where_the_whole_text_does_or_before_a_lowercase_word(text, want):
    """The worst case of a stream that pauses: settle() after every piece. No character is lost or
    moved (punctuation alone at the very end aside), and every sentence boundary is the whole
    text's, or comes before a lowercase word (where only the next piece could have told: "Well...
    maybe"), or inside a run of punctuation ("Really?" then "!")."""
    def bounds(parts):  # where each sentence but the last ends, counted in characters without spaces
        out, n = set(), 0
        for p in parts[:-1]:
            n += len(p.replace(" ", ""))
            out.add(n)
        return out

    punct = ".!?\u2026\"')]}\u00bb\u201d\u2019"

    rng = random.Random(len(text) + 1)
    for _ in range(3):
        s, got, i = SentenceSplitter(), [], 0
        while i < len(text):
            n = rng.randint(1, 8)
            got += s.push(text[i : i + n])
            got += s.settle()
            i += n
        got += s.flush()
        joined = "".join(want).replace(" ", "")
        assert "".join(got).replace(" ", "") == joined
        assert all(joined[b].islower() or joined[b] in punct for b in bounds(got) - bounds(want)), (got, want)
