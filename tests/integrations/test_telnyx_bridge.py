"""The Telnyx bridge end to end: a Telnyx simulator on one side, a real csm-stream server (tiny)
on the other, TelnyxService in between (the seed's embedded deployment)."""

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus

from csmstream.integrations.telnyx_bridge import (
    AUTH_HEADER,
    CallRegistry,
    TelnyxCall,
    handle_telnyx_media,
    stream_options,
    websockets_auth,
)
from csmstream.integrations.telnyx_service import TelnyxService
from csmstream.integrations.telnyx_session import TelnyxMediaSession
from csmstream.kernels.g711 import ulaw_decode, ulaw_encode
from csmstream.kernels.resample import Resampler, resample_ref
from tests import ffmpeg
from tests.integrations.telnyx_sim import TelnyxSimulator
from tests.servers import as_written, floor_frame_time, wait_finished, wait_until

CONFIG = {"tts_provider": "sesame", "use_websocket_tts": True, "sesame_settings": {"speaker_id": 1, "seed": 9}}


@asynccontextmanager
async def endpoint(token=None, **media_format):
    registry = CallRegistry()
    calls = []

    async def handler(ws):
        calls.append(await handle_telnyx_media(ws, registry, **media_format))

    async with serve(handler, "127.0.0.1", 0, process_request=websockets_auth(token)) as srv:
        yield f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/telnyx", registry, calls


def engine_audio(text, speaker, seed):
    import csmstream

    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    return np.concatenate(list(eng.stream(text, speaker, seed=seed)))


@asynccontextmanager
async def loop_stalls(every=0.005):
    """Measure this event loop's stalls while the block runs: yields a list that holds, at its end,
    how late each 5 ms tick ran (seconds)."""
    lags = [0.0]

    async def tick():
        while True:
            t = time.monotonic()
            await asyncio.sleep(every)
            lags.append(max(0.0, time.monotonic() - t - every))

    task = asyncio.create_task(tick())
    try:
        yield lags
    finally:
        task.cancel()


@asynccontextmanager
async def speaking(server, text, media):
    """A simulated call speaking `text` (speak_text running as a task) once `media` messages of it
    have arrived: yields (sim, task, registry, calls)."""
    async with endpoint() as (url, registry, calls):
        service = TelnyxService(registry, sesame_url=server.url)
        async with TelnyxSimulator(url) as sim:
            task = asyncio.create_task(service.speak_text("v2:call-1", text, CONFIG))
            await wait_until(lambda: len(sim.media_times()) >= media)
            yield sim, task, service, registry, calls


