import signal
import subprocess
import sys
import wave

import httpx
import numpy as np
import pytest

from csmstream.commands import free_port, wait_healthy


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "csmstream", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("serve", "say", "demo"):
        assert cmd in out.stdout
    serve = run("serve", "--help")
    for opt in ("--model", "--host", "--port", "--device", "--dtype", "--max-streams", "--prefill-chunk",
                "--quantize", "--http-port", "--telnyx-codec", "--telnyx-sampling-rate", "--telnyx-l16-byteorder"):
        assert opt in serve.stdout
    for env in ("CSM_CUDA_GRAPHS=0", "CSM_FAST_STEP=0", "CSM_FUSED_GEMV=auto", "CSM_PDL=auto", "CSM_GEMV_TILES=FILE"):
        assert env in serve.stdout  # the GPU settings that are environment variables


def test_say_local_writes_a_playable_wav(tmp_path):
    path = tmp_path / "hello.wav"
    out = run("say", "Hello there.", "--local", "--out", str(path), "--device", "cpu", "--seed", "3",
              "--max-frames", "6")
    assert out.returncode == 0, out.stderr
    assert "noise-like" in out.stderr  # the tiny model says what it is
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() > 0 and w.getnframes() % 1920 == 0


def test_say_local_writes_what_a_g722_phone_hears(tmp_path):
    """--format g722_16000 --local: the WAV is the engine's audio at 16 kHz through G.722 and back,
    sample for sample what FFmpeg's codec makes of it."""
    import numpy as np

    import csmstream
    from csmstream.kernels.resample import Resampler
    from csmstream.wav import read_wav
    from tests import ffmpeg

    path = tmp_path / "hd.wav"
    out = run("say", "Hello there.", "--local", "--format", "g722_16000", "--out", str(path), "--device", "cpu",
              "--seed", "3", "--max-frames", "6")
    assert out.returncode == 0, out.stderr
    got, rate = read_wav(path)
    src = np.concatenate(list(csmstream.load("tiny", device="cpu", max_streams=1).stream("Hello there.", 0, seed=3,
                                                                                          max_frames=6)))
    r = Resampler(24000, 16000)
    res = np.concatenate([r.process(src), r.flush()])
    res = np.concatenate([res, np.zeros(len(res) % 2, np.int16)])  # an odd last sample is completed with a zero
    assert rate == 16000
    np.testing.assert_array_equal(got, ffmpeg.g722_decode(ffmpeg.g722_encode(res)))
    bad = run("say", "Hi.", "--local", "--format", "mp3_44100_128")  # a WAV holds the raw formats
    assert bad.returncode == 2 and "invalid choice: 'mp3_44100_128'" in bad.stderr and "g722_16000" in bad.stderr


def test_say_local_with_an_int8_depth_decoder(tmp_path):
    path = tmp_path / "q.wav"
    out = run("say", "Hi.", "--local", "--out", str(path), "--device", "cpu", "--max-frames", "3",
              "--quantize", "int8-depth")
    assert out.returncode == 0, out.stderr
    assert "quantize=int8-depth" in out.stderr and path.stat().st_size > 44
    bad = run("say", "Hi.", "--local", "--quantize", "int4")
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr and "int8-depth" in bad.stderr


def test_bad_argument_is_one_clear_line():
    out = run("say", "hi", "--local", "--topk", "0", "--device", "cpu")
    assert out.returncode == 2
    assert "error: topk must be an integer" in out.stderr and "Traceback" not in out.stderr


def test_bad_prefill_chunk_is_refused_before_loading():
    out = run("serve", "--prefill-chunk", "0", "--device", "cpu", "--port", "0")
    assert out.returncode == 2
    assert "--prefill-chunk must be >= 1" in out.stderr and "Traceback" not in out.stderr


