"""An ElevenLabs-compatible stream-input endpoint (PROTOCOLS.md §3), so a backend that speaks
ElevenLabs' WebSocket protocol switches by changing only its URL:

    ws://HOST:PORT/v1/text-to-speech/{voice_id}/stream-input?output_format=pcm_24000

Client: {"text": " ", ...settings} to begin, then text pieces, {"text": "...", "flush": true} to
generate what is buffered now, {"text": ""} to finish. Server: {"audio": base64, "isFinal": false,
"normalizedAlignment": null, "alignment": null} messages, then {"audio": null, "isFinal": true}, and
the socket closes. voice_id: a named voice (serve --voices) or a speaker number.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import parse_qs, urlsplit

from . import protocol
from .connection import Connection
from .job import Job

PATH = re.compile(r"^/v1/text-to-speech/([^/]+)/stream-input$")
CHUNK_MS = 100


def match(path: str) -> bool:
    return PATH.match(path) is not None


class ElevenLabsConnection(Connection):
    def __init__(self, server, ws) -> None:
        super().__init__(server, ws)
        url = urlsplit(ws.request.path)
        self.voice_id = PATH.match(url.path).group(1)
        self.output_format = parse_qs(url.query).get("output_format", ["pcm_24000"])[0]
        self.job = None
        self.finished = False

    async def run(self) -> None:
        if self.output_format not in protocol.FORMATS:
            await self._refuse(f"output_format {self.output_format!r} is not supported; use one of "
                               f"{', '.join(protocol.FORMATS)}")
            return
        if not (self.voice_id in self.server.voices or self.voice_id.isdigit()):
            known = ", ".join(sorted(self.server.voices)) or "none configured"
            await self._refuse(f"unknown voice_id {self.voice_id!r}: use a named voice ({known}) or a speaker number")
            return
        await super().run()

    async def _refuse(self, message: str) -> None:
        self.server.metrics.error("elevenlabs_refused")
        await self.ws.send(json.dumps({"error": "invalid_request", "message": message}))
        await self.ws.close(1008, message[:120])

    async def _on_message(self, message) -> None:
        if self.finished:
            return
        try:
            msg = json.loads(message)
            if not isinstance(msg, dict) or not isinstance(msg.get("text", ""), str):
                raise ValueError
        except (TypeError, ValueError):
            await self._error("invalid_message", 'messages are JSON objects like {"text": "Hello "}')
            return
        text = msg.get("text", "")
        if self.job is None:  # the first message opens the stream (its text is usually " ")
            named = self.voice_id in self.server.voices
            gen = protocol.Generate(text=text or " ", speaker_id=0 if named else int(self.voice_id),
                                    request_id=self.server.next_request_id(), format=self.output_format,
                                    chunk_ms=CHUNK_MS, voice=self.voice_id if named else None, final=False)
            self.job = job = Job(gen, gen.request_id)
            job.open = True
            self.open_job = job
            job.add_text(text)
            self.jobs.append(job)
            self.server.metrics.requests += 1
            self._work.set()
            return
        job = self.job
        if not job.open:
            return
        if text == "":
            job.close()  # end of input
            self.open_job = None
            return
        if job.chars + len(text) > self.server.max_text_chars:
            await self._error("text_too_long", f"at most {self.server.max_text_chars} characters per stream")
            return
        job.add_text(text)
        if msg.get("flush") is True or msg.get("try_trigger_generation") is True:
            job.flush_now()

    async def _send_audio(self, job, chunk: bytes) -> None:
        job.first_audio(self.server.metrics)
        await self.ws.send(json.dumps({"audio": base64.b64encode(chunk).decode("ascii"), "isFinal": False,
                                       "normalizedAlignment": None, "alignment": None}))

    async def _done(self, job, *, cancelled: bool, audio_ms=None, **extra) -> None:
        self.finished = True
        self.server.metrics.completed += 1
        self.server.metrics.audio_seconds += job.encoder.audio_ms / 1000
        await self.ws.send(json.dumps({"audio": None, "isFinal": True, "normalizedAlignment": None,
                                       "alignment": None}))
        await self.ws.close(1000)

    async def _error(self, code: str, message: str, rid: str | None = None) -> None:
        self.server.metrics.error(code)
        await self.ws.send(json.dumps({"error": code, "message": message}))
