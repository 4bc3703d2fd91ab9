"""The OpenAI-compatible speech endpoint's sans-I/O half: request heads, OpenAI bodies mapped onto
/ws/generate requests, and the response framing (checked with h11 and the stdlib wave reader as
independent parsers)."""

import base64
import io
import json
import wave

import h11
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from csmstream.transport import http_speech as hs, protocol


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


# -- request heads -------------------------------------------------------------------------------
def test_a_request_head_parses_with_case_insensitive_headers():
    req = hs.parse_head(head("POST /v1/audio/speech?x=1 HTTP/1.1", "Host: a", "content-TYPE: application/json",
                             "Content-Length: 42", "Authorization:  Bearer t  "))
    assert (req.method, req.path, req.query, req.version) == ("POST", "/v1/audio/speech", "x=1", "HTTP/1.1")
    assert req.content_length == 42
    assert req.headers.get("Content-Type") == "application/json" and "CONTENT-LENGTH" in req.headers
    assert req.headers.get("authorization") == "Bearer t"
    assert req.keep_alive


@pytest.mark.parametrize("version, connection, keep", [
    ("HTTP/1.1", None, True), ("HTTP/1.1", "close", False), ("HTTP/1.1", "Keep-Alive", True),
    ("HTTP/1.0", None, False), ("HTTP/1.0", "keep-alive", True)])
def test_keep_alive_follows_the_version_and_connection_header(version, connection, keep):
    lines = [f"GET /healthz {version}", "Host: a"] + ([f"Connection: {connection}"] if connection else [])
    assert hs.parse_head(head(*lines)).keep_alive is keep


@pytest.mark.parametrize("raw, status, code", [
    (head("POST /v1/audio/speech"), 400, "invalid_http"),
    (head("POST v1/audio/speech HTTP/1.1"), 400, "invalid_http"),
    (head("PO ST / HTTP/1.1"), 400, "invalid_http"),
    (head("POST / HTTP/2.0"), 505, "http_version"),
    (head("POST / HTTP/1.1", "no colon here"), 400, "invalid_http"),
    (head("POST / HTTP/1.1", "bad name: x"), 400, "invalid_http"),
    (head("POST / HTTP/1.1", "Transfer-Encoding: chunked"), 411, "length_required"),
    (head("POST / HTTP/1.1", "Content-Length: 5", "Content-Length: 6"), 400, "invalid_http"),
    (head("POST / HTTP/1.1", "Content-Length: -1"), 400, "invalid_http"),
    (head("POST / HTTP/1.1", f"Content-Length: {hs.MAX_BODY_BYTES + 1}"), 413, "body_too_large"),
    (head("GET / HTTP/1.1", *[f"X-{i}: {i}" for i in range(hs.MAX_HEADERS + 1)]), 431, "too_many_headers"),
])
def test_bad_request_heads_are_refused_with_a_status_and_reason(raw, status, code):
    with pytest.raises(hs.HttpError) as e:
        hs.parse_head(raw)
    assert (e.value.status, e.value.code) == (status, code) and e.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_http_error(raw):
    try:
        req = hs.parse_head(raw)
    except hs.HttpError as e:
        assert e.status in hs.REASONS and e.message
    else:
        assert req.path.startswith("/") and req.version in ("HTTP/1.0", "HTTP/1.1")


# -- OpenAI bodies ---------------------------------------------------------------------------------
def named(*names, **aliases):
    """A server's voices dict: each name's Voice (no real codes: parsing never reads them), and each
    alias=name as another key for it, as engine.voices.with_aliases makes it."""
    from csmstream.engine.voices import Voice, with_aliases

    return with_aliases({n: Voice(n, f"{n} speaking.", np.zeros((1, 32), np.int64)) for n in names}, aliases)


def speech(body, voices=("anna",), **kw):
    return hs.parse_speech(json.dumps(body).encode(), voices=named(*voices), **kw)


