"""How many Telnyx calls one server process's event loop carries.

    python bench/telnyx_capacity.py --calls 50,100,200 --seconds 10 [--codec G722] [--listen-only]
        [--encode loop,threads] [--agents pcm_16000 [--agent-frame-ms 20,100]]
        [--model-streams 2] [--switch-ms 5,0.5]

A child process runs the server as `csm-stream serve --telnyx` does (StreamServer, the same
routes, uvloop; the tiny model, idle). This process plays Telnyx for N calls at once: each sends
its start, then a caller media frame every 20 ms, and reads everything the server sends
(counting the audio in its media). Unless --listen-only, every call also has speech playing into it
all the time, a clip fed at real time in 100 ms chunks (what the engine's sink does, minus the
model, whose work is on its own thread or GPU), so both directions run: 20 ms frames in, 100 ms
media messages out (media_ms), the worst case of a conversation. Before and after each measured
window it reads the child's /metrics: the loop thread's CPU (csm_event_loop_cpu_seconds_total), its
lag histogram and largest lag (a gauge over the last 10 s: measure windows of 10 s or more, or it
reaches back before the window), the calls and frames counted. Per N it prints the loop's share of a
core, the share per call, the lag, and audio out per call per second (1000 ms when every call gets
its audio in real time), and the calls a core would carry at that cost. With --model-streams M,
M clients of the model (the tiny one on this CPU; the child then has M slots and warms it) ask
/ws/generate for one sentence after another through the window, and the row adds the engine's
frames a second and those requests' real-time factor, first audio and underruns: the engine's
thread and the loop's work at once, as in a server that speaks into its calls. `--json FILE`
writes the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from csmstream.benchtool import write_rows
from csmstream.integrations.telnyx_codecs import whole_frames
from csmstream.integrations.telnyx_listen import FORMATS as LISTEN_FORMATS


# -- the server (child process) ----------------------------------------------------------------------
def serve(codec: str, speak: bool, compression: str | None = None, encode: str = "auto",
          switch_ms: float | None = None, model_streams: int = 0) -> None:
    import csmstream
    from csmstream.commands import _run_loop, telnyx_routes
    from csmstream.integrations.telnyx_bridge import UnknownCall
    from csmstream.transport.encoder import warm_codecs
    from csmstream.transport.server import StreamServer

    routes, calls = telnyx_routes(codec, None)
    t = np.arange(24000 * 3) / 24000
    clip = (8000 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.int16)  # 3 s chirp: one utterance
    pieces = [clip[i : i + 2400] for i in range(0, len(clip), 2400)]

    async def talk(call) -> None:
        loop = asyncio.get_running_loop()

        async def chunks():
            due = loop.time()
            for p in pieces:
                yield p
                due += 0.1
                await asyncio.sleep(max(0.0, due - loop.time()))

        if encode != "auto":  # where the call's resampling and encoding run (TelnyxCall.encode_off_loop)
            call.encode_off_loop = encode == "threads"
        while not call.ended.is_set():
            try:
                await call.speak(chunks())
            except UnknownCall:  # hung up between the check and the utterance
                return

    def orphaned() -> None:  # the measuring process is gone (its end of our stdin closed): so are we
        sys.stdin.read()
        os._exit(0)

    async def main() -> None:
        threading.Thread(target=orphaned, daemon=True).start()
        if switch_ms is not None:
            sys.setswitchinterval(switch_ms / 1000)
        warm_codecs()  # as serve's start-up does (warmup=False below skips only that and the model's): a
        # cold numba cache would otherwise compile the codecs on the loop inside the measured window
        srv = StreamServer(lambda: csmstream.load("tiny", device="cpu", max_streams=max(1, model_streams)), port=0,
                           routes=routes, calls=calls, warmup=model_streams > 0, compression=compression)
        await srv.start()
        print(srv.port, sys.getswitchinterval(), flush=True)  # (the interval: what the rows say was measured)
        talking: dict = {}
        while True:  # give every new call its speech
            for call in list(calls):
                if speak and call not in talking:
                    talking[call] = asyncio.create_task(talk(call))
            for call in [c for c, task in talking.items() if task.done()]:
                del talking[call]
            await asyncio.sleep(0.1)

    _run_loop(main())


# -- Telnyx's side (this process) ----------------------------------------------------------------------
AGENT_FORMATS = tuple(LISTEN_FORMATS)  # what /telnyx/listen sends
ENCODE = {"auto": "server's choice", "loop": "event loop", "threads": "codec threads"}
PAYLOADS = {"PCMU": b"\xff" * 160, "PCMA": b"\xd5" * 160, "L16": bytes(640)}


def caller_payload(codec: str) -> str:
    if codec == "G722":
        from csmstream.kernels.g722 import g722_encode

        raw = g722_encode(np.zeros(320, np.int16)).tobytes()
    else:
        raw = PAYLOADS[codec]
    return base64.b64encode(raw).decode()


def scrape(port: int) -> dict[str, float]:
    from csmstream.benchtool import server_metrics

    got = server_metrics(f"ws://127.0.0.1:{port}/ws/generate")
    if got is None:
        raise RuntimeError(f"the server on port {port} did not answer /metrics")
    return got


def lag_quantile(before: dict, after: dict, q: float) -> str:
    """The histogram bucket holding quantile q of the window's lag samples, as '<= X ms'."""
    name = "csm_event_loop_lag_milliseconds_bucket"
    keys = sorted((k for k in after if k.startswith(name)), key=lambda k: float(k.split('"')[1]))
    total = after[f'{name}{{le="+Inf"}}'] - before[f'{name}{{le="+Inf"}}']
    last = "0"
    for k in keys:
        le = k.split('"')[1]
        if after[k] - before[k] >= q * total:
            return f"> {last} ms" if le == "+Inf" else f"<= {le} ms"
        last = le
    return f"> {last} ms"


