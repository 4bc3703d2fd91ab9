import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from csmstream import logs
from csmstream.commands import free_port, wait_healthy


def _record(msg, *args, exc_info=None, **extra):
    record = logging.getLogger("csmstream.test").makeRecord("csmstream.test", logging.WARNING, __file__, 1, msg,
                                                             args, exc_info, extra=extra)
    return record


def test_a_json_line_holds_the_formatted_message_the_record_fields_and_the_traceback():
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        exc = sys.exc_info()
    before = datetime.datetime.now(datetime.UTC)
    line = logs.JsonFormatter().format(_record("request %s: %d frames", "r-1", 12, exc_info=exc, request_id="r-1",
                                               ttfa_ms=21.5, odd=object(), text="naïve \"quoted\"\nline"))
    assert "\n" not in line  # one record, one line, even with a traceback and a newline in a field
    out = json.loads(line)
    when = datetime.datetime.fromisoformat(out["time"].replace("Z", "+00:00"))
    assert out["time"].endswith("Z") and abs((when - before).total_seconds()) < 5
    assert (out["level"], out["logger"], out["message"]) == ("WARNING", "csmstream.test", "request r-1: 12 frames")
    assert (out["request_id"], out["ttfa_ms"], out["text"]) == ("r-1", 21.5, "naïve \"quoted\"\nline")
    assert out["odd"].startswith("<object object at")  # not JSON: its repr, never a failed log call
    assert out["exc"].startswith("Traceback") and "ZeroDivisionError: division by zero" in out["exc"]
    for internal in ("args", "msg", "exc_info", "levelno", "pathname", "created", "thread"):
        assert internal not in out


def test_a_record_s_field_never_overwrites_the_four_fixed_ones():
    out = json.loads(logs.JsonFormatter().format(_record("hello", level_name="x", logger_name="y")))
    assert (out["level"], out["logger"], out["message"]) == ("WARNING", "csmstream.test", "hello")
    assert (out["level_name"], out["logger_name"]) == ("x", "y")