def test_a_minimal_openai_request_is_a_wav_of_speaker_0():
    s = speech({"model": "tts-1", "input": "Hello there."})
    assert s.wav and not s.sse
    g = s.gen
    assert (g.text, g.speaker_id, g.format, g.voice, g.final) == ("Hello there.", 0, "pcm_24000", None, True)
    assert (g.temperature, g.topk, g.seed, g.chunk_ms) == (0.9, 50, None, 100)  # /ws/generate's defaults


@pytest.mark.parametrize("body, want", [
    ({"response_format": "pcm"}, dict(format="pcm_24000", wav=False)),
    ({"response_format": "ulaw_8000"}, dict(format="ulaw_8000", wav=False)),
    ({"response_format": "pcm_16000", "stream_format": "sse"}, dict(format="pcm_16000", sse=True)),
    ({"voice": "anna"}, dict(voice="anna", speaker_id=0)),
    ({"voice": "anna", "speaker_id": 3}, dict(voice="anna", speaker_id=3)),
    ({"voice": "2"}, dict(voice=None, speaker_id=2)),
    ({"voice": 4}, dict(speaker_id=4)),
    ({"voice": "5", "speaker_id": 5}, dict(speaker_id=5)),
    ({"speed": 1.0, "instructions": "", "model": "anything"}, dict(format="pcm_24000")),
    ({"response_format": None, "stream_format": None, "speed": None, "instructions": None}, dict(wav=True, sse=False)),
    ({"seed": 7, "topk": 1, "temperature": 0.5, "max_audio_ms": 900, "chunk_ms": 40, "request_id": "r1"},
     dict(seed=7, topk=1, temperature=0.5, max_audio_ms=900, chunk_ms=40, request_id="r1")),
])
def test_openai_fields_and_csm_stream_extensions_map_onto_a_request(body, want):
    s = speech({"input": "Hi.", **body})
    for k, v in want.items():
        assert getattr(s if k in ("wav", "sse") else s.gen, k) == v, k


@pytest.mark.parametrize("body, code, says", [
    (b"{not json", "invalid_json", "not valid JSON"),
    (b"\xff\xfe", "invalid_json", "not valid JSON"),
    (b"[1, 2]", "invalid_message", "JSON object"),
    (b'{"model": "x"}', "invalid_input", '"input" must be a non-empty string'),
    (b'{"input": "   "}', "invalid_input", "non-empty"),
    (b'{"input": 5}', "invalid_input", "non-empty"),
    (b'{"input": "?!"}', "invalid_text", "nothing to speak"),  # (it was a 200 with no audio)
    (b'{"input": "Hi.", "model": 3}', "invalid_model", "ignored"),
    (b'{"input": "Hi.", "response_format": "wma"}', "invalid_format", "aac, flac"),
    (b'{"input": "Hi.", "response_format": "aiff"}', "invalid_format", "one of wav, pcm"),
    (b'{"input": "Hi.", "stream_format": "ws"}', "invalid_stream_format", '"audio" or "sse"'),
    (b'{"input": "Hi.", "stream_format": false}', "invalid_stream_format", '"audio" or "sse"'),
    (b'{"input": "Hi.", "response_format": ""}', "invalid_format", "one of wav, pcm"),
    (b'{"input": "Hi.", "response_format": []}', "invalid_format", "one of wav, pcm"),
    (b'{"input": "Hi.", "instructions": 0}', "unsupported_instructions", "no style prompt"),
    (b'{"input": "Hi.", "speed": 4.5}', "invalid_speed", "a number in 0.25..4"),
    (b'{"input": "Hi.", "speed": true}', "invalid_speed", "a number in 0.25..4"),
    (b'{"input": "Hi.", "instructions": "whisper"}', "unsupported_instructions", "named voice"),
    (b'{"input": "Hi.", "voice": "alloy"}', "unknown_voice", "anna"),
    (b'{"input": "Hi.", "voice": -1}', "unknown_voice", "speaker number"),
    (b'{"input": "Hi.", "voice": true}', "unknown_voice", "speaker number"),
    (b'{"input": "Hi.", "voice": "' + b"9" * 5000 + b'"}', "unknown_voice", "speaker number"),  # past int()'s digits
    (b'{"input": "Hi.", "voice": "2", "speaker_id": 3}', "invalid_speaker_id", "disagree"),
    (b'{"input": "Hi.", "topk": 0}', "invalid_topk", "1..2048"),
    (b'{"input": "Hi.", "temperature": -1}', "invalid_temperature", "> 0"),
    (b'{"input": "Hi.", "chunk_ms": 5}', "invalid_chunk_ms", "20..1000"),
    (b'{"input": "Hi.", "request_id": ""}', "invalid_request_id", "non-empty"),
    (b'{"input": "' + b"a" * 30 + b'"}', "text_too_long", "at most 20"),
    (b'{"input": "Hi.", "previous_text": ["Hello."]}', "invalid_previous_text", "must be a string"),
])
def test_bad_openai_bodies_say_what_is_wrong_and_what_is_allowed(body, code, says):
    with pytest.raises(hs.HttpError) as e:
        hs.parse_speech(body, voices=named("anna"), max_text_chars=20)
    assert (e.value.status, e.value.code) == (400, code)
    assert says in e.value.message


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
FIELDS = ["input", "model", "voice", "response_format", "stream_format", "speed", "instructions", "previous_text",
          *hs.PASSED_THROUGH]


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON | st.sampled_from(
    ["Hi.", "anna", "0", "pcm", "wav", "sse", "mp3", 1, 1.0]), max_size=8))