def test_speak_text_streams_exact_ulaw_paced_with_a_mark(server):
    text = "Thanks for calling, how can I help?"

    async def go():
        async with endpoint() as (url, registry, _), loop_stalls() as stalls:
            service = TelnyxService(registry, sesame_url=server.url)
            async with TelnyxSimulator(url) as sim:
                utt = await service.speak_text("v2:call-1", text, CONFIG)
                call = registry.get("v2:call-1")
                heard = await call.heard(utt, timeout=30)
                return sim, utt, heard, max(stalls)

    sim, utt, heard, stall = asyncio.run(go())
    assert not sim.problems, sim.problems[:3]
    assert heard and utt.state == "heard" and sim.marks_echoed == [utt.name]
    # the audio: the engine's own audio, resampled to 8 kHz and mu-law encoded, padded with 0xFF
    pcm = engine_audio(text, 1, 9)
    r = Resampler(24000, 8000)
    want = ulaw_encode(np.concatenate([r.process(pcm), r.flush()])).tobytes()
    got = bytes(sim.audio)
    assert got[: len(want)] == want and set(got[len(want):]) <= {0xFF} and len(got) - len(want) < 160
    # and, independently, within G.711 quantisation of the float reference resampler: each decoded
    # sample is within mu-law's own quantisation error near that level (from all 65,536 inputs)
    # plus the int16 rounding of the resampled value
    ref = np.clip(resample_ref(pcm.astype(np.float64), 24000, 8000), -32768, 32767)
    dec = sim.pcm()[: len(ref)].astype(np.float64)
    levels = np.arange(-32768, 32768)
    qerr = np.abs(ulaw_decode(ulaw_encode(levels.astype(np.int16))).astype(np.int64) - levels)
    near = np.maximum.reduce([np.roll(qerr, s) for s in (-2, -1, 0, 1, 2)])
    allowed = near[np.clip(np.rint(ref), -32768, 32767).astype(np.int64) + 32768] + 1.5
    assert np.all(np.abs(dec - ref) <= allowed)
    # pacing: beyond a 100 ms head start, never faster than 2x real time -- over every stretch of
    # messages. The pacer and the simulated caller share this test's event loop: a stall of that
    # loop (a busy machine) delays earlier messages, and the pacer then rightly sends what fell due
    # at once, so a stretch across a stall looks shorter by up to the stall: 30 ms of slack plus the
    # longest stall measured
    t = np.array(sim.media_times())
    secs = np.array([len(base64.b64decode(m["media"]["payload"])) / 8000 for _, m in sim.received
                     if m.get("event") == "media"])  # each message's audio (whole 20 ms frames)
    assert np.all(np.isclose(secs * 50, np.round(secs * 50))) and secs.max() <= 0.100  # media_ms: 100
    gap = t[None, :] - t[:, None]  # [i, j]: t[j] - t[i]
    cum = np.concatenate([[0.0], np.cumsum(secs)])
    audio = cum[None, 1:] - cum[:-1, None]  # [i, j]: the audio of messages i..j inclusive
    earliest = (audio - 0.100) / 2.0
    upper = np.triu(np.ones_like(gap, dtype=bool), 1)
    assert np.all(gap[upper] >= earliest[upper] - 0.030 - stall), stall
    # the whole utterance was not dumped at once: it took at least half its duration to send
    assert t[-1] - t[0] >= 0.5 * cum[-1] - 0.100 - secs[-1]


def test_sesame_settings_speed_reaches_the_call(server):
    """sesame_settings["speed"] passes through: the call hears the engine's audio played at that
    speed (the stretcher's whole-signal reference), resampled and mu-law encoded."""
    from csmstream.kernels.stretch import stretch_ref

    text = "A brisker reply."
    config = {**CONFIG, "sesame_settings": {**CONFIG["sesame_settings"], "speed": 1.5}}

    async def go():
        async with endpoint() as (url, registry, _):
            service = TelnyxService(registry, sesame_url=server.url)
            async with TelnyxSimulator(url) as sim:
                utt = await service.speak_text("v2:call-1", text, config)
                return sim, await registry.get("v2:call-1").heard(utt, timeout=30)

    sim, heard = asyncio.run(go())
    assert heard and not sim.problems
    r = Resampler(24000, 8000)
    pcm = stretch_ref(engine_audio(text, 1, 9), 1.5)
    want = ulaw_encode(np.concatenate([r.process(pcm), r.flush()])).tobytes()
    got = bytes(sim.audio)
    assert got[: len(want)] == want and set(got[len(want):]) <= {0xFF} and len(got) - len(want) < 160


def test_speak_text_takes_an_llms_pieces_and_plays_them_as_they_come(server):
    """speak_text with the text as an LLM writes it (an async iterable): one text stream, spoken
    as it comes; a one-sentence reply gives exactly the audio of that sentence sent whole."""
    text = "Thanks for calling, how can I help?"

    async def go():
        async with endpoint() as (url, registry, _):
            service = TelnyxService(registry, sesame_url=server.url)
            async with TelnyxSimulator(url) as sim:
                utt = await service.speak_text("v2:call-1", as_written(text), CONFIG)
                heard = await registry.get("v2:call-1").heard(utt, timeout=30)
                return sim, heard

    sim, heard = asyncio.run(go())
    assert heard and not sim.problems
    r = Resampler(24000, 8000)
    pcm = engine_audio(text, 1, 9)
    want = ulaw_encode(np.concatenate([r.process(pcm), r.flush()])).tobytes()
    got = bytes(sim.audio)
    assert got[: len(want)] == want and set(got[len(want):]) <= {0xFF} and len(got) - len(want) < 160


