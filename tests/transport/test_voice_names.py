"""serve --voice-alias and --default-voice: a client's own voice names (OpenAI's "alloy", an
ElevenLabs voice id) mean one of the server's voices, and a request that names none gets the
default, on every interface. The expectation is the Python API's: the engine's audio for the text
with that voice's turn (load_voices on the same WAVs) as context, for the same seed."""

import asyncio
import base64
import json
import urllib.request

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from tests.servers import RunningServer, collect
from tests.transport.test_reliability import same_audio
from tests.transport.test_text_stream import _write_voice

TEXT, SEED = "Nice to meet you.", 5
EL_ID = "21m00Tcm4TlvDq8ikWAM"  # an ElevenLabs voice id, as a client configured for ElevenLabs sends it
ALIASES = {"alloy": "ada", EL_ID: "ben"}


def _pcm(chunks) -> bytes:
    return np.concatenate(list(chunks)).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def voiced(tmp_path_factory):
    """A server with voices ada and ben, the aliases above and ada as the default; and the Python
    API's PCM of TEXT in each voice and in none."""
    import csmstream
    from csmstream import Segment
    from csmstream.engine.voices import load_voices

    d = tmp_path_factory.mktemp("voices")
    _write_voice(d, "ada", "Hello, my name is Ada.", rate=16000, channels=1)
    _write_voice(d, "ben", "I am Ben, and I speak slowly.", rate=22050, channels=1, seconds=1.6)
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    want = {name: _pcm(eng.stream(TEXT, 0, context=[Segment(0, v.text, codes=v.codes)], seed=SEED))
            for name, v in load_voices(d, eng).items()}
    want[None] = _pcm(eng.stream(TEXT, 0, seed=SEED))
    assert len(set(want.values())) == 3  # the three are told apart
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), voices_dir=str(d), http_port=0,
                       voice_aliases=ALIASES, default_voice="ada").start()
    yield rs, want
    rs.stop()


def _ws_generate(rs, bodies: list[dict]) -> list:
    async def go():
        out = []
        async with connect(rs.url) as ws:
            for body in bodies:
                await ws.send(json.dumps({"text": TEXT, "seed": SEED, **body}))
                events = await collect(ws)
                audio = b"".join(b for k, b in events if k == "audio")
                out.append(events[-1][1] if events[-1][0] == "error" else audio)
        return out

    return asyncio.run(go())


def test_ws_generate_hears_an_alias_as_its_voice_and_no_voice_as_the_default(voiced):
    rs, want = voiced
    ada, alloy, default, ben, unknown = _ws_generate(rs, [{"voice": "ada"}, {"voice": "alloy"}, {}, {"voice": EL_ID},
                                                          {"voice": "nova"}])
    assert ada == alloy == default == want["ada"] and ben == want["ben"]
    err = unknown["error"]
    assert err["code"] == "unknown_voice" and f"available: {EL_ID}, ada, alloy, ben" in err["message"]