def test_any_json_object_is_a_request_or_a_400_that_says_why(body):
    try:
        s = hs.parse_speech(json.dumps(body).encode(), voices=named("anna"))
    except hs.HttpError as e:
        assert e.status == 400 and e.code and e.message
    else:
        assert isinstance(s.gen, protocol.Generate) and s.gen.text == body["input"] and s.gen.text.strip()
        assert s.gen.format in protocol.ALL_FORMATS and s.gen.speaker_id >= 0
        previous = body.get("previous_text")
        assert s.continues == isinstance(previous, str) and s.previous_text == previous


def test_the_unknown_voice_message_lists_no_voices_when_none_exist():
    with pytest.raises(hs.HttpError, match="none are configured"):
        speech({"input": "Hi.", "voice": "nova"}, voices=())


def test_an_alias_is_its_voice_and_a_body_without_a_voice_gets_the_default():
    """serve --voice-alias / --default-voice: an alias becomes the voice's own name (the one its
    requests are remembered by); no voice, or null, the default; a speaker number stays itself."""
    voices = named("anna", "ben", alloy="anna", nova="ben")

    def gen(**body):
        return hs.parse_speech(json.dumps({"input": "Hi.", **body}).encode(), voices=voices, default_voice="ben").gen

    got = [(g.voice, g.speaker_id) for g in (gen(voice="alloy"), gen(voice="nova"), gen(voice="anna"), gen(),
                                             gen(voice=None), gen(voice="1"), gen(voice=2))]
    assert got == [("anna", 0), ("ben", 0), ("anna", 0), ("ben", 0), ("ben", 0), (None, 1), (None, 2)]
    # with no default a body without a voice has none, as before
    assert hs.parse_speech(b'{"input": "Hi."}', voices=voices).gen.voice is None
    with pytest.raises(hs.HttpError, match="alloy, anna, ben, nova"):  # the aliases are listed with the voices
        hs.parse_speech(b'{"input": "Hi.", "voice": "shimmer"}', voices=voices)
    eleven_gen = hs.parse_elevenlabs("/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM/stream", "", b'{"text": "Hi."}',
                                     voices=named("anna", **{"21m00Tcm4TlvDq8ikWAM": "anna"})).gen
    assert (eleven_gen.voice, eleven_gen.speaker_id) == ("anna", 0)


