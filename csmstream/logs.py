"""What the command line writes to standard error: readable lines (the default), or with
`--log-format json` (env CSM_LOG_FORMAT=json) one JSON object a line for a log collector.

A JSON line has "time" (UTC, ISO 8601 to the millisecond), "level", "logger" and "message", then
the record's own fields (`extra=`: "request_id", "status", "code", "call_control_id", ...), then
"exc" with the traceback when there is one. In that mode everything else that would reach standard
error is made such a line too: `serve`'s notices to its operator (`notice`), Python warnings,
transformers' messages (it has its own handler otherwise) and an exception that ends the process
or a thread.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import sys
import threading

FORMATS = ("text", "json")
ENV = "CSM_LOG_FORMAT"
QUIET = ("csmstream.websockets", "httpx")  # loggers shown only with -v
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RECORD_KEYS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_json = False  # configure() chose JSON: notice() logs instead of printing


class JsonFormatter(logging.Formatter):
    """One record as one line of JSON; fields that JSON cannot hold are written as their repr."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _RECORD_KEYS and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=repr)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r} (--log-format or ${ENV})")
    return fmt


def configure(fmt: str = "text", verbose: bool = False) -> None:
    """The root logger's one handler on standard error, in `fmt` ("text" or "json")."""
    global _json
    check_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for name in QUIET:  # per-connection handshake lines (and httpx's line per request of say) only with -v
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    _json = fmt == "json"
    logging.captureWarnings(_json)
    if _json:
        _route_transformers()
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def notice(text: str, level: int = logging.INFO) -> None:
    """A line for whoever runs the command: printed as it is, or in JSON mode a record of the
    'csmstream' logger, so that every line on standard error parses."""
    if _json:
        logging.getLogger("csmstream").log(level, text)
    else:
        print(text, file=sys.stderr, flush=True)


def _route_transformers() -> None:
    """transformers writes '[transformers] ...' through a handler of its own: hand its records to
    ours, now if it is loaded, else as it loads. (Serving never imports transformers, though a test
    or an embedding program may; importing it here just to route its lines would cost ~1.4 s.)"""
    loaded = sys.modules.get(_TF_LOGGING)
    if loaded is not None:
        _hand_over(loaded)
    elif not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport(_TF_LOGGING, _hand_over))


_TF_LOGGING = "transformers.utils.logging"


def _hand_over(tf_logging) -> None:
    tf_logging.disable_default_handler()
    tf_logging.enable_propagation()


class _OnImport:
    """A meta path finder that finds nothing itself: when module `name` is imported, it has the
    real finders find it and runs `then(module)` right after the module's own code, once."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module) -> None:
            run(module)
            then(module)

        spec.loader.exec_module = exec_module
        return spec


def _log_uncaught_in_thread(args) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("csmstream").critical("uncaught %s in thread %s: %s", args.exc_type.__name__,
                                            args.thread.name if args.thread else "?", args.exc_value,
                                            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_uncaught(kind, exc, tb) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("csmstream").critical("uncaught %s: %s", kind.__name__, exc, exc_info=(kind, exc, tb))
