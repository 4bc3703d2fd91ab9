"""The csm-stream command line: `csm-stream serve|say|demo ...` (also `python -m csmstream`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import __version__, logs
from .commands import TINY_NOTE
from .stdin_text import STDIN, read_stdin_text, stdin_pieces
from .transport.protocol import FORMATS

SAY_FORMATS = list(FORMATS)  # the raw formats (pcm_*, ulaw_8000, alaw_8000, g722_16000)

DEMO_TEXT = "Hello! This is csm-stream, streaming speech one frame at a time."
GPU_ENV = """GPU settings (environment):
  CSM_CUDA_GRAPHS=0    run the frame step and the prefill eagerly (same audio, slower)
  CSM_FAST_STEP=0      skip the Triton step; plain eager PyTorch (slowest)
  CSM_FUSED_GEMV=auto  auto | on | off: five-kernel layers for batches <= 16 (auto keeps what
                       replays faster at start-up)
  CSM_PDL=auto         auto | on | off: run those kernels as programmatic dependent launches on
                       Hopper (auto keeps it if faster and its codes match the plain step's)
  CSM_GEMV_TILES=FILE  tiles measured by bench/gemv_sweep.py (its --json) for those kernels;
                       unset: the built-in table for this GPU model if there is one (the
                       H200's), else guessed; =guess: always guessed"""

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="'tiny' (embedded, no download), a transformers-format CSM checkpoint directory, "
                        "or a hub id such as sesame/csm-1b (default: tiny)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto = "
                                                   "bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="on CUDA, run the frame step eagerly instead of replaying one CUDA graph per batch "
                        "bucket (same audio, slower; for debugging; env CSM_CUDA_GRAPHS=0 does the same)")
    p.add_argument("--quantize", default="none", choices=["none", "int8-depth"],
                   help="int8-depth: weight-only int8 for the depth decoder, half the bytes a small-batch GPU "
                        "frame reads (faster on GPU; the weights are rounded, so check the voice; "
                        "default: none)")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speaker", type=int, default=0, help="speaker id (default: 0)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature > 0 (default: 0.9)")
    p.add_argument("--topk", type=int, default=50, help="top-k sampling; 1 is greedy (default: 50)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible output")
    p.add_argument("--max-frames", type=int, default=None,
                   help="cap on 80 ms frames (default: scales with the text length)")


def _cafile_arg(p: argparse.ArgumentParser) -> None:
    """--cafile, for the commands that connect to a server (say, bench)."""
    p.add_argument("--cafile", default=None, metavar="PEM",
                   help="trust the CA certificate(s) in this PEM file for a wss:// or https:// --url (a server "
                        "with a private CA's certificate; default: the system's, or $SSL_CERT_FILE)")


def _log_args(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    """-v and --log-format, before the command or after it (a command's copy sets them only when given)."""
    d = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging", **d)
    p.add_argument("--log-format", choices=logs.FORMATS, **(d or {"default": os.environ.get(logs.ENV) or "text"}),
                   help=f"text: readable lines; json: one JSON object a line (time, level, logger, message, "
                        f"request_id, ...) for a log collector (default: ${logs.ENV} or text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csm-stream",
        description="Real-time streaming text-to-speech for Sesame's CSM-1B: a WebSocket server that "
                    "streams audio frame by frame, a client, and a demo.",
        epilog="Run 'csm-stream COMMAND --help' for a command's options. Quick start: "
               "'csm-stream serve' in one terminal, 'csm-stream say \"Hello\"' in another.")
    parser.add_argument("--version", action="version", version=f"csm-stream {__version__}")
    _log_args(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the streaming server (/ws/generate, /healthz, /metrics)",
                           description="Load the model, warm it up, and serve WebSocket clients on /ws/generate\n"
                                       "and on ElevenLabs' URLs (/v1/text-to-speech/VOICE/stream-input and\n"
                                       ".../multi-stream-input); with --http-port, also OpenAI's POST\n"
                                       "/v1/audio/speech and ElevenLabs' REST speech. /healthz answers 503\n"
                                       "until the model is ready, then 200; /metrics gives Prometheus text.\n"
                                       "Stop with Ctrl-C or SIGTERM.",
                           epilog=GPU_ENV, formatter_class=argparse.RawDescriptionHelpFormatter)
    _log_args(serve)
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; "
                                                          "0.0.0.0 for all interfaces)")
    serve.add_argument("--port", type=int, default=8765, help="TCP port (default: 8765; 0 picks a free one)")
    serve.add_argument("--http-port", type=int, default=None, metavar="PORT",
                       help="also serve plain HTTP on PORT: the OpenAI-compatible POST /v1/audio/speech "
                            "(streams audio as it is generated: wav, pcm, mp3, opus, aac, flac, ulaw_8000, ...; or "
                            "SSE), ElevenLabs' POST /v1/text-to-speech/VOICE[/stream][/with-timestamps], /healthz, "
                            "/metrics, /voices, and the model and voice lists of both APIs (GET /v1/models, "
                            "/v1/voices) (default: off; 0 picks a free port)")
    serve.add_argument("--max-streams", type=int, default=None,
                       help="concurrent generations (batch slots; default: 4 on CPU, 64 on GPU)")
    serve.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                       help="prompt positions prefilled at a time between two frame steps, so a long "
                            "prompt (voice, context) never holds up the calls already playing (default: 512)")
    serve.add_argument("--engine-stall-timeout", type=float, default=None, metavar="SECONDS",
                       help="a frame step that runs this long means the engine is stuck (a GPU that stopped "
                            "answering, a deadlock): its requests end with an error, /healthz and /livez answer "
                            "503 and a restart is due (default: 120 on GPU, 300 on CPU; 0 turns the watch off)")
    serve.add_argument("--max-text-chars", type=int, default=5000,
                       help="longest text accepted per request (default: 5000)")
    serve.add_argument("--tls-cert", default=None, metavar="PEM",
                       help="serve TLS on both ports (wss://, https://) with this PEM certificate chain (the "
                            "server's certificate first); e.g. for a Telnyx stream_url with no proxy in front. "
                            "SIGHUP loads it (and --tls-key) again: a renewed certificate, no restart "
                            "(default: plain ws://, http://; TLS left to a proxy such as deploy/nginx.conf)")
    serve.add_argument("--tls-key", default=None, metavar="PEM",
                       help="the certificate's unencrypted PEM private key (default: inside the --tls-cert file)")
    serve.add_argument("--auth-token", default=None,
                       help="require 'Authorization: Bearer TOKEN' on every endpoint but /healthz and /livez; "
                            "a browser's WebSocket sends it as subprotocols 'bearer', TOKEN "
                            "(default: $CSM_AUTH_TOKEN; unset = open)")
    serve.add_argument("--allowed-origins", default=None, metavar="URL,URL",
                       help="browser Origins allowed to connect; the HTTP port answers them with CORS "
                            "headers, so their pages can call it (default: any may open a WebSocket, none may "
                            "read the HTTP port)")
    serve.add_argument("--max-connections-per-ip", type=int, default=64,
                       help="open WebSockets per client address (default: 64)")
    serve.add_argument("--max-requests-per-minute", type=int, default=600,
                       help="requests per connection per minute (default: 600)")
    serve.add_argument("--trusted-proxies", default=None, metavar="ADDR,NET",
                       help="load balancers in front (addresses or CIDR networks, e.g. 127.0.0.1,10.0.0.0/8) "
                            "whose X-Forwarded-For names the client: per-client limits, ElevenLabs' previous_text "
                            "memory and logs then go by that client, not by the proxy every connection comes "
                            "from; nobody else's X-Forwarded-For is believed (default: $CSM_TRUSTED_PROXIES; "
                            "unset = none)")
    serve.add_argument("--ws-compression", choices=["off", "deflate"], default="off",
                       help="accept permessage-deflate when a WebSocket client offers it: fewer bytes for "
                            "base64-in-JSON clients (ElevenLabs, Telnyx), at a zlib pass per message on the "
                            "event loop; audio hardly compresses (default: off)")
    serve.add_argument("--elevenlabs-continue-previous", action="store_true",
                       help="ElevenLabs multi-stream-input sockets: each new context hears the last sentences "
                            "generated on its socket as context (/ws/generate's continue_previous), so a voice "
                            "agent's turns keep one voice; a socket's ?continue_previous=false turns it off "
                            "(default: off, each context starts afresh)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="on SIGTERM/SIGINT, seconds to let running requests finish (default: 10)")
    serve.add_argument("--voices", default=None, metavar="DIR",
                       help="named voices: NAME.wav + NAME.txt pairs, encoded at start-up and again on SIGHUP "
                            "(voices added, changed or removed there, no restart); requests pick one with "
                            "\"voice\": \"NAME\"; GET /voices lists them")
    serve.add_argument("--default-voice", default=None, metavar="NAME",
                       help="the voice (one of --voices) of every /ws/generate and OpenAI request that names "
                            "none, so every caller hears one voice (default: none, such a request has no voice "
                            "prompt and CSM picks a voice anew)")
    serve.add_argument("--voice-alias", action="append", default=None, metavar="ALIAS=NAME",
                       help="let clients name a voice of --voices by a name they already send: OpenAI's "
                            "(alloy=ada) or an ElevenLabs voice id; repeat it or join pairs with commas "
                            "(alloy=ada,nova=ben); GET /voices lists them")
    serve.add_argument("--telnyx", action="store_true",
                       help="also serve /telnyx for Telnyx media streams; /ws/generate requests with "
                            "\"call_control_id\" then play into that call (in-process, lowest latency)")
    serve.add_argument("--telnyx-codec", default="PCMU", choices=["PCMU", "PCMA", "G722", "L16"],
                       help="the calls' stream_bidirectional_codec, as in streaming_start: PCMU/PCMA (G.711, "
                            "8 kHz), G722 (wideband 16 kHz at the same 64 kbit/s), L16 (uncompressed). Default "
                            "PCMU; a call whose stream_url ends ?codec=G722 (&sampling_rate=...) gets that one")
    serve.add_argument("--telnyx-sampling-rate", type=int, default=None, metavar="HZ",
                       help="stream_bidirectional_sampling_rate: 8000 for PCMU/PCMA, 16000 for G722, "
                            "8000/16000/22050/24000/48000 for L16 (default: the codec's own; 16000 for L16)")
    serve.add_argument("--telnyx-l16-byteorder", default="big", choices=["big", "little"],
                       help="L16's byte order; Telnyx does not document it, RTP's is big-endian (default)")
    serve.add_argument("--telnyx-auth-token", default=None,
                       help="require this x-telnyx-streaming-auth-token on /telnyx handshakes "
                            "(default: $CSM_TELNYX_AUTH_TOKEN; unset = no check)")

    say = sub.add_parser("say", help="stream TEXT from a running server into a WAV, with latency figures",
                         description="Send one request to a csm-stream server, write the audio to a WAV "
                                     "as it arrives, and print time to first audio, total time, "
                                     "real-time factor and the largest gap between chunks. With --local, "
                                     "generate in this process instead (no server).")
    _log_args(say)
    say.add_argument("text", help="what to say; - reads it from standard input: over a ws:// URL or with --local "
                                  "it is spoken as it arrives (pipe an LLM in); to an http:// URL it is read whole "
                                  "first")
    say.add_argument("--url", default="ws://127.0.0.1:8765/ws/generate",
                     help="server endpoint (default: ws://127.0.0.1:8765/ws/generate); an http:// URL such as "
                          "http://127.0.0.1:8766/v1/audio/speech uses the OpenAI-compatible HTTP port")
    say.add_argument("-o", "--out", default="out/say.wav", help="output WAV path (default: out/say.wav)")
    say.add_argument("--format", default="pcm_24000", choices=SAY_FORMATS,
                     help="audio format to request (default: pcm_24000); ulaw/alaw/g722 are decoded into the "
                          "WAV at their rate: what a phone hears. With --local, the same encoding is applied "
                          "in-process")
    say.add_argument("--chunk-ms", type=int, default=100, help="chunk length, 20..1000 ms (default: 100)")
    say.add_argument("--speed", type=float, default=1.0,
                     help="speaking rate, 0.25..4 with the pitch kept: 1.2 is 20%% faster (default: 1, CSM's own)")
    say.add_argument("--local", action="store_true",
                     help="generate in-process with --model (no server), sentence by sentence as a server speaks "
                          "a text: the same audio for the same --seed")
    say.add_argument("--token", default=None, help="server auth token (default: $CSM_AUTH_TOKEN)")
    _cafile_arg(say)
    say.add_argument("--max-request-chars", type=int, default=5000, metavar="N",
                     help="the characters the server takes a request (its serve --max-text-chars, which say "
                          "learns from its /healthz when it says; default: 5000): a longer text, or standard "
                          "input past that, goes as back-to-back requests cut at sentence ends")
    say.add_argument("--voice", default=None, metavar="NAME",
                     help="a named voice: one of the server's (serve --voices; GET /voices on its HTTP port "
                          "lists them), or with --local one of --voices DIR (default: none)")
    say.add_argument("--voices", default=None, metavar="DIR",
                     help="with --local: NAME.wav + NAME.txt voice prompts, as for serve --voices")
    _model_args(say)
    _gen_args(say)

    bench = sub.add_parser("bench", help="measure a running server like callers would (TTFA, gaps, underruns)",
                           description="Drive a running server with N concurrent simulated callers, each playing "
                                       "its audio in real time. Prints p50/p95/p99/max tables, writes results.json, "
                                       "results.csv and PNG plots to --out, and reports the REST-style baseline "
                                       "(play only after the whole utterance arrived) from the same run.")
    _log_args(bench)
    bench.add_argument("--url", default="ws://127.0.0.1:8765/ws/generate",
                       help="server endpoint: ws://HOST:PORT/ws/generate (default: ws://127.0.0.1:8765/ws/generate), "
                            "or http://HOST:HTTP_PORT/v1/audio/speech for the OpenAI-compatible port")
    _cafile_arg(bench)
    bench.add_argument("--concurrency", type=int, default=4, help="concurrent callers (default: 4)")
    bench.add_argument("--sweep", default=None, metavar="N,N,...",
                       help="run these concurrency levels in turn (e.g. 1,2,4,8,16) and report the highest with "
                            "no underruns and p95 TTFA under --ttfa-threshold-ms")
    bench.add_argument("--requests", type=int, default=16, help="requests per level (default: 16)")
    bench.add_argument("--text-file", default=None, help="one text per line (default: built-in call-centre lines)")
    bench.add_argument("--format", default="pcm_24000", choices=["pcm_24000", "pcm_16000", "pcm_8000", "ulaw_8000",
                                                                "alaw_8000", "g722_16000"],
                       help="audio format (default: pcm_24000)")
    bench.add_argument("--chunk-ms", type=int, default=100, help="chunk length in ms (default: 100)")
    bench.add_argument("--ttfa-threshold-ms", type=float, default=500.0, help="p95 TTFA bound for --sweep (500)")
    bench.add_argument("--out", default="out/bench", help="output directory (default: out/bench)")
    bench.add_argument("--token", default=None, help="server auth token (default: $CSM_AUTH_TOKEN)")
    bench.add_argument("--tokens-per-s", type=float, default=None, metavar="N",
                       help="type each text out word by word at N words a second on a text stream, as an LLM "
                            "writes it; times count from its first word (default: each text sent whole)")
    bench.add_argument("--voice", default=None, metavar="NAME",
                       help="a named voice of the server's (serve --voices) for every request: times first audio "
                            "with a voice prompt (default: none)")
    bench.add_argument("--speed", type=float, default=1.0,
                       help="speaking rate of every request, 0.25..4 with the pitch kept (the server stretches the "
                            "audio: times first audio and capacity at the rate callers hear; default: 1)")

    demo = sub.add_parser("demo", help="start a server on the tiny model, stream a sentence, stop",
                          description="The end-to-end check: start 'csm-stream serve' in the background, "
                                      "wait for /healthz, stream a sentence with 'say', write the WAV, "
                                      "print the figures, and stop the server cleanly.")
    _log_args(demo)
    demo.add_argument("-o", "--out", default="out/demo.wav", help="output WAV path (default: out/demo.wav)")
    demo.add_argument("--text", default=DEMO_TEXT, help="sentence to speak")
    demo.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    _model_args(demo)
    _gen_args(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(logs.check_format(args.log_format), args.verbose)
    except ValueError as e:  # a bad $CSM_LOG_FORMAT (the flag's choices are checked by argparse)
        parser.error(str(e))
    if args.command is None:
        parser.print_help()
        return 2
    from . import commands

    try:
        if args.command == "serve":
            return commands.serve(args)
        if args.command == "demo":
            return commands.demo(args)
        if args.command == "bench":
            return commands.bench(args)
        commands.check_chunk_ms(args.chunk_ms)  # (before loading a model or connecting)
        commands.check_speed(args.speed)
        if not args.local:
            commands.check_url(args.url)
            if args.max_request_chars < 1:
                raise ValueError(f"--max-request-chars must be >= 1, got {args.max_request_chars}")
            args.ssl_context = commands.client_tls(args.cafile)
        elif args.cafile is not None:
            raise ValueError("--cafile is for a server's wss:// or https:// --url; --local makes the audio here")
        if args.voices is not None and not args.local:
            raise ValueError("--voices DIR is for --local; a server has its own (serve --voices): give --voice NAME")
        if args.local and args.voice is not None and args.voices is None:
            raise ValueError("--voice with --local needs --voices DIR (the NAME.wav + NAME.txt prompts to load)")
        if args.text == STDIN and args.local:  # spoken as it arrives; its first text before the model loads
            args.text = stdin_pieces()
        elif args.text == STDIN and args.url.startswith(("http://", "https://")):
            args.text = read_stdin_text()
        return _speak(args) if args.local else commands.say(args)
    except ValueError as e:  # bad arguments, bad checkpoints: one clear line, no traceback
        logs.notice(f"csm-stream: error: {e}", logging.ERROR)
        return 2
    except KeyboardInterrupt:
        return 130


def _speak(args) -> int:
    from pathlib import Path

    from . import GenerationError, Streamer, load
    from .wav import WavWriter

    if args.voices is not None and not Path(args.voices).is_dir():  # (before the model loads)
        raise ValueError(f"voices directory {args.voices!r} does not exist")
    if args.model == "tiny":
        print(TINY_NOTE, file=sys.stderr)
    rate, enc = 24_000, None
    if args.format != "pcm_24000" or args.speed != 1:  # what a client of that format (or speed) hears
        from .transport.decoder import AudioDecoder
        from .transport.encoder import encoder_for

        enc, dec = encoder_for(args.format, 100, args.speed), AudioDecoder(args.format)
        rate = dec.rate

    def heard(pieces):  # the encoder's output decoded as such a client does
        return [dec.decode(b) for b in pieces]

    def finish(wav) -> None:  # the encoder's last (short) chunk
        for piece in [] if enc is None else heard(enc.finish()):
            wav.write(piece)
    # (a path that cannot be written fails before the model loads; if nothing is made, an earlier file there stays)
    with WavWriter(args.out, rate, keep_empty=False) as wav:
        t0 = time.perf_counter()
        engine = load(args.model, device=args.device, dtype=args.dtype, max_streams=1,
                      cuda_graphs=args.cuda_graphs, quantize=args.quantize)
        print(f"loaded {engine} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        context = () if args.voice is None else (_local_voice(args, engine),)
        start, tty = time.perf_counter(), sys.stderr.isatty()
        ttfa, frames = None, 0
        opts = dict(context=context, temperature=args.temperature, topk=args.topk, seed=args.seed,
                    max_frames=args.max_frames)
        with Streamer(engine) as tts:  # sentence by sentence, as the server speaks a text
            stream = (tts.stream(args.text, args.speaker, sentences=True, **opts) if isinstance(args.text, str)
                      else tts.stream_text(args.text, args.speaker, **opts))  # (say -: as it arrives)
            try:
                for pcm in stream:
                    if ttfa is None:
                        ttfa = time.perf_counter() - start
                    for piece in [pcm] if enc is None else heard(enc.feed(pcm)):
                        wav.write(piece)
                    frames += len(pcm) // engine.samples_per_frame
                    audio_s = frames * engine.samples_per_frame / engine.sample_rate
                    if tty:  # a live progress line only on a terminal
                        print(f"\r  {frames:4d} frames  {audio_s:6.2f} s audio  "
                              f"rtf {(time.perf_counter() - start) / audio_s:5.2f}", end="", file=sys.stderr,
                              flush=True)
            except KeyboardInterrupt:
                print(f"\ncsm-stream: interrupted; kept the {wav.seconds:.2f} s made so far in {args.out}",
                      file=sys.stderr)
                return 130
            except (GenerationError, ValueError, OSError) as e:  # a later sentence refused, stdin gone bad
                finish(wav)
                kept = f"; kept the {wav.seconds:.2f} s made before it in {args.out}" if wav.samples else ""
                print(f"\ncsm-stream: error: {e}{kept}", file=sys.stderr)
                return 1
        finish(wav)
    wall = time.perf_counter() - start
    if tty:
        print(file=sys.stderr)
    if wav.samples == 0:
        print(f"csm-stream: the model ended speech before the first frame; {args.out} was not written",
              file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {wav.seconds:.2f} s of audio in {wall:.2f} s "
          f"(first audio after {1000 * ttfa:.0f} ms, real-time factor {wall / wav.seconds:.2f})")
    return 0


def _local_voice(args, engine):
    """--voice NAME of --voices DIR, as the context turn a server would give it."""
    from . import Segment
    from .engine.voices import load_voices

    voices = load_voices(args.voices, engine)
    if args.voice not in voices:
        raise ValueError(f"unknown voice {args.voice!r}; {args.voices} has: {', '.join(sorted(voices))}")
    v = voices[args.voice]
    return Segment(args.speaker, v.text, codes=v.codes)
