"""Property-based fuzzing of the message protocol and the Telnyx session: whatever arrives, no
exception escapes except the documented ProtocolError, and every reply is valid."""

import base64
import json

import numpy as np
from hypothesis import given, settings, strategies as st

from csmstream.integrations import telnyx_session as ts
from csmstream.transport import context as ctx, protocol

# text around the UTF-16 surrogates (which st.text leaves out): JSON's \uD800-\uDFFF escapes decode to
# lone surrogates unless a high one is followed by a low one
near_surrogates = st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010) | st.characters(max_codepoint=0x7F),
                          max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30)
    | near_surrogates,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12)
KEYS = ["text", "speaker_id", "request_id", "format", "chunk_ms", "temperature", "topk", "seed", "max_audio_ms",
        "voice", "final", "cancel", "flush", "call_control_id", "inactivity_timeout", "continue_previous", "context"]
messages = st.one_of(
    st.text(max_size=200),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6).map(lambda d: json.dumps(d, allow_nan=True)),
    st.binary(max_size=50),
)
# a valid request with one to three of its fields replaced by any JSON value: each field's check is
# reached (in messages above, an earlier bad field usually refuses the message first)
VALID = {"text": "Hello there.", "speaker_id": 1, "format": "ulaw_8000", "chunk_ms": 40, "temperature": 0.7,
         "topk": 20, "seed": 3, "max_audio_ms": 500, "request_id": "r1", "final": True}
near_valid = st.dictionaries(st.sampled_from(KEYS[1:]), json_values, min_size=1, max_size=3).map(
    lambda d: json.dumps({**VALID, **d}, allow_nan=True))
RESULTS = (protocol.Generate, protocol.Cancel, protocol.Append, protocol.Flush)


@settings(max_examples=600, deadline=None)
@given(messages | near_valid, st.booleans())
def test_protocol_parse_returns_a_message_or_a_protocol_error(raw, streaming):
    try:
        msg = protocol.parse(raw, streaming=streaming)
    except protocol.ProtocolError as e:
        reply = json.loads(protocol.error(e.code, e.message, e.request_id))
        assert reply["error"]["code"] and reply["error"]["message"]
        return
    assert isinstance(msg, RESULTS)
    if isinstance(msg, (protocol.Generate, protocol.Append)):
        msg.text.encode("utf-8")  # what is accepted can be tokenized (a lone surrogate has no UTF-8)
    if isinstance(msg, protocol.Generate):
        assert isinstance(msg.text, str) and msg.format in protocol.FORMATS
        assert 20 <= msg.chunk_ms <= 1000 and msg.speaker_id >= 0 and msg.topk >= 1 and msg.temperature > 0



@settings(max_examples=300, deadline=None)
@given(near_surrogates.filter(str.strip), st.booleans())
def test_text_is_refused_exactly_when_it_holds_a_lone_surrogate_or_nothing_to_speak(text, streaming):
    raw = json.dumps({"text": text})  # lone surrogates go out as \udXXX escapes; a high-low pair reads back as one
    decoded = json.loads(raw)["text"]
    lone = any(0xD800 <= ord(c) <= 0xDFFF for c in decoded)
    mute = not streaming and not any(c.isalnum() for c in decoded)  # a whole request of punctuation, symbols
    try:
        msg = protocol.parse(raw, streaming=streaming)
    except protocol.ProtocolError as e:
        assert e.code == "invalid_text"
        assert ("surrogate" in e.message) if lone else (mute and "nothing to speak" in e.message)
        return
    assert not lone and not mute and msg.text == decoded
    msg.text.encode("utf-8")