async def run_calls(port: int, n: int, seconds: float, codec: str, payload: str,
                    agents: str | None = None, agent_frame_ms: int = 20, model_streams: int = 0) -> dict:
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{port}/telnyx?codec={codec}" + ("&sampling_rate=16000" if codec == "L16" else "")
    rate = {"G722": 16000, "L16": 16000}.get(codec, 8000)
    conns = []
    for i in range(n):
        ws = await connect(url, max_size=None, ping_interval=None)
        await ws.send(json.dumps({"event": "connected", "version": "1.0.0"}))
        await ws.send(json.dumps({"event": "start", "sequence_number": "1", "stream_id": f"s{i}",
                                  "start": {"call_control_id": f"v2:load-{i}",
                                            "media_format": {"encoding": codec, "sample_rate": rate, "channels": 1}}}))
        conns.append(ws)
    got = [0.0] * n  # ms of audio received, per call
    per_ms = {"L16": 32}.get(codec, 8)  # bytes a millisecond: G.711 8 kHz, G.722 64 kbit/s, L16 16 kHz

    async def read(i, ws):
        async for m in ws:
            if m.startswith('{"event": "media"'):
                a = m.index('"payload": "') + 12
                b = m.index('"', a)
                got[i] += ((b - a) * 3 // 4 - m.count("=", b - 2, b)) / per_ms

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(conns)]
    heard = [0.0] * n  # ms of caller audio an agent listening to the call received
    if agents:  # each call's agent listens on /telnyx/listen, as a voice agent's speech recognition does
        agent_rate = int(agents.split("_")[1])

        async def listen(i):
            query = f"call_control_id=v2:load-{i}&format={agents}&frame_ms={agent_frame_ms}"
            async with connect(f"ws://127.0.0.1:{port}/telnyx/listen?{query}", max_size=None,
                               ping_interval=None) as lw:
                async for m in lw:
                    if isinstance(m, bytes):
                        heard[i] += len(m) / 2 / agent_rate * 1000

        readers += [asyncio.create_task(listen(i)) for i in range(n)]
    loop = asyncio.get_running_loop()
    late = 0.0
    running = True

    async def send_frames():
        nonlocal late
        due, seq = loop.time(), 1
        while running:
            seq += 1
            for i, ws in enumerate(conns):
                await ws.send(f'{{"event": "media", "sequence_number": "{seq}", "stream_id": "s{i}", "media": '
                              f'{{"track": "inbound", "chunk": "{seq}", "timestamp": "{20 * seq}", '
                              f'"payload": "{payload}"}}}}')
            due += 0.02
            late = max(late, loop.time() - due)
            await asyncio.sleep(max(0.0, due - loop.time()))

    answered: list = []  # (began, ended: time.monotonic, benchtool.CallResult) of each model request

    async def generate(j: int) -> None:  # one client of the model: a sentence, and when it is done the next
        from csmstream.benchtool import DEFAULT_TEXTS, one_call

        k = 0
        while running:
            began = time.monotonic()
            r = await one_call(f"ws://127.0.0.1:{port}/ws/generate", DEFAULT_TEXTS[(j + k) % len(DEFAULT_TEXTS)],
                               j * 1000 + k, model_streams, "pcm_24000", 100)
            answered.append((began, time.monotonic(), r))
            k += 1
            if r.error is not None:  # (counted in the row; not retried at once, which would flood the server)
                await asyncio.sleep(0.1)

    sender = asyncio.create_task(send_frames())
    speakers = [asyncio.create_task(generate(j)) for j in range(model_streams)]
    await asyncio.sleep(2.0)  # every call started, speech flowing
    before, got0, t0, c0 = await asyncio.to_thread(scrape, port), sum(got), time.monotonic(), time.process_time()
    heard0 = sum(heard)
    late = 0.0
    await asyncio.sleep(seconds)
    after, got1, t1, c1 = await asyncio.to_thread(scrape, port), sum(got), time.monotonic(), time.process_time()
    heard1 = sum(heard)
    running = False
    for task in speakers:  # (a request still running is cut off: it did not end inside the window)
        task.cancel()
    await asyncio.gather(*speakers, return_exceptions=True)
    await sender
    for ws in conns:
        await ws.close()
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    wall = t1 - t0
    loop_cpu = (after["csm_event_loop_cpu_seconds_total"] - before["csm_event_loop_cpu_seconds_total"]) / wall
    return {"calls": n, "codec": codec, "seconds": round(wall, 2),
            "active_calls": after["csm_telnyx_calls_active"],
            "loop_cpu_share": round(loop_cpu, 4), "per_call_share": round(loop_cpu / n, 6),
            "calls_per_core": int(n / loop_cpu) if loop_cpu > 0 else None,
            "process_cpu_share": round(
                (after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]) / wall, 4),
            "lag_p99": lag_quantile(before, after, 0.99), "lag_max_ms": after["csm_event_loop_lag_max_milliseconds"],
            "caller_frames_per_call_s": round((after["csm_telnyx_caller_frames_total"]
                                               - before["csm_telnyx_caller_frames_total"]) / n / wall, 1),
            "audio_out_ms_per_call_s": round((got1 - got0) / n / wall, 1),
            "agents": agents, "agent_frame_ms": agent_frame_ms if agents else None,
            "agent_heard_ms_per_call_s": round((heard1 - heard0) / n / wall, 1) if agents else None,
            "codec_thread_calls_per_s": round((after["csm_codec_calls_total"] - before["csm_codec_calls_total"]) / wall,
                                              1),
            "load_cpu_share": round((c1 - c0) / wall, 3), "load_late_ms": round(1000 * late, 1),
            **model_row(model_streams, [r for b, e, r in answered if t0 <= b and e <= t1], before, after, wall)}