def test_a_missing_voices_directory_and_a_bad_chunk_are_refused_before_loading_or_connecting(tmp_path):
    out = run("serve", "--voices", str(tmp_path / "nope"), "--device", "cpu", "--port", "0")
    assert out.returncode == 2 and f"--voices {str(tmp_path / 'nope')!r}: no such directory" in out.stderr
    assert "loaded" not in out.stderr and "ready" not in out.stderr
    for where in (["--url", f"ws://127.0.0.1:{free_port()}/ws/generate"], ["--local", "--device", "cpu"]):
        out = run("say", "hi", "--chunk-ms", "5", *where)
        assert out.returncode == 2 and "--chunk-ms must be in 20..1000, got 5" in out.stderr
        assert "cannot connect" not in out.stderr and "loaded" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout must be a number of seconds >= 0, got -1.0"),
    (["serve", "--shutdown-timeout", "nan"], "--shutdown-timeout must be a number of seconds >= 0, got nan"),
    (["serve", "--max-connections-per-ip", "0"], "--max-connections-per-ip must be >= 1, got 0"),
    (["serve", "--max-requests-per-minute", "0"], "--max-requests-per-minute must be >= 1, got 0"),
    (["serve", "--trusted-proxies", "127.0.0.1,nginx"], "trusted proxy 'nginx' is not an IP address or network"),
    (["serve", "--dtype", "int4"], "dtype 'int4' is not supported; allowed: 'auto', 'float32', 'bfloat16'"),
    (["serve", "--max-streams", "0"], "max_streams must be an integer in 1..1024, got 0"),
    (["serve", "--device", "tpu"], "device 'tpu' is not supported; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"),
    (["serve", "--model", "FILE"], "is a file; pass the checkpoint directory that holds it"),
    (["serve", "--model", "no/such/dir"], "'no/such/dir': no such directory, and not a hub id"),
    (["bench", "--chunk-ms", "5"], "--chunk-ms must be in 20..1000, got 5"),
    (["bench", "--ttfa-threshold-ms", "-5"], "--ttfa-threshold-ms must be a number of milliseconds > 0, got -5.0"),
    (["bench", "--out", "FILE"], "cannot be the results' folder: a file has that name"),
    (["bench", "--url", "ftp://host/x"], "--url must be ws[s]://HOST:PORT/ws/generate or http[s]://"),
    (["bench", "--url", "ws://host:99999/ws/generate"], "is not a valid URL: Port out of range"),
    (["serve", "--tls-cert", "FILE"], "not a PEM certificate chain with its PEM private key"),
    (["serve", "--tls-cert", "no/cert.pem"], "--tls-cert 'no/cert.pem': no such file"),
    (["serve", "--tls-key", "FILE"], "--tls-key needs --tls-cert (the certificate it belongs to)"),
    (["say", "hi", "--cafile", "no/ca.pem"], "--cafile 'no/ca.pem': no such file"),
    (["say", "hi", "--speed", "5"], "--speed must be a number in 0.25..4 (1 is CSM's own rate), got 5.0"),
    (["say", "hi", "--local", "--speed", "nan"], "--speed must be a number in 0.25..4 (1 is CSM's own rate), got nan"),
    (["say", "hi", "--cafile", "FILE"], "no PEM certificate in it"),
    (["say", "hi", "--local", "--cafile", "FILE"], "--cafile is for a server's wss:// or https:// --url"),
    (["bench", "--cafile", "FILE"], "no PEM certificate in it"),
    (["serve", "--default-voice", "ada"], "--default-voice needs --voices DIR"),
    (["serve", "--voice-alias", "alloy=ada"], "--voice-alias alloy=ada needs --voices DIR"),
    (["serve", "--voices", "VOICES", "--default-voice", "carl"], "has no voice 'carl' (its voices: ada)"),
    (["serve", "--voices", "VOICES", "--voice-alias", "alloy=carl"], "--voice-alias alloy=carl: "),
    (["serve", "--voices", "VOICES", "--voice-alias", "alloy"], "voice alias 'alloy': write ALIAS=VOICE"),
    (["serve", "--voices", "VOICES", "--voice-alias", "alloy=ada, alloy=ben"], "'alloy' is given twice"),
    (["serve", "--voices", "VOICES", "--voice-alias", "ada=ada"], "'ada' is already a voice's own name"),
])
def test_bad_serve_say_and_bench_options_are_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    """Each was accepted: a server that could never be stopped gently or refused every client, or a
    bench that ran every request to fail at the server, or failed with a traceback after the run."""
    from csmstream import benchtool, cli, commands
    from csmstream.transport import server

    def reached(*args, **kwargs):
        raise AssertionError(f"{argv} was accepted")

    monkeypatch.setattr(server, "StreamServer", reached)
    monkeypatch.setattr(benchtool, "run_bench", reached)
    monkeypatch.setattr(cli, "_speak", reached)
    monkeypatch.setattr(commands, "say", reached)
    (tmp_path / "FILE").write_text("")
    (tmp_path / "VOICES").mkdir()
    (tmp_path / "VOICES" / "ada.wav").write_bytes(b"")  # (its name is all that is read before the model loads)
    argv = [str(tmp_path / a) if a in ("FILE", "VOICES") else a for a in argv]
    assert cli.main(argv + (["--device", "cpu"] if argv[0] == "serve" and "--device" not in argv else [])) == 2
    assert message in capsys.readouterr().err


def test_bad_http_port_is_refused_before_loading():
    out = run("serve", "--http-port", "70000", "--device", "cpu")
    assert out.returncode == 2 and "--http-port must be in 0..65535, got 70000" in out.stderr
    out = run("serve", "--http-port", "9100", "--port", "9100", "--device", "cpu")
    assert out.returncode == 2 and "--http-port must differ from --port" in out.stderr
    assert "Traceback" not in out.stderr
    assert "noise-like" not in out.stderr  # the tiny model's note only once the flags are good: the error stands alone


