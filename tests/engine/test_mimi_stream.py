"""Streamed decode (engine/mimi_stream.py on engine/mimi.py's modules) equals transformers' offline
MimiModel.decode on the same weights, sample for sample."""

import numpy as np
import pytest
import torch

from csmstream.engine.mimi_stream import StreamingMimiDecoder
from tests.checkpoints import ours, randomize_codebooks, small_mimi_config


class Pair:
    """transformers' MimiModel (the reference) and ours with its weights."""

    def __init__(self, cfg, seed):
        from transformers import MimiModel

        torch.manual_seed(seed)
        self.ref = MimiModel(cfg).eval()
        randomize_codebooks(self.ref)
        self.ours = ours(self.ref)


@pytest.fixture(scope="module")
def small_mimi():
    return Pair(small_mimi_config(), 0)


def offline(pair, codes):  # codes [T, 32], decoded by the reference
    with torch.inference_mode():
        return pair.ref.decode(torch.as_tensor(codes).T[None]).audio_values[0, 0]


def streamed(dec, codes, row=0):
    with torch.inference_mode():
        return torch.cat([dec.decode(torch.as_tensor(c)[None], row, row + 1)[0] for c in codes])


@pytest.mark.parametrize("frames", [1, 2, 7, 33, 60])
def test_streamed_equals_offline(small_mimi, frames):
    rng = np.random.default_rng(frames)
    codes = rng.integers(0, 2048, size=(frames, 32))
    dec = StreamingMimiDecoder(small_mimi.ours, rows=1)
    s, o = streamed(dec, codes), offline(small_mimi, codes)
    assert s.shape == o.shape == (frames * 1920,)
    assert (s - o).abs().max().item() < 1e-4


def test_across_the_sliding_window(small_mimi):
    """130 frames = 260 transformer steps, past the 250-step window."""
    codes = np.random.default_rng(9).integers(0, 2048, size=(130, 32))
    dec = StreamingMimiDecoder(small_mimi.ours, rows=1)
    assert (streamed(dec, codes) - offline(small_mimi, codes)).abs().max().item() < 1e-4


def test_two_slots_batched_and_reset_is_per_slot(small_mimi):
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 2048, size=(12, 32)), rng.integers(0, 2048, size=(12, 32))
    dec = StreamingMimiDecoder(small_mimi.ours, rows=2)
    with torch.inference_mode():
        out = [dec.decode(torch.as_tensor(np.stack([a[t], b[t]])), 0, 2) for t in range(12)]
    sa, sb = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    assert (sa - offline(small_mimi, a)).abs().max() < 1e-4
    assert (sb - offline(small_mimi, b)).abs().max() < 1e-4
    # reset slot 0 and start a new sequence there, while slot 1 carries on with b's continuation
    c = rng.integers(0, 2048, size=(6, 32))
    b2 = rng.integers(0, 2048, size=(6, 32))
    dec.reset(0)
    with torch.inference_mode():
        out = [dec.decode(torch.as_tensor(np.stack([c[t], b2[t]])), 0, 2) for t in range(6)]
    sc, sb2 = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    assert (sc - offline(small_mimi, c)).abs().max() < 1e-4
    full_b = offline(small_mimi, np.concatenate([b, b2]))
    assert (sb2 - full_b[12 * 1920 :]).abs().max() < 1e-4


def test_full_mimi_config_few_frames():
    from transformers import MimiConfig

    m = Pair(MimiConfig(), 1)
    codes = np.random.default_rng(2).integers(0, 2048, size=(3, 32))
    dec = StreamingMimiDecoder(m.ours, rows=1)
    assert (streamed(dec, codes) - offline(m, codes)).abs().max().item() < 1e-4


def test_cost_does_not_grow_with_stream_length(small_mimi):
    """No re-decoding: the state a frame touches is fixed-size (ring, tails, contexts)."""
    dec = StreamingMimiDecoder(small_mimi.ours, rows=1)
    before = [t.shape for t in (dec.transformer.k, dec.transformer.slot_pos)]
    streamed(dec, np.zeros((300, 32), dtype=np.int64) + 5)
    assert [t.shape for t in (dec.transformer.k, dec.transformer.slot_pos)] == before