def model_row(streams: int, spoken: list, before: dict, after: dict, wall: float) -> dict:
    """What `streams` clients of the model got in the window: the engine's frames a second (each
    stream needs 12.5 while it speaks), and of the requests that began and ended in it the real-
    time factor, time to first audio and underruns (benchtool's playback from the first chunk)."""
    if not streams:
        return {"model_streams": 0}
    from csmstream.benchtool import summarize

    s = summarize(spoken)
    return {"model_streams": streams, "model_requests": s["requests"], "model_errors": s["errors"],
            "model_frames_per_s": round((after["csm_frames_total"] - before["csm_frames_total"]) / wall, 1),
            "model_rtf_p50": s["rtf"]["p50"], "model_rtf_max": s["rtf"]["max"],
            "model_ttfa_ms_p50": s["ttfa_ms"]["p50"], "model_ttfa_ms_max": s["ttfa_ms"]["max"],
            "model_underruns": s["underruns"], "model_underrun_ms": s["underrun_ms"]}


def wait_idle(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while scrape(port)["csm_telnyx_calls_active"] > 0:
        if time.monotonic() > end:
            raise RuntimeError("the server still has calls after the load closed them")
        time.sleep(0.2)


def measure(calls: list[int], seconds: float = 10.0, codec: str = "PCMU", speak: bool = True,
            compression: str | None = None, progress=print, encode: str = "auto",
            agents: str | None = None, agent_frame_ms: int = 20, switch_ms: float | None = None,
            model_streams: int = 0) -> list[dict]:
    """Start the child server, run each N in turn, stop the server; the rows."""
    if codec not in ("PCMU", "PCMA", "G722", "L16"):
        raise ValueError(f"codec must be PCMU, PCMA, G722 or L16, got {codec!r}")
    if not calls or min(calls) < 1:
        raise ValueError(f"calls must be whole numbers >= 1, got {calls}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if compression not in (None, "deflate"):
        raise ValueError(f"compression must be None or 'deflate', got {compression!r}")
    if encode not in ENCODE:
        raise ValueError(f"encode must be one of {', '.join(ENCODE)}, got {encode!r}")
    if agents not in (None, *AGENT_FORMATS):
        raise ValueError(f"agents must be None or one of {', '.join(AGENT_FORMATS)}, got {agents!r}")
    if not whole_frames(agent_frame_ms):  # (/telnyx/listen's rule for frame_ms)
        raise ValueError(f"agent_frame_ms must be a multiple of 20 from 20 to 1000, got {agent_frame_ms!r}")
    if switch_ms is not None and not 0.01 <= switch_ms <= 100:  # (nan fails this too)
        raise ValueError(f"switch_ms must be None (Python's default) or milliseconds in 0.01..100, got {switch_ms!r}")
    if not isinstance(model_streams, int) or not 0 <= model_streams <= 64:
        raise ValueError(f"model_streams must be a whole number in 0..64, got {model_streams!r}")
    argv = [sys.executable, os.path.abspath(__file__), "--serve", "--codec", codec]
    argv += ([] if speak else ["--listen-only"]) + (["--ws-compression", compression] if compression else [])
    argv += ["--encode", encode, "--model-streams", str(model_streams)]
    argv += [] if switch_ms is None else ["--switch-ms", str(switch_ms)]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        line = child.stdout.readline().split()
        if len(line) != 2 or not line[0].isdigit():
            raise RuntimeError(f"the server did not start (exit {child.poll()})")
        port, server_switch_ms = int(line[0]), 1000 * float(line[1])
        directions = "speech in both directions" if speak else "caller audio only"
        directions += f", an agent listening to each call ({agents}, {agent_frame_ms} ms frames)" if agents else ""
        directions += (f", {model_streams} client{'s' * (model_streams > 1)} of the model beside them"
                       if model_streams else "")
        interval = f"{server_switch_ms:g} ms" + (" (Python's default)" if switch_ms is None else "")
        progress(f"server on port {port} (pid {child.pid}); {directions}, {codec}, "
                 f"permessage-deflate {compression or 'off'}, encoding on the {ENCODE[encode]}, "
                 f"GIL switch interval {interval}")
        payload = caller_payload(codec)
        for n in calls:
            row = asyncio.run(run_calls(port, n, seconds, codec, payload, agents, agent_frame_ms, model_streams))
            rows.append(dict(row, compression=compression or "off", encode=encode, switch_ms=server_switch_ms))
            wait_idle(port)
            progress(row_text(rows[-1]))
    finally:
        child.kill()
        child.wait()
    return rows


def row_text(r: dict) -> str:
    return (f"{r['calls']:4d} calls: loop {100 * r['loop_cpu_share']:5.1f}% of a core "
            f"({100 * r['per_call_share']:.3f}% a call -> ~{r['calls_per_core']} calls a core); "
            f"lag p99 {r['lag_p99']}, max {r['lag_max_ms']:.0f} ms; "
            f"audio out {r['audio_out_ms_per_call_s']:.0f} ms/s a call (1000 = real time), caller frames in "
            f"{r['caller_frames_per_call_s']}/s; "
            + (f"agents heard {r['agent_heard_ms_per_call_s']:.0f} ms/s a call; " if r.get("agents") else "")
            + (f"model: {r['model_frames_per_s']:.0f} frames/s, {r['model_requests']} requests, RTF p50 "
               f"{r['model_rtf_p50']} max {r['model_rtf_max']}, first audio p50 {r['model_ttfa_ms_p50']} ms, "
               f"{r['model_underruns']} underruns; " if r.get("model_streams") else "")
            + f"load process {100 * r['load_cpu_share']:.0f}% CPU, {r['load_late_ms']:.0f} ms late at worst")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--calls", default="25,50,100",
                    help="comma-separated numbers of concurrent calls (default 25,50,100)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per N (default 10)")
    ap.add_argument("--codec", default="PCMU", choices=["PCMU", "PCMA", "G722", "L16"],
                    help="the calls' bidirectional codec (L16 at 16 kHz; default PCMU)")
    ap.add_argument("--listen-only", action="store_true", help="caller audio in only, no speech out")
    ap.add_argument("--ws-compression", default="off",
                    help="the server's permessage-deflate: off, deflate, or off,deflate to measure both in one run "
                         "(default off, the server's default)")
    ap.add_argument("--encode", default="auto",
                    help="where a call's resampling and encoding run: auto (the server's choice: the event "
                         "loop), loop, threads (TelnyxCall.encode_off_loop), or several comma-separated to "
                         "measure each in one run, e.g. loop,threads (default auto)")
    ap.add_argument("--agents", choices=AGENT_FORMATS,
                    help="also connect an agent to each call's /telnyx/listen in this format, reading the "
                         "caller's audio as a voice agent's speech recognition does (default: no agents)")
    ap.add_argument("--agent-frame-ms", default="20",
                    help="the agents' frame_ms (/telnyx/listen): ms of caller audio a frame, or several "
                         "comma-separated to measure each in one run, e.g. 20,100 (default 20)")
    ap.add_argument("--switch-ms", default=None,
                    help="the server's GIL switch interval in ms (sys.setswitchinterval: how long a thread that "
                         "wants the GIL waits before the holder must give it up), or several comma-separated to "
                         "measure each in one run, e.g. 5,0.5 (default: Python's, 5)")
    ap.add_argument("--model-streams", type=int, default=0,
                    help="also run this many clients of the model (the tiny one, on this CPU) on /ws/generate "
                         "through the window, each a sentence after another: does the engine keep up while the "
                         "loop carries the calls? (default 0)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.codec, not args.listen_only, None if args.ws_compression == "off" else args.ws_compression,
              args.encode, None if args.switch_ms is None else float(args.switch_ms), args.model_streams)
        return 0
    try:
        calls = [int(x) for x in args.calls.split(",")]
    except ValueError:
        ap.error(f"--calls takes comma-separated whole numbers, got {args.calls!r}")
    modes = args.ws_compression.split(",")
    if not set(modes) <= {"off", "deflate"}:
        ap.error(f"--ws-compression takes off, deflate or both (comma-separated), got {args.ws_compression!r}")
    encodes = args.encode.split(",")
    if not set(encodes) <= set(ENCODE):
        ap.error(f"--encode takes {', '.join(ENCODE)} (comma-separated), got {args.encode!r}")
    try:
        agent_frames = [int(x) for x in args.agent_frame_ms.split(",")]
    except ValueError:
        ap.error(f"--agent-frame-ms takes comma-separated whole numbers, got {args.agent_frame_ms!r}")
    try:
        switches = [None] if args.switch_ms is None else [float(x) for x in args.switch_ms.split(",")]
    except ValueError:
        ap.error(f"--switch-ms takes comma-separated milliseconds, got {args.switch_ms!r}")
    rows = []
    try:
        for mode, encode, frame_ms, switch in itertools.product(modes, encodes, agent_frames, switches):
            rows += measure(calls, args.seconds, args.codec, not args.listen_only, None if mode == "off" else mode,
                            encode=encode, agents=args.agents, agent_frame_ms=frame_ms, switch_ms=switch,
                            model_streams=args.model_streams)
    except ValueError as e:
        ap.error(str(e))
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