def test_telnyx_codec_and_rate_are_checked_before_loading():
    out = run("serve", "--telnyx", "--telnyx-codec", "G722", "--telnyx-sampling-rate", "8000", "--device", "cpu")
    assert out.returncode == 2 and "G722 runs at 16000 Hz, got sampling rate 8000" in out.stderr
    out = run("serve", "--telnyx", "--telnyx-codec", "OPUS")
    assert out.returncode == 2 and "invalid choice: 'OPUS'" in out.stderr and "G722" in out.stderr
    out = run("serve", "--ws-compression", "gzip")
    assert out.returncode == 2 and "invalid choice: 'gzip'" in out.stderr and "deflate" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bench_text_file_that_is_not_utf8_is_refused_naming_it(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes("Caf\u00e9 au lait.\n".encode("latin-1"))
    out = run("bench", "--text-file", str(path), "--url", f"ws://127.0.0.1:{free_port()}/ws/generate")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--text-file {str(path)!r} is not UTF-8 text (invalid continuation byte at byte 3)" in out.stderr


def test_say_without_a_server_explains_and_leaves_an_earlier_file_alone(tmp_path):
    from csmstream.wav import write_wav

    write_wav(tmp_path / "x.wav", [np.arange(480, dtype=np.int16)])  # last run's output
    earlier = (tmp_path / "x.wav").read_bytes()
    out = run("say", "hi", "--url", f"ws://127.0.0.1:{free_port()}/ws/generate", "--out", str(tmp_path / "x.wav"))
    assert out.returncode == 1
    assert "cannot connect" in out.stderr and "csm-stream serve" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "x.wav").read_bytes() == earlier  # (it was emptied to a 44-byte header)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]
    for url in ("127.0.0.1:8765", "tcp://127.0.0.1:8765/ws/generate"):  # (a scheme left out or wrong)
        out = run("say", "hi", "--url", url, "--out", str(tmp_path / "y.wav"))
        assert out.returncode == 2 and f"--url must be ws[s]://HOST:PORT/ws/generate or http[s]://HOST:HTTP_PORT" \
            f"/v1/audio/speech, got {url!r}" in out.stderr and "cannot connect" not in out.stderr


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """-o naming a directory: a clear error before connecting, loading a model or starting a server
    (it was a traceback from wave after the whole request, or after a full model load)."""
    where = str(tmp_path)
    for args in (("say", "hi", "--url", f"ws://127.0.0.1:{free_port()}/ws/generate"), ("say", "hi", "--local"),
                 ("demo",)):
        out = run(*args, "--out", where, "--device", "cpu")
        assert out.returncode == 2, (args, out.stderr)
        assert f"cannot write {where!r}: Is a directory" in out.stderr and "Traceback" not in out.stderr
        for work in ("cannot connect", "loaded Engine", "starting the server"):
            assert work not in out.stderr, (args, out.stderr)


def _voice_dir(path):
    """One named voice, "ada": a second of a 16 kHz tone (resampled at load) and its transcript."""
    import numpy as np

    from csmstream.wav import write_wav

    path.mkdir()
    t = np.arange(16000) / 16000
    write_wav(path / "ada.wav", [(8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)], 16000)
    (path / "ada.txt").write_text("A short voice prompt.")
    return path


def test_say_local_speaks_in_a_named_voice(tmp_path):
    """--local --voice NAME --voices DIR: the engine's audio with that voice's turn as context, as a
    server gives it (engine/voices.load_voices, the request's speaker)."""
    import numpy as np

    import csmstream
    from csmstream.engine.voices import load_voices
    from csmstream.wav import read_wav

    voices = _voice_dir(tmp_path / "voices")
    path = tmp_path / "ada.wav"
    out = run("say", "In her voice.", "--local", "--voice", "ada", "--voices", str(voices), "--out", str(path),
              "--device", "cpu", "--seed", "4", "--max-frames", "6", "--speaker", "1")
    assert out.returncode == 0, out.stderr
    eng = csmstream.load("tiny", device="cpu", max_streams=1)
    v = load_voices(voices, eng)["ada"]
    want = np.concatenate(list(eng.stream("In her voice.", 1, context=[csmstream.Segment(1, v.text, codes=v.codes)],
                                          seed=4, max_frames=6)))
    plain = np.concatenate(list(eng.stream("In her voice.", 1, seed=4, max_frames=6)))
    got, rate = read_wav(path)
    assert rate == 24000 and np.array_equal(got, want) and not np.array_equal(got[:len(plain)], plain[:len(got)])
    bad = run("say", "Hi.", "--local", "--voice", "bob", "--voices", str(voices), "--device", "cpu")
    assert bad.returncode == 2 and f"unknown voice 'bob'; {voices} has: ada" in bad.stderr
    for args, message in ((("--local", "--voice", "ada"), "--voice with --local needs --voices DIR"),
                          (("--voices", str(voices)), "--voices DIR is for --local"),
                          (("--local", "--voice", "ada", "--voices", str(tmp_path / "none")),
                           "voices directory")):
        bad = run("say", "Hi.", *args, "--device", "cpu")
        assert bad.returncode == 2 and message in bad.stderr and "loaded Engine" not in bad.stderr, bad.stderr


