"""Streaming Mimi decode cost per frame: flat as the stream grows (no re-decoding of the past).

    .venv/bin/python -m pytest bench/test_mimi_stream.py --benchmark-only
"""

import pytest
import torch

from csmstream.engine.mimi import Mimi, MimiSpec, init_random
from csmstream.engine.mimi_stream import StreamingMimiDecoder


def mimi(kind):
    from tests.checkpoints import small_mimi_config

    spec = MimiSpec() if kind == "full" else MimiSpec.from_config(small_mimi_config())
    return init_random(Mimi(spec), 0).eval()


@pytest.fixture(scope="module", params=["tiny", "full"])
def model(request):
    return request.param, mimi(request.param)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("at_frame", [10, 1000])
def test_stream_decode_frame(benchmark, model, batch, at_frame):
    kind, m = model
    if kind == "full" and at_frame == 1000:
        warm = 300  # past the 250-step window the per-frame state is fixed; 300 frames shows it
    else:
        warm = at_frame
    dec = StreamingMimiDecoder(m, rows=batch)
    codes = torch.randint(0, 2048, (batch, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(warm):
        dec.decode(codes, 0, batch)
    benchmark.group = f"mimi-stream-{kind}-b{batch}"
    benchmark.extra_info.update(frame=warm, batch=batch)
    benchmark.pedantic(dec.decode, args=(codes, 0, batch), rounds=10 if kind == "full" else 30, warmup_rounds=1)


def test_offline_decode_50_frames(benchmark, model):
    kind, m = model
    codes = torch.randint(0, 2048, (1, 32, 50), generator=torch.Generator().manual_seed(1))
    benchmark.group = f"mimi-offline-{kind}"
    benchmark.extra_info["frames"] = 50

    def run():
        with torch.inference_mode():
            return m.decode(codes)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
