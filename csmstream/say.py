"""`csm-stream say` to a server: one request, or a long text (standard input as it arrives, a
document past the server's --max-text-chars) as back-to-back requests (text_parts.py); the WAV is
written as the audio arrives, with time to first audio, real-time factor and the largest gap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time

from .stdin_text import STDIN, stdin_text_stream

log = logging.getLogger("csmstream.say")
AUTH_ENV = "CSM_AUTH_TOKEN"
PREVIOUS_CHARS = 2000  # previous_text over HTTP: its end is enough (the server looks at its last sentences)
ASK_LIMIT_ABOVE = 200  # a longer text (or standard input): say first asks the server's /healthz what it takes
LIMIT_TIMEOUT_S = 3.0


def say(args) -> int:
    from .transport.client import SesameConnectionError, SesameTTSError
    from .transport.decoder import AudioDecoder
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
                kept += (f"\n  say asks a server's /healthz for its limit before a text of over {ASK_LIMIT_ABOVE} "
                         f"characters, and cuts at --max-request-chars ({args.max_request_chars}) when it does not "
                         "say; this server takes fewer (its serve --max-text-chars)")
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
    if getattr(args, "speed", 1) != 1:  # (demo's have no speed either)
        opts["speed"] = args.speed
    token = args.token or os.environ.get(AUTH_ENV)
    conn = dict(token=token, ssl_context=getattr(args, "ssl_context", None))  # (--cafile's; demo has none)
    http = args.url.startswith(("http://", "https://"))  # the OpenAI-compatible HTTP port
    limit = args.max_request_chars
    if args.text == STDIN or len(args.text) > ASK_LIMIT_ABOVE:  # (a short text fits any server)
        limit = min(limit, await _server_limit(args.url, conn) or limit)
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


async def _server_limit(url: str, conn: dict) -> int | None:
    """The characters the server takes a request (max_text_chars on its /healthz, on the URL's host
    and port), or None when it does not say (an older server, a proxy that routes only the
    endpoint): say then cuts at --max-request-chars."""
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    health = f"{'https' if parts.scheme in ('wss', 'https') else 'http'}://{parts.netloc}/healthz"
    try:
        async with httpx.AsyncClient(timeout=LIMIT_TIMEOUT_S, verify=conn.get("ssl_context") or True) as client:
            n = (await client.get(health)).json().get("max_text_chars")
    except (httpx.HTTPError, ValueError, AttributeError) as e:  # (not JSON, or not an object)
        log.debug("say: %s did not give the server's limit (%s); cutting at --max-request-chars", health, e)
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    log.debug("say: the server takes %d characters a request", n)
    return n


async def _one(text: str):
    yield text


async def _in_parts(parts, args, opts: dict, conn: dict, http: bool):
    """The audio of `parts`, one request each, in turn on one connection: part k with seed + the
    sentences before it, and what is left of max_audio_ms."""
    from .transport import protocol
    from .transport.client import SesameWebSocketService, stream_speech_http

    per_ms = protocol.byte_rate(args.format) / 1000
    seed, budget, heard = opts.get("seed"), opts.get("max_audio_ms"), 0
    before = ""  # (over HTTP: the text of the parts before, as previous_text)
    svc = None if http else SesameWebSocketService(args.url, **conn)
    async with svc or contextlib.nullcontext():  # (a WebSocket: one kept connection for all the parts)
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
                if not http:  # its first sentences hear the last ones of the part before (one voice throughout)
                    o["continue_previous"] = True
            if http:  # previous_text ("" at first, so the server remembers it): the same voice throughout
                text = "".join([piece async for piece in part])
                source = stream_speech_http(args.url, text, args.speaker, **conn, **o,
                                            previous_text=before[-PREVIOUS_CHARS:])
                before = f"{before} {text}"[-PREVIOUS_CHARS:]  # (a space: a part's last sentence stays one)
            else:
                source = svc.stream_text(part, args.speaker, **o)
            async for chunk in source:
                heard += len(chunk)
                yield chunk