# a request's context turns: each field valid or not, the audio any bytes in base64 (or not base64)
_turn_audio = st.binary(max_size=2000).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=20)
_wild_turn = st.fixed_dictionaries({}, optional={
    "speaker_id": st.integers(-1, 3) | json_values, "text": st.sampled_from(["Hi there.", "", " "]) | json_values,
    "audio": _turn_audio | json_values, "audio_format": st.sampled_from([*ctx.AUDIO_FORMATS, "mp3", ""]) | json_values,
})
# ...and turns that are valid but for their audio's length (8 kHz: 80 ms is 640 bytes of G.711, 1,280 of PCM)
_fair_turn = st.builds(lambda sid, fmt, audio: {"speaker_id": sid, "text": "Hi there.", "audio_format": fmt,
                                                "audio": base64.b64encode(audio).decode()},
                       st.integers(0, 3), st.sampled_from(["ulaw_8000", "alaw_8000", "pcm_8000"]),
                       st.binary(min_size=600, max_size=1400))
_turns = st.lists(_fair_turn | _wild_turn, max_size=10)


@settings(max_examples=400, deadline=None)
@given(_turns | json_values)
def test_context_turns_parse_to_decoded_audio_or_an_invalid_context_error(turns):
    raw = json.dumps({"text": "Hello there.", "context": turns}, allow_nan=True)
    try:
        msg = protocol.parse(raw)
    except protocol.ProtocolError as e:
        assert (e.code == "invalid_context" and e.message.startswith("context")) or turns is None, e.code
        return
    got = msg.context
    assert (got is None) == (turns is None)
    if got is None:
        return
    assert 1 <= len(got) == len(turns) <= ctx.MAX_TURNS and sum(t.seconds for t in got) <= ctx.MAX_SECONDS
    for t, sent in zip(got, turns, strict=True):
        assert t.pcm.dtype == np.int16 and t.seconds >= ctx.MIN_SECONDS and t.text.strip() and t.speaker_id >= 0
        fmt = sent.get("audio_format", ctx.DEFAULT_AUDIO_FORMAT)
        raw_audio = base64.b64decode(sent["audio"])
        assert t.rate == ctx.AUDIO_FORMATS[fmt] and len(t.pcm) == len(raw_audio) // (2 if fmt.startswith("pcm") else 1)
        if fmt.startswith("pcm"):
            assert t.pcm.tobytes() == raw_audio  # little-endian 16-bit, as sent


EVENTS = ["connected", "start", "media", "mark", "dtmf", "stop", "error", "clear", "bogus"]
telnyx_messages = st.one_of(
    st.text(max_size=120),
    st.binary(max_size=40),
    st.builds(lambda e, body: json.dumps({"event": e, **body}, allow_nan=True), st.sampled_from(EVENTS),
              st.dictionaries(st.sampled_from(["start", "media", "mark", "dtmf", "stop", "payload", "stream_id"]),
                              json_values, max_size=3)),
    # the fields Telnyx's events carry, each any JSON value (1e999 reads back as inf, NaN as nan)
    st.builds(lambda fmt, sid: json.dumps({"event": "start", "stream_id": sid, "start": {
        "call_control_id": "c2", "media_format": fmt}}, allow_nan=True),
        st.dictionaries(st.sampled_from(["encoding", "sample_rate", "channels"]), json_values, max_size=3),
        json_values),
    st.builds(lambda media: json.dumps({"event": "media", "media": {"payload": "AAAA", **media}}, allow_nan=True),
              st.dictionaries(st.sampled_from(["chunk", "timestamp", "track", "payload"]), json_values, max_size=3)),
)
KNOWN = (ts.Connected, ts.CallStarted, ts.CallerAudio, ts.Dtmf, ts.MarkPlayed, ts.Stopped, ts.TelnyxError,
         ts.BadMessage)


@settings(max_examples=400, deadline=None)
@given(st.lists(telnyx_messages, max_size=8))
def test_telnyx_session_never_raises_and_returns_known_events(stream):
    s = ts.TelnyxMediaSession()
    s.receive(json.dumps({"event": "start", "start": {"call_control_id": "c"}}))
    for raw in stream:
        events = s.receive(raw)
        assert isinstance(events, list) and all(isinstance(e, KNOWN) for e in events)
    # outgoing still well-formed afterwards (unless the fuzz stopped the call)
    if not s.stopped:
        s.current = None
        s.start_utterance()
        for m in s.audio(np.zeros(2400, np.int16)) + s.end_utterance():
            assert json.loads(m)["event"] in ("media", "mark")
