"""`say -`: the text to say from standard input -- whole (read_stdin_text), or as it arrives
(stdin_pieces for a thread, stdin_text_stream for an event loop), so a program piped in (an LLM)
is spoken while it still writes."""

from __future__ import annotations

import asyncio
import codecs
import os
import queue
import sys
import threading

STDIN = "-"  # say -: the text comes on standard input
NO_TEXT = "say -: standard input held no text to say"


def _stdin(hint: str):
    """sys.stdin (on a terminal, `hint` says what to type), or ValueError when the process has none
    (started with it closed)."""
    if sys.stdin is None:
        raise ValueError("say -: this process has no standard input to read the text from")
    if sys.stdin.isatty():
        print(f"reading what to say from standard input{hint}; end it with Ctrl-D", file=sys.stderr)
    return sys.stdin


def _not_utf8(e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"say -: standard input is not UTF-8 text ({e})")


def read_stdin_text() -> str:
    """say - with an http:// URL: all of standard input, read before anything starts."""
    stdin = _stdin("")
    try:
        text = stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(e) from None
    if not text.strip():
        raise ValueError(NO_TEXT)
    return text


def _read_in_thread(put) -> None:
    """Start a daemon thread that hands each read's text to put(), then None at the end (or the
    error: not UTF-8, unreadable). A read that blocks never holds up the exit."""
    fd = _stdin(", spoken as it comes").fileno()

    def pump() -> None:
        dec = codecs.getincrementaldecoder("utf-8")()
        try:  # (os.read: a read blocked in sys.stdin's buffer holds its lock, and the exit aborts on it)
            while data := os.read(fd, 65536):
                if text := dec.decode(data):
                    put(text)
            dec.decode(b"", final=True)
            put(None)
        except UnicodeDecodeError as e:
            put(_not_utf8(e))
        except Exception as e:  # (an unreadable standard input)
            put(e)

    threading.Thread(target=pump, name="say-stdin", daemon=True).start()


def _with_head(head: str, rest):
    yield head
    yield from rest


def stdin_pieces():
    """Standard input as it arrives, for a thread: waits for the first text that is not blank
    (none: ValueError, before anything starts) and returns an iterator of the pieces from there."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    _read_in_thread(q.put)

    def pieces():
        while (item := q.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    it = pieces()
    head = ""
    for piece in it:
        head += piece
        if head.strip():
            return _with_head(head, it)
    raise ValueError(NO_TEXT)


async def stdin_text_stream():
    """stdin_pieces for an event loop (say - over a WebSocket): an async iterator of the pieces."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:
            pass  # (the loop has closed: say is over)

    async def pieces():
        while (item := await q.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    _read_in_thread(put)
    it = pieces()
    head = ""
    async for piece in it:
        head += piece
        if head.strip():
            break
    if not head.strip():
        raise ValueError(NO_TEXT)

    async def rest():
        yield head
        async for piece in it:
            yield piece
    return rest()
