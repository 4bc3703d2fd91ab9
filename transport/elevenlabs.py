"""ElevenLabs-compatible WebSocket endpoints (PROTOCOLS.md §3), so a backend that speaks ElevenLabs'
protocols switches by changing only its URL:

    ws://HOST:PORT/v1/text-to-speech/{voice_id}/stream-input?output_format=pcm_24000
    ws://HOST:PORT/v1/text-to-speech/{voice_id}/multi-stream-input?output_format=ulaw_8000

stream-input, one utterance a connection: {"text": " ", ...settings} to begin, then text pieces,
{"text": "...", "flush": true} to generate what is buffered now, {"text": ""} to finish. Server:
{"audio": base64, "isFinal": false, "normalizedAlignment", "alignment"} messages, then
{"audio": null, "isFinal": true, ...}, and the socket closes.

multi-stream-input (elevenlabs_multi.py), up to 5 utterances ("contexts") at once on one
connection, each generated and streamed independently: every client message names its `context_id`
(none: the context "default"); the first message with text (" " will do) opens that context;
{"text": "", "context_id"} keeps it alive (and opens nothing); {"context_id", "flush": true}
generates its buffered text now; {"context_id", "close_context": true} ends its input: what was
sent is spoken to the end, then its {"isFinal": true, "contextId"} (a csm-stream extension,
"immediate": true, stops it at once instead: a barge-in that also frees the engine slot);
{"close_socket": true} closes every context that way and then the socket. Every reply carries
"contextId"; every context ends with exactly one isFinal. A context that fails while its client is
still writing its turn drops the rest of that turn's text, up to its flush or close_context.

Both: voice_id is a named voice (serve --voices), an alias of one (serve --voice-alias: the voice id
an ElevenLabs client already sends, mapped to a voice here) or a speaker number; query parameters
output_format (any /ws/generate format, or mp3_RATE_KBPS / opus_48000_KBPS as ElevenLabs names
them; pcm_24000 when not given), inactivity_timeout (seconds, default 20, at most 180: input
left that long without a message is closed -- its buffered text is still spoken -- and a socket with
nothing open is closed), seed (reproducible audio) and continue_previous (true | false; default:
serve --elevenlabs-continue-previous, else false: on multi-stream-input a new context hears the
sentences of the context that generated last, so a voice agent's turns keep one voice; its isFinal
then says "continued": N; stream-input holds one utterance, so nothing comes before it). The
opening message's voice_settings.speed (0.25-4, default 1) sets the speaking rate, pitch kept; model_id
and ElevenLabs' other settings are accepted and ignored. With serve --auth-token, a handshake that
offers no credential may carry it in its first message instead (xi_api_key, or authorization:
"Bearer TOKEN"), as ElevenLabs allows: see gate.py. The alignment (characters with start times
and durations, which clients such as pipecat turn into the words the caller heard) is estimated per
sentence: see alignment.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.exceptions import ConnectionClosed

from . import gate, protocol
from .alignment import Aligner, relative_ms
from .connection import Connection, PlaybackClock
from .job import Job

log = logging.getLogger("csmstream.server")
PATH = re.compile(r"^/v1/text-to-speech/([^/]+)/(stream-input|multi-stream-input)$")
CHUNK_MS = 100
NO_ALIGNMENT = {"normalizedAlignment": None, "alignment": None}


class Stream(Job):
    """An ElevenLabs utterance: a text stream that knows when its client last wrote to it, plays on
    its own clock, and counts time to first audio from its first words (a stream opens with a blank
    message, often well before the LLM has written anything)."""

    def __init__(self, msg: protocol.Generate, rid: str) -> None:
        super().__init__(msg, rid)
        self.open = True
        self.clock = PlaybackClock()
        self.last_message = time.monotonic()
        self.has_words = False
        self.mid_turn = False  # text came after the last flush (the client is still writing a turn)
        self.aligner = Aligner(self)
        self.context_id: str | None = None  # multi-stream-input: the context it is

    def take(self, text: str) -> None:
        if not self.has_words and text.strip():
            self.has_words = True
            self.t_recv = time.perf_counter()
        self.mid_turn = self.mid_turn or bool(text)
        self.add_text(text)

    def flush_now(self) -> None:
        self.mid_turn = False
        super().flush_now()

    def alignment(self, chunk_ms: float) -> dict | None:
        """A chunk of `chunk_ms` goes out: the (estimated, see alignment.py) alignment of the
        sentences whose audio ends in it, or None. Times count from where the previous alignment
        ended, so a client that adds up alignments (as ElevenLabs' clients do) stays in step."""
        got = self.aligner.advance(chunk_ms)
        return None if got is None else relative_ms(*got)


def match(path: str) -> type[Connection] | None:
    """The connection class serving `path`, or None when it is not an ElevenLabs endpoint."""
    m = PATH.match(path)
    if m is None:
        return None
    if m.group(2) == "multi-stream-input":
        from .elevenlabs_multi import MultiContextConnection

        return MultiContextConnection
    return ElevenLabsConnection


def _json_object(message) -> dict | None:
    """A client message as the JSON object it should be, or None."""
    try:
        msg = protocol.decode_json(message)
    except (TypeError, ValueError):
        return None
    return msg if isinstance(msg, dict) else None


class ElevenLabsBase(Connection):
    """What both endpoints share: the URL's voice and settings, refusing a bad URL, making a
    stream's Job, audio messages, the inactivity watch."""

    def __init__(self, server, ws) -> None:
        super().__init__(server, ws)
        url = urlsplit(ws.request.path)
        self.voice_id = unquote(PATH.match(url.path).group(1))
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.output_format = self.query.get("output_format", "pcm_24000")
        self.inactivity = protocol.INACTIVITY_S
        self.seed: int | None = None
        self.continue_previous = server.elevenlabs_continue_previous  # ?continue_previous= overrides it
        self.last_message = time.monotonic()
        # a token is required and the handshake offered none: the first message must carry it
        self.auth_pending = bool(server.gate.token) and not gate.offers_credential(ws.request.headers)
        self._first = None  # that first message, once let in: handled as any other

    def _check_url(self) -> str | None:
        """What is wrong with the URL, or None."""
        if self.output_format not in protocol.ALL_FORMATS:
            return (f"output_format {self.output_format!r:.40} is not supported; use one of "
                    f"{', '.join(protocol.ALL_FORMATS)}")
        if not (self.voice_id in self.server.voices or protocol.digits_value(self.voice_id) is not None):
            known = ", ".join(sorted(self.server.voices)) or "none configured"
            return f"unknown voice_id {self.voice_id!r:.40}: use a named voice ({known}) or a speaker number"
        raw = self.query.get("inactivity_timeout")
        if raw is not None:
            try:
                self.inactivity = float(raw)
            except ValueError:
                self.inactivity = -1.0
            if not 0 < self.inactivity <= protocol.MAX_INACTIVITY_S:
                return (f"inactivity_timeout must be a number of seconds in (0, {protocol.MAX_INACTIVITY_S:.0f}], got "
                        f"{raw!r:.40}")
        raw = self.query.get("seed")
        if raw is not None:
            self.seed = protocol.digits_value(raw, 10)
            if self.seed is None or self.seed >= 2**32:
                return f"seed must be an integer in 0..4294967295, got {raw!r:.40}"
        raw = self.query.get("continue_previous")
        if raw is not None:
            if raw.lower() not in ("true", "false"):
                return f"continue_previous must be true or false, got {raw!r:.40}"
            self.continue_previous = raw.lower() == "true"
        return None

    async def run(self) -> None:
        if self.auth_pending and not await self._authorize():  # (first: the URL's answer names the voices)
            return
        why = self._check_url()
        if why is not None:
            self.server.metrics.error("elevenlabs_refused")
            await self.ws.send(json.dumps({"error": "invalid_request", "message": why}))
            await self.ws.close(1008, protocol.close_reason(why))
            return
        watch = asyncio.create_task(self._watch())
        try:
            await self._serve()
        finally:
            watch.cancel()

    async def _authorize(self) -> bool:
        """ElevenLabs' way for a client that cannot set headers: the token in the first message.
        That message, if it carries the token, goes on to be handled as usual."""
        why = None
        try:
            message = await asyncio.wait_for(self.ws.recv(), gate.AUTH_WAIT_S)
        except TimeoutError:
            why = f"no credentials: the first message did not come within {gate.AUTH_WAIT_S:.0f} s"
        else:
            msg = _json_object(message)
            if msg is not None and gate.message_token_ok(msg, self.server.gate.token):
                self._first = message
                return True
            why = "missing or wrong credentials"
        log.warning("refused an ElevenLabs connection: %s", why)
        self.server.metrics.error("unauthorized")
        await self.ws.send(json.dumps({"error": "unauthorized", "message": f"{why}: send the 'xi-api-key' header, "
                                       "or xi_api_key (or authorization: 'Bearer TOKEN') in the first message"}))
        await self.ws.close(1008, protocol.close_reason(why))
        return False

    async def _serve(self) -> None:
        await super().run()

    async def _receive(self) -> None:
        if self._first is not None:  # (the message that carried the token)
            first, self._first = self._first, None
            await self._take(first)
        await super()._receive()

    def _watch_input(self) -> None:
        pass  # (this socket's own _watch applies inactivity_timeout, from its URL)

    def _stream_note(self, job: Job) -> str:
        return ""  # (a failed stream here ends its socket, or its context: see each _error)

    async def _watch(self) -> None:
        try:
            while True:
                await asyncio.sleep(min(1.0, self.inactivity / 4))
                await self._idle(time.monotonic())
        except ConnectionClosed:
            pass  # the client left while being told it timed out
        except Exception:  # a bug: say so (a silently dead watch would leave idle input open for ever)
            log.exception("ElevenLabs inactivity watch failed; this connection's input no longer times out")

    async def _idle(self, now: float) -> None:
        raise NotImplementedError

    async def _time_out(self) -> None:
        """Nothing is open and the client has been silent for inactivity_timeout: close."""
        log.info("ElevenLabs connection idle for %.0f s: closing", self.inactivity)
        self.server.metrics.error("input_timeout_exceeded")
        await self.ws.send(json.dumps({"error": "input_timeout_exceeded", "message": "no message within "
                                       f"inactivity_timeout ({self.inactivity:g} s); the connection is closed"}))
        await self.ws.close(1008, "input timeout exceeded")

    async def _decode(self, message, example: str) -> dict | None:
        """The client's message as a JSON object, or None once it has been told (invalid_message)
        what a message looks like; `example` is one."""
        msg = _json_object(message)
        if msg is None:
            await self._error("invalid_message", f"messages are JSON objects like {example}")
            return None
        return msg

    def _new_job(self, text: str, speed: float = 1.0) -> Stream:
        named = self.voice_id in self.server.voices
        gen = protocol.Generate(text=text or " ", speaker_id=0 if named else protocol.digits_value(self.voice_id),
                                request_id=self.server.next_request_id(), format=self.output_format,
                                chunk_ms=CHUNK_MS, voice=self.server.voice_name(self.voice_id) if named else None,
                                final=False, seed=self.seed, continue_previous=self.continue_previous, speed=speed)
        job = Stream(gen, gen.request_id)
        job.take(text)
        self.jobs.append(job)
        self.server.metrics.requests += 1
        return job

    @staticmethod
    def opening_speed(msg: dict) -> float:
        """The speed an opening message asks for in its voice_settings (1 when none), or
        ProtocolError saying what is allowed."""
        speed = protocol.voice_settings_speed(msg, protocol.ProtocolError)
        return 1.0 if speed is None else speed

    def _audio(self, job: Stream, chunk: bytes) -> dict:
        align = job.alignment(job.encoder.duration_ms(chunk))
        return {"audio": base64.b64encode(chunk).decode("ascii"), "isFinal": False,
                "normalizedAlignment": align, "alignment": align}

    async def _deliver(self, job: Job, chunk: bytes) -> None:
        await self._send_timed(job, json.dumps(self._audio(job, chunk)))

    @staticmethod
    def _final_message(job: Job, **fields) -> dict:
        """A stream's isFinal; with continue_previous, "continued" (a csm-stream extension, as on
        /ws/generate's done)."""
        return {"audio": None, "isFinal": True, **NO_ALIGNMENT, **fields, **job.continued_field()}


class ElevenLabsConnection(ElevenLabsBase):
    """stream-input: one utterance; the socket closes after its isFinal."""

    def __init__(self, server, ws) -> None:
        super().__init__(server, ws)
        self.job: Stream | None = None
        self.finished = False

    async def _idle(self, now: float) -> None:
        if now - self.last_message < self.inactivity:
            return
        if self.job is None:
            await self._time_out()
        elif self.job.open:
            self.job.close()  # its buffered text is still spoken, then isFinal
            self.open_job = None

    async def _on_message(self, message) -> None:
        self.last_message = time.monotonic()
        if self.finished:
            return
        msg = await self._decode(message, '{"text": "Hello "}')
        if msg is None:
            return
        text = msg.get("text", "")
        if not isinstance(text, str):
            await self._error("invalid_message", f"text must be a string, got {type(text).__name__}")
            return
        if (why := protocol.text_problem(text)) is not None:
            await self._error("invalid_message", why)
            return
        job = self.job
        if job is not None and not job.open:
            return
        if job is not None and text == "":
            job.close()  # end of input
            self.open_job = None
            return
        if (job.chars if job is not None else 0) + len(text) > self.server.max_text_chars:
            await self._error("text_too_long", f"at most {self.server.max_text_chars} characters per stream")
            return
        if job is None:  # the first message opens the stream (its text is usually " ", with its settings)
            try:
                speed = self.opening_speed(msg)
            except protocol.ProtocolError as e:
                await self._error(e.code, e.message)
                return
            job = self.job = self.open_job = self._new_job(text, speed)
            self._work.set()
            if text == "":  # the end of input before any text: nothing to say (isFinal now, not at the timeout)
                job.close()
                self.open_job = None
                return
        else:
            job.take(text)
        if msg.get("flush") is True:
            job.flush_now()  # (try_trigger_generation is only a hint: a sentence starts when it is complete)

    async def _done(self, job, *, cancelled: bool, audio_ms=None, **extra) -> None:
        self.finished = True
        self._account(job, cancelled, audio_ms)
        await self.ws.send(json.dumps(self._final_message(job)))
        await self.ws.close(1000)

    async def _stream_or_fail(self, job: Job) -> None:
        """Stream the utterance; one that failed (refused as busy, or generation failed) has had its
        error message, and then ends as every stream here does: isFinal, and the socket closes (with
        1013, try again later, when the server was full; 1008 for a request the engine refused; 1011
        for a failure). Without this the client waited for ever: its socket stayed open, and later
        text was dropped."""
        await super()._stream_or_fail(job)
        if job.error and not self.finished:
            self.finished = True
            code = {"busy": 1013, "unavailable": 1013, "invalid_request": 1008}.get(job.error_code, 1011)
            await self.ws.send(json.dumps(self._final_message(job)))
            await self.ws.close(code, protocol.close_reason(job.error))

    async def _error(self, code: str, message: str, rid: str | None = None) -> None:
        self.server.metrics.error(code)
        await self.ws.send(json.dumps({"error": code, "message": message}))
