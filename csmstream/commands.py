"""The serve / say / demo commands behind csmstream/cli.py."""

from __future__ import annotations

import asyncio
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
from pathlib import Path

from .logs import notice
from .say import AUTH_ENV, say  # noqa: F401  (the say command lives in say.py; cli calls commands.say)

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


def check_speed(speed: float) -> None:
    """--speed as the server accepts it (kernels/speed.py's check), checked before any work."""
    from .kernels.speed import SPEED_RANGE, check_speed as accepted

    try:
        accepted(speed)
    except ValueError:  # (nan too) said in the flag's words
        lo, hi = SPEED_RANGE
        raise ValueError(f"--speed must be a number in {lo:g}..{hi:g} (1 is CSM's own rate), got {speed}") from None


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
    from .engine.worker import stall_seconds

    stall_seconds(args.engine_stall_timeout, None, "--engine-stall-timeout")
    if not 0 <= args.shutdown_timeout < math.inf:  # (nan fails this too)
        raise ValueError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    for flag, value in (("--max-connections-per-ip", args.max_connections_per_ip),
                        ("--max-requests-per-minute", args.max_requests_per_minute)):
        if value < 1:  # (0 would refuse every client)
            raise ValueError(f"{flag} must be >= 1, got {value}")
    proxies = args.trusted_proxies if args.trusted_proxies is not None else os.environ.get(PROXIES_ENV)
    from .transport.proxies import TrustedProxies

    TrustedProxies(proxies)  # (its ValueError names the entry that is not an address)
    if args.voices is not None and not os.path.isdir(args.voices):  # (before the model loads)
        raise ValueError(f"--voices {args.voices!r}: no such directory (it should hold NAME.wav + NAME.txt pairs)")
    aliases = _voice_flags(args)
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
                           prefill_chunk=args.prefill_chunk, engine_stall_s=args.engine_stall_timeout,
                           http_port=args.http_port,
                           compression=None if args.ws_compression == "off" else args.ws_compression,
                           ssl_context=ssl_context,
                           elevenlabs_continue_previous=args.elevenlabs_continue_previous,
                           voice_aliases=aliases, default_voice=args.default_voice, trusted_proxies=proxies)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if ssl_context is not None or args.voices is not None:  # SIGHUP: read the certificate, the voices again
            loop.add_signal_handler(signal.SIGHUP, _on_sighup, srv, args)
        if ssl_context is not None:
            _note_expiry(srv, args.tls_cert)
        await srv.start()
        notice(f"csm-stream: serving {srv.url} (health: {srv.web_scheme}://{args.host}:{srv.port}/healthz)")
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


def _voice_flags(args) -> dict[str, str]:
    """--voice-alias pairs, checked with --default-voice against the --voices directory's NAME.wav
    files before the model loads (the server checks them again once the voices are encoded)."""
    from .engine.voices import parse_aliases

    aliases = parse_aliases(args.voice_alias)
    wanted = ([("--default-voice", args.default_voice)] if args.default_voice is not None else []) + \
        [(f"--voice-alias {a}={t}", t) for a, t in aliases.items()]
    if wanted and args.voices is None:
        raise ValueError(f"{wanted[0][0]} needs --voices DIR (the NAME.wav + NAME.txt voices it names)")
    if wanted:
        names = sorted(p.stem for p in Path(args.voices).iterdir() if p.suffix.lower() == ".wav" and p.is_file())
        for flag, name in wanted:
            if name not in names:
                raise ValueError(f"{flag}: {args.voices} has no voice {name!r} (its voices: "
                                 f"{', '.join(names) or 'none'})")
        taken = sorted(set(aliases) & set(names))
        if taken:
            raise ValueError(f"--voice-alias {taken[0]}=...: {taken[0]!r} is already a voice's own name")
    return aliases


TOKEN_ENV = "CSM_TELNYX_AUTH_TOKEN"
PROXIES_ENV = "CSM_TRUSTED_PROXIES"
log_tls = logging.getLogger("csmstream.tls")


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


def client_tls(cafile: str | None):
    """--cafile (say, bench) as a client's ssl.SSLContext; None: the system's trust store."""
    if cafile is None:
        return None
    from .transport.tls import client_context

    return client_context(cafile)


def _on_sighup(srv, args) -> None:
    """SIGHUP: the TLS certificate (--tls-cert) and the voices (--voices) read again, each kept as
    it was when what is there will not do."""
    if args.tls_cert is not None:
        _reload_tls(srv, args.tls_cert, args.tls_key)
    if args.voices is not None:
        task = asyncio.get_running_loop().create_task(srv.reload_voices())
        _background.add(task)  # (a task nobody holds may be collected before it ends)
        task.add_done_callback(_background.discard)


_background: set = set()


def _reload_tls(srv, cert: str, key: str | None) -> None:
    """SIGHUP with --tls-cert: a renewed certificate (and key) from the same paths, for the
    handshakes from now on; a file that will not do is logged and the certificate in use kept."""
    from .transport import tls

    try:
        tls.reload(srv.ssl_context, cert, key)
    except (ValueError, OSError) as e:
        log_tls.error("SIGHUP: kept the TLS certificate in use: %s", e)
        return
    log_tls.info("SIGHUP: reloaded the TLS certificate from %s%s", cert, f" and its key from {key}" if key else "")
    _note_expiry(srv, cert)


def _note_expiry(srv, cert: str) -> None:
    """Log when the served certificate expires (a WARNING within tls.WARN_DAYS), and put it on /metrics."""
    from .transport import tls

    try:
        srv.tls_not_after, line, warn = tls.expiry_note(cert)
    except (ValueError, OSError) as e:  # (it loaded, so this is only the expiry's reading)
        srv.tls_not_after = None
        log_tls.warning("cannot tell when the TLS certificate expires: %s", e)
        return
    log_tls.log(logging.WARNING if warn else logging.INFO, "%s", line)


def _query(ws) -> str:
    """The query string of a WebSocket's request URL."""
    return ws.request.path.partition("?")[2] if ws.request is not None else ""


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
    check_speed(args.speed)
    check_url(args.url)
    if args.tokens_per_s is not None:
        if not 0 < args.tokens_per_s <= 10_000:
            raise ValueError(f"--tokens-per-s must be a rate in (0, 10000] words a second, got {args.tokens_per_s}")
        if args.url.startswith(("http://", "https://")):
            raise ValueError("--tokens-per-s types text out on a WebSocket text stream: give a ws://.../ws/generate "
                             "--url (the HTTP endpoint takes each text whole)")
    if not 0 < args.ttfa_threshold_ms < math.inf:
        raise ValueError(f"--ttfa-threshold-ms must be a number of milliseconds > 0, got {args.ttfa_threshold_ms}")
    ssl_context = client_tls(args.cafile)
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
    rate = "" if args.speed == 1 else f", speed {args.speed:g}"
    print(f"bench: {args.url}, levels {levels}, {args.requests} requests each, {args.format}{rate}{typed}",
          file=sys.stderr)
    out = run_bench(args.url, concurrency=levels, requests=args.requests, texts=texts, fmt=args.format,
                    chunk_ms=args.chunk_ms, out_dir=args.out, ttfa_threshold_ms=args.ttfa_threshold_ms,
                    token=args.token or os.environ.get(AUTH_ENV), voice=args.voice, tokens_per_s=args.tokens_per_s,
                    ssl_context=ssl_context, speed=args.speed)
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
