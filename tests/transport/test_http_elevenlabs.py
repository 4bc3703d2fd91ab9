"""ElevenLabs' REST text-to-speech on the HTTP port, driven by ElevenLabs' own Python SDK: the
plain and /stream routes (raw audio, mp3 by default), and the /with-timestamps routes (JSON with
base64 audio and the character alignment). Audio is checked against Engine.stream (and our MP3
encoder of it, itself checked against an independent decoder in test_mp3.py); alignment against
the engine's own record of the frames it made for each sentence."""

import base64
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from csmstream.transport.encoder import encoder_for
from csmstream.transport.mp3 import LAME_DELAY
from tests.transport.test_http_server import TEXT, base_of
from tests.transport.test_server import reference_pcm

SENTENCES = "First one here. The second is a little longer! And a third?"


def sdk(http):
    from elevenlabs.client import ElevenLabs

    return ElevenLabs(api_key="unused", base_url=base_of(http).rsplit("/v1", 1)[0])


def encoded(fmt: str, pcm: bytes) -> bytes:
    """What the server's encoder makes of the engine's audio (one request, chunks joined)."""
    enc = encoder_for(fmt, 100)
    return b"".join(enc.feed(np.frombuffer(pcm, "<i2")) + enc.finish())


def test_the_elevenlabs_sdk_streams_the_engines_audio_over_rest(http):
    """ElevenLabs' REST text-to-speech (`/v1/text-to-speech/{voice_id}/stream` and the plain
    `/v1/text-to-speech/{voice_id}`), driven by ElevenLabs' own SDK: same audio as the engine's,
    and its errors carry what is allowed."""
    from elevenlabs.client import ElevenLabs
    from elevenlabs.core.api_error import ApiError

    client = ElevenLabs(api_key="unused", base_url=base_of(http).rsplit("/v1", 1)[0])
    got = b"".join(client.text_to_speech.stream(voice_id="2", text=TEXT, model_id="csm-1b", seed=4,
                                                output_format="pcm_24000", voice_settings=None))
    assert got == reference_pcm(TEXT, 2, seed=4)
    ulaw = b"".join(client.text_to_speech.convert(voice_id="0", text=TEXT, seed=5, output_format="ulaw_8000"))
    assert ulaw == encoded("ulaw_8000", reference_pcm(TEXT, 0, seed=5))

    def refused(**kw):
        with pytest.raises(ApiError) as e:
            b"".join(client.text_to_speech.stream(**{"voice_id": "0", "text": TEXT, "output_format": "pcm_16000",
                                                      **kw}))
        return e.value.status_code, e.value.body["error"]

    status, err = refused(output_format="opus_48000_256")
    assert status == 400 and err["code"] == "unsupported_format" and "mp3_44100_128" in err["message"]
    status, err = refused(voice_id="21m00Tcm4TlvDq8ikWAM")
    assert status == 400 and err["code"] == "unknown_voice" and "ElevenLabs' voice names" in err["message"]
    status, err = refused(text=" ")
    assert status == 400 and err["code"] == "invalid_input"
    status, err = refused(seed=1.5)
    assert status == 400 and "seed" in err["message"]
    r = httpx.get(base_of(http) + "/text-to-speech/0/stream", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_elevenlabs_default_format_mp3_streams_the_engines_audio(http):
    """No output_format: ElevenLabs' default, mp3_44100_128, frame by frame as it is generated."""
    chunks = list(sdk(http).text_to_speech.stream(voice_id="1", text=TEXT, seed=6))
    pcm = reference_pcm(TEXT, 1, seed=6)
    mp3 = b"".join(chunks)
    assert mp3 == encoded("mp3_44100_128", pcm)
    audio, rate = sf.read(io.BytesIO(mp3), dtype="int16")  # an independent decoder
    assert rate == 44100 and len(audio) >= LAME_DELAY + len(pcm) // 2 * 44100 // 24000


def test_stream_with_timestamps_gives_each_chunk_and_the_sentences_it_completes(http):
    """pipecat's ElevenLabsHttpTTSService reads this route: one JSON object a line, each chunk's
    audio in base64 and the alignment of the sentences whose audio it completes, in seconds from
    the start of the reply's audio."""
    before = len(http.srv.recent)
    lines = list(sdk(http).text_to_speech.stream_with_timestamps(voice_id="3", text=SENTENCES, seed=2,
                                                                 output_format="pcm_16000"))
    reqs = list(http.srv.recent)[before:]
    assert [r.text for r in reqs] == ["First one here.", "The second is a little longer!", "And a third?"]
    ends = [0.08 * sum(r.frames for r in reqs[:i + 1]) for i in range(len(reqs))]
    audio, chars, starts, sent_s = b"", "", [], 0.0
    for line in lines:
        chunk = base64.b64decode(line.audio_base_64)
        audio += chunk
        sent_s += len(chunk) / 32000  # pcm_16000: 32,000 bytes a second
        a = line.alignment
        assert a == line.normalized_alignment
        if a is None:
            continue
        assert len(a.characters) == len(a.character_start_times_seconds) == len(a.character_end_times_seconds)
        assert a.character_end_times_seconds[-1] <= sent_s + 0.001  # never ahead of the audio
        for c, t in zip(a.characters, a.character_start_times_seconds, strict=True):
            if not chars or chars[-2:] in (". ", "! ", "? "):
                starts.append(t)
            chars += c
        assert round(a.character_end_times_seconds[-1], 3) in [round(e, 3) for e in ends]
    assert chars == "".join(r.text + " " for r in reqs)
    assert starts == pytest.approx([0.0] + ends[:-1], abs=0.001)
    assert 0 <= len(audio) - round(ends[-1] * 32000) < 200  # every frame's audio at 16 kHz (+ the filter's tail)


def test_with_timestamps_returns_one_object_with_all_the_audio_and_alignment(http):
    """The non-streamed route in mp3: the audio is our encoder's MP3 of the engine's audio, and the
    alignment starts after MP3's priming delay and ends where the speech ends."""
    got = sdk(http).text_to_speech.convert_with_timestamps(voice_id="0", text=TEXT, seed=8,
                                                           output_format="mp3_24000_48")
    pcm = reference_pcm(TEXT, 0, seed=8)
    assert base64.b64decode(got.audio_base_64) == encoded("mp3_24000_48", pcm)
    a = got.alignment
    assert "".join(a.characters) == TEXT + " " and got.normalized_alignment == a
    delay = LAME_DELAY / 24000
    assert a.character_start_times_seconds[0] == pytest.approx(delay, abs=0.001)
    assert a.character_end_times_seconds[-1] == pytest.approx(delay + len(pcm) / 2 / 24000, abs=0.001)
    assert a.character_start_times_seconds[1:] == a.character_end_times_seconds[:-1]


def test_with_timestamps_errors_are_json_before_any_audio(http):
    r = httpx.post(base_of(http) + "/text-to-speech/nobody/with-timestamps", json={"text": "Hi."}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_voice"
    r = httpx.post(base_of(http) + "/text-to-speech/0/stream/with-timestamps?output_format=opus_16000_64",
                   json={"text": "Hi."}, timeout=30)
    assert r.status_code == 400 and "mp3_22050_32" in r.json()["error"]["message"]
    r = httpx.post(base_of(http) + "/text-to-speech/0/with-timestamps?output_format=ulaw_8000",
                   json={"text": "Hi.", "seed": 1}, timeout=60)  # the server still serves
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert base64.b64decode(r.json()["audio_base64"]) == encoded("ulaw_8000", reference_pcm("Hi.", 0, seed=1))


def test_openai_mp3_is_24_khz_mp3_of_the_engines_audio(http):
    import openai

    client = openai.OpenAI(base_url=base_of(http), api_key="unused", max_retries=0)
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="0", input=TEXT, response_format="mp3", extra_body={"seed": 12}) as r:
        assert r.headers["content-type"] == "audio/mpeg" and r.headers["x-sample-rate"] == "24000"
        got = b"".join(r.iter_bytes())
    assert got == encoded("mp3_24000_48", reference_pcm(TEXT, 0, seed=12))


def test_openai_opus_is_ogg_opus_of_the_engines_audio(http):
    """OpenAI's `opus`: an Ogg Opus stream (audio/ogg) that decodes, independently of our encoder,
    to the engine's audio coded by our encoder; ElevenLabs' opus names on its REST route too."""
    import openai

    client = openai.OpenAI(base_url=base_of(http), api_key="unused", max_retries=0)
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="0", input=TEXT, response_format="opus", extra_body={"seed": 12}) as r:
        assert r.headers["content-type"] == "audio/ogg" and r.headers["x-audio-format"] == "opus_48000_32"
        got = b"".join(r.iter_bytes())
    pcm = reference_pcm(TEXT, 0, seed=12)
    decoded, rate = sf.read(io.BytesIO(got), dtype="int16")
    assert rate == 24000 and len(decoded) == len(pcm) // 2
    np.testing.assert_array_equal(decoded, sf.read(io.BytesIO(encoded("opus_48000_32", pcm)), dtype="int16")[0])
    el = b"".join(sdk(http).text_to_speech.stream(voice_id="0", text=TEXT, output_format="opus_48000_128", seed=12))
    assert len(sf.read(io.BytesIO(el))[0]) == len(pcm) // 2


