"""Every bad input gets a clear error and the same connection keeps producing audio."""

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.servers import collect

GOOD = json.dumps({"text": "Still working.", "max_audio_ms": 300})

CASES = [
    ("not json at all", "invalid_json"),
    ('{"text": "unterminated', "invalid_json"),
    ("[" * 100_000, "invalid_json"),  # json's RecursionError
    ('{"text": "hi", "seed": 1' + "0" * 5000 + "}", "invalid_json"),  # an int over Python's 4,300 digits
    ("[1, 2, 3]", "invalid_message"),
    ('"just a string"', "invalid_message"),
    ("{}", "missing_text"),
    ('{"speaker_id": 0}', "missing_text"),
    ('{"text": ""}', "invalid_text"),
    ('{"text": "   "}', "invalid_text"),
    ('{"text": 42}', "invalid_text"),
    ('{"text": null}', "invalid_text"),
    ('{"text": "caf\\u00e9 a\\ud800b"}', "invalid_text"),  # a lone surrogate: no UTF-8 form, no tokens
    ('{"text": "\\udfff\\ud83d"}', "invalid_text"),  # both halves, in the wrong order
    ('{"text": "..."}', "invalid_text"),  # nothing to speak: it was a done with no audio
    ('{"text": "\\ud83d\\udc4d!"}', "invalid_text"),  # an emoji alone
    (json.dumps({"text": "x" * 5001}), "text_too_long"),
    ('{"text": "hi", "speaker_id": -1}', "invalid_speaker_id"),
    ('{"text": "hi", "speaker_id": "0"}', "invalid_speaker_id"),
    ('{"text": "hi", "speaker_id": true}', "invalid_speaker_id"),
    ('{"text": "hi", "speaker_id": 1.5}', "invalid_speaker_id"),
    ('{"text": "hi", "format": "mp3_44100"}', "invalid_format"),
    ('{"text": "hi", "format": 8000}', "invalid_format"),
    ('{"text": "hi", "format": []}', "invalid_format"),  # (unhashable: it cannot be looked up in a dict)
    ('{"text": "hi", "format": {"rate": 8000}}', "invalid_format"),
    ('{"text": "hi", "output_format": "ulaw_8000"}', "invalid_format"),  # ElevenLabs' name: would come as pcm_24000
    ('{"text": "hi", "response_format": "pcm_16000"}', "invalid_format"),  # OpenAI's
    ('{"text": "hi", "chunk_ms": 10}', "invalid_chunk_ms"),
    ('{"text": "hi", "chunk_ms": 1001}', "invalid_chunk_ms"),
    ('{"text": "hi", "chunk_ms": "100"}', "invalid_chunk_ms"),
    ('{"text": "hi", "temperature": 0}', "invalid_temperature"),
    ('{"text": "hi", "topk": 0}', "invalid_topk"),
    ('{"text": "hi", "topk": 5000}', "invalid_topk"),
    ('{"text": "hi", "seed": "abc"}', "invalid_seed"),
    ('{"text": "hi", "max_audio_ms": 0}', "invalid_max_audio_ms"),
    ('{"text": "hi", "speed": 4.5}', "invalid_speed"),
    ('{"text": "hi", "speed": "fast"}', "invalid_speed"),
    ('{"text": "hi", "request_id": 7}', "invalid_request_id"),
    ('{"text": "hi", "request_id": "a\\nb"}', "invalid_request_id"),  # logged and echoed: no line breaks
    ('{"text": "hi", "voice": "nobody"}', "unknown_voice"),
    ('{"text": "hi", "final": "yes"}', "invalid_final"),
    ('{"text": "hi", "call_control_id": "v2:x"}', "unknown_call"),
    ('{"text": "hi", "call_control_id": 5}', "invalid_call_control_id"),
    ('{"cancel": true}', "nothing_to_cancel"),
    ('{"cancel": true, "request_id": "nope"}', "nothing_to_cancel"),
    ('{"cancel": 1}', "invalid_cancel"),
    (b"\x00\x01binary", "binary_not_allowed"),
]