def test_continue_previous_keeps_one_connection_for_the_call_and_each_turn_hears_the_last(server):
    """sesame_settings continue_previous: the call's turns go over one kept connection and each one
    hears the turn before it as context (the agent keeps its voice); the connection closes when
    the call ends. Without it, a turn opens its own connection and hears nothing, as before."""
    turns = ["Thanks for calling the bakery.", "What would you like to order today?", "A plain turn again."]
    keep = {**CONFIG, "sesame_settings": {**CONFIG["sesame_settings"], "continue_previous": True}}

    async def go():
        async with endpoint() as (url, registry, _):
            service = TelnyxService(registry, sesame_url=server.url)
            with pytest.raises(ValueError, match=r"\['continue_previous'\] must be true or false, got 1"):
                await service.speak_text("v2:call-1", "Hi.", {**CONFIG, "sesame_settings": {"continue_previous": 1}})
            sockets = []
            async with TelnyxSimulator(url) as sim:
                for text, config in zip(turns, (keep, keep, CONFIG), strict=True):
                    utt = await service.speak_text("v2:call-1", text, config)
                    assert await registry.get("v2:call-1").heard(utt, timeout=30)
                    sockets += [opened.result()._ws for opened in service._kept.values()]
                (svc,) = [opened.result() for opened in service._kept.values()]
                continued = svc.last_done["continued"]
            await wait_until(lambda: not service._kept)  # the call ended: its connection is closed
            return sim, sockets, svc, continued

    sim, sockets, svc, continued = asyncio.run(go())
    assert not sim.problems and len(sockets) == 3 and len(set(map(id, sockets))) == 1 and svc._ws is None
    assert continued == 1
    reqs = {r.text: r for r in server.srv.recent if r.text in turns}
    assert [[s.text for s in reqs[t].context] for t in turns] == [[], [turns[0]], []]


def test_the_callers_turn_in_sesame_settings_is_the_replys_context(server):
    """sesame_settings context (the caller's words with their 8 kHz audio, as the call carried
    them) reaches the server with the call's utterance: the reply heard that turn, then played."""
    from csmstream.kernels.g711 import ulaw_encode
    from csmstream.transport.context import turn

    t = np.arange(4000) / 8000
    caller = turn(1, "Can I move my booking?", ulaw_encode((np.sin(2 * np.pi * 190 * t) * 6000).astype(np.int16)),
                  "ulaw_8000")
    config = {**CONFIG, "sesame_settings": {**CONFIG["sesame_settings"], "context": [caller]}}

    async def go():
        async with endpoint() as (url, registry, _):
            service = TelnyxService(registry, sesame_url=server.url)
            async with TelnyxSimulator(url) as sim:
                utt = await service.speak_text("v2:call-1", "Of course, which day?", config)
                return sim, await registry.get("v2:call-1").heard(utt, timeout=30)

    sim, heard = asyncio.run(go())
    assert not sim.problems and heard
    [req] = [r for r in server.srv.recent if r.text == "Of course, which day?"]
    assert [(s.speaker_id, s.text, len(s.codes)) for s in req.context] == [(1, "Can I move my booking?", 7)]