def test_serve_then_say_over_the_socket_then_clean_stop(tmp_path):
    port = free_port()
    http_port = free_port()
    voices = _voice_dir(tmp_path / "voices")
    proc = subprocess.Popen([sys.executable, "-m", "csmstream", "serve", "--port", str(port), "--device", "cpu",
                             "--http-port", str(http_port), "--ws-compression", "deflate", "--voices", str(voices),
                             "--elevenlabs-continue-previous"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc, timeout=120)
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{port}/ws/generate") as ws:  # --ws-compression deflate reached the server
            assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        assert _elevenlabs_turns_continued(port) == [0, 1]  # --elevenlabs-continue-previous reached the server
        speech = httpx.post(f"http://127.0.0.1:{http_port}/v1/audio/speech", timeout=60,
                            json={"input": "Over plain HTTP.", "response_format": "pcm", "max_audio_ms": 400})
        assert speech.status_code == 200 and len(speech.content) == 400 * 48
        over_http = tmp_path / "http.wav"
        out = run("say", "Over plain HTTP.", "--url", f"http://127.0.0.1:{http_port}/v1/audio/speech", "--out",
                  str(over_http), "--max-frames", "5")
        assert out.returncode == 0 and "first audio after" in out.stdout, out.stderr
        assert "HTTP Request" not in out.stderr  # (httpx's INFO line per request: only with -v)
        with wave.open(str(over_http)) as w:
            assert w.getframerate() == 24000 and w.getnframes() == 400 * 24 == len(speech.content) // 2
        bad = run("say", "Hi.", "--url", f"http://127.0.0.1:{http_port}/v1/audio/speech", "--topk", "0")
        assert bad.returncode == 1 and "server error invalid_topk: topk must be" in bad.stderr
        wrong = run("say", "Hi.", "--url", f"ws://127.0.0.1:{http_port}/ws/generate")  # the HTTP port: a 404
        assert wrong.returncode == 1 and "HTTP 404" in wrong.stderr and "is a server running" not in wrong.stderr
        assert "a server answered but refused the WebSocket: the endpoint is /ws/generate on serve's --port" \
            in wrong.stderr
        path = tmp_path / "say.wav"
        out = run("say", "Over the socket.", "--url", f"ws://127.0.0.1:{port}/ws/generate", "--out", str(path),
                  "--seed", "1", "--max-frames", "10", "--format", "pcm_16000")
        assert out.returncode == 0, out.stderr
        for figure in ("first audio after", "real-time factor", "largest gap"):
            assert figure in out.stdout
        with wave.open(str(path)) as w:
            assert w.getframerate() == 16000 and w.getnframes() >= 800 * 16000 // 1000
        phone = tmp_path / "phone.wav"
        out = run("say", "Over the phone.", "--url", f"ws://127.0.0.1:{port}/ws/generate", "--out", str(phone),
                  "--max-frames", "5", "--format", "ulaw_8000")
        assert out.returncode == 0, out.stderr
        with wave.open(str(phone)) as w:  # mu-law decoded: 16-bit samples at 8 kHz
            assert (w.getframerate(), w.getsampwidth()) == (8000, 2) and w.getnframes() >= 400 * 8
        _say_in_a_voice_and_interrupted(tmp_path, port, voices)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "shutting down" in err and "stopped" in err
    assert f"OpenAI-compatible speech on http://127.0.0.1:{http_port}/v1/audio/speech" in err


def _elevenlabs_turns_continued(port) -> list:
    """Two turns on one ElevenLabs multi-stream-input socket: what each isFinal says it continued."""
    import json

    from websockets.sync.client import connect

    finals = []
    with connect(f"ws://127.0.0.1:{port}/v1/text-to-speech/0/multi-stream-input?output_format=ulaw_8000") as ws:
        for cid in ("one", "two"):
            for msg in ({"text": "A short turn. "}, {"close_context": True}):
                ws.send(json.dumps({**msg, "context_id": cid}))
            while not (reply := json.loads(ws.recv(timeout=60))).get("isFinal"):
                assert "audio" in reply, reply
            finals.append(reply.get("continued"))
    return finals


def _say_in_a_voice_and_interrupted(tmp_path, port, voices):
    """say --voice over the socket gives what --local gives with the same voice files and seed; a
    say stopped by Ctrl-C keeps, as a playable WAV, the audio that had arrived (it used to keep
    nothing: the WAV was written only at the end)."""
    import time

    url = f"ws://127.0.0.1:{port}/ws/generate"
    common = ("--seed", "4", "--max-frames", "6", "--speaker", "1")
    served, local = tmp_path / "served.wav", tmp_path / "local.wav"
    out = run("say", "In her voice.", "--url", url, "--voice", "ada", "--out", str(served), *common)
    assert out.returncode == 0, out.stderr
    out = run("say", "In her voice.", "--local", "--voice", "ada", "--voices", str(voices), "--out", str(local),
              "--device", "cpu", *common)
    assert out.returncode == 0, out.stderr
    assert served.read_bytes() == local.read_bytes()
    bad = run("say", "Hi.", "--url", url, "--voice", "bob")
    assert bad.returncode == 1 and "server error unknown_voice: unknown voice 'bob'; available: ada" in bad.stderr
    cut = tmp_path / "cut.wav"
    # started as a shell in a terminal starts it, with Ctrl-C's SIGINT at its default: a test run started in the
    # background (`make test &`, nohup) ignores SIGINT, a child inherits that, and a Python started so never gets
    # a KeyboardInterrupt (a test that ran an event loop's signal handlers in this worker may have reset it)
    argv = ["csmstream", "say", "A long answer. " * 40, "--url", url, "--out", str(cut), "--max-frames", "1500"]
    proc = subprocess.Popen([sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, "
                             f"signal.default_int_handler); sys.argv = {argv!r}; runpy.run_module('csmstream', "
                             "run_name='__main__')"], stderr=subprocess.PIPE, text=True)
    part = tmp_path / ".cut.wav.part"  # (the audio goes here until the WAV is complete, then takes cut's name)
    deadline = time.monotonic() + 120
    while (not part.exists() or part.stat().st_size < 200_000) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the long request ended before it could be interrupted"
    how = _signal_masks(proc.pid)  # (if it does not stop: whether it ignored or caught the signal)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"say went on for 30 s after SIGINT; before it: {how}, in this test process "
                             f"{signal.getsignal(signal.SIGINT)}") from None
    assert proc.returncode == 130 and "interrupted; kept the" in err and "Traceback" not in err, (err, how)
    with wave.open(str(cut)) as w:  # a whole header: the frames it counts are the bytes that follow it
        n = w.getnframes()
        assert n >= 200_000 // 2 - 100 and 44 + 2 * n == cut.stat().st_size and n < 1500 * 1920
    assert not part.exists()