def test_openai_flac_is_the_engines_audio_exactly_and_aac_plays(http):
    """OpenAI's `flac`: lossless, so FFmpeg's decoder gives back the engine's own samples; `aac`:
    ADTS that FFmpeg decodes to the engine's length plus the priming frame."""
    import openai

    from tests.transport.test_packets import adts_frames, ffmpeg_decode

    client = openai.OpenAI(base_url=base_of(http), api_key="unused", max_retries=0)
    pcm = np.frombuffer(reference_pcm(TEXT, 0, seed=12), "<i2")
    got = {}
    for fmt in ("flac", "aac"):
        with client.audio.speech.with_streaming_response.create(
                model="csm-1b", voice="0", input=TEXT, response_format=fmt, extra_body={"seed": 12}) as r:
            assert r.headers["content-type"] == f"audio/{fmt}" and r.headers["x-sample-rate"] == "24000"
            got[fmt] = b"".join(r.iter_bytes())
    np.testing.assert_array_equal(ffmpeg_decode(got["flac"], "flac"), pcm)
    frames = adts_frames(got["aac"])
    assert len(ffmpeg_decode(got["aac"], "aac")) == 1024 * frames >= len(pcm) + 1024


def test_previous_text_continues_in_the_same_voice_with_the_earlier_codes_as_context(http):
    """pipecat's HTTP service sends each sentence of a turn as its own request, with the turn so far
    as previous_text. The second request is generated with the first one's codes as context: its
    codes equal the engine's for the same prompt built by hand. Another client address, a different
    voice, or text this server never generated give no context."""
    import csmstream

    first, second = "The first sentence.", "And a second one."
    client = sdk(http)

    def say(text, voice="1", **kw):
        before = len(http.srv.recent)
        b"".join(client.text_to_speech.stream(voice_id=voice, text=text, output_format="pcm_16000", **kw))
        (req,) = list(http.srv.recent)[before:]
        return np.stack(req.codes)

    c1 = say(first, seed=3)
    c2 = say(second, seed=4, previous_text=first)
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    want = np.stack(list(eng.frames(second, 1, context=[csmstream.Segment(1, first, codes=c1)], seed=4)))
    np.testing.assert_array_equal(c2, want[:len(c2)])
    alone = np.stack(list(eng.frames(second, 1, seed=4)))
    assert not np.array_equal(alone[:len(c2)], c2)  # the context mattered
    # no context: text never generated here, another voice, another client address
    got = say(second, seed=4, previous_text="Something else.")
    np.testing.assert_array_equal(got, alone[:len(got)])
    got = say(second, voice="2", seed=4, previous_text=first)
    np.testing.assert_array_equal(got, np.stack(list(eng.frames(second, 2, seed=4)))[:len(got)])
    assert [t for t, _ in http.srv.spoken.context_for("127.0.0.1", (None, 1), first)] == [first]
    assert http.srv.spoken.context_for("10.9.8.7", (None, 1), first) == []  # kept per client address
    r = httpx.post(base_of(http) + "/text-to-speech/1", json={"text": "Hi.", "previous_text": 5}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_previous_text"


def test_previous_request_ids_stitch_requests_by_the_request_id_header(http):
    """ElevenLabs' request stitching, driven by its SDK: each response names its request in a
    `request-id` header; a request listing earlier ids in previous_request_ids is generated with
    their sentences' codes as context (the engine's frames for that prompt, built by hand), and
    then previous_text is ignored, as ElevenLabs documents. An id this client never got, or
    malformed ids, give no context or a 400 saying what is allowed."""
    from elevenlabs.core.api_error import ApiError

    import csmstream
    from csmstream.transport.metrics import parse

    first, second, third = "The first sentence.", "And a second one.", "Then a third."
    client = sdk(http)

    def say(text, **kw):
        before = len(http.srv.recent)
        with client.text_to_speech.with_raw_response.stream(voice_id="1", text=text, output_format="pcm_16000",
                                                            **kw) as r:
            rid = r.headers["request-id"]
            b"".join(r.data)
        (req,) = list(http.srv.recent)[before:]
        assert rid == r.headers["x-request-id"] == req.tag.rid
        return rid, np.stack(req.codes)

    def continuations():  # /metrics: requests naming earlier ones, by whether any was found
        m = parse(httpx.get(base_of(http).rsplit("/v1", 1)[0] + "/metrics", timeout=30).text)
        return m['csm_continuations_total{found="yes"}'], m['csm_continuations_total{found="no"}']

    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    before = continuations()
    r1, c1 = say(first, seed=3)
    r2, c2 = say(second, seed=4, previous_request_ids=[r1], previous_text="Something else entirely.")
    want = np.stack(list(eng.frames(second, 1, context=[csmstream.Segment(1, first, codes=c1)], seed=4)))
    np.testing.assert_array_equal(c2, want[:len(c2)])
    r3, c3 = say(third, seed=5, previous_request_ids=[r1, r2])  # both, oldest first; r2's own sentence only
    ctx = [csmstream.Segment(1, first, codes=c1), csmstream.Segment(1, second, codes=c2)]
    np.testing.assert_array_equal(c3, np.stack(list(eng.frames(third, 1, context=ctx, seed=5)))[:len(c3)])
    assert len({r1, r2, r3}) == 3
    _, alone = say(second, seed=4, previous_request_ids=["never-sent"])
    np.testing.assert_array_equal(alone, np.stack(list(eng.frames(second, 1, seed=4)))[:len(alone)])
    yes, no = continuations()
    assert (yes - before[0], no - before[1]) == (2, 1)  # r2 and r3 found theirs; "never-sent" did not
    for bad in (["a", "b", "c", "d"], "r1", [5], [""]):
        with pytest.raises(ApiError) as e:
            say(third, previous_request_ids=bad)
        assert e.value.status_code == 400 and e.value.body["error"]["code"] == "invalid_previous_request_ids"
        assert "at most 3 request ids" in e.value.body["error"]["message"]


def test_a_reply_is_remembered_before_its_body_ends(http, monkeypatch):
    """A client that has a whole reply may send its next request at once, on another connection: the
    reply's sentences are remembered by then, however late the server's coroutine resumes after
    writing the body's end (here half a second late)."""
    import asyncio

    from csmstream.transport import http_server

    real = http_server.SpeechStream._write

    async def late(self, data):
        await real(self, data)
        if data.endswith(http_server.hs.LAST_CHUNK):
            await asyncio.sleep(0.5)

    monkeypatch.setattr(http_server.SpeechStream, "_write", late)
    r = httpx.post(base_of(http) + "/text-to-speech/2/stream?output_format=pcm_16000",
                   json={"text": "Remembered at once.", "previous_text": ""}, timeout=60)
    assert r.status_code == 200
    found = http.srv.spoken.context_of_requests("127.0.0.1", (None, 2), [r.headers["request-id"]])
    assert [t for t, _ in found] == ["Remembered at once."]