@pytest.mark.parametrize("message,code", CASES, ids=[c for _, c in CASES])
def test_bad_message_gets_error_and_connection_keeps_serving(server, message, code):
    async def go():
        async with connect(server.url) as ws:
            await ws.send(message)
            err = json.loads(await asyncio.wait_for(ws.recv(), 30))
            await ws.send(GOOD)
            return err, await collect(ws)

    err, after = asyncio.run(go())
    assert err["error"]["code"] == code
    assert len(err["error"]["message"]) > 15  # says what was wrong and what is allowed
    assert after[-1][0] == "done" and any(k == "audio" for k, _ in after)


def test_error_messages_name_what_is_allowed(server):
    async def go():
        async with connect(server.url) as ws:
            out = []
            for m in ('{"text": "hi", "format": "mp3"}', '{"text": "hi", "chunk_ms": 5}', '{"text": 1}'):
                await ws.send(m)
                out.append(json.loads(await ws.recv())["error"]["message"])
            return out

    fmt, chunk, text = asyncio.run(go())
    assert "pcm_24000" in fmt and "ulaw_8000" in fmt
    assert "20..1000" in chunk
    assert "non-empty string" in text


def test_a_huge_name_is_quoted_short_in_its_error(server):
    async def go():
        async with connect(server.url) as ws:
            out = []
            for field in ("voice", "call_control_id"):
                await ws.send(json.dumps({"text": "hi", field: "v" * 100_000}))
                out.append(json.loads(await ws.recv())["error"])
            return out

    voice, call = asyncio.run(go())
    assert voice["code"] == "unknown_voice" and call["code"] == "unknown_call"
    for err in (voice, call):
        assert "'vvvv" in err["message"] and len(err["message"]) < 300  # the name is quoted, cut to 60


def test_unknown_fields_are_ignored_and_named_in_done(server):
    """Ignored, never fatal; but the done names them, each with the field it most resembles, so a
    typo (temprature) or another API's name (output_format) does not pass unseen. A request with no
    unknown field ends with the done it always had."""
    async def go():
        async with connect(server.url) as ws:
            out = []
            for extra in ({"stability": 0.5, "nested": {"a": 1}, "temprature": 0.5, "Speed": 1.2, "output_format":
                           "pcm_24000", "voice_id": "x"}, {}):
                await ws.send(json.dumps({"text": "Extra fields.", "speaker_id": 0, "max_audio_ms": 300, **extra}))
                out.append(await collect(ws))
            return out

    extra, plain = asyncio.run(go())
    for events in (extra, plain):
        assert events[-1][0] == "done" and any(k == "audio" for k, _ in events)
    assert extra[-1][1]["ignored_fields"] == {"stability": None, "nested": None, "temprature": "temperature",
                                              "Speed": "speed", "output_format": "format", "voice_id": "voice"}
    assert "ignored_fields" not in plain[-1][1]
    assert extra[-1][1]["audio_ms"] == plain[-1][1]["audio_ms"] == 300  # (temprature changed nothing)


def test_a_done_names_at_most_16_ignored_fields_printably(server):
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Many.", "max_audio_ms": 100, "bad\nname" + "x" * 100: 1,
                                      **{f"f{i}": i for i in range(40)}}))
            return await collect(ws)

    ignored = asyncio.run(go())[-1][1]["ignored_fields"]
    assert len(ignored) == 16 and list(ignored)[0] == "bad?name" + "x" * 52 and list(ignored)[1:3] == ["f0", "f1"]


def test_oversized_message_closes_with_1009(server):
    async def go():
        async with connect(server.url, max_size=None) as ws:
            await ws.send(json.dumps({"text": "x" * (1 << 20)}))
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), 30)
            return e.value.rcvd.code

    assert asyncio.run(go()) == 1009


def test_one_bad_client_does_not_disturb_another(server):
    async def bad():
        async with connect(server.url) as ws:
            for _ in range(20):
                await ws.send("garbage")
                await ws.recv()

    async def good():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"text": "Unbothered.", "max_audio_ms": 800}))
            return await collect(ws)

    async def go():
        return await asyncio.gather(bad(), good())

    _, events = asyncio.run(go())
    assert events[-1][0] == "done" and not events[-1][1]["cancelled"]