def test_g722_call_gets_wideband_audio_exactly_as_ffmpeg_encodes_it(server):
    """An HD call (stream_bidirectional_codec G722): 16 kHz audio, byte for byte FFmpeg's G.722 of
    the engine's audio resampled to 16 kHz (then silence to the frame's end), and what the caller
    hears through FFmpeg's decoder is that audio (the QMFs' delay aside) to within ADPCM's noise."""
    text = "Wideband audio for this caller."

    async def go():
        async with endpoint(codec="G722") as (url, registry, _):
            service = TelnyxService(registry, sesame_url=server.url)
            async with TelnyxSimulator(url, codec="G722", sampling_rate=16000) as sim:
                utt = await service.speak_text("v2:call-1", text, CONFIG)
                heard = await registry.get("v2:call-1").heard(utt, timeout=30)
                return sim, utt, heard

    sim, utt, heard = asyncio.run(go())
    assert not sim.problems, sim.problems[:3]
    assert heard and utt.state == "heard" and sim.audio_ms == 20 * utt.frames
    r = Resampler(24000, 16000)
    pcm = engine_audio(text, 1, 9)
    res = np.concatenate([r.process(pcm), r.flush()])
    got = bytes(sim.audio)
    pad = 2 * len(got) - len(res)
    assert 0 <= pad < 320
    assert got == ffmpeg.g722_encode(np.concatenate([res, np.zeros(pad, np.int16)])).tobytes()
    ref = np.clip(resample_ref(pcm.astype(np.float64), 24000, 16000), -32768, 32767)
    out = sim.pcm().astype(np.float64)
    lag = int(np.argmax([np.dot(ref[:-64], out[k : k + len(ref) - 64]) for k in range(48)]))
    want, heard_pcm = np.fft.rfft(ref[:-64]), np.fft.rfft(out[lag : lag + len(ref) - 64])
    low = np.fft.rfftfreq(len(ref) - 64, 1 / 16000) < 3500
    snr = [10 * np.log10(np.sum(np.abs(want[m]) ** 2) / np.sum(np.abs(want[m] - heard_pcm[m]) ** 2))
           for m in (low, slice(None))]
    # tiny's audio is noise-like, G.722's worst case: 6 bits for 0-4 kHz, 2 for 4-8 kHz (measured
    # 19 and 9 dB; one sample off the right delay gives 0 dB)
    assert snr[0] > 15 and snr[1] > 6, snr


def test_stream_url_query_picks_the_calls_codec():
    assert stream_options("") == {"codec": "PCMU", "sampling_rate": 8000, "l16_byteorder": "big"}
    assert stream_options("codec=G722")["sampling_rate"] == 16000
    assert stream_options("codec=L16&sampling_rate=24000&l16_byteorder=little") == \
        {"codec": "L16", "sampling_rate": 24000, "l16_byteorder": "little"}
    assert stream_options("codec=L16", codec="L16", sampling_rate=48000)["sampling_rate"] == 48000  # kept
    assert stream_options("codec=PCMA", codec="L16", sampling_rate=48000)["sampling_rate"] == 8000  # the codec's own
    for query, match in [("rate=16000", "unknown stream URL parameter 'rate'; allowed: codec, sampling_rate"),
                         ("codec=L16&sampling_rate=fast", "sampling_rate must be a whole number of Hz, got 'fast'"),
                         ("codec=G722&sampling_rate=8000", "G722 runs at 16000 Hz"),
                         ("codec=OPUS", "codec must be one of PCMU, PCMA, G722, L16"),
                         ("codec=L16&l16_byteorder=middle", "l16_byteorder must be 'big' or 'little'")]:
        with pytest.raises(ValueError, match=match):
            stream_options(query)


def test_interrupt_clears_cancels_generation_and_drops_the_rest(server, monkeypatch):
    floor_frame_time(monkeypatch, server)
    text = "This is a long answer that the caller will interrupt halfway through. " * 6

    async def go():
        async with speaking(server, text, 15) as (sim, task, service, registry, _):
            await service.interrupt("v2:call-1")
            utt = await asyncio.wait_for(task, 10)
            await wait_until(lambda: sim.cleared_at, 5)
            await asyncio.sleep(0.3)  # anything still coming would arrive now
            heard = await registry.get("v2:call-1").heard(utt, timeout=5)
            return sim, utt, heard

    sim, utt, heard = asyncio.run(go())
    assert len(sim.cleared_at) == 1 and utt.state == "cut_off" and heard is False
    after = [m for t, m in sim.received if t > sim.cleared_at[0] and m.get("event") == "media"]
    assert after == []
    # generation stopped: the server's request was cancelled within one frame, well before its end
    req = server.srv.recent[-1]
    wait_finished(req)
    assert req.reason == "cancelled" and req.frames - req.frames_at_cancel <= 1 and req.frames < req.max_frames


