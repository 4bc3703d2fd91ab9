"""multi-stream-input (transport/elevenlabs_multi.py) under clients that do anything in any order:
contexts opened, fed, flushed, kept alive, closed (at once too) and reopened, up to more than the
five a socket may hold, with bad messages between, in every output format, then close_socket. The
invariants ElevenLabs clients rely on hold for every context; the flows one by one are in
test_elevenlabs.py."""

import asyncio
import json
import logging
import random

from websockets.asyncio.client import connect

from tests.servers import RunningServer
from tests.transport.test_reliability import assert_idle_and_freed, live_rings, tiny

CONTEXTS = ["a", "b", "c", "d", "e", "f", None]  # six ids and the default: one more than a socket holds
BAD = ["junk", '{"text": 5}', '{"context_id": 5, "text": "a"}', '{"text": "\\ud800"}', "[" * 3000, '{"flush": "yes"}',
       "null", "[]", '{"close_context": 1}']


def _random_message(rnd: random.Random) -> tuple[str, str | None]:
    """One message, and the context it gives text to (None: none)."""
    cid, kind = rnd.choice(CONTEXTS), rnd.random()
    msg = {} if cid is None else {"context_id": cid}
    if kind < 0.4:
        msg["text"] = rnd.choice([" ", "Hi. ", "Yes", " no? ", "Ok! "])
        if rnd.random() < 0.2:
            msg["flush"] = True
    elif kind < 0.5:
        msg["text"] = ""  # keep-alive
    elif kind < 0.6:
        msg["flush"] = True
    elif kind < 0.75:
        msg["close_context"] = True
        if rnd.random() < 0.5:
            msg["immediate"] = True
    else:
        return rnd.choice(BAD), None
    return json.dumps(msg), (cid or "default") if msg.get("text", "").strip() else None


def test_random_message_sequences_end_every_context_with_its_isfinal_and_close_cleanly(caplog):
    """Eight sockets at once: each ends with 1000 after close_socket; every context that was given
    text is answered; each context's last audio-or-isFinal message is an isFinal (none is left
    playing, none ends silently); nothing is logged as a server error; afterwards the engine is
    idle and every audio buffer is freed."""
    rs = RunningServer(tiny(4), warmup=False).start()
    base = rs.url.replace("/ws/generate", "/v1/text-to-speech/0/multi-stream-input")
    baseline = live_rings()
    try:
        async def session(seed):
            rnd = random.Random(seed)
            fmt = rnd.choice(["pcm_24000", "ulaw_8000", "pcm_16000", "mp3_44100_128", "opus_48000_64"])
            url = f"{base}?output_format={fmt}&inactivity_timeout=5" + rnd.choice(["", "&continue_previous=true"])
            got, texted = [], set()
            async with connect(url, max_size=None) as ws:
                async def read():
                    async for m in ws:
                        got.append(json.loads(m))

                reader = asyncio.create_task(read())
                for _ in range(rnd.randint(5, 25)):
                    msg, cid = _random_message(rnd)
                    texted |= {cid} - {None}
                    await ws.send(msg)
                    if rnd.random() < 0.4:
                        await asyncio.sleep(rnd.random() * 0.3)
                await ws.send(json.dumps({"close_socket": True}))
                await asyncio.wait_for(reader, 60)
                code = ws.close_code
            last = {}
            for d in got:
                if "audio" in d or d.get("isFinal"):
                    last[d["contextId"]] = d
            return dict(code=code, unanswered=texted - {d.get("contextId") for d in got},
                        unfinished=[c for c, d in last.items() if not d.get("isFinal")], audio=len(last))

        async def go():
            return await asyncio.gather(*(session(s) for s in range(8)))

        with caplog.at_level(logging.WARNING):
            ends = asyncio.run(go())
        assert [(e["code"], e["unanswered"], e["unfinished"]) for e in ends] == [(1000, set(), [])] * 8, ends
        assert sum(e["audio"] for e in ends) >= 8  # (contexts did play)
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert_idle_and_freed(rs, baseline)
    finally:
        rs.stop()
