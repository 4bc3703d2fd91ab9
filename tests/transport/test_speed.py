"""`speed` over every route: the audio sent is the engine's audio played at that speed by the
stretcher's whole-signal reference (kernels/stretch.stretch_ref), exactly, in every format's
chunks; max_audio_ms and the alignment count the audio as played; a bad speed is refused with
what is allowed, and the connection serves on. Speed 1 (the default) is the engine's audio as
it was: tests/transport/test_server.py and the others check that unchanged."""

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from csmstream.kernels.stretch import stretch_ref
from tests.servers import collect
from tests.transport.test_http_server import base_of
from tests.transport.test_server import audio_of, reference_pcm

TEXT = "Faster or slower, same voice."


def played(pcm: bytes, speed: float) -> bytes:
    return stretch_ref(np.frombuffer(pcm, "<i2"), speed).astype("<i2").tobytes()


def ws_events(url: str, *messages) -> list:
    async def go():
        async with connect(url) as ws:
            out = []
            for m in messages:
                await ws.send(json.dumps(m))
                out.append(await collect(ws))
            return out

    return asyncio.run(go())


@pytest.mark.parametrize("speed", [0.8, 1.5])
def test_ws_generate_plays_the_engines_audio_at_the_speed_asked(http, speed):
    (events,) = ws_events(http.url, {"text": TEXT, "seed": 3, "speed": speed})
    chunks = [b for k, b in events if k == "audio"]
    want = played(reference_pcm(TEXT, 0, seed=3), speed)
    assert b"".join(chunks) == want
    assert all(len(c) == 4800 for c in chunks[:-1])  # exact 100 ms chunks still
    assert events[-1][1]["audio_ms"] == pytest.approx(len(want) / 48, abs=0.1)


def test_max_audio_ms_counts_the_audio_as_played(http):
    """1,000 ms asked at speed 2: 2 s of the engine's audio, played in exactly 1 s."""
    (events,) = ws_events(http.url, {"text": "A sentence long enough to run past one second of audio, surely.",
                                       "seed": 1, "speed": 2, "max_audio_ms": 1000})
    assert events[-1][0] == "done" and events[-1][1]["audio_ms"] == pytest.approx(1000, abs=0.2)
    assert len(audio_of(events)) == 48_000  # 1 s at 24 kHz, 16-bit


def test_a_bad_speed_is_refused_and_the_connection_serves_on(http):
    bad, good = ws_events(http.url, {"text": TEXT, "speed": 0.1}, {"text": TEXT, "seed": 3, "speed": 1.5})
    err = bad[0][1]["error"]
    assert err["code"] == "invalid_speed" and "0.25..4" in err["message"] and "0.1" in err["message"]
    assert audio_of(good) == played(reference_pcm(TEXT, 0, seed=3), 1.5)


def test_openai_sdk_speed(http):
    """OpenAI's `speed` (0.25-4), sent by its own SDK: the engine's audio at that speed."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(api_key="unused", base_url=base_of(http))
    with client.audio.speech.with_streaming_response.create(model="csm-1b", voice="0", input=TEXT, speed=1.25,
                                                            response_format="pcm", extra_body={"seed": 5}) as r:
        got = r.read()
    assert got == played(reference_pcm(TEXT, 0, seed=5), 1.25)
    for bad in (5, 0.2, "1.5", True):
        with pytest.raises(BadRequestError) as e:
            client.audio.speech.create(model="csm-1b", voice="0", input=TEXT, speed=bad)
        assert e.value.body["code"] == "invalid_speed" and "0.25..4" in e.value.body["message"]


def test_elevenlabs_voice_settings_speed_over_rest_with_the_alignment_as_played(http):
    from elevenlabs import VoiceSettings
    from elevenlabs.client import ElevenLabs

    client = ElevenLabs(api_key="unused", base_url=base_of(http).rsplit("/v1", 1)[0])
    got = client.text_to_speech.convert_with_timestamps(voice_id="0", text=TEXT, seed=6, output_format="pcm_24000",
                                                        voice_settings=VoiceSettings(speed=0.8))
    audio = base64.b64decode(got.audio_base_64)
    assert audio == played(reference_pcm(TEXT, 0, seed=6), 0.8)
    a = got.alignment
    assert "".join(a.characters) == TEXT + " "
    assert a.character_end_times_seconds[-1] == pytest.approx(len(audio) / 48_000, abs=0.001)
    url = base_of(http) + "/text-to-speech/0"
    for body, code in (({"text": TEXT, "voice_settings": {"speed": 9}}, "invalid_speed"),
                       ({"text": TEXT, "voice_settings": [1.1]}, "invalid_voice_settings")):
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_elevenlabs_stream_input_takes_speed_from_the_opening_voice_settings(http):
    url = http.url.replace("/ws/generate", "/v1/text-to-speech/0/stream-input?seed=7")

    async def go(opening):
        async with connect(url) as ws:
            for m in [opening, {"text": TEXT + " "}, {"text": ""}]:
                await ws.send(json.dumps(m))
            audio, errors = b"", []
            async for m in ws:
                msg = json.loads(m)
                if msg.get("error"):
                    errors.append(msg)
                    return audio, errors
                if msg["isFinal"]:
                    return audio, errors
                audio += base64.b64decode(msg["audio"])

    audio, errors = asyncio.run(go({"text": " ", "voice_settings": {"stability": 0.5, "speed": 1.2}}))
    assert errors == [] and audio == played(reference_pcm(TEXT, 0, seed=7), 1.2)
    _, errors = asyncio.run(go({"text": " ", "voice_settings": {"speed": -1}}))
    assert errors[0]["error"] == "invalid_speed" and "0.25..4" in errors[0]["message"]


def test_elevenlabs_multi_stream_input_takes_each_contexts_speed_from_its_first_message(http):
    from tests.transport.test_elevenlabs import read_contexts

    url = http.url.replace("/ws/generate", "/v1/text-to-speech/0/multi-stream-input?seed=3")

    async def go():
        async with connect(url) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "bad", "voice_settings": {"speed": "x"}}))
            refused = json.loads(await ws.recv())
            await ws.send(json.dumps({"text": TEXT + " ", "context_id": "q", "voice_settings": {"speed": 1.6}}))
            await ws.send(json.dumps({"context_id": "q", "close_context": True}))
            got = await read_contexts(ws, 1)
            await ws.send(json.dumps({"text": TEXT + " ", "context_id": "n"}))  # no settings: speed 1
            await ws.send(json.dumps({"context_id": "n", "close_context": True}))
            return refused, got, await read_contexts(ws, 1)

    refused, (quick, _, other, _), (plain, _, other2, _) = asyncio.run(go())
    assert refused["error"] == "invalid_speed" and refused["contextId"] == "bad" and other == other2 == []
    want = reference_pcm(TEXT, 0, seed=3)
    assert quick["q"] == played(want, 1.6) and plain["n"] == want
