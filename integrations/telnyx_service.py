"""The app-backend side (the seed's design): route speech for a call to a TTS provider.

    registry = CallRegistry()                    # mount handle_telnyx_media(ws, registry) at stream_url
    service = TelnyxService(registry, sesame_url="ws://gpu-host:8765/ws/generate",
                            providers={"elevenlabs": my_elevenlabs_handler})
    await service.speak_text(call_control_id, "Hello!", agent_config)

`agent_config["tts_provider"] == "sesame"` with `use_websocket_tts` (default true) streams from a
csm-stream server into the call's media stream; every other provider goes to the handler
registered for it: `async handler(call_control_id, text, agent_config)`.

`text` may also be an LLM's output as it is written (an iterable or async iterable of str): the
sesame route speaks it as it comes, first sentence first (one text stream); another provider's
handler gets it joined, once it has all come.

`sesame_settings["continue_previous"] = True` keeps the agent's voice from turn to turn: the call's
utterances then go over one connection kept for the call (opened at its first, closed when the
call ends or by aclose()), each asking the server for continue_previous, so every turn hears the
agent's last sentences as context. `sesame_settings` also passes `voice` (a named voice of the
server's), `speed` (speaking rate, 0.25-4, pitch kept) and `context` (the caller's last words with
their audio, e.g. what /telnyx/listen gave, as transport/context.turn() makes them) through to the
request, for the server to check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable

from ..transport import protocol
from ..transport.client import DEFAULT_URL, SesameWebSocketService
from .telnyx_bridge import CallRegistry, UnknownCall
from .telnyx_session import Utterance

PASSED_SETTINGS = ("temperature", "topk", "seed", "voice", "context", "speed")  # what a request carries as it is
SETTINGS = ("speaker_id", *PASSED_SETTINGS, "continue_previous", "url")  # what sesame_settings may hold

log = logging.getLogger("csmstream.telnyx")
Handler = Callable[[str, str, dict], Awaitable[object]]


class TelnyxService:
    def __init__(self, registry: CallRegistry, *, sesame_url: str = DEFAULT_URL,
                 providers: dict[str, Handler] | None = None, stream_wait: float = 5.0) -> None:
        self.registry, self.sesame_url = registry, sesame_url
        self.providers: dict[str, Handler] = dict(providers or {})
        self.stream_wait = stream_wait
        # (call, url) -> its kept connection, as the task that opens it: the call's utterances share
        # one, and calls open theirs side by side
        self._kept: dict[tuple[str, str], asyncio.Task] = {}
        self._closers: set[asyncio.Task] = set()
        self._warned: set[str] = set()  # sesame_settings keys already warned of as unused

    def register_provider(self, name: str, handler: Handler) -> None:
        self.providers[name] = handler

    async def speak_text(self, call_control_id: str, text: str | Iterable[str] | AsyncIterable[str],
                         agent_config: dict):
        """Speak `text` (or its pieces as an LLM writes them) on the call with the provider the agent
        is configured for."""
        if not isinstance(agent_config, dict):
            raise ValueError(f"agent_config must be a dict, got {type(agent_config).__name__}")
        if not isinstance(text, str) and not isinstance(text, (Iterable, AsyncIterable)):
            raise ValueError(f"text must be a str or pieces of text (an iterable or async iterable of str), got "
                             f"{type(text).__name__}")
        provider = agent_config.get("tts_provider")
        if provider == "sesame" and agent_config.get("use_websocket_tts", True):
            return await self._speak_text_websocket_sesame(call_control_id, text, agent_config)
        key = provider if provider != "sesame" else "sesame_rest"
        handler = self.providers.get(key)
        if handler is None:
            known = ", ".join(sorted(["sesame (use_websocket_tts)", *self.providers])) or "none"
            raise ValueError(f"no TTS handler for tts_provider={provider!r} (use_websocket_tts="
                             f"{agent_config.get('use_websocket_tts')!r}); available: {known}. Register one with "
                             "TelnyxService(providers={name: handler})")
        if not isinstance(text, str):  # (a handler of the seed's kind takes the whole text)
            text = await _joined(text)
        return await handler(call_control_id, text, agent_config)

    async def _speak_text_websocket_sesame(self, call_control_id: str, text: str, agent_config: dict) -> Utterance:
        settings = agent_config.get("sesame_settings") or {}
        if not isinstance(settings, dict):
            raise ValueError(f"agent_config['sesame_settings'] must be a dict (speaker_id, "
                             f"{', '.join(PASSED_SETTINGS)}, continue_previous, url), got {type(settings).__name__}")
        self._warn_unused(settings)
        speaker = settings.get("speaker_id", 0)
        keep = settings.get("continue_previous", False)
        if not isinstance(keep, bool):
            raise ValueError(f"agent_config['sesame_settings']['continue_previous'] must be true or false, got "
                             f"{keep!r:.40}")
        call = await self.registry.wait_for(call_control_id, self.stream_wait)
        options = {k: settings[k] for k in PASSED_SETTINGS if k in settings}
        url = settings.get("url", self.sesame_url)
        svc = await self._call_connection(call, url) if keep else SesameWebSocketService(url)
        # 24 kHz PCM in 20 ms chunks: each one becomes one 20 ms media message as it arrives
        opts = {"format": "pcm_24000", "chunk_ms": 20, **options}
        if keep:
            opts["continue_previous"] = True
        chunks = (svc.stream_tts(text, speaker, **opts) if isinstance(text, str) else
                  svc.stream_text(text, speaker, **opts))  # (an LLM's pieces: spoken as they come)
        utt = await call.speak(chunks)
        log.info("call %s: utterance %s %s (%d frames)", call_control_id, utt.name, utt.state, utt.frames,
                 extra={"call_control_id": call_control_id})
        return utt

    def _warn_unused(self, settings: dict) -> None:
        """A WARNING, once per key, for sesame_settings keys this service does not use (a typo, or
        another provider's name such as voice_id): ignored, so the call would not sound as configured."""
        unused = {k: v for k, v in protocol.unknown_fields(settings, SETTINGS).items() if k not in self._warned}
        if unused and len(self._warned) < 256:
            self._warned.update(unused)
            log.warning("agent_config['sesame_settings'] keys %s are not used and are ignored (it takes %s)",
                        protocol.hinted(unused),
                        ", ".join(SETTINGS))

    async def _call_connection(self, call, url: str) -> SesameWebSocketService:
        """The connection kept for this call's utterances to `url`: opened at the first, closed when
        the call ends."""
        key = (call.call_control_id, url)
        opening = self._kept.get(key)
        if opening is None:  # (two first utterances at once: one connection)
            opening = self._kept[key] = asyncio.get_running_loop().create_task(self._open(call, key, url))
            opening.add_done_callback(lambda t: t.cancelled() or t.exception())  # (its failure is its waiters')
        return await asyncio.shield(opening)  # (a waiter cancelled leaves the opening to the others)

    async def _open(self, call, key, url: str) -> SesameWebSocketService:
        try:
            svc = await SesameWebSocketService(url).__aenter__()
        except BaseException:
            del self._kept[key]  # (not opened: the call's next utterance tries again)
            raise
        task = asyncio.get_running_loop().create_task(self._close_at_end(call, key, svc, asyncio.current_task()))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)
        return svc

    async def _close_at_end(self, call, key, svc: SesameWebSocketService, opening: asyncio.Task) -> None:
        try:
            await call.ended.wait()
        finally:  # (the call ended, or aclose() cancelled this)
            if self._kept.get(key) is opening:
                del self._kept[key]
            await svc.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close the connections kept for calls (continue_previous); the service can go on after."""
        tasks = list(self._closers)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def interrupt(self, call_control_id: str) -> None:
        """Barge-in on the call: cancel its TTS, clear Telnyx's queue."""
        call = self.registry.get(call_control_id)
        if call is None:
            raise UnknownCall(f"no live media stream for call {call_control_id!r}")
        await call.interrupt()


async def _joined(pieces: Iterable[str] | AsyncIterable[str]) -> str:
    """All of `pieces`, as one text."""
    if isinstance(pieces, AsyncIterable):
        parts = [p async for p in pieces]
    else:
        parts = list(pieces)
    bad = [p for p in parts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"pieces of text must be str, got {type(bad[0]).__name__}")
    return "".join(parts)