def test_nothing_is_sent_after_stop_and_generation_is_cancelled(server, monkeypatch):
    floor_frame_time(monkeypatch, server)
    text = "A caller who hangs up while we are still talking to them. " * 5

    async def go():
        async with speaking(server, text, 8) as (sim, task, _, registry, _):
            await sim.stop()
            utt = await asyncio.wait_for(task, 10)
            await asyncio.sleep(0.3)
            return sim, utt, registry

    sim, utt, registry = asyncio.run(go())
    late = [m for t, m in sim.received if t > sim.stopped_at + 0.05]
    assert late == [] and utt.state == "cut_off"
    assert registry.get("v2:call-1") is None
    req = server.srv.recent[-1]
    wait_finished(req)
    assert req.reason == "cancelled" and req.frames < req.max_frames


def test_call_dropping_mid_utterance_cancels_generation(server, monkeypatch):
    floor_frame_time(monkeypatch, server)
    text = "The line drops while this sentence is being generated and sent. " * 5

    async def go():
        async with endpoint() as (url, registry, _):
            service = TelnyxService(registry, sesame_url=server.url)
            sim = TelnyxSimulator(url)
            await sim.__aenter__()
            task = asyncio.create_task(service.speak_text("v2:call-1", text, CONFIG))
            await wait_until(lambda: len(sim.media_times()) >= 5)
            await sim.__aexit__(None, None, None)  # socket closes, no stop
            return await asyncio.wait_for(task, 10)

    utt = asyncio.run(go())
    assert utt.state == "cut_off"
    req = server.srv.recent[-1]
    wait_finished(req)
    assert req.reason == "cancelled" and req.frames < req.max_frames


def test_a_call_whose_sending_fails_ends_instead_of_going_silent(server, monkeypatch, caplog):
    """A send that raises (a bug, or a socket broken under the writer) killed the writer task
    without a word: the call went silent for ever while its generation ran on, its speaker waited
    and the stream stayed registered. Now the call ends: the utterance is cut off, generation is
    cancelled, heard() answers False, the call leaves the registry and its handler returns."""
    import logging

    floor_frame_time(monkeypatch, server)
    text = "This sentence will never be heard in full, because sending breaks. " * 5

    async def go():
        async with speaking(server, text, 5) as (_, task, _, registry, calls):
            call = registry.get("v2:call-1")

            async def broken(msg):
                raise RuntimeError("injected: the send path is broken")

            call.sock.send = broken
            utt = await asyncio.wait_for(task, 10)
            heard = await call.heard(utt, timeout=10)
            await wait_until(lambda: calls == [call])  # the media handler returned
            return utt, heard, registry.get("v2:call-1"), call

    with caplog.at_level(logging.ERROR, logger="csmstream.telnyx"):
        utt, heard, registered, call = asyncio.run(go())
    assert utt.state == "cut_off" and heard is False and registered is None and call.ended.is_set()
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "sending failed (RuntimeError: injected" in record.getMessage() and record.exc_info
    req = server.srv.recent[-1]
    wait_finished(req)
    assert req.reason == "cancelled" and req.frames < req.max_frames


@pytest.mark.parametrize("bad", [
    "this is not json",
    json.dumps({"event": "hologram", "stream_id": "STREAM-1"}),
    json.dumps({"event": "media", "stream_id": "STREAM-1", "media": {"payload": "!!!not-base64!!!"}}),
    json.dumps({"event": "mark"}),
    json.dumps([1, 2]),
])
def test_bad_telnyx_messages_are_logged_and_the_call_keeps_playing(server, bad):
    async def go():
        async with endpoint() as (url, registry, calls):
            service = TelnyxService(registry, sesame_url=server.url)
            async with TelnyxSimulator(url) as sim:
                await sim.send_raw(bad)
                utt = await service.speak_text("v2:call-1", "Still here.", CONFIG)
                heard = await registry.get("v2:call-1").heard(utt, timeout=30)
                return sim, heard

    sim, heard = asyncio.run(go())
    assert heard and len(sim.audio) > 0 and not sim.problems


