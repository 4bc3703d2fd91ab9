"""The end of a request played into a phone call: `done` once the caller heard it, and a clear
error (never a client left waiting) when finding that out fails. The whole path, with a simulated
Telnyx, is in tests/integrations."""

import asyncio
from types import SimpleNamespace

import pytest

from csmstream.transport import call_stream


class FakeConn:
    def __init__(self, job):
        self.playing, self.sent = [job], []

    async def _done(self, job, **kw):
        self.sent.append(("done", job.rid, kw))

    async def _error(self, code, message, rid=None):
        self.sent.append(("error", rid, code, message))


class FakeCall:
    def __init__(self, outcome):
        self.outcome = outcome

    async def heard(self, utt):
        await asyncio.sleep(0)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def finish(outcome):
    job = SimpleNamespace(rid="r1")
    conn = FakeConn(job)
    asyncio.run(call_stream._done_when_heard(conn, job, FakeCall(outcome), SimpleNamespace(), 160.0))
    return conn


def test_done_says_whether_the_caller_heard_it():
    for heard in (True, False):
        conn = finish(heard)
        assert conn.sent == [("done", "r1", {"cancelled": not heard, "audio_ms": 160.0, "heard": heard})]
        assert conn.playing == []


def test_a_failure_waiting_for_the_mark_is_the_requests_internal_error():
    conn = finish(KeyError("utterance r1"))
    assert len(conn.sent) == 1 and conn.playing == []
    kind, rid, code, message = conn.sent[0]
    assert (kind, rid, code) == ("error", "r1", "internal_error") and "KeyError" in message


def test_a_call_that_ends_as_its_audio_starts_is_a_cut_off_done_not_a_server_bug():
    """speak() refuses a call that has just ended (the caller hung up between the request's lookup
    and its first audio): that is the request's done (cancelled, not heard), like a hang-up a
    moment later, not an internal_error. On a call still live the same failure is a bug, left to
    the connection (_stream_or_fail makes it the request's internal_error)."""
    class Call:
        def __init__(self, hangs_up):
            self.ended, self.hangs_up = asyncio.Event(), hangs_up

        async def speak(self, chunks, name=None):
            if self.hangs_up:
                self.ended.set()
            raise LookupError("call 'v2:c' has ended")  # (the bridge's UnknownCall is a LookupError)

    class Conn(FakeConn):
        async def source(self, job, unit):
            yield b""

    def play(call):
        job = SimpleNamespace(rid="r1", call=call, error=None, cancelled=False)
        job.cancel = lambda: setattr(job, "cancelled", True)
        conn = Conn(job)
        conn.playing = []
        asyncio.run(call_stream.stream_to_call(conn, job))
        return conn, job

    conn, job = play(Call(hangs_up=True))
    assert conn.sent == [("done", "r1", {"cancelled": True, "audio_ms": 0.0, "heard": False})] and job.cancelled
    with pytest.raises(LookupError, match="has ended"):
        play(Call(hangs_up=False))