# -- responses -----------------------------------------------------------------------------------
def client_events(data: bytes, method: str = "POST"):
    """What a real HTTP/1.1 client (h11) reads from these bytes."""
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method=method, target="/v1/audio/speech", headers=[("Host", "x"), ("Content-Length", "0")]))
    c.send(h11.EndOfMessage())
    c.receive_data(data)
    out = []
    while (ev := c.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        out.append(ev)
    return out


def test_a_streamed_response_is_valid_chunked_http():
    s = speech({"input": "Hi.", "response_format": "ulaw_8000", "request_id": "abc"})
    pieces = [b"\x01" * 160, b"\x02" * 7, bytes(range(256))]
    raw = hs.stream_head(s, "abc", keep_alive=True) + b"".join(hs.chunk(p) for p in pieces) + hs.LAST_CHUNK
    events = client_events(raw)
    resp = events[0]
    assert isinstance(resp, h11.Response) and resp.status_code == 200
    headers = {k.decode(): v.decode() for k, v in resp.headers}
    assert headers["content-type"] == "audio/basic" and headers["x-request-id"] == "abc"
    assert headers["x-audio-format"] == "ulaw_8000" and headers["x-sample-rate"] == "8000"
    assert b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data)) == b"".join(pieces)
    assert isinstance(events[-1], h11.EndOfMessage)


def test_an_error_response_is_openai_shaped_json():
    raw = hs.error_response(503, "busy", "the engine queue is full", extra={"Retry-After": "1"})
    resp, data, end = client_events(raw)
    assert resp.status_code == 503 and (b"retry-after", b"1") in resp.headers
    assert (b"connection", b"close") in resp.headers and isinstance(end, h11.EndOfMessage)
    assert json.loads(bytes(data.data)) == {"error": {"message": "the engine queue is full", "type": "server_error",
                                                      "param": None, "code": "busy"}}
    assert json.loads(hs.error_response(400, "x", "y").split(b"\r\n\r\n", 1)[1])["error"]["type"] == \
        "invalid_request_error"