def test_the_openai_and_elevenlabs_routes_hear_the_alias_and_the_default(voiced):
    rs, want = voiced

    def openai(**body):
        r = httpx.post(rs.srv.speech_url, json={"input": TEXT, "seed": SEED, "response_format": "pcm", **body},
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.content

    assert openai(voice="alloy") == openai() == want["ada"]
    assert openai(voice="0") == want[None]  # a speaker number is still no voice prompt
    base = rs.srv.speech_url.rsplit("/audio/speech", 1)[0]
    r = httpx.post(f"{base}/text-to-speech/{EL_ID}/stream?output_format=pcm_24000", json={"text": TEXT, "seed": SEED},
                   timeout=60)
    assert r.status_code == 200 and r.content == want["ben"]

    async def socket():
        url = rs.url.replace("/ws/generate", f"/v1/text-to-speech/{EL_ID}/stream-input?seed={SEED}")
        audio = b""
        async with connect(url) as ws:
            for m in [{"text": " "}, {"text": TEXT + " "}, {"text": ""}]:
                await ws.send(json.dumps(m))
            async for m in ws:
                msg = json.loads(m)
                if msg["isFinal"]:
                    return audio
                audio += base64.b64decode(msg["audio"])

    assert same_audio(asyncio.run(asyncio.wait_for(socket(), 60)), want["ben"])


def test_an_alias_shares_its_voices_previous_text_memory(voiced):
    """OpenAI's previous_text: a sentence spoken as "ada" is heard by the next request that says
    "alloy" (the alias is its voice's name everywhere, the memory's key included)."""
    rs, _ = voiced
    first, second = "The first sentence is here.", "And the second follows it."
    for voice, text, previous in (("ada", first, ""), ("alloy", second, first)):
        r = httpx.post(rs.srv.speech_url, json={"input": text, "voice": voice, "previous_text": previous,
                                                "seed": SEED, "response_format": "pcm"}, timeout=60)
        assert r.status_code == 200, r.text
    req = next(r for r in reversed(rs.srv.recent) if r.text == second)
    assert [s.text for s in req.context] == ["Hello, my name is Ada.", first]


def test_voices_lists_the_aliases_and_the_default(voiced):
    rs, _ = voiced
    base = rs.url.replace("ws://", "http://").replace("/ws/generate", "")
    listing = json.loads(urllib.request.urlopen(base + "/voices").read())
    got = {v["name"]: (v.get("alias_of"), v.get("default", False)) for v in listing["voices"]}
    assert got == {"ada": (None, True), "ben": (None, False), "alloy": ("ada", False), EL_ID: ("ben", False)}
    assert listing["default"] == "ada"


@pytest.mark.parametrize("kw,message", [
    (dict(default_voice="carl"), "default voice 'carl': no such voice (voices: ada)"),
    (dict(voice_aliases={"alloy": "carl"}), "voice alias 'alloy' -> 'carl': no such voice (voices: ada)"),
    (dict(voice_aliases={"ada": "ada"}), "'ada' is already a voice's own name"),
])
def test_a_bad_alias_or_default_stops_the_server_from_starting(kw, message):
    """Given as voices (no directory) they are refused when the server is made; from a directory,
    when it is loaded (the CLI checks the WAV names even before that)."""
    from csmstream.engine.voices import Voice
    from csmstream.transport.server import StreamServer

    ada = Voice("ada", "Hello.", np.zeros((3, 32), np.int64))
    with pytest.raises(ValueError) as e:
        StreamServer(object(), voices={"ada": ada}, **kw)
    assert message in str(e.value)


def test_the_sdks_list_the_model_and_the_voices_and_every_listed_voice_speaks(voiced):
    """OpenAI's client lists the model and ElevenLabs' the voices, as their users would; the
    invariant: each voice id listed is one the ElevenLabs route takes, speaking the voice the
    listing says (a named voice, an alias as its voice, speaker 0 as no prompt)."""
    import openai
    from elevenlabs.client import ElevenLabs

    rs, want = voiced
    base = rs.srv.speech_url.rsplit("/v1/audio/speech", 1)[0]
    oa = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    assert [(m.id, m.owned_by) for m in oa.models.list()] == [("tiny", "csm-stream")]
    assert oa.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("tts-1")
    el = ElevenLabs(api_key="unused", base_url=base)
    voices = el.voices.get_all().voices
    ids = [v.voice_id for v in voices]
    assert sorted(ids) == sorted(["ada", "ben", *ALIASES, "0"]) and ids[-1] == "0"
    assert el.voices.get(EL_ID).labels == {"source": "voice prompt", "alias_of": "ben"}
    expect = {"ada": want["ada"], "ben": want["ben"], "alloy": want["ada"], EL_ID: want["ben"], "0": want[None]}
    for v in voices:
        r = httpx.post(f"{base}/v1/text-to-speech/{v.voice_id}/stream?output_format=pcm_24000",
                       json={"text": TEXT, "seed": SEED}, timeout=60)
        assert r.status_code == 200 and r.content == expect[v.voice_id], v.voice_id