@pytest.fixture
def restore_logging():
    """configure() changes process-wide state: put back the root handlers, hooks and transformers' handler."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, sys.excepthook, threading.excepthook
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET}
    tf_root = logging.getLogger("transformers")
    tf_saved = tf_root.handlers[:], tf_root.propagate
    yield
    root.handlers[:], (level, hook, thread_hook) = saved[0], saved[1:]
    root.setLevel(level)
    for name, was in quiet.items():
        logging.getLogger(name).setLevel(was)
    sys.excepthook, threading.excepthook = hook, thread_hook
    logging.captureWarnings(False)
    logs._json = False
    tf_root.handlers[:], tf_root.propagate = tf_saved


def test_json_mode_makes_every_line_on_standard_error_parse(restore_logging, capsys):
    from transformers.utils import logging as tf_logging

    logs.configure("json")
    logs.notice("csm-stream: serving ws://127.0.0.1:1/ws/generate")
    logs.notice("csm-stream: error: bad flag", logging.ERROR)
    logging.getLogger("csmstream.server").info("ready: %s", "tiny", extra={"request_id": None})
    logging.getLogger("csmstream.websockets").info("a handshake line, only with -v")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old argument", UserWarning, stacklevel=1)
    tf_logging.get_logger("transformers.configuration_utils").warning("Model config: pad_token_id ...")
    try:
        raise RuntimeError("the engine thread died")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())

    def crash():
        raise OSError("a codec thread failed")

    worker = threading.Thread(target=crash, name="codec-1")
    worker.start()
    worker.join()
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [json.loads(line) for line in captured.err.splitlines()]  # (a line that is not JSON fails here)
    got = [(d["level"], d["logger"], d["message"]) for d in lines]
    assert got[:3] == [("INFO", "csmstream", "csm-stream: serving ws://127.0.0.1:1/ws/generate"),
                       ("ERROR", "csmstream", "csm-stream: error: bad flag"),
                       ("INFO", "csmstream.server", "ready: tiny")]
    assert lines[2]["request_id"] is None
    assert got[3][:2] == ("WARNING", "py.warnings") and "UserWarning: an old argument" in got[3][2]
    assert got[4] == ("WARNING", "transformers.configuration_utils", "Model config: pad_token_id ...")
    assert got[5] == ("CRITICAL", "csmstream", "uncaught RuntimeError: the engine thread died")
    assert "RuntimeError: the engine thread died" in lines[5]["exc"]
    assert got[6] == ("CRITICAL", "csmstream", "uncaught OSError in thread codec-1: a codec thread failed")
    assert "OSError: a codec thread failed" in lines[6]["exc"] and len(lines) == 7


def test_text_mode_prints_notices_as_they_are_and_logs_readable_lines(restore_logging, capsys):
    logs.configure("text", verbose=True)
    logs.notice("csm-stream: serving ws://127.0.0.1:1/ws/generate")
    logging.getLogger("csmstream.websockets").debug("a handshake line")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "csm-stream: serving ws://127.0.0.1:1/ws/generate"
    assert err[1].endswith(" DEBUG csmstream.websockets: a handshake line") and len(err) == 2
    with pytest.raises(ValueError, match="log format must be one of text, json, got 'xml'"):
        logs.configure("xml")


def _serve(*args, env=None):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "csmstream", "serve", "--port", str(port), "--device", "cpu",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    return proc, port


def test_serve_in_json_mode_writes_only_json_lines_with_each_request_s_own_fields():
    from websockets.sync.client import connect

    proc, port = _serve(env={logs.ENV: "json"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc, timeout=120)
        with connect(f"ws://127.0.0.1:{port}/ws/generate") as ws:
            ws.send(json.dumps({"text": "Hi.", "request_id": "bad-1", "topk": 0}))
            assert json.loads(ws.recv(30))["error"]["code"] == "invalid_topk"
            ws.send(json.dumps({"text": "Hello there.", "request_id": "good-1", "max_audio_ms": 400}))
            while not isinstance(msg := ws.recv(30), str) or "done" not in json.loads(msg):
                pass
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line, the notices too
    assert all({"time", "level", "logger", "message"} <= set(d) for d in lines)
    by_id = {d["request_id"]: d for d in lines if "request_id" in d}
    assert by_id["bad-1"]["code"] == "invalid_topk" and "topk must be" in by_id["bad-1"]["message"]
    good = by_id["good-1"]
    assert (good["outcome"], good["audio_ms"], good["frames"]) == ("done", 400.0, 5)
    assert good["ttfa_ms"] > 0 and good["sentences"] == 1
    messages = [d["message"] for d in lines]
    assert f"csm-stream: serving ws://127.0.0.1:{port}/ws/generate (health: http://127.0.0.1:{port}/healthz)" \
        in messages and "stopped" in messages


def test_a_bad_flag_in_json_mode_is_one_json_error_line_and_a_bad_log_format_is_refused():
    out = subprocess.run([sys.executable, "-m", "csmstream", "serve", "--log-format", "json", "--port", "70000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    last = json.loads(out.stderr.splitlines()[-1])
    assert last["level"] == "ERROR" and last["message"] == "csm-stream: error: --port must be in 0..65535, got 70000"
    bad = subprocess.run([sys.executable, "-m", "csmstream", "serve"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, logs.ENV: "xml"})
    assert bad.returncode == 2 and "log format must be one of text, json, got 'xml'" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "csmstream", "--help"], capture_output=True, text=True, timeout=60)
    assert "--log-format {text,json}" in helped.stdout


def test_json_mode_routes_transformers_when_it_loads_not_before():
    """A process on `tiny` never imports transformers: JSON mode does not import it either (~1.4 s),
    and when something later does, its lines are JSON like every other."""
    code = ("import sys; from csmstream import logs; logs.configure('json'); "
            "print('loaded:', 'transformers' in sys.modules, flush=True); "
            "from transformers.utils import logging as tf; tf.get_logger('transformers.x').warning('late line')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout.strip() == "loaded: False", r.stderr
    lines = [json.loads(line) for line in r.stderr.splitlines()]  # every line parses
    assert [(x["level"], x["logger"], x["message"]) for x in lines] == [("WARNING", "transformers.x", "late line")]
