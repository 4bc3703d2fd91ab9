"""The serve / say / demo commands behind csmstream/cli.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from .logs import notice
from .stdin_text import STDIN, stdin_text_stream

log = logging.getLogger("csmstream.say")

TINY_NOTE = ("note: 'tiny' is an embedded random-weight model: its audio is noise-like. It proves the "
             "pipeline, not the voice; pass --model /path/to/csm-1b for speech.")


def _run_loop(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # uvloop is a dependency, but keep the plain loop as a fallback
        asyncio.run(coro)


def check_chunk_ms(ms: int) -> None:
    """--chunk-ms as the server accepts it, checked before any connection or model load."""
    from .transport.protocol import CHUNK_MS_RANGE

    lo, hi = CHUNK_MS_RANGE
    if not lo <= ms <= hi:
        raise ValueError(f"--chunk-ms must be in {lo}..{hi}, got {ms}")


def check_url(url: str) -> None:
    """--url as say and bench can use it: a WebSocket endpoint or the HTTP port's speech route,
    checked before any connection (else each request fails with the client library's words)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
    except ValueError as e:
        raise ValueError(f"--url {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
        raise ValueError(f"--url must be ws[s]://HOST:PORT/ws/generate or http[s]://HOST:HTTP_PORT/v1/audio/speech, "
                         f"got {url!r}")


# -- serve -----------------------------------------------------------------------------------------
def serve(args) -> int:
    from . import load
    from .transport.server import StreamServer

    if args.max_text_chars < 1:
        raise ValueError(f"--max-text-chars must be >= 1, got {args.max_text_chars}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise ValueError(f"--http-port must be in 0..65535, got {args.http_port}")
    if args.http_port is not None and args.http_port == args.port != 0:
        raise ValueError(f"--http-port must differ from --port (both {args.port})")
    if args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be >= 1 (prompt tokens), got {args.prefill_chunk}")
    if not 0 <= args.shutdown_timeout < math.inf:  # (nan fails this too)
        raise ValueError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    for flag, value in (("--max-connections-per-ip", args.max_connections_per_ip),
                        ("--max-requests-per-minute", args.max_requests_per_minute)):
        if value < 1:  # (0 would refuse every client)
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.voices is not None and not os.path.isdir(args.voices):  # (before the model loads)
        raise ValueError(f"--voices {args.voices!r}: no such directory (it should hold NAME.wav + NAME.txt pairs)")
    if args.tls_key is not None and args.tls_cert is None:
        raise ValueError("--tls-key needs --tls-cert (the certificate it belongs to)")
    ssl_context = None
    if args.tls_cert is not None:
        from .transport.tls import server_context

        ssl_context = server_context(args.tls_cert, args.tls_key)
    from .engine.loader import check_load_args  # (the model's flags too, before the port is bound)

    check_load_args(args.model, args.device, args.dtype, args.max_streams, args.cuda_graphs, args.quantize)
    if args.model == "tiny":  # (after the flags' checks: a typo's error is the last line, not lost above a note)
        notice(TINY_NOTE)

    def make_engine():
        return load(args.model, device=args.device, dtype=args.dtype, max_streams=args.max_streams,
                    cuda_graphs=args.cuda_graphs, quantize=args.quantize)

    routes, calls = {}, None
    if args.telnyx:
        routes, calls = telnyx_routes(args.telnyx_codec, args.telnyx_auth_token or os.environ.get(TOKEN_ENV),
                                      args.telnyx_sampling_rate, args.telnyx_l16_byteorder,
                                      listen_token=args.auth_token or os.environ.get(AUTH_ENV))

    async def main() -> None:
        srv = StreamServer(make_engine, host=args.host, port=args.port, max_text_chars=args.max_text_chars,
                           routes=routes, calls=calls, voices_dir=args.voices,
                           auth_token=args.auth_token or os.environ.get(AUTH_ENV),
                           allowed_origins=[o.strip() for o in args.allowed_origins.split(",")]
                           if args.allowed_origins else None,
                           max_connections_per_ip=args.max_connections_per_ip,
                           max_requests_per_minute=args.max_requests_per_minute,
                           prefill_chunk=args.prefill_chunk, http_port=args.http_port,
                           compression=None if args.ws_compression == "off" else args.ws_compression,
                           ssl_context=ssl_context)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if ssl_context is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload_tls, ssl_context, args.tls_cert, args.tls_key)
        await srv.start()
        web = "https" if ssl_context is not None else "http"
        notice(f"csm-stream: serving {srv.url} (health: {web}://{args.host}:{srv.port}/healthz)")
        if srv.speech_url:
            notice(f"csm-stream: OpenAI-compatible speech on {srv.speech_url} (POST; streams as it generates)")
        if args.telnyx:
            fmt = routes["/telnyx"][0].media_format
            notice(f"csm-stream: Telnyx media streams on {srv.scheme}://{args.host}:{srv.port}/telnyx "
                   f"({fmt['codec']} at {fmt['sampling_rate']} Hz unless the URL says ?codec=...; auth token "
                   f"{'required' if routes['/telnyx'][1] else 'NOT configured'}); the caller's audio for the agent "
                   f"on {srv.scheme}://{args.host}:{srv.port}/telnyx/listen?call_control_id=...")
        await stop.wait()
        notice(f"csm-stream: shutting down (running requests get up to {args.shutdown_timeout:.0f} s)")
        await srv.stop(args.shutdown_timeout)

    try:
        _run_loop(main())
    except OSError as e:  # port in use, bad address
        ports = f"{args.port}" + (f" / HTTP {args.http_port}" if args.http_port is not None else "")
        notice(f"csm-stream: error: cannot serve on {args.host} port {ports}: {e.strerror or e}", logging.ERROR)
        return 1
    return 0


TOKEN_ENV = "CSM_TELNYX_AUTH_TOKEN"
AUTH_ENV = "CSM_AUTH_TOKEN"


def telnyx_routes(codec: str, token: str | None, sampling_rate: int | None = None, l16_byteorder: str = "big",
                  listen_token: str | None = None):
    """The /telnyx endpoint (Telnyx's media streams, checked against `token`), /telnyx/listen (the
    caller's audio for the agent, checked against `listen_token`: the server's own) and their
    call registry, for StreamServer(routes=..., calls=...). The codec is the default of every
    call; a stream URL's query (?codec=G722) chooses another."""
    from .integrations.telnyx_bridge import CallRegistry, auth_ok, handle_telnyx_media, stream_options
    from .integrations.telnyx_listen import handle_listener
    from .transport.gate import token_ok
    from .transport.protocol import close_reason

    default = stream_options("", codec, sampling_rate, l16_byteorder)  # ValueError before serving
    registry = CallRegistry()

    async def handler(ws):
        try:
            fmt = stream_options(_query(ws), **default)
        except ValueError as e:
            logging.getLogger("csmstream.telnyx").warning("telnyx: refused a media stream: %s", e)
            registry.counts["refused"] += 1
            await ws.close(1008, close_reason(str(e)))
            return
        await handle_telnyx_media(ws, registry, **fmt)

    async def listener(ws):
        await handle_listener(ws, registry, _query(ws))

    accept = (lambda headers: auth_ok(headers, token)) if token else None
    accept_listener = (lambda headers: token_ok(headers, listen_token)) if listen_token else None
    handler.media_format = default
    return {"/telnyx": (handler, accept), "/telnyx/listen": (listener, accept_listener)}, registry


def _reload_tls(ctx, cert: str, key: str | None) -> None:
    """SIGHUP with --tls-cert: a renewed certificate (and key) from the same paths, for the
    handshakes from now on; a file that will not do is logged and the certificate in use kept."""
    from .transport import tls

    log_tls = logging.getLogger("csmstream.tls")
    try:
        tls.reload(ctx, cert, key)
    except (ValueError, OSError) as e:
        log_tls.error("SIGHUP: kept the TLS certificate in use: %s", e)
        return
    log_tls.info("SIGHUP: reloaded the TLS certificate from %s%s", cert, f" and its key from {key}" if key else "")


def _query(ws) -> str:
    """The query string of a WebSocket's request URL."""
    return ws.request.path.partition("?")[2] if ws.request is not None else ""


# -- say -------------------------------------------------------------------------------------------
def say(args) -> int:
    from .transport.client import SesameConnectionError, SesameTTSError
    from .transport.encoder import AudioDecoder
    from .wav import WavWriter

    dec = AudioDecoder(args.format)  # G.711/G.722 decoded: the WAV is what a client of the format hears
    AudioDecoder(args.format).decode(bytes(480))  # (its numba kernel compiled now, not between two chunks)
    # (a path that cannot be written fails before connecting; if nothing arrives, an earlier file there stays)
    with WavWriter(args.out, dec.rate, keep_empty=False) as wav:
        try:
            stats = asyncio.run(_say(args, lambda chunk: wav.write(dec.decode(chunk))))
        except SesameConnectionError as e:
            hint = (f"kept the {wav.seconds:.2f} s that arrived in {args.out}" if wav.samples
                    else _connect_hint(e, args.url))
            print(f"csm-stream: error: {e.message}\n  {hint}", file=sys.stderr)
            return 1
        except SesameTTSError as e:
            kept = f"\n  kept the {wav.seconds:.2f} s that arrived in {args.out}" if wav.samples else ""
            if e.code == "text_too_long":
                kept += (f"\n  say cuts the text into requests of at most {args.max_request_chars} characters "
                         "(--max-request-chars); this server takes fewer (its serve --max-text-chars)")
            print(f"csm-stream: server error {e.code}: {e.message}{kept}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\ncsm-stream: interrupted; kept the {wav.seconds:.2f} s that arrived in {args.out}",
                  file=sys.stderr)
            return 130
    if wav.samples == 0:
        print(f"csm-stream: the server sent no audio (the model ended speech at once); {args.out} was not written",
              file=sys.stderr)
        return 1
    total = stats["total"]
    print(f"wrote {args.out}: {wav.seconds:.2f} s of audio in {total:.2f} s; first audio after "
          f"{1000 * stats['ttfa']:.0f} ms; real-time factor {total / wav.seconds:.2f}; largest gap between chunks "
          f"{1000 * stats['max_gap']:.0f} ms ({stats['chunks']} chunks)")
    return 0


def _connect_hint(e, url: str) -> str:
    """What to check when `say` got nothing from `url`."""
    tls = url.startswith(("wss:", "https:"))
    if "CERTIFICATE_VERIFY_FAILED" in e.message:
        return ("the server's TLS certificate is not trusted here: pass --cafile CA.pem (the CA that signed it), "
                "or set SSL_CERT_FILE")
    if tls and ("WRONG_VERSION_NUMBER" in e.message or isinstance(e.__cause__, ConnectionResetError)):
        return ("the server does not speak TLS here (it does with serve --tls-cert): use ws:// (http:// for the "
                "HTTP port)")
    if not tls and any(m in e.message for m in ("did not receive a valid HTTP response", "without sending a response")):
        port = "--http-port (the --port takes WebSockets)" if url.startswith("http:") else "--port"
        return (f"the server closed the connection without an answer: is this serve's {port}? One that serves TLS "
                "(serve --tls-cert) needs wss:// (https:// for the HTTP port)")
    if isinstance(e.__cause__, (OSError, TimeoutError)):  # nothing answered at that address
        return "is a server running? start one with: csm-stream serve"
    if url.startswith(("http:", "https:")):
        return ("a server answered but not as csm-stream's HTTP port does: the speech endpoint is "
                "/v1/audio/speech on serve's --http-port")
    # something answered, but refused the WebSocket handshake (a wrong path or port, auth)
    return ("a server answered but refused the WebSocket: the endpoint is /ws/generate on serve's --port (the HTTP "
            "routes are on --http-port); with serve --auth-token, pass --token")


async def _say(args, write):
    """Stream args.text from the server, handing each chunk to `write` as it arrives; returns the
    timing figures."""
    from .text_parts import TextParts
    from .transport.client import SesameWebSocketService, stream_speech_http

    opts = dict(format=args.format, chunk_ms=args.chunk_ms, temperature=args.temperature, topk=args.topk)
    if args.seed is not None:
        opts["seed"] = args.seed
    if args.max_frames is not None:
        opts["max_audio_ms"] = 80 * args.max_frames
    if getattr(args, "voice", None) is not None:  # (demo's arguments have none)
        opts["voice"] = args.voice
    token = args.token or os.environ.get(AUTH_ENV)
    conn = dict(token=token, ssl_context=getattr(args, "ssl_context", None))  # (--cafile's; demo has none)
    http = args.url.startswith(("http://", "https://"))  # the OpenAI-compatible HTTP port
    limit = args.max_request_chars
    if args.text != STDIN and len(args.text) <= limit:  # one request
        source = (stream_speech_http(args.url, args.text, args.speaker, **conn, **opts) if http else
                  SesameWebSocketService(args.url, **conn).stream_tts(args.text, args.speaker, **opts))
    else:  # standard input (over a WebSocket, spoken as it arrives) or a long text: requests of `limit` characters
        parts = TextParts(await stdin_text_stream() if args.text == STDIN else _one(args.text), limit)
        source = _in_parts(parts, args, opts, conn, http)
    tty = sys.stderr.isatty()  # a live progress line only on a terminal
    chunks = 0
    t0 = time.perf_counter()
    first = last = None
    max_gap = 0.0
    async for chunk in source:
        now = time.perf_counter()
        if first is None:
            first = now
        elif now - last > max_gap:
            max_gap = now - last
        last = now
        chunks += 1
        write(chunk)
        if tty:
            print(f"\r  {chunks:4d} chunks  {now - t0:6.2f} s", end="", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    total = time.perf_counter() - t0
    return dict(ttfa=(first or t0) - t0, total=total, max_gap=max_gap, chunks=chunks)


async def _one(text: str):
    yield text


async def _in_parts(parts, args, opts: dict, conn: dict, http: bool):
    """The audio of `parts`, one request each, in turn on one connection: part k with seed + the
    sentences before it, and what is left of max_audio_ms."""
    from .transport import protocol
    from .transport.client import SesameWebSocketService, stream_speech_http

    rate, enc = protocol.FORMATS[args.format]
    per_ms = rate * protocol.BYTES_PER_SAMPLE[enc] / 1000
    seed, budget, heard = opts.get("seed"), opts.get("max_audio_ms"), 0
    svc = None if http else SesameWebSocketService(args.url, **conn)
    async with contextlib.AsyncExitStack() as stack:
        if svc is not None:
            await stack.enter_async_context(svc)
        while (part := await parts.next_part()) is not None:
            o = dict(opts)
            if seed is not None:
                o["seed"] = seed + parts.sentences
            if budget is not None:
                if budget - heard / per_ms < 80:  # (less than a frame left)
                    break
                o["max_audio_ms"] = int(budget - heard / per_ms)
            if parts.parts > 1:
                log.info("say: request %d, after %d sentences", parts.parts, parts.sentences)
            if http:
                text = "".join([piece async for piece in part])
                source = stream_speech_http(args.url, text, args.speaker, **conn, **o)
            else:
                source = svc.stream_text(part, args.speaker, **o)
            async for chunk in source:
                heard += len(chunk)
                yield chunk


# -- demo ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Poll /healthz until 200; raise if the server process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s ({url})")


def demo(args) -> int:
    from .transport import protocol
    from .wav import WavWriter

    WavWriter(args.out).discard()  # a path that cannot be written fails now, not after the server's start-up
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "csmstream", "serve", "--port", str(port), "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--quantize", args.quantize] \
        + ([] if args.cuda_graphs is None else ["--no-cuda-graphs"])
    print(f"demo: starting the server: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    try:
        t0 = time.perf_counter()
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        print(f"demo: server ready after {time.perf_counter() - t0:.1f} s; streaming a sentence", file=sys.stderr,
              flush=True)
        args.url = f"ws://127.0.0.1:{port}/ws/generate"
        args.format, args.chunk_ms, args.token = "pcm_24000", 100, None
        args.max_request_chars = protocol.DEFAULT_MAX_TEXT_CHARS  # (the server's: demo starts it so)
        return say(args)
    except RuntimeError as e:
        print(f"csm-stream: demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print("demo: server stopped", file=sys.stderr)


# -- bench -----------------------------------------------------------------------------------------
def bench(args) -> int:
    from pathlib import Path

    from .benchtool import run_bench, table

    if args.sweep:
        try:
            levels = [int(x) for x in args.sweep.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--sweep must be comma-separated integers, got {args.sweep!r}") from None
    else:
        levels = [args.concurrency]
    if not levels or min(levels) < 1 or args.requests < 1:
        raise ValueError("concurrency levels and --requests must be >= 1")
    check_chunk_ms(args.chunk_ms)  # (else every request fails at the server)
    check_url(args.url)
    if args.tokens_per_s is not None:
        if not 0 < args.tokens_per_s <= 10_000:
            raise ValueError(f"--tokens-per-s must be a rate in (0, 10000] words a second, got {args.tokens_per_s}")
        if args.url.startswith(("http://", "https://")):
            raise ValueError("--tokens-per-s types text out on a WebSocket text stream: give a ws://.../ws/generate "
                             "--url (the HTTP endpoint takes each text whole)")
    if not 0 < args.ttfa_threshold_ms < math.inf:
        raise ValueError(f"--ttfa-threshold-ms must be a number of milliseconds > 0, got {args.ttfa_threshold_ms}")
    try:  # the results' folder, before the run rather than after it
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (FileExistsError: a file of that name)
        raise ValueError(f"--out {args.out!r} cannot be the results' folder: "
                         f"{'a file has that name' if isinstance(e, FileExistsError) else e.strerror or e}") from None
    texts = None
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise ValueError(f"--text-file {str(path)!r} does not exist")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"--text-file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise ValueError(f"--text-file {str(path)!r} has no non-empty lines")
    typed = "" if args.tokens_per_s is None else f", typed at {args.tokens_per_s:g} words/s (timed from the first)"
    print(f"bench: {args.url}, levels {levels}, {args.requests} requests each, {args.format}{typed}", file=sys.stderr)
    out = run_bench(args.url, concurrency=levels, requests=args.requests, texts=texts, fmt=args.format,
                    chunk_ms=args.chunk_ms, out_dir=args.out, ttfa_threshold_ms=args.ttfa_threshold_ms,
                    token=args.token or os.environ.get(AUTH_ENV), voice=args.voice, tokens_per_s=args.tokens_per_s)
    print(table(out["summary"]))
    for c, summ in out["summary"].items():
        d, parts = summ["drift"], []
        if d["ttfa_last_tenth_p50"] is not None:  # (None when no request of the level got audio)
            parts.append(f"TTFA p50 first tenth {d['ttfa_first_tenth_p50']:.0f} ms -> "
                         f"last tenth {d['ttfa_last_tenth_p50']:.0f} ms")
        if d["rss_growth_mb"] is not None:
            parts.append(f"server memory {d['rss_before_mb']} -> {d['rss_after_mb']} MB")
        if parts:
            print(f"drift at concurrency {c}: " + "; ".join(parts))
    errors = sum(s["errors"] for s in out["summary"].values())
    if args.sweep:
        best = out["best_concurrency"]
        print(f"highest concurrency with no underruns and p95 TTFA <= {args.ttfa_threshold_ms:.0f} ms: "
              f"{best if best is not None else 'none of the levels tried'}")
    print("wrote " + ", ".join(out["files"]))
    if errors:
        first = next(r.error for r in out["results"] if r.error)
        print(f"csm-stream bench: {errors} request(s) failed; first: {first}", file=sys.stderr)
        return 1
    return 0
