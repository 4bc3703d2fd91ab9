"""The listing endpoints of the APIs this server speaks, so a client or a UI that asks what is
there before it speaks finds the model and the voices:

- OpenAI's `GET /v1/models` (`{"object": "list", "data": [model]}`) and `GET /v1/models/{id}`: the
  one model the process serves (the speech endpoint accepts any `model` and ignores it);
- ElevenLabs' `GET /v1/voices` (`{"voices": [voice]}`) and `GET /v1/voices/{voice_id}`: the named
  voices (`serve --voices`) and their aliases, then speaker "0" -- the ids the speech routes take.

Sans I/O: `listing(path, ...)` is (status, JSON object) for those paths and None for any other;
the server answers them on both ports, behind the same auth token as the rest.
"""

from __future__ import annotations

from urllib.parse import unquote

from .http_speech import error_object
from .protocol import digits_value

MODELS_PATH = "/v1/models"
VOICES_PATH = "/v1/voices"
OWNER = "csm-stream"


def is_listing(path: str) -> bool:
    """Whether `path` is one of the listing pages (a collection or one item of it)."""
    return any(path == p or (path.startswith(p + "/") and len(path) > len(p) + 1) for p in (MODELS_PATH, VOICES_PATH))


def listing(path: str, *, model: str, created: int, voices: dict, default_voice: str | None) -> tuple[int, dict] | None:
    """(HTTP status, JSON object) of a listing page, or None when `path` is not one. `voices`: name
    -> engine.voices.Voice (aliases share their voice's object); `created`: Unix seconds."""
    if not is_listing(path):
        return None
    if path == MODELS_PATH:
        return 200, {"object": "list", "data": [_model(model, created)]}
    if path == VOICES_PATH:
        entries = [_voice(name, v, default_voice) for name, v in voices.items()]
        return 200, {"voices": entries + [_speaker(0)]}
    kind, _, item = path[len("/v1/"):].partition("/")
    item = unquote(item)
    if kind == "models":
        if item == model:
            return 200, _model(model, created)
        return 404, error_object(404, "model_not_found", f"model {item!r:.60} is not served here; this server "
                                 f"serves {model!r} (GET {MODELS_PATH}). The speech endpoint accepts any "
                                 "model name and ignores it")
    if item in voices:
        return 200, _voice(item, voices[item], default_voice)
    if (sid := digits_value(item)) is not None:
        return 200, _speaker(sid)
    known = ", ".join(sorted(voices)) or "no named voices are configured"
    return 404, error_object(404, "voice_not_found", f"no voice {item!r:.60}: a voice is a named voice ({known}) "
                             f'or a speaker number such as "0" (GET {VOICES_PATH} lists them)')


def _model(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": OWNER}


def _voice(name: str, v, default_voice: str | None) -> dict:
    labels = {"source": "voice prompt"}
    if name != v.name:
        labels["alias_of"] = v.name
    if name == default_voice:
        labels["default"] = "true"
    return {"voice_id": name, "name": name, "category": "cloned", "labels": labels,
            "description": f"a {v.seconds:.1f} s voice prompt: {v.text}"}


def _speaker(sid: int) -> dict:
    """A speaker number as a voice: what the OpenAI and ElevenLabs routes make of voice "0" (never
    the default voice: a number names no prompt)."""
    return {"voice_id": str(sid), "name": f"speaker {sid}", "category": "premade",
            "labels": {"source": "speaker number"},
            "description": f"CSM's speaker {sid} with no voice prompt: its voice may differ from one request to "
                           "the next (a named voice keeps one)"}
