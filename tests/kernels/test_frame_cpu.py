"""The numba frame kernel against the eager PyTorch step and the sampling rule it copies."""

import numpy as np
import pytest
import torch

from csmstream.engine.prompt import build_prompt
from csmstream.engine.sampling import NOISE_BITS, gumbel_table, sample
from csmstream.kernels.frame_cpu import _draw, row_key


@pytest.mark.parametrize("k", [1, 2, 7, 50, 64, 65, 300, 2048])  # insertion up to 64, then a sort
def test_draw_matches_torch_sample(k):
    rng = np.random.default_rng(k)
    table = gumbel_table().numpy()
    for trial in range(20):
        logits = rng.normal(size=2048).astype(np.float32) * 3
        if trial % 2:  # ties, also at the k-th place
            logits = logits.round()
        temp = np.float32(rng.uniform(0.3, 1.5))
        seed, counter = int(rng.integers(0, 1 << 62)), int(rng.integers(0, 1 << 40))
        want = sample(torch.from_numpy(logits)[None], torch.tensor([temp]), torch.tensor([k]), k,
                      torch.tensor([seed]), torch.tensor([counter]), trial).item()
        vals, idx = np.empty(k, np.float32), np.empty(k, np.int64)
        got = _draw(logits, k, temp, row_key(seed, counter, NOISE_BITS), trial, table, vals, idx)
        assert got == want
        # independent check: the pick is one of the k largest logits
        assert logits[got] >= np.sort(logits)[-k]


def test_kernel_frames_equal_eager_loop_batched(tiny_engine):
    """Three rows with different top-k, temperature and seeds, several frames: the kernel and the
    eager path produce the same codes (same weights, same counter-based noise)."""
    g = tiny_engine.gen
    assert g.rows >= 3
    settings = [(11, 0.9, 50), (12, 0.5, 1), (13, 1.3, 7)]
    prompts = [build_prompt(tiny_engine.tokenizer, t, i, [], 32)
               for i, t in enumerate(["First row.", "Second, longer row of text.", "Third!"])]

    def run(use_kernel):
        kernel = g.cpu
        if not use_kernel:
            g.cpu = None
        try:
            for row, ((tok, mask), (seed, temp, k)) in enumerate(zip(prompts, settings, strict=True)):
                g.prefill(row, torch.from_numpy(tok), torch.from_numpy(mask), seed=seed, temperature=temp, topk=k)
            out = torch.stack([g.step(0, 3, 50) for _ in range(6)])
        finally:
            g.cpu = kernel
            for row in range(3):
                g.release(row)
        return out.numpy()

    fast, eager = run(True), run(False)
    assert fast.shape == (6, 3, 32)
    np.testing.assert_array_equal(fast, eager)
    assert fast.max() < 2048