def test_media_before_start_and_wrong_codec_are_reported_not_fatal(server):
    from csmstream.integrations.telnyx_session import BadMessage

    events = []

    async def go():
        registry = CallRegistry()

        async def handler(ws):
            await handle_telnyx_media(ws, registry, on_event=lambda call, ev: events.append(ev))

        async with serve(handler, "127.0.0.1", 0) as srv:
            url = f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/telnyx"
            from websockets.asyncio.client import connect

            async with connect(url) as ws:
                await ws.send(json.dumps({"event": "media", "media": {"payload": "/w=="}}))
            service = TelnyxService(registry, sesame_url=server.url)
            async with TelnyxSimulator(url, encoding="OPUS", send_caller_audio=False) as sim:
                utt = await service.speak_text("v2:call-1", "Codec check.", CONFIG)
                return await registry.get("v2:call-1").heard(utt, timeout=30), sim

    heard, sim = asyncio.run(go())
    reasons = [e.reason for e in events if isinstance(e, BadMessage)]
    assert any("media before start" in r for r in reasons)
    assert any("OPUS" in r for r in reasons)
    assert heard and len(sim.audio) > 0


def test_auth_token_is_checked_at_the_handshake():
    async def attempt(headers):
        async with endpoint(token="s3cret") as (url, registry, _):
            try:
                async with TelnyxSimulator(url, headers=headers, send_caller_audio=False):
                    await wait_until(lambda: registry.get("v2:call-1") is not None, 5)
                    return 101
            except InvalidStatus as e:
                return e.response.status_code

    assert asyncio.run(attempt({})) == 401
    assert asyncio.run(attempt({AUTH_HEADER: "wrong"})) == 401
    assert asyncio.run(attempt({AUTH_HEADER: "s3cret"})) == 101  # handshake accepted, call registered


class _Sent:
    """A socket that keeps what is sent."""

    def __init__(self):
        self.sent = []

    async def send(self, text):
        self.sent.append(text)


async def _spoken(call, pcm, piece=1920):
    async def chunks():
        for i in range(0, len(pcm), piece):
            yield pcm[i : i + piece]

    await call.speak(chunks())
    return [m for m, _ in call.pacer._q]


@pytest.mark.parametrize("codec,rate", [("PCMU", 8000), ("G722", 16000), ("L16", 16000), ("L16", 24000)])
def test_encoding_on_the_codec_threads_sends_the_bytes_encoding_on_the_loop_does(codec, rate):
    """A call's codec work on the codec threads (TelnyxCall.encode_off_loop, off by default) sends
    the same messages, byte for byte, as on the loop."""
    pcm = (np.random.default_rng(1).normal(size=24000) * 3000).astype(np.int16)

    async def go(off):
        call = TelnyxCall(_Sent(), codec=codec, sampling_rate=rate)
        assert call.encode_off_loop is False  # (the default: see TelnyxCall.__init__)
        call.encode_off_loop = off
        return await _spoken(call, pcm, 1000) + await _spoken(call, pcm[::-1].copy())  # two utterances

    on_loop, on_threads = asyncio.run(go(False)), asyncio.run(go(True))
    assert len(on_loop) > 2 and on_threads == on_loop


