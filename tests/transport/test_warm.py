"""Nothing compiles on the event loop once the server is ready: every numba kernel the loop runs
(resampling, G.711, G.722, Ogg CRC) has its signatures when start() returns, and serving every
raw format and every Telnyx codec, both directions, adds none. Checked in a fresh interpreter,
where no other test has compiled anything yet."""

import json
import os
import subprocess
import sys

import numpy as np

from csmstream.transport.encoder import AudioDecoder, warm_codecs
from csmstream.transport.protocol import ALL_FORMATS, FORMATS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import asyncio, json, sys
import numba
import numpy as np

from csmstream.kernels import audio, crc, g711, g722, resample


def signatures():
    return {f"{m.__name__.rsplit('.', 1)[1]}.{n}": len(d.signatures) for m in (audio, crc, g711, g722, resample)
            for n, d in vars(m).items() if isinstance(d, numba.core.dispatcher.Dispatcher)}


fresh = signatures()
import csmstream
from csmstream.commands import telnyx_routes
from csmstream.transport.protocol import FORMATS
from tests.integrations.telnyx_sim import TelnyxSimulator
from tests.servers import RunningServer, collect
from websockets.asyncio.client import connect

routes, calls = telnyx_routes("PCMU", None)
rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=2), routes=routes, calls=calls,
                   warmup=sys.argv[1] == "warm").start()
ready = signatures()
base = rs.url.replace("/ws/generate", "/telnyx")


async def serve_everything():
    async with connect(rs.url) as ws:
        for i, fmt in enumerate(FORMATS):
            await ws.send(json.dumps({"text": "Every format.", "format": fmt, "max_audio_ms": 240, "seed": 1,
                                      "request_id": f"f{i}"}))
            await collect(ws)
    for codec, rate in [("PCMU", 8000), ("PCMA", 8000), ("G722", 16000), ("L16", 8000), ("L16", 16000),
                        ("L16", 22050), ("L16", 24000), ("L16", 48000)]:
        ccid = f"v2:{codec}-{rate}"
        async with TelnyxSimulator(f"{base}?codec={codec}&sampling_rate={rate}", ccid, codec=codec, sampling_rate=rate,
                                   encoding=codec if codec != "L16" else "PCMU",
                                   caller_pcm=np.arange(1600, dtype=np.int16)) as sim:
            while calls.get(ccid) is None:
                await asyncio.sleep(0.01)
            async with connect(rs.url) as ws:
                await ws.send(json.dumps({"text": "Into the call.", "call_control_id": ccid, "max_audio_ms": 240}))
                done = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert done.get("done") and done["audio_ms"] > 0, done
            assert not sim.problems, sim.problems


asyncio.run(serve_everything())
served = signatures()
rs.stop()
print(json.dumps({"fresh": fresh, "ready": ready, "served": served}))
"""


def run_server(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serving_every_format_and_codec_compiles_nothing_after_start():
    got = run_server("warm")
    compiled_later = {k: (got["ready"][k], v) for k, v in got["served"].items() if v != got["ready"][k]}
    assert compiled_later == {}
    for kernel in ("g711._encode", "g711._decode", "g722._encode", "g722._decode", "resample._polyphase", "crc._crc"):
        assert got["ready"][kernel] > got["fresh"][kernel] == 0, kernel  # compiled (or loaded) by start()


def test_without_the_warm_up_the_first_requests_compile_on_the_loop():
    """The check above can fail: with warmup=False, the same traffic compiles kernels after start."""
    got = run_server("cold")
    assert {k for k, v in got["served"].items() if v != got["ready"][k]} >= {"g711._encode", "g722._encode",
                                                                             "resample._polyphase"}


def test_warm_codecs_encodes_every_format_and_says_which_libraries_are_missing(monkeypatch):
    assert warm_codecs() == []  # PyAV and lameenc are dependencies: all there
    import builtins

    real_import = builtins.__import__

    def no_av(name, *a, **kw):
        if name in ("av", "lameenc"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_av)
    missing = warm_codecs()
    assert missing and set(missing) == set(ALL_FORMATS) - set(FORMATS)  # the compressed ones; raw ones still warm


def test_decoders_take_bytes_and_byte_arrays_alike():
    data = np.arange(-4000, 4000, 7, dtype=np.int16).tobytes()
    for fmt in FORMATS:
        a = AudioDecoder(fmt).decode(data)
        b = AudioDecoder(fmt).decode(np.frombuffer(data, np.uint8))
        np.testing.assert_array_equal(a, b)
