"""The sans-I/O Telnyx session and the pacer, message by message (PROTOCOLS.md §1)."""

import base64
import json

import numpy as np
import pytest

from csmstream.integrations.pacer import Pacer
from csmstream.integrations.telnyx_session import (BadMessage, CallerAudio, CallStarted, Connected, Dtmf,
                                                   MarkPlayed, Stopped, TelnyxError, TelnyxMediaSession)
from csmstream.kernels.g711 import alaw_encode, ulaw_encode
from csmstream.kernels.resample import Resampler

START = {"event": "start", "sequence_number": "1", "stream_id": "S1",
         "start": {"user_id": "u", "call_control_id": "v2:abc", "call_session_id": "cs", "from": "+1", "to": "+2",
                   "client_state": "xx", "custom_parameters": {"k": "v"},
                   "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}}


def started(codec="PCMU"):
    s = TelnyxMediaSession(codec)
    s.receive(json.dumps(START))
    return s


def test_every_telnyx_event_becomes_a_typed_event():
    s = TelnyxMediaSession()
    assert s.receive('{"event": "connected", "version": "1.0.0"}') == [Connected("1.0.0")]
    (ev,) = s.receive(json.dumps(START))
    assert isinstance(ev, CallStarted) and ev.call_control_id == "v2:abc" and ev.stream_id == "S1"
    assert (ev.encoding, ev.sample_rate, ev.channels, ev.custom_parameters) == ("PCMA", 8000, 1, {"k": "v"})
    pcm = (np.sin(np.arange(160) / 5) * 8000).astype(np.int16)
    payload = base64.b64encode(alaw_encode(pcm).tobytes()).decode()
    (audio,) = s.receive(json.dumps({"event": "media", "sequence_number": "4", "stream_id": "S1",
                                     "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": payload}}))
    assert isinstance(audio, CallerAudio) and (audio.chunk, audio.timestamp, audio.track) == (2, 5, "inbound")
    assert np.all(np.abs(audio.pcm.astype(int) - pcm) <= np.abs(pcm) * 0.07 + 16)  # A-law decoded
    assert s.receive('{"event": "dtmf", "stream_id": "S1", "dtmf": {"digit": "7"}}') == [Dtmf("7")]
    (err,) = s.receive('{"event": "error", "stream_id": "S1", "payload": {"code": 100003, "title": '
                       '"malformed_frame", "detail": "bad"}}')
    assert err == TelnyxError(100003, "malformed_frame", "bad")
    assert s.receive('{"event": "stop", "stream_id": "S1", "stop": {"call_control_id": "v2:abc"}}') == \
        [Stopped("v2:abc")]
    assert s.stopped


@pytest.mark.parametrize("raw,reason", [
    ("nope", "not JSON"), ("[1]", "not a JSON object"), ('{"event": "teleport"}', "unknown event"),
    ('{"no_event": 1}', "unknown event"), ('{"event": "mark"}', "malformed mark"),
    ('{"event": "start", "start": {}}', "malformed start"),
])
def test_malformed_messages_are_events_not_exceptions(raw, reason):
    (ev,) = TelnyxMediaSession().receive(raw)
    assert isinstance(ev, BadMessage) and reason in ev.reason


def test_media_before_start_and_bad_base64():
    s = TelnyxMediaSession()
    (ev,) = s.receive('{"event": "media", "media": {"payload": "/w=="}}')
    assert isinstance(ev, BadMessage) and "before start" in ev.reason
    s.receive(json.dumps(START))
    (ev,) = s.receive('{"event": "media", "media": {"payload": "***"}}')
    assert isinstance(ev, BadMessage) and "base64" in ev.reason


@pytest.mark.parametrize("codec,encode,silence", [("PCMU", ulaw_encode, 0xFF), ("PCMA", alaw_encode, 0xD5)])
def test_outgoing_media_is_exact_20ms_frames_with_silence_tail_and_mark(codec, encode, silence):
    s = started(codec)
    u = s.start_utterance()
    pcm = (np.random.default_rng(0).normal(size=24000 * 3 // 10 + 123) * 3000).astype(np.int16)
    msgs = []
    for i in range(0, len(pcm), 1000):
        msgs += s.audio(pcm[i : i + 1000])
    msgs += s.end_utterance()
    *media, mark = [json.loads(m) for m in msgs]
    assert mark == {"event": "mark", "mark": {"name": u.name}}
    payloads = [base64.b64decode(m["media"]["payload"]) for m in media]
    assert all(m["event"] == "media" and len(p) == 160 for m, p in zip(media, payloads))
    r = Resampler(24000, 8000)
    want = encode(np.concatenate([r.process(pcm), r.flush()])).tobytes()
    got = b"".join(payloads)
    assert got[: len(want)] == want and set(got[len(want):]) <= {silence} and len(got) % 160 == 0
    assert u.state == "sent" and u.frames == len(media)


def test_marks_tell_heard_from_cut_off():
    s = started()
    a = s.start_utterance("a")
    s.audio(np.zeros(4800, np.int16))
    s.end_utterance()
    assert s.receive('{"event": "mark", "mark": {"name": "a"}}') == [MarkPlayed("a", heard=True)]
    assert a.heard
    b = s.start_utterance("b")
    s.audio(np.zeros(4800, np.int16))
    s.end_utterance()
    assert json.loads(s.clear()) == {"event": "clear"}
    # Telnyx returns the queued mark after a clear: it does not mean the caller heard it
    assert s.receive('{"event": "mark", "mark": {"name": "b"}}') == [MarkPlayed("b", heard=False)]
    assert b.state == "cut_off" and a.state == "heard"


def test_nothing_goes_out_after_stop_and_overlapping_utterances_refused():
    s = started()
    s.start_utterance()
    with pytest.raises(RuntimeError, match="still being spoken"):
        s.start_utterance()
    s.receive('{"event": "stop", "stop": {}}')
    assert s.audio(np.ones(4800, np.int16)) == [] and s.end_utterance() == []
    with pytest.raises(ValueError, match="PCMU, PCMA"):
        TelnyxMediaSession("G729")


def test_pacer_head_start_then_at_most_twice_real_time():
    p = Pacer(head_ms=100, speed=2.0)
    for i in range(50):
        p.push(f"m{i}", 20.0)
    p.push("mark", 0.0)
    t0 = 1000.0
    assert len(p.pop_due(t0)) == 5  # 100 ms at once
    assert p.pop_due(t0 + 0.009) == []
    assert p.next_due(t0) == pytest.approx(t0 + 0.010)
    assert p.pop_due(t0 + 0.010) == ["m5"]  # then one 20 ms message per 10 ms
    assert len(p.pop_due(t0 + 0.100)) == 9
    assert len(p.pop_due(t0 + 0.200)) == 10  # 100 + 2 x 200 ms = 25 messages in all
    out = p.pop_due(t0 + 0.500)
    assert out[-1] == "mark" and len(out) == 26  # the rest; the mark follows the audio before it
    assert p.next_due(t0 + 0.5) is None


def test_pacer_clear_and_idle_restart():
    p = Pacer(head_ms=100, speed=2.0)
    for i in range(20):
        p.push(f"m{i}", 20.0)
    assert len(p.pop_due(0.0)) == 5
    assert p.clear() == 15 and len(p) == 0
    p.push("x", 20.0)
    assert p.pop_due(0.05) == ["x"]  # still within the head start
    for i in range(10):
        p.push(f"n{i}", 20.0)
    # long after playback ran dry: a fresh burst gets a fresh head start
    assert len(p.pop_due(10.0)) == 5
