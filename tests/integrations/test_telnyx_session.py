"""The sans-I/O Telnyx session and the pacer, message by message (PROTOCOLS.md §1)."""

import base64
import json

import numpy as np
import pytest

from csmstream.integrations.pacer import Pacer
from csmstream.integrations.telnyx_session import (
    BadMessage,
    CallerAudio,
    CallStarted,
    Connected,
    Dtmf,
    MarkPlayed,
    Stopped,
    TelnyxError,
    TelnyxMediaSession,
)
from csmstream.kernels.g711 import alaw_encode, ulaw_encode
from csmstream.kernels.resample import Resampler
from tests import ffmpeg

START = {"event": "start", "sequence_number": "1", "stream_id": "S1",
         "start": {"user_id": "u", "call_control_id": "v2:abc", "call_session_id": "cs", "from": "+1", "to": "+2",
                   "client_state": "xx", "custom_parameters": {"k": "v"},
                   "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}}


def started(codec="PCMU", rate=None, order="big", caller=None, media_ms=100):
    s = TelnyxMediaSession(codec, rate, order, media_ms)
    start = json.loads(json.dumps(START))
    if caller is not None:
        start["start"]["media_format"].update(encoding=caller[0], sample_rate=caller[1])
    s.receive(json.dumps(start))
    return s


def speak(s, pcm, piece=1000):
    msgs = []
    for i in range(0, len(pcm), piece):
        msgs += s.audio(pcm[i : i + piece])
    return msgs + s.end_utterance()


def payloads(msgs):
    return [base64.b64decode(json.loads(m)["media"]["payload"]) for m in msgs if json.loads(m)["event"] == "media"]


def noise(n, seed=0):
    return (np.random.default_rng(seed).normal(size=n) * 3000).astype(np.int16)


def resampled(pcm, rate):
    if rate == 24000:
        return pcm
    r = Resampler(24000, rate)
    return np.concatenate([r.process(pcm), r.flush()])


def media(payload: bytes, chunk: int) -> str:
    return json.dumps({"event": "media", "media": {"track": "inbound", "chunk": str(chunk),
                                                   "timestamp": str(20 * chunk),
                                                   "payload": base64.b64encode(payload).decode()}})


def test_every_telnyx_event_becomes_a_typed_event():
    s = TelnyxMediaSession()
    assert s.receive('{"event": "connected", "version": "1.0.0"}') == [Connected("1.0.0")]
    (ev,) = s.receive(json.dumps(START))
    assert isinstance(ev, CallStarted) and ev.call_control_id == "v2:abc" and ev.stream_id == "S1"
    assert (ev.encoding, ev.sample_rate, ev.channels, ev.custom_parameters) == ("PCMA", 8000, 1, {"k": "v"})
    pcm = (np.sin(np.arange(160) / 5) * 8000).astype(np.int16)
    payload = base64.b64encode(alaw_encode(pcm).tobytes()).decode()
    (audio,) = s.receive(json.dumps({"event": "media", "sequence_number": "4", "stream_id": "S1", "media": {
        "track": "inbound", "chunk": "2", "timestamp": "5", "payload": payload}}))
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
    ("[" * 100_000, "not JSON"),  # json's RecursionError
    ('{"event": "start", "start": {"call_control_id": "v2:x", "media_format": {"sample_rate": 1e999}}}',
     "malformed start"),  # int(inf) raises OverflowError
    ('{"event": "media", "sequence_number": 1' + "0" * 5000 + "}", "not JSON"),  # over Python's 4,300 digits
    ('{"event": "' + "x" * 100_000 + '"}', "unknown event 'xxx"),
])
def test_malformed_messages_are_events_not_exceptions(raw, reason):
    (ev,) = TelnyxMediaSession().receive(raw)
    assert isinstance(ev, BadMessage) and reason in ev.reason
    assert len(ev.reason) < 200 and len(ev.raw) <= 200  # logged at WARNING: a flood is not copied into the log


def test_media_before_start_and_bad_base64():
    s = TelnyxMediaSession()
    (ev,) = s.receive('{"event": "media", "media": {"payload": "/w=="}}')
    assert isinstance(ev, BadMessage) and "before start" in ev.reason
    s.receive(json.dumps(START))
    (ev,) = s.receive('{"event": "media", "media": {"payload": "***"}}')
    assert isinstance(ev, BadMessage) and "base64" in ev.reason


