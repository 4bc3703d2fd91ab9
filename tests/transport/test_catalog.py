"""OpenAI's GET /v1/models and ElevenLabs' GET /v1/voices, sans I/O (transport/catalog.py). The
servers' answers, through both SDKs, are in test_voice_names.py."""

import numpy as np
import pytest

from csmstream.engine.voices import Voice
from csmstream.transport import catalog

ADA = Voice("ada", "Hello, my name is Ada.", np.zeros((25, 32), np.int64))  # 25 frames: 2.0 s
VOICES = {"ada": ADA, "alloy": ADA}  # alloy: an alias (the same voice object)


def _get(path, default_voice=None):
    return catalog.listing(path, model="csm-1b", created=1_700_000_000, voices=VOICES, default_voice=default_voice)


def test_models_lists_the_one_model_as_openai_does():
    model = {"id": "csm-1b", "object": "model", "created": 1_700_000_000, "owned_by": "csm-stream"}
    assert _get("/v1/models") == (200, {"object": "list", "data": [model]})
    assert _get("/v1/models/csm-1b") == (200, model)
    status, err = _get("/v1/models/tts-1")
    assert status == 404 and err["error"]["code"] == "model_not_found"
    assert err["error"]["type"] == "invalid_request_error"
    assert "'tts-1' is not served here; this server serves 'csm-1b'" in err["error"]["message"]


def test_voices_lists_named_voices_their_aliases_and_speaker_0():
    status, body = _get("/v1/voices", default_voice="ada")
    assert status == 200
    assert [(v["voice_id"], v["name"], v["category"], v["labels"]) for v in body["voices"]] == [
        ("ada", "ada", "cloned", {"source": "voice prompt", "default": "true"}),
        ("alloy", "alloy", "cloned", {"source": "voice prompt", "alias_of": "ada"}),
        ("0", "speaker 0", "premade", {"source": "speaker number"})]
    assert body["voices"][0]["description"] == "a 2.0 s voice prompt: Hello, my name is Ada."
    assert "no voice prompt" in body["voices"][2]["description"]


def test_one_voice_by_id_a_quoted_name_or_a_speaker_number():
    voices = _get("/v1/voices")[1]["voices"]
    assert _get("/v1/voices/alloy") == (200, voices[1])
    assert _get("/v1/voices/0") == (200, voices[2])
    assert _get("/v1/voices/7")[1]["voice_id"] == "7"
    spaced = {"my voice": ADA}
    got = catalog.listing("/v1/voices/my%20voice", model="m", created=0, voices=spaced, default_voice=None)
    assert got[0] == 200 and got[1]["voice_id"] == "my voice"
    for path in ("/v1/voices/nobody", "/v1/voices/-1", "/v1/voices/1234567890", "/v1/voices/ada/edit"):
        status, err = _get(path)
        assert status == 404 and err["error"]["code"] == "voice_not_found", path
        assert "a named voice (ada, alloy) or a speaker number" in err["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/model", "/v1/models/", "/v1/voices/", "/v1/voicesx", "/voices", "/healthz",
                                  "/v1/audio/speech", "/v1/text-to-speech/ada"])
def test_other_paths_are_not_listings(path):
    assert not catalog.is_listing(path) and _get(path) is None