@pytest.mark.parametrize("when", ["queued", "running"])
def test_a_barge_in_while_a_chunk_is_on_a_codec_thread_drops_it_and_the_next_utterance_is_clean(when):
    """interrupt() while a chunk is on a codec thread, its encode not started yet ("queued") or
    running ("running": the clear waits for it): its bytes are never sent, and the next utterance
    is exactly what one thread doing the same in order sends -- the chunk is either not encoded at
    all, or encoded whole before the clear resets the codec."""
    import threading

    rng = np.random.default_rng(2)
    first, stale, second = ((rng.normal(size=n) * 3000).astype(np.int16) for n in (3840, 1920, 4800))

    async def go():
        call = TelnyxCall(_Sent(), codec="G722")
        call.encode_off_loop = True
        entered, release, left = threading.Event(), threading.Event(), threading.Event()
        encode, process = call.session.encode, call.session._resampler.process

        def hold(x, then, *args):
            if not (len(x) == len(stale) and np.array_equal(x, stale)):
                return then(x, *args)
            entered.set()
            release.wait(10)
            try:
                return then(x, *args)
            finally:
                left.set()

        if when == "queued":
            call.session.encode = lambda pcm, epoch: hold(pcm, encode, epoch)
        else:  # inside encode, with the codec's lock held
            call.session._resampler.process = lambda x: hold(x, process)

        async def chunks():
            yield first
            yield stale
            await asyncio.sleep(30)  # (never reached: the barge-in comes first)

        speaking = asyncio.create_task(call.speak(chunks()))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        threading.Timer(0.05, release.set).start()
        await call.interrupt()
        utt = await asyncio.wait_for(speaking, 10)
        await asyncio.get_running_loop().run_in_executor(None, left.wait, 10)  # (the chunk's encode is over)
        queued = [m for m, _ in call.pacer._q]  # (cleared: nothing of the first utterance is queued)
        return utt, call, queued, await _spoken(call, second)

    utt, call, queued, got = asyncio.run(go())
    assert utt.state == "cut_off" and queued == []
    assert json.loads(call.sock.ws.sent[-1]) == {"event": "clear"}
    ref = TelnyxMediaSession("G722")  # one thread, in order
    ref.start_utterance()
    ref.audio(first)
    if when == "running":
        ref.audio(stale)  # (its messages are not sent)
    ref.clear()
    ref.start_utterance()
    want = ref.audio(second) + ref.end_utterance()

    def audio(msgs):
        return b"".join(base64.b64decode(json.loads(m)["media"]["payload"]) for m in msgs if '"media"' in m)

    assert len(audio(got)) >= 1600 and audio(got) == audio(want)


class _Scripted(_Sent):
    """A socket that gives the call these Telnyx messages, then nothing more."""

    def __init__(self, messages):
        super().__init__()
        self.messages = messages

    async def __aiter__(self):
        for m in self.messages:
            yield m
            await asyncio.sleep(0)


def test_g722_caller_audio_reaches_listeners_exactly_every_event_in_order_and_none_last():
    """A G.722 caller's audio reaches a call's listeners decoded exactly (FFmpeg's codes, our
    decoder's state run across the frames), a key press between its frames in its place, and the
    None that ends their events after the Stopped (it used to come before it)."""
    from csmstream.kernels.g722 import g722_decode

    x = (np.random.default_rng(3).normal(size=3200) * 3000).astype(np.int16)
    codes = ffmpeg.g722_encode(x).tobytes()
    start = {"event": "start", "stream_id": "s", "start": {"call_control_id": "v2:g", "media_format": {
        "encoding": "G722", "sample_rate": 16000, "channels": 1}}}

    def media(i):
        return json.dumps({"event": "media", "media": {"track": "inbound", "chunk": str(i + 1), "payload":
                                                       base64.b64encode(codes[160 * i : 160 * i + 160]).decode()}})

    script = [json.dumps(start), *map(media, range(5)), json.dumps({"event": "dtmf", "dtmf": {"digit": "7"}}),
              *map(media, range(5, 10)), json.dumps({"event": "stop", "stop": {"call_control_id": "v2:g"}})]
    events = []

    async def go():
        call = TelnyxCall(_Scripted(script), codec="G722")
        call.listeners.append(events.append)
        await asyncio.wait_for(call.run(), 10)

    asyncio.run(go())
    kinds = [type(e).__name__ for e in events]
    audio = ["CallerAudio"] * 5
    assert kinds == ["CallStarted", *audio, "Dtmf", *audio, "Stopped", "NoneType"]  # (None: the call is over)
    heard = np.concatenate([e.pcm for e in events if type(e).__name__ == "CallerAudio"])
    np.testing.assert_array_equal(heard, g722_decode(codes))
    assert [e.chunk for e in events if type(e).__name__ == "CallerAudio"] == list(range(1, 11))