def check_message_sizes(msgs, frame: int, media_ms: int) -> list[bytes]:
    """Each media message: whole 20 ms frames, at most media_ms of them, `.ms` saying how much."""
    out = []
    for m in msgs:
        msg = json.loads(m)
        if msg["event"] == "media":
            p = base64.b64decode(msg["media"]["payload"])
            assert len(p) % frame == 0 and 0 < len(p) <= frame * media_ms // 20
            assert m.ms == 20 * len(p) // frame
            out.append(p)
    return out


@pytest.mark.parametrize("media_ms", [20, 100])
@pytest.mark.parametrize("codec,encode,silence", [("PCMU", ulaw_encode, 0xFF), ("PCMA", alaw_encode, 0xD5)])
def test_outgoing_media_is_exact_20ms_frames_with_silence_tail_and_mark(codec, encode, silence, media_ms):
    s = started(codec, media_ms=media_ms)
    u = s.start_utterance()
    pcm = (np.random.default_rng(0).normal(size=24000 * 3 // 10 + 123) * 3000).astype(np.int16)
    msgs = []
    for i in range(0, len(pcm), 1000):
        msgs += s.audio(pcm[i : i + 1000])
    msgs += s.end_utterance()
    *media, mark = [json.loads(m) for m in msgs]
    assert mark == {"event": "mark", "mark": {"name": u.name}}
    payloads = check_message_sizes(msgs, 160, media_ms)
    assert len(payloads) == len(media) and all(m["event"] == "media" for m in media)
    if media_ms == 20:
        assert all(len(p) == 160 for p in payloads)
    else:  # 1000-sample pieces (41.7 ms): all the whole frames of each piece in one message
        assert max(len(p) for p in payloads) > 160
    r = Resampler(24000, 8000)
    want = encode(np.concatenate([r.process(pcm), r.flush()])).tobytes()
    got = b"".join(payloads)
    assert got[: len(want)] == want and set(got[len(want):]) <= {silence} and len(got) % 160 == 0
    assert u.state == "sent" and u.frames == len(got) // 160


@pytest.mark.parametrize("media_ms", [0, 10, 30, 1020, 100.0, "100"])
def test_a_media_size_that_is_not_whole_frames_is_refused(media_ms):
    with pytest.raises(ValueError, match="media_ms must be a multiple of 20 from 20 to 1000"):
        TelnyxMediaSession(media_ms=media_ms)


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


def test_pacer_knows_when_the_callers_playback_ends():
    """Hand-checked: 1 s of audio queued at t=1000; the head start (100 ms) and 2x pacing release
    it all by 1000.45 (popped every 10 ms, as the writer does), and its playback, started at 1000,
    ends at 1001: a fixed moment once all is sent."""
    p = Pacer(head_ms=100, speed=2.0)
    assert p.playback_end(5.0) == 5.0  # nothing sent or queued
    for i in range(50):
        p.push(f"m{i}", 20.0)
    assert p.playback_end(1000.0) == pytest.approx(1001.0)  # all queued: now + 1 s
    p.pop_due(1000.0)
    assert p.playback_end(1000.0) == pytest.approx(1001.0)  # 100 ms sent, 900 queued
    for k in range(1, 46):
        p.pop_due(1000.0 + k / 100)
    assert len(p) == 0 and p.playback_end(1000.45) == pytest.approx(1001.0)  # all sent, still playing
    assert p.playback_end(1003.0) == pytest.approx(1001.0)  # played out: still when it ended
    p.push("late", 20.0)  # queued before that ends: the end of what was sent, plus what is queued
    assert p.playback_end(1000.9) == pytest.approx(1001.0 + 0.02)
    assert p.playback_end(1005.0) == pytest.approx(1005.0 + 0.02)  # (not sent yet: from now at the earliest)


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


@pytest.mark.parametrize("codec,rate,order,frame", [
    ("G722", None, "big", 160), ("L16", None, "big", 640), ("L16", 24000, "big", 960), ("L16", 8000, "little", 320),
    ("L16", 48000, "big", 1920), ("L16", 22050, "big", 882),
])
def test_g722_and_l16_streams_are_whole_20ms_frames_of_the_resampled_audio(codec, rate, order, frame):
    s = started(codec, rate, order)
    assert s.frame_bytes == frame
    u = s.start_utterance()
    pcm = noise(24000 * 3 // 10 + 123)
    msgs = speak(s, pcm, piece=4800)  # 200 ms pieces: two 100 ms messages each
    assert json.loads(msgs[-1]) == {"event": "mark", "mark": {"name": u.name}}
    got = check_message_sizes(msgs, frame, 100)
    assert len(got) == len(msgs) - 1 and sum(len(p) == 5 * frame for p in got) >= 2
    got = b"".join(got)
    assert u.frames == len(got) // frame
    want_pcm = resampled(pcm, s.sample_rate)
    if codec == "G722":  # FFmpeg's encoder on the resampled audio, then silence to the frame's end
        pad = np.zeros(2 * len(got) - len(want_pcm), np.int16)
        assert 0 <= len(pad) < 320
        assert got == ffmpeg.g722_encode(np.concatenate([want_pcm, pad])).tobytes()
    else:
        want = want_pcm.astype(">i2" if order == "big" else "<i2").tobytes()
        assert got[: len(want)] == want and set(got[len(want):]) <= {0} and len(got) - len(want) < frame


def test_g722_stream_runs_on_across_utterances_as_the_far_ends_decoder_does():
    """Two utterances make one continuous G.722 stream: the bytes are FFmpeg's encoding of
    everything sent, silence padding included, in one go."""
    s = started("G722")
    sent_pcm, sent = [], b""
    for i, n in enumerate([7001, 9600]):
        s.start_utterance(f"u{i}")
        pcm = noise(n, seed=i)
        got = b"".join(payloads(speak(s, pcm)))
        res = resampled(pcm, 16000)
        sent_pcm += [res, np.zeros(2 * len(got) - len(res), np.int16)]
        sent += got
    assert sent == ffmpeg.g722_encode(np.concatenate(sent_pcm)).tobytes()


@pytest.mark.parametrize("declared_rate", [8000, 16000])  # G.722's RTP clock says 8000 for 16 kHz audio
def test_caller_g722_is_decoded_at_16khz_across_messages(declared_rate):
    s = started(caller=("G722", declared_rate))
    t = np.arange(8000) / 16000
    x = (8000 * np.sin(2 * np.pi * 700 * t) + 2000 * np.sin(2 * np.pi * 5500 * t)).astype(np.int16)
    codes = ffmpeg.g722_encode(x).tobytes()
    events = []
    for i in range(0, len(codes), 160):
        events += s.receive(media(codes[i : i + 160], i // 160 + 1))
    assert all(isinstance(e, CallerAudio) and e.sample_rate == 16000 for e in events)
    np.testing.assert_array_equal(np.concatenate([e.pcm for e in events]), ffmpeg.g722_decode(codes))


@pytest.mark.parametrize("order", ["big", "little"])
def test_caller_l16_in_the_streams_byte_order_and_odd_payloads(order):
    s = started("L16", 16000, order, caller=("L16", 16000))
    x = noise(320, seed=9)
    (ev,) = s.receive(media(x.astype(">i2" if order == "big" else "<i2").tobytes(), 1))
    assert ev.sample_rate == 16000
    np.testing.assert_array_equal(ev.pcm, x)
    (bad,) = s.receive(media(b"\x01\x02\x03", 2))
    assert isinstance(bad, BadMessage) and "whole 16-bit samples" in bad.reason and "3 bytes" in bad.reason
    (ev,) = s.receive(media(bytes(640), 3))  # and the call goes on
    assert isinstance(ev, CallerAudio) and not ev.pcm.any()


def test_caller_codec_that_is_not_decoded_is_reported_at_start_and_its_audio_skipped():
    s = TelnyxMediaSession()
    start = json.loads(json.dumps(START))
    start["start"]["media_format"].update(encoding="OPUS", sample_rate=48000)
    ev, bad = s.receive(json.dumps(start))
    assert isinstance(ev, CallStarted) and isinstance(bad, BadMessage)
    assert "OPUS" in bad.reason and "PCMU, PCMA, G722, L16" in bad.reason
    assert s.receive(media(b"\x00" * 80, 1)) == []


@pytest.mark.parametrize("codec,rate,order,match", [
    ("G722", 8000, "big", "G722 runs at 16000 Hz, got sampling rate 8000"),
    ("PCMU", 16000, "big", "PCMU runs at 8000 Hz"),
    ("L16", 44100, "big", "L16 runs at 8000 or 16000 or 22050 or 24000 or 48000 Hz"),
    ("L16", None, "middle", "l16_byteorder must be 'big' or 'little'"),
    ("pcmu", None, "big", "codec must be one of PCMU, PCMA, G722, L16"),
])
def test_codec_rate_and_byte_order_combinations_this_side_cannot_speak_are_refused(codec, rate, order, match):
    with pytest.raises(ValueError, match=match):
        TelnyxMediaSession(codec, rate, order)


def test_a_clear_drops_what_the_g722_encoder_and_the_frame_buffer_hold():
    s = started("G722")
    s.start_utterance("cut")
    assert s.audio(noise(401, seed=3)) == []  # 267 samples at 16 kHz, 133 bytes: not yet a frame
    s.clear()
    s.start_utterance("next")
    pcm = noise(4800, seed=4)
    got = b"".join(payloads(speak(s, pcm)))
    assert 0 <= 2 * len(got) - len(resampled(pcm, 16000)) < 320  # only the new utterance, padded


def after_a_clear(stale):
    """The G.722 bytes of an utterance spoken after one that was cleared; `stale(s, pcm)` is what
    becomes of a chunk whose encode was handed off before the clear."""
    s = started("G722")
    s.start_utterance("cut")
    s.audio(noise(4800, seed=5))
    epoch = s.epoch
    s.clear()
    stale(s, noise(1921, seed=6), epoch)
    s.start_utterance("next")
    return b"".join(payloads(speak(s, noise(4800, seed=7))))


def test_an_encode_handed_off_before_a_clear_does_nothing_and_is_never_sent():
    """The bridge encodes on a codec thread and frames on the loop: a chunk handed off before a
    clear (barge-in) neither moves the codec on (resampler history, G.722 state, an odd sample held
    back) nor reaches the next utterance. The bytes are those of a session that never saw it."""
    def nothing(s, pcm, epoch):
        pass

    def handed_off(s, pcm, epoch):
        assert s.encode(pcm, epoch) is None
        assert s.take(b"\xff" * 480, epoch) == []  # a result that came back late is dropped too

    def encoded_anyway(s, pcm, epoch):  # what the epochs prevent: the codec moved on by the stale chunk
        s._encoder.encode(s._resampler.process(pcm))

    want = after_a_clear(nothing)
    assert after_a_clear(handed_off) == want
    assert after_a_clear(encoded_anyway) != want  # (so the comparison can tell)


def test_encode_then_take_is_audio_and_every_codec_step_starts_a_new_epoch():
    pcm = noise(9600, seed=8)
    a, b = started("G722"), started("G722")
    a.start_utterance("u")
    b.start_utterance("u")
    want = a.audio(pcm[:5000]) + a.audio(pcm[5000:])
    got = []
    for piece in (pcm[:5000], pcm[5000:]):
        epoch = b.epoch
        got += b.take(b.encode(piece, epoch), epoch)
    assert got == want and [m.ms for m in got] == [m.ms for m in want]
    epochs = [b.epoch]
    b.end_utterance()
    epochs.append(b.epoch)
    b.start_utterance("v")
    epochs.append(b.epoch)
    b.clear()
    epochs.append(b.epoch)
    b.end()
    epochs.append(b.epoch)
    assert len(set(epochs)) == 5
    assert b.encode(pcm, epochs[0]) is None and b.encode(pcm, epochs[-1]) is not None  # (stopped: take drops it)
    assert b.take(b"\x00" * 160, epochs[-1]) == []


def test_a_clear_waits_for_an_encode_already_running_on_another_thread():
    """The codec's lock: a clear (on the loop) never resets the resampler or the G.722 encoder
    under an encode running on a codec thread; it waits for it, then the encode's result (of the
    old epoch) is dropped."""
    import threading

    s = started("G722")
    s.start_utterance("u")
    entered, release = threading.Event(), threading.Event()
    process = s._resampler.process

    def slow(x):
        entered.set()
        release.wait(10)
        return process(x)

    s._resampler.process = slow
    epoch = s.epoch
    result = {}
    enc = threading.Thread(target=lambda: result.setdefault("payload", s.encode(noise(1920), epoch)))
    enc.start()
    assert entered.wait(10)
    clearing = threading.Thread(target=s.clear)
    clearing.start()
    clearing.join(0.2)
    assert clearing.is_alive()  # held by the running encode
    release.set()
    enc.join(10)
    clearing.join(10)
    assert not clearing.is_alive() and len(result["payload"]) == 640  # 1280 samples at 16 kHz
    assert s.epoch != epoch and s.take(result["payload"], epoch) == []