def _signal_masks(pid: int) -> str:
    """The SigIgn and SigCgt lines of a Linux process's status (bit 2 from the right: SIGINT)."""
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return "(no /proc)"
    return "; ".join(line for line in lines if line.startswith(("SigIgn", "SigCgt")))


def test_demo_runs_server_and_client_end_to_end(tmp_path):
    path = tmp_path / "demo.wav"
    out = run("demo", "--out", str(path), "--device", "cpu", "--seed", "7", "--max-frames", "8")
    assert out.returncode == 0, out.stderr
    assert "first audio after" in out.stdout and "demo: server stopped" in out.stderr
    with wave.open(str(path)) as w:
        assert w.getnframes() == 8 * 1920


def test_bench_prints_no_made_up_ttfa_drift_for_a_level_where_no_request_got_audio(tmp_path, capsys, monkeypatch):
    """It printed 'TTFA p50 first tenth 0 ms -> last tenth 0 ms' for a level whose every request
    failed (an unknown voice): a figure nobody measured."""
    from csmstream import benchtool, cli
    from csmstream.benchtool import CallResult, drift

    failed = [CallResult(index=i, concurrency=2, chars=5, error="unknown_voice: unknown voice 'x'") for i in range(2)]
    summary = {2: {"errors": 2, "drift": drift(failed, 100 * 2**20, 101 * 2**20)}}
    monkeypatch.setattr(benchtool, "run_bench", lambda *a, **k: dict(summary=summary, files=[], results=failed))
    monkeypatch.setattr(benchtool, "table", lambda s: "TABLE")
    assert cli.main(["bench", "--concurrency", "2", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "drift at concurrency 2: server memory 100.0 -> 101.0 MB\n" in out.out and "TTFA" not in out.out
    assert "2 request(s) failed; first: unknown_voice" in out.err


def test_say_dash_speaks_standard_input_as_it_arrives(tmp_path, server):
    """say - over a WebSocket: a program piped in (an LLM) is spoken while it still writes. The
    second half is written only once the server has the first sentence: read whole, it would never
    get there. The WAV holds exactly the audio of that one request's sentences."""
    import time

    path = tmp_path / "piped.wav"
    proc = subprocess.Popen([sys.executable, "-m", "csmstream", "say", "-", "--url", server.url, "--out", str(path),
                             "--seed", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Sure, I can help with that. Your")
        proc.stdin.flush()
        first = None
        deadline = time.monotonic() + 60
        while first is None and time.monotonic() < deadline and proc.poll() is None:
            first = next((r for r in list(server.srv.recent) if r.text == "Sure, I can help with that."), None)
            time.sleep(0.02)
        assert first is not None, "the first sentence never reached the server while standard input was open"
        out, err = proc.communicate(" order shipped on Monday. Caf\u00e9 au lait.\n".encode(), timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"first audio after" in out
    reqs = [r for r in server.srv.recent if r.tag is first.tag]
    assert [r.text for r in reqs] == ["Sure, I can help with that.", "Your order shipped on Monday.",
                                      "Caf\u00e9 au lait."]
    with wave.open(str(path)) as w:
        assert w.getnframes() == sum(r.frames for r in reqs) * 1920


def test_say_dash_local_speaks_standard_input_as_it_arrives(tmp_path):
    """say - --local: the same, in-process. The rest is written only once the first sentence's audio
    is in the WAV being written (its .part file has grown); the WAV is what the Streamer makes of
    the whole text, sentence by sentence, for that seed."""
    import time

    import numpy as np

    import csmstream
    from csmstream.wav import read_wav

    path = tmp_path / "local.wav"
    part = tmp_path / ".local.wav.part"
    proc = subprocess.Popen([sys.executable, "-m", "csmstream", "say", "-", "--local", "--device", "cpu", "--out",
                             str(path), "--seed", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Sure, I can help with that. Your")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size > 44) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        assert part.exists() and part.stat().st_size > 44, "no audio while standard input was open"
        out, err = proc.communicate(b" order shipped on Monday.\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    got, rate = read_wav(path)
    with csmstream.Streamer(csmstream.load("tiny", device="cpu", max_streams=1)) as tts:
        want = np.concatenate(list(tts.stream("Sure, I can help with that. Your order shipped on Monday.", seed=5,
                                              sentences=True)))
    assert rate == 24000 and np.array_equal(got, want)


@pytest.mark.parametrize("data, why", [(b"  \n\t", "standard input held no text to say"),
                                       (b"Caf\xe9 au lait.", "standard input is not UTF-8 text")])
@pytest.mark.parametrize("where", ["ws", "http", "local"])
def test_say_dash_refuses_blank_or_undecodable_input_before_any_work(tmp_path, data, why, where):
    url = {"ws": f"ws://127.0.0.1:{free_port()}/ws/generate", "http": f"http://127.0.0.1:{free_port()}/v1/audio/speech"}
    args = ["--local", "--device", "cpu"] if where == "local" else ["--url", url[where]]
    out = subprocess.run([sys.executable, "-m", "csmstream", "say", "-", *args, "--out", str(tmp_path / "x.wav")],
                         input=data, capture_output=True, timeout=120)
    err = out.stderr.decode()
    assert out.returncode == 2 and f"csm-stream: error: say -: {why}" in err and "Traceback" not in err
    assert "cannot connect" not in err and "loaded Engine" not in err and not (tmp_path / "x.wav").exists()


def test_say_dash_without_a_standard_input_says_so():
    import os

    out = subprocess.run([sys.executable, "-m", "csmstream", "say", "-", "--url",
                          f"ws://127.0.0.1:{free_port()}/ws/generate"], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: os.close(0))  # (started with it closed: sys.stdin is None)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "say -: this process has no standard input to read the text from" in out.stderr


def test_say_local_keeps_what_was_made_when_a_later_sentence_is_refused(tmp_path, monkeypatch, capsys):
    """--local: the engine refuses the second sentence (here: its prompt made to fail, as one over
    the model's window does); the first sentence's audio stays in the WAV, exit 1 says why."""
    import numpy as np

    import csmstream
    from csmstream import cli
    from csmstream.plan import SentencePlan
    from csmstream.wav import read_wav

    real = SentencePlan._fit

    def fit(self, text):
        if text.startswith("Then"):
            raise ValueError("prompt (text + context) is 9999 positions; the model's window is 2048")
        return real(self, text)

    monkeypatch.setattr(SentencePlan, "_fit", fit)
    path = tmp_path / "cut.wav"
    assert cli.main(["say", "First this. Then that.", "--local", "--device", "cpu", "--seed", "3", "--out",
                     str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: sentence 2 of 2 was refused: prompt (text + context) is 9999 positions" in err
    got, rate = read_wav(path)
    want = np.concatenate(list(csmstream.load("tiny", device="cpu", max_streams=1).stream("First this.", seed=3)))
    assert rate == 24000 and np.array_equal(got, want) and f"kept the {len(want) / 24000:.2f} s" in err


def _long_text(seed: int, n: int) -> tuple[str, list[str]]:
    import random

    rng = random.Random(seed)
    words = "amber birch cedar dahlia elm fern ginkgo hazel iris juniper laurel maple".split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))).capitalize() + "." for _ in range(n)]
    return " ".join(sentences), sentences


def _packed(sentences: list[str], limit: int) -> list[list[str]]:
    """The requests a text must go as: its sentences packed greedily, each request's text (with
    the space after each sentence but the text's last) at most `limit` characters."""
    out, cur, size = [], [], 0
    for i, s in enumerate(sentences):
        need = len(s) + (i < len(sentences) - 1)
        if cur and size + need > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += need
    return out + [cur]


def _requests_of(srv, sentences: list[str]) -> list[list]:
    """The engine requests the server made for these sentences, grouped by client request."""
    reqs = [r for r in srv.recent if r.text in set(sentences)]
    groups: list[list] = []
    for r in reqs:
        if not groups or groups[-1][0].tag is not r.tag:
            groups.append([])
        groups[-1].append(r)
    return groups


def test_say_dash_speaks_a_text_longer_than_the_server_takes_as_back_to_back_requests(tmp_path, server,
                                                                                       monkeypatch):
    """Standard input past the server's --max-text-chars used to stop at text_too_long. Now it goes as
    requests cut at sentence ends (each as full as the limit allows, which say learns from the
    server's /healthz), with sentence i on seed + i across them as in one request, and the WAV
    holds all of their audio."""
    monkeypatch.setattr(server.srv, "max_text_chars", 150)
    text, sentences = _long_text(1, 10)
    assert len(text) > 2 * 150  # (three requests at least)
    path = tmp_path / "long.wav"
    cmd = [sys.executable, "-m", "csmstream", "say", "-", "--url", server.url, "--out", str(path), "--seed", "11"]
    health = server.srv.health
    with monkeypatch.context() as m:  # a server whose /healthz does not say (an older one): say cuts at 5,000
        m.setattr(server.srv, "health", lambda: {k: v for k, v in health().items() if k != "max_text_chars"})
        old = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=120)
    assert old.returncode == 1 and b"server error text_too_long" in old.stderr
    assert b"cuts at --max-request-chars (5000) when it does not say; this server takes fewer" in old.stderr
    done = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()
    groups = _requests_of(server.srv, sentences)[-len(_packed(sentences, 150)):]
    assert [[r.text for r in g] for g in groups] == _packed(sentences, 150)
    reqs = [r for g in groups for r in g]
    assert [r.seed for r in reqs] == [11 + i for i in range(len(sentences))]
    # each sentence heard the four before it, across the requests too (continue_previous), as in one request
    assert [[seg.text for seg in r.context] for r in reqs] == [sentences[max(0, i - 4):i] for i in range(len(reqs))]
    with wave.open(str(path)) as w:
        assert w.getnframes() == sum(r.frames for r in reqs) * 1920


def test_say_a_long_text_to_the_http_port_goes_as_several_requests(tmp_path):
    """The same cut for a long TEXT argument to the OpenAI-compatible port, with --max-frames
    bounding the whole text, not each request."""
    import csmstream
    from tests.servers import RunningServer

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), http_port=0, max_text_chars=150).start()
    try:
        text, sentences = _long_text(2, 8)
        path = tmp_path / "long.wav"
        cmd = [sys.executable, "-m", "csmstream", "say", text, "--url", rs.srv.speech_url, "--out", str(path),
               "--seed", "4", "--max-request-chars", "150"]
        done = subprocess.run(cmd, capture_output=True, timeout=180)
        assert done.returncode == 0, done.stderr.decode()
        groups = _requests_of(rs.srv, sentences)
        assert [[r.text for r in g] for g in groups] == _packed(sentences, 150)
        reqs = [r for g in groups for r in g]
        assert [r.seed for r in reqs] == [4 + i for i in range(len(sentences))]
        # each sentence heard the four before it, across the requests too (previous_text), as in one request
        assert [[seg.text for seg in r.context] for r in reqs] == [sentences[max(0, i - 4):i] for i in range(len(reqs))]
        with wave.open(str(path)) as w:
            assert w.getnframes() == sum(r.frames for r in reqs) * 1920
        frames = sum(r.frames for r in reqs)
        capped = subprocess.run(cmd + ["--max-frames", str(frames // 2)], capture_output=True, timeout=180)
        assert capped.returncode == 0, capped.stderr.decode()
        with wave.open(str(path)) as w:
            assert w.getnframes() == frames // 2 * 1920
    finally:
        rs.stop()


def _until(proc, log, check, what: str, timeout: float = 60) -> None:
    """Wait for check() while the serve process `proc` runs; its log in the failure."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what}: {log.read_text()}"
        time.sleep(0.2)


def test_serve_over_tls_takes_a_renewed_certificate_on_sighup(tmp_path):
    """A certificate is renewed every few weeks: SIGHUP loads it again from the same paths without a
    restart; a file that will not do is logged and the certificate in use kept. When each one
    expires is logged (a WARNING when soon) and on /metrics."""
    import datetime
    import ssl
    import urllib.request

    import trustme

    from csmstream.transport.tls import client_context

    cert, key, log = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "serve.log"

    def issue(name: str, not_after) -> str:  # a new CA and a certificate it signed at --tls-cert/--tls-key; its CA
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", not_after=not_after)
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(tmp_path / name))
        return str(tmp_path / name)

    def trusted(cafile: str) -> bool:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=client_context(cafile),
                                        timeout=5) as r:
                return r.status == 200
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                return False
            raise

    def until(check, what: str) -> None:
        _until(proc, log, check, what)

    def metric() -> float:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=client_context(current),
                                    timeout=5) as r:
            line = next(x for x in r.read().decode().splitlines() if x.startswith("csm_tls_certificate_not_after"))
        return float(line.split()[1])

    soon = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=5)
    first = current = issue("first_ca.pem", soon)
    port = free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "csmstream", "serve", "--port", str(port), "--device", "cpu",
                                 "--tls-cert", str(cert), "--tls-key", str(key)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        until(lambda: "csm-stream: serving wss://" in log.read_text() and trusted(first), "never served TLS")
        assert f"WARNING csmstream.tls: the TLS certificate in {cert} is valid until " \
               f"{soon:%Y-%m-%d %H:%M} UTC (5 days)" in log.read_text()  # (expires soon: a warning)
        assert metric() == soon.timestamp()
        second = issue("second_ca.pem", datetime.datetime(2031, 6, 1, 12, 0))
        assert trusted(first) and not trusted(second)  # the files alone change nothing
        proc.send_signal(signal.SIGHUP)
        until(lambda: "SIGHUP: reloaded the TLS certificate" in log.read_text(), "no reload")
        assert trusted(second) and not trusted(first)
        current = second
        assert metric() == datetime.datetime(2031, 6, 1, 12, 0, tzinfo=datetime.UTC).timestamp()
        assert f"INFO csmstream.tls: the TLS certificate in {cert} is valid until 2031-06-01 12:00 UTC" \
            in log.read_text()
        cert.write_text("renewal went wrong\n")
        proc.send_signal(signal.SIGHUP)
        until(lambda: "SIGHUP: kept the TLS certificate in use" in log.read_text(), "no refusal")
        assert "not a PEM certificate chain" in log.read_text() and trusted(second)
        out = run("say", "Still here.", "--url", f"wss://127.0.0.1:{port}/ws/generate", "--cafile", second,
                  "--out", str(tmp_path / "tls.wav"), "--max-frames", "5")
        assert out.returncode == 0, out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0 and "Traceback" not in log.read_text()


def test_serve_reads_its_voices_again_on_sighup(tmp_path):
    """serve --voices DIR: a voice added to the directory is served after SIGHUP, no restart; a
    directory that will not do is logged as an ERROR and the voices in use kept."""
    import json
    import urllib.request

    from tests.transport.test_text_stream import _write_voice

    d, log = tmp_path / "voices", tmp_path / "serve.log"
    d.mkdir()
    _write_voice(d, "ada", "Hello, my name is Ada.", rate=16000, channels=1)
    port = free_port()

    def until(check, what: str) -> None:
        _until(proc, log, check, what)

    def voices() -> list:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/voices", timeout=5) as r:
            return sorted(v["voice_id"] for v in json.loads(r.read())["voices"])

    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "csmstream", "serve", "--port", str(port), "--device", "cpu",
                                 "--voices", str(d)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        until(lambda: "csm-stream: serving ws://" in log.read_text(), "never served")
        assert voices() == ["0", "ada"]
        _write_voice(d, "ben", "I am Ben.", rate=16000, channels=1)
        proc.send_signal(signal.SIGHUP)
        until(lambda: "voices reloaded from" in log.read_text(), "no reload")
        assert voices() == ["0", "ada", "ben"] and "added: ben; changed: none; removed: none" in log.read_text()
        (d / "ben.txt").unlink()
        proc.send_signal(signal.SIGHUP)
        until(lambda: "voices not reloaded" in log.read_text(), "no refusal")
        assert "ERROR csmstream.server: voices not reloaded; the ones in use are kept:" in log.read_text()
        assert "missing transcript ben.txt" in log.read_text() and voices() == ["0", "ada", "ben"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0 and "Traceback" not in log.read_text()


@pytest.mark.parametrize("body, want", [
    (b'{"status": "ok", "max_text_chars": 321}', 321),
    (b'{"status": "ok"}', None),  # an older server
    (b'{"max_text_chars": true}', None),
    (b'{"max_text_chars": 0}', None),
    (b"[1, 2]", None),
    (b"<html>a proxy's page</html>", None),
])
def test_say_reads_the_servers_limit_from_healthz_or_goes_without(body, want):
    """What say makes of a /healthz (csmstream.say._server_limit): the limit when it is a count of
    characters, None (cut at --max-request-chars) for anything else, or when nothing answers."""
    import asyncio

    from csmstream.say import _server_limit
    from tests.servers import CannedHttp

    with CannedHttp(200, body, only_path="/healthz") as port:
        assert asyncio.run(_server_limit(f"ws://127.0.0.1:{port}/ws/generate", {})) == want
        assert asyncio.run(_server_limit(f"http://127.0.0.1:{port}/v1/audio/speech", {})) == want
    assert asyncio.run(_server_limit(f"ws://127.0.0.1:{free_port()}/ws/generate", {})) is None  # nothing there
