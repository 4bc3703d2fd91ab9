"""A Telnyx simulator: plays Telnyx's side of a bidirectional media stream over a real WebSocket.

It connects, sends `connected` and `start`, sends caller `media` every 20 ms, and receives our
messages, checking each one (valid JSON; media payloads base64 of the bidirectional codec, whole
20 ms frames: 160 bytes of PCMU/PCMA or G722, 2 bytes a sample of L16). `pcm()` decodes what
arrived with decoders independent of csm-stream's encoders where there is one (FFmpeg for G.722;
the byte order itself for L16).
Playback is simulated in real time: each 20 ms of media plays after the previous; a `mark` is
echoed once the audio sent before it has played; `clear` drops what is queued and returns the
queued marks at once (as Telnyx does).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from csmstream.kernels.g711 import alaw_decode, ulaw_decode, ulaw_encode
from tests import ffmpeg

BYTES_PER_SECOND = {"PCMU": 8000, "PCMA": 8000, "G722": 8000, "L16": None}  # L16: 2 x its rate


class TelnyxSimulator:
    def __init__(self, url: str, call_control_id: str = "v2:call-1", *, headers: dict | None = None,
                 encoding: str = "PCMU", send_caller_audio: bool = True, codec: str = "PCMU",
                 sampling_rate: int = 8000, caller_pcm=None, ssl=None) -> None:
        """encoding: the caller's audio (caller_pcm, 8 kHz int16, is sent as PCMU, then silence);
        codec, sampling_rate: the bidirectional stream's (what streaming_start asked for: what
        we must receive)."""
        self.caller_pcm = caller_pcm
        self.url, self.ccid, self.headers = url, call_control_id, headers or {}
        self.ssl = ssl  # an ssl.SSLContext for a wss:// url
        self.encoding, self.send_caller_audio = encoding, send_caller_audio
        self.codec, self.rate = codec, sampling_rate
        self.bytes_per_second = BYTES_PER_SECOND[codec] or 2 * sampling_rate
        self.frame_bytes = self.bytes_per_second // 50
        self.received: list[tuple[float, dict]] = []  # (monotonic time, message)
        self.problems: list[str] = []
        self.audio = bytearray()  # every media payload, in order
        self.marks_echoed: list[str] = []
        self.cleared_at: list[float] = []
        self.stopped_at: float | None = None
        self._play_end = 0.0
        self._pending_marks: list[tuple[float, str, asyncio.TimerHandle]] = []
        self._tasks: list[asyncio.Task] = []
        self._seq = 0
        self.caller_frames_sent = 0
        self.ws = None
        self.media_event = asyncio.Event()

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def __aenter__(self) -> TelnyxSimulator:
        self.ws = await connect(self.url, additional_headers=self.headers, **({"ssl": self.ssl} if self.ssl else {}))
        await self.ws.send(json.dumps({"event": "connected", "version": "1.0.0"}))
        await self.ws.send(json.dumps({
            "event": "start", "sequence_number": self._next_seq(), "stream_id": "STREAM-1",
            "start": {"user_id": "u", "call_control_id": self.ccid, "call_session_id": "s", "from": "+15550001",
                      "to": "+15550002", "client_state": "c3RhdGU=", "custom_parameters": {"agent": "a1"},
                      "media_format": {"encoding": self.encoding, "sample_rate": 8000, "channels": 1}}}))
        self._tasks = [asyncio.create_task(self._reader())]
        if self.send_caller_audio:
            self._tasks.append(asyncio.create_task(self._caller()))
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await self.ws.close()

    async def _caller(self) -> None:
        chunk = 0
        frame = {"PCMA": b"\xd5" * 160, "G722": ffmpeg.g722_encode(np.zeros(320, np.int16)).tobytes(),
                 "L16": bytes(640)}.get(self.encoding, b"\xff" * 160)
        silence = base64.b64encode(frame).decode()
        speech = ulaw_encode(self.caller_pcm).tobytes() if self.caller_pcm is not None else b""
        while True:
            chunk += 1
            said = speech[160 * (chunk - 1) : 160 * chunk]
            payload = base64.b64encode(said).decode() if len(said) == 160 else silence
            await self.ws.send(json.dumps({"event": "media", "sequence_number": self._next_seq(),
                                           "stream_id": "STREAM-1",
                                           "media": {"track": "inbound", "chunk": str(chunk),
                                                     "timestamp": str(20 * chunk), "payload": payload}}))
            self.caller_frames_sent += 1
            await asyncio.sleep(0.02)

    async def _reader(self) -> None:
        loop = asyncio.get_running_loop()
        async for raw in self.ws:
            now = time.monotonic()
            try:
                msg = json.loads(raw)
            except (TypeError, ValueError):
                self.problems.append(f"not JSON: {raw!r:.80}")
                continue
            self.received.append((now, msg))
            ev = msg.get("event")
            if ev == "media":
                try:
                    payload = base64.b64decode(msg["media"]["payload"], validate=True)
                except Exception as e:
                    self.problems.append(f"bad payload: {e}")
                    continue
                if len(payload) == 0 or len(payload) % self.frame_bytes:
                    self.problems.append(f"payload of {len(payload)} bytes is not a multiple of {self.frame_bytes}")
                self.audio += payload
                self._play_end = max(self._play_end, now) + len(payload) / self.bytes_per_second
                self.media_event.set()
            elif ev == "mark":
                name = msg["mark"]["name"]
                h = loop.call_at(loop.time() + max(0.0, self._play_end - now), self._echo, name)
                self._pending_marks.append((self._play_end, name, h))
            elif ev == "clear":
                self.cleared_at.append(now)
                self._play_end = now
                for _, name, h in self._pending_marks:
                    h.cancel()
                    self._echo(name)
                self._pending_marks.clear()
            else:
                self.problems.append(f"unexpected event {ev!r}")

    def _echo(self, name: str) -> None:
        self._pending_marks = [p for p in self._pending_marks if p[1] != name]
        self.marks_echoed.append(name)
        asyncio.ensure_future(self._send_quietly(json.dumps({"event": "mark", "sequence_number": self._next_seq(),
                                                             "stream_id": "STREAM-1", "mark": {"name": name}})))

    async def _send_quietly(self, text: str) -> None:
        """A mark echoed after the call ended has no one to go to (Telnyx drops it too)."""
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            pass

    async def send_raw(self, text) -> None:
        await self.ws.send(text)

    async def stop(self) -> None:
        self.stopped_at = time.monotonic()
        await self.ws.send(json.dumps({"event": "stop", "sequence_number": self._next_seq(), "stream_id": "STREAM-1",
                                       "stop": {"user_id": "u", "call_control_id": self.ccid}}))

    def media_times(self) -> list[float]:
        return [t for t, m in self.received if m.get("event") == "media"]

    def pcm(self) -> np.ndarray:
        """What the caller hears, at the stream's rate."""
        data = bytes(self.audio)
        if self.codec == "G722":
            return ffmpeg.g722_decode(data)
        if self.codec == "L16":
            return np.frombuffer(data, ">i2").astype(np.int16)
        return (alaw_decode if self.codec == "PCMA" else ulaw_decode)(data)

    @property
    def audio_ms(self) -> float:
        return 1000 * len(self.audio) / self.bytes_per_second