def test_the_streaming_wav_header_reads_as_24k_16bit_mono():
    pcm = bytes(range(200)) * 4
    with wave.open(io.BytesIO(hs.wav_header() + pcm)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.readframes(10_000) == pcm  # open-ended size: read until the data ends


def test_sse_events_carry_base64_audio():
    ev = hs.sse_audio(b"\x00\x01\xff")
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n")
    assert json.loads(ev[6:]) == {"type": "speech.audio.delta", "audio": "AAH/"}


def test_every_ws_format_is_a_response_format():
    assert set(protocol.FORMATS) <= set(hs.RESPONSE_FORMATS)


# -- ElevenLabs' REST text-to-speech ---------------------------------------------------------------
def eleven(path="/v1/text-to-speech/0/stream", query="output_format=pcm_16000", voices=(), **body):
    return hs.parse_elevenlabs(path, query, json.dumps(body).encode(), voices=named(*voices))


def test_elevenlabs_rest_maps_onto_a_generate_request():
    s = eleven(text="Hi there.", model_id="eleven_flash_v2_5", seed=9, voice_settings={"stability": 0.5},
               previous_text="Earlier.", language_code="en")
    g = s.gen
    assert (g.text, g.speaker_id, g.format, g.seed, g.voice) == ("Hi there.", 0, "pcm_16000", 9, None)
    assert not s.wav and not s.sse
    g = eleven("/v1/text-to-speech/front%20desk", "output_format=ulaw_8000&optimize_streaming_latency=3",
               voices=["front desk"], text="Hello.").gen
    assert (g.voice, g.format, g.speaker_id) == ("front desk", "ulaw_8000", 0)
    assert eleven("/v1/text-to-speech/7", text="Hi.").gen.speaker_id == 7
    for tail, mode in (("", None), ("/stream", None), ("/with-timestamps", "json"),
                       ("/stream/with-timestamps", "lines")):
        assert eleven(f"/v1/text-to-speech/0{tail}", text="Hi.").timestamps == mode
    assert eleven("/v1/text-to-speech/0", "", text="Hi.").gen.format == "mp3_44100_128"  # ElevenLabs' default
    for path in ("/v1/text-to-speech/0/with-timestamps/stream", "/v1/text-to-speech/0/timestamps"):
        assert hs.ELEVENLABS_PATH.match(path) is None


def test_elevenlabs_request_stitching_ids_pass_through_and_its_responses_name_the_request():
    s = eleven(text="Hi.", previous_request_ids=["a", "b" * 128], next_request_ids=["c"], next_text="Later.")
    assert s.previous_request_ids == ["a", "b" * 128] and s.continues and s.elevenlabs
    assert eleven(text="Hi.").previous_request_ids is None
    assert b"\r\nrequest-id: r7\r\n" in hs.stream_head(s, "r7", keep_alive=True)
    assert b"request-id:" not in hs.stream_head(speech({"input": "Hi."}), "r7", keep_alive=True)  # OpenAI's: no
    for bad in (["a"] * 4, "a", [1], [""], ["b" * 129], {"a": 1}):
        with pytest.raises(hs.HttpError) as e:
            eleven(text="Hi.", previous_request_ids=bad)
        assert (e.value.status, e.value.code) == (400, "invalid_previous_request_ids")
        assert "at most 3 request ids" in e.value.message


def test_openai_mp3_and_elevenlabs_mp3_names_are_response_formats():
    assert hs.parse_speech(b'{"input": "Hi.", "response_format": "mp3"}', voices={}).gen.format == "mp3_24000_48"
    s = hs.parse_speech(b'{"input": "Hi.", "response_format": "mp3_44100_128"}', voices={})
    assert s.gen.format == "mp3_44100_128" and not s.wav
    assert b"Content-Type: audio/mpeg" in hs.stream_head(s, "r1", keep_alive=True)


def test_base64_stream_pieces_join_into_the_base64_of_the_whole():
    data = bytes(range(256)) * 3
    for cuts in ([1, 2, 3, 700], [5, 5, 5], [0, 767], [767]):
        b64, pieces, at = hs.Base64Stream(), [], 0
        for n in cuts:
            pieces.append(b64.feed(data[at:at + n]))
            at += n
        pieces.append(b64.feed(data[at:]))
        assert b"".join(pieces) + b64.finish() == base64.b64encode(data)
        assert all(len(p) % 4 == 0 for p in pieces)  # whole groups only until the end


@pytest.mark.parametrize("kw, code, words", [
    ({"query": "output_format=opus_48000_256", "text": "Hi."}, "unsupported_format", "opus_48000_192"),
    ({"query": "output_format=mp3_48000_320", "text": "Hi."}, "unsupported_format", "pcm_16000"),
    ({"path": "/v1/text-to-speech/Rachel", "text": "Hi."}, "unknown_voice", "ElevenLabs' voice names"),
    ({"path": "/v1/text-to-speech/%C2%B2", "text": "Hi."}, "unknown_voice", "speaker number"),
    ({"path": "/v1/text-to-speech/" + "9" * 5000, "text": "Hi."}, "unknown_voice", "speaker number"),
    ({"text": ""}, "invalid_input", '"text" must be a non-empty string'),
    ({"input": "OpenAI's field name"}, "invalid_input", '"text"'),
    ({"text": "Hi.", "seed": "7"}, "invalid_seed", "integer"),
    ({"text": "x" * 5001}, "text_too_long", "5000"),
])
def test_elevenlabs_rest_refuses_bad_requests_saying_what_is_allowed(kw, code, words):
    with pytest.raises(hs.HttpError) as e:
        eleven(**kw)
    assert (e.value.status, e.value.code) == (400, code) and words in e.value.message


def test_elevenlabs_rest_refuses_a_body_that_is_not_a_json_object():
    for body in (b"not json", b"[1, 2]", b"\xff"):
        with pytest.raises(hs.HttpError) as e:
            hs.parse_elevenlabs("/v1/text-to-speech/0", "output_format=pcm_24000", body, voices={})
        assert e.value.status == 400 and e.value.code in ("invalid_json", "invalid_message")
