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

from tests.servers import RunningServer, collect, wait_until
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


def test_reload_voices_adds_changes_and_removes_without_a_restart_and_keeps_them_when_the_dir_is_bad(tmp_path):
    """reload_voices (SIGHUP): the directory read again. A voice added there speaks as the Python API
    with its turn, a changed one with its new turn, a removed one is unknown; their prompts' KV
    pins follow. A directory that will not do (a transcript missing, an alias's target gone) is
    refused and the voices in use are kept."""
    import csmstream
    from csmstream import Segment
    from csmstream.engine.voices import load_voices

    d = tmp_path / "voices"
    d.mkdir()
    _write_voice(d, "ada", "Hello, my name is Ada.", rate=16000, channels=1)
    ref = csmstream.load("tiny", device="cpu", max_streams=1)  # (the expectations' engine: the server has its own)
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    rs = RunningServer(eng, voices_dir=str(d), voice_aliases={"alloy": "ada"}).start()

    def reload() -> bool:
        return asyncio.run_coroutine_threadsafe(rs.srv.reload_voices(), rs.loop).result(120)

    def listed() -> list:
        base = rs.url.replace("ws://", "http://").replace("/ws/generate", "")
        return sorted(v["voice_id"] for v in json.loads(urllib.request.urlopen(base + "/v1/voices").read())["voices"])

    def want(name: str) -> bytes:
        v = load_voices(d, ref)[name]
        return _pcm(ref.stream(TEXT, 0, context=[Segment(0, v.text, codes=v.codes)], seed=SEED))

    try:
        assert listed() == ["0", "ada", "alloy"] and len(eng.prefixes._pinned) == 1
        _write_voice(d, "ben", "I am Ben, and I speak slowly.", rate=22050, channels=1, seconds=1.6)
        (d / "ada.txt").write_text("Hello, I am Ada, still.")  # changed: a new transcript
        assert reload() is True
        assert listed() == ["0", "ada", "alloy", "ben"] and len(eng.prefixes._pinned) == 2  # (old ada unpinned)
        ben, ada, alloy = _ws_generate(rs, [{"voice": "ben"}, {"voice": "ada"}, {"voice": "alloy"}])
        assert ben == want("ben") and ada == alloy == want("ada")
        (d / "ben.txt").unlink()  # a WAV without its transcript: the directory will not do
        assert reload() is False and listed() == ["0", "ada", "alloy", "ben"]
        (d / "ben.wav").unlink()
        (d / "ada.wav").rename(d / "eve.wav")  # alloy's target gone: refused too
        (d / "ada.txt").rename(d / "eve.txt")
        assert reload() is False and listed() == ["0", "ada", "alloy", "ben"]
        (d / "eve.wav").rename(d / "ada.wav")
        (d / "eve.txt").rename(d / "ada.txt")
        assert reload() is True and listed() == ["0", "ada", "alloy"] and len(eng.prefixes._pinned) == 1
        (gone,) = _ws_generate(rs, [{"voice": "ben"}])
        assert gone["error"]["code"] == "unknown_voice"
    finally:
        rs.stop()


def test_a_reply_under_way_keeps_its_voice_through_a_reload(tmp_path):
    """A text stream with voice ada: its first sentence is out, then ada's transcript changes and the
    voices are reloaded, then its second sentence comes. The whole reply is what it is with no reload
    (the voice is taken at the first sentence); the next request has the new ada."""
    import csmstream

    d = tmp_path / "voices"
    d.mkdir()
    _write_voice(d, "ada", "Hello, my name is Ada.", rate=16000, channels=1)
    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1), voices_dir=str(d)).start()

    async def reply(between=None) -> bytes:
        async with connect(rs.url) as ws:
            await ws.send(json.dumps({"text": "First sentence here.", "voice": "ada", "seed": SEED, "final": False}))
            audio = b""
            while not audio:  # (its first sentence is generating: the request has taken its voice)
                m = await asyncio.wait_for(ws.recv(), 60)
                audio += m if isinstance(m, bytes) else b""
            await wait_until(lambda: len([r for r in list(rs.srv.recent)
                                          if r.text == "First sentence here." and r.finished]) > n_first, 60)
            if between is not None:
                assert await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(between(), rs.loop)) is True
            await ws.send(json.dumps({"text": " Second sentence here.", "final": True}))
            events = await collect(ws)
            assert events[-1][0] == "done"
            return audio + b"".join(b for k, b in events if k == "audio")

    try:
        n_first = 0
        plain = asyncio.run(reply())
        (d / "ada.txt").write_text("Hello, I am Ada, with other words.")
        n_first = 1
        kept = asyncio.run(reply(rs.srv.reload_voices))
        n_first = 2
        after = asyncio.run(reply())
        assert kept == plain and after != plain
    finally:
        rs.stop()


def test_reload_voices_without_a_directory_or_before_ready_says_so_and_changes_nothing(caplog):
    from csmstream.engine.voices import Voice
    from csmstream.transport.server import StreamServer

    ada = Voice("ada", "Hello.", np.zeros((3, 32), np.int64))
    with caplog.at_level("WARNING", logger="csmstream.server"):
        srv = StreamServer(object(), voices={"ada": ada})
        assert asyncio.run(srv.reload_voices()) is False and srv.voices == {"ada": ada}
        assert asyncio.run(StreamServer(object(), voices_dir="/nonexistent").reload_voices()) is False
    assert [r.getMessage() for r in caplog.records] == [
        "voices not reloaded: no voices directory (serve --voices DIR)",
        "voices not reloaded: the server is not ready yet"]
