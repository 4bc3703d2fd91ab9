"""/telnyx/listen's cut-off rules, with a listener socket that stops taking messages (the
end-to-end path, over real sockets, is in test_telnyx_inprocess.py)."""

import asyncio
import base64
import json

import numpy as np

from csmstream.integrations import telnyx_listen
from csmstream.integrations.telnyx_bridge import CallRegistry, TelnyxCall
from csmstream.integrations.telnyx_session import CallerAudio
from tests.integrations.test_telnyx_session import START


class StuckListener:
    """Takes the first message, then none until `release` is set."""

    def __init__(self) -> None:
        self.sent, self.closed, self.release = [], None, asyncio.Event()

    async def send(self, message) -> None:
        if self.sent:
            await self.release.wait()
        self.sent.append(message)

    async def close(self, code, reason="") -> None:
        self.closed = (code, reason)


async def a_call():
    registry = CallRegistry()
    call = TelnyxCall(StuckListener(), registry)
    for ev in call.session.receive(json.dumps(START)):
        call._handle(ev)
    return registry, call


async def listening():
    """A call, and a stuck listener on it (its start already sent)."""
    registry, call = await a_call()
    ws = StuckListener()
    task = asyncio.create_task(telnyx_listen.handle_listener(ws, registry, "call_control_id=v2:abc"))
    await asyncio.sleep(0.05)
    return call, ws, task


def audio():
    return CallerAudio(np.zeros(160, np.int16), "inbound", None, None, 8000)


def test_a_listener_that_takes_nothing_is_cut_off_and_the_call_goes_on(monkeypatch):
    monkeypatch.setattr(telnyx_listen, "SEND_TIMEOUT_S", 0.2)

    async def go():
        call, ws, task = await listening()
        call._handle(audio())
        await asyncio.wait_for(task, 5)
        return ws, call

    ws, call = asyncio.run(go())
    assert json.loads(ws.sent[0])["event"] == "start"
    assert ws.closed[0] == 1008 and "slow_listener: took nothing for" in ws.closed[1]
    assert call.listeners == [] and not call.ended.is_set()


def test_a_listener_that_falls_too_far_behind_is_cut_off(monkeypatch):
    monkeypatch.setattr(telnyx_listen, "MAX_BEHIND", 3)

    async def go():
        call, ws, task = await listening()
        for _ in range(10):  # while its send is stuck: more than 3 queued
            call._handle(audio())
        ws.release.set()
        await asyncio.wait_for(task, 5)
        return ws, call

    ws, call = asyncio.run(go())
    assert ws.closed[0] == 1008 and "more than 3 events behind" in ws.closed[1]
    assert call.listeners == []


class Taker:
    """A listener socket that takes everything."""

    def __init__(self) -> None:
        self.sent, self.closed = [], None

    async def send(self, message) -> None:
        self.sent.append(message)

    async def close(self, code, reason="") -> None:
        self.closed = (code, reason)


class Backlog:
    """A Telnyx socket whose messages are all there at once (the loop stalled while they came):
    iterating it never suspends, so the call handles them in one go."""

    def __init__(self, messages) -> None:
        self.messages = list(messages)

    async def send(self, message) -> None:
        pass

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for m in self.messages:
            yield m


def test_a_listener_waiting_for_the_call_gets_every_frame_even_from_a_backlog():
    """Before the fix the listener attached when the loop got round to it, after the call had
    handled the whole backlog: a second of caller audio went missing."""
    frames = [bytes([i % 256]) * 160 for i in range(50)]
    media = [json.dumps({"event": "media", "media": {"track": "inbound", "payload": base64.b64encode(f).decode()}})
             for f in frames]
    stop = json.dumps({"event": "stop", "stop": {}})

    async def go():
        registry = CallRegistry()
        ws = Taker()
        listener = asyncio.create_task(telnyx_listen.handle_listener(ws, registry,
                                                                     "call_control_id=v2:abc&format=pcm_8000"))
        await asyncio.sleep(0.05)  # waiting for the call
        call = TelnyxCall(Backlog([json.dumps(START), *media, stop]), registry)
        await call.run()
        await asyncio.wait_for(listener, 5)
        return ws

    ws = asyncio.run(go())
    audio = b"".join(m for m in ws.sent if isinstance(m, bytes))
    # START's caller is PCMA; at the listener's 8 kHz each frame is its A-law decode, in order
    from csmstream.kernels.g711 import alaw_decode

    assert audio == b"".join(alaw_decode(f).astype("<i2").tobytes() for f in frames)
    assert json.loads(ws.sent[-1]) == {"event": "stop"} and ws.closed[0] == 1000


def test_frame_ms_sends_the_callers_audio_in_larger_frames_and_keeps_every_event_in_order():
    """frame_ms=100: the same audio as 20 ms frames give, in frames of exactly 100 ms, except the
    audio before a key press and before the stop, which goes out first, in a shorter frame."""
    from csmstream.kernels.g711 import alaw_decode
    from csmstream.kernels.resample import Resampler

    frames = [bytes([(7 * i) % 256]) * 160 for i in range(23)]  # 460 ms of A-law

    def media(f):
        return json.dumps({"event": "media", "media": {"track": "inbound", "payload": base64.b64encode(f).decode()}})

    dtmf = json.dumps({"event": "dtmf", "dtmf": {"digit": "3"}})
    script = [json.dumps(START), *map(media, frames[:12]), dtmf, *map(media, frames[12:]),
              json.dumps({"event": "stop", "stop": {}})]

    async def go():
        registry = CallRegistry()
        ws = Taker()
        listener = asyncio.create_task(telnyx_listen.handle_listener(
            ws, registry, "call_control_id=v2:abc&format=pcm_16000&frame_ms=100"))
        await asyncio.sleep(0.05)
        await TelnyxCall(Backlog(script), registry).run()
        await asyncio.wait_for(listener, 5)
        return ws

    ws = asyncio.run(go())
    start = json.loads(ws.sent[0])
    assert start["frame_ms"] == 100 and start["format"] == "pcm_16000"
    sizes = [len(m) if isinstance(m, bytes) else json.loads(m)["event"] for m in ws.sent[1:]]
    # 12 frames (240 ms) before the key: two of 100 ms, then 40 ms; 11 after: 100 ms twice, then 20 ms
    assert sizes == [3200, 3200, 1280, "dtmf", 3200, 3200, 640, "stop"]
    r = Resampler(8000, 16000)
    want = b"".join(r.process(alaw_decode(f)).astype("<i2").tobytes() for f in frames)
    assert b"".join(m for m in ws.sent if isinstance(m, bytes)) == want
