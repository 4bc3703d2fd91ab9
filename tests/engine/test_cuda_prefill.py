"""The fast path's padded prefill (engine/cuda_prefill.py), run eagerly on CPU: what its CUDA graphs
replay. Against the plain prefill it must leave the same KV at the prompt's positions, the same
hidden state and the same frames after, touch no other row, and handle pieces longer than its
largest bucket and buckets that run past the window's end."""

import numpy as np
import pytest
import torch

from csmstream.engine.cuda_prefill import StaticPrefill, length_buckets
from csmstream.engine.generator import FrameGenerator
from csmstream.engine.prompt import build_prompt


def test_length_buckets():
    assert length_buckets(2048) == [16, 32, 64, 128, 256, 512]
    assert length_buckets(2048, 100) == [16, 32, 64, 100]
    assert length_buckets(40) == [16, 32, 40]
    assert length_buckets(10) == [10]


def _pair(engine, max_tokens=512, window=None, rows=3):
    """A generator with the plain prefill and one with the padded one (both step eagerly)."""
    ref = FrameGenerator(engine.model, rows=rows, max_seq_len=window)
    new = FrameGenerator(engine.model, rows=rows, max_seq_len=window)
    for g in (ref, new):
        g.cpu = None
    new.static_prefill = StaticPrefill(new, graphs=False, max_tokens=max_tokens)
    assert new.static_prefill.graphs == {}
    return ref, new


def _prompt(engine, text="Hello there, how can I help you today?", context=()):
    tok, mask = build_prompt(engine.tokenizer, text, 0, list(context), 32)
    return torch.from_numpy(tok), torch.from_numpy(mask)


def _same(ref, new, row, T):
    torch.testing.assert_close(new.bb_cache[:, row, :T], ref.bb_cache[:, row, :T], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.h[row], ref.h[row], rtol=1e-5, atol=1e-6)
    assert new.pos.tolist() == ref.pos.tolist() and new.host_pos == ref.host_pos


@pytest.mark.parametrize("max_tokens", [512, 16])  # 16: the prompt goes in as several pieces
def test_padded_prefill_gives_the_plain_prefills_cache_state_and_frames(tiny_engine, max_tokens):
    ref, new = _pair(tiny_engine, max_tokens)
    tok, mask = _prompt(tiny_engine)
    T = tok.shape[0]
    assert T not in new.static_prefill.buckets and T > 16  # padded, and in pieces when max_tokens=16
    for g in (ref, new):
        g.prefill(1, tok, mask, seed=3, temperature=0.9, topk=1)
    _same(ref, new, 1, T)
    assert not torch.equal(new.bb_cache[:, 1, T], ref.bb_cache[:, 1, T])  # the padding wrote past the prompt
    for _ in range(4):  # ... which the frames overwrite before they read it
        assert torch.equal(ref.step(1, 2, 1), new.step(1, 2, 1))
    torch.testing.assert_close(new.h, ref.h, rtol=1e-5, atol=1e-6)


def test_other_rows_are_untouched(tiny_engine):
    _, new = _pair(tiny_engine)
    tok, mask = _prompt(tiny_engine)
    for r in (0, 2):
        new.prefill(r, tok, mask, seed=r, temperature=0.9, topk=1)
    cache, h = new.bb_cache.clone(), new.h.clone()
    new.prefill(1, *_prompt(tiny_engine, "Another caller."), seed=9, temperature=0.9, topk=1)
    for r in (0, 2):
        assert torch.equal(new.bb_cache[:, r], cache[:, r]) and torch.equal(new.h[r], h[r])


def test_chunks_and_a_cached_prefix_start_mid_window(tiny_engine):
    """A prompt after a cached voice prefix, fed in uneven chunks: every piece starts past 0."""
    ref, new = _pair(tiny_engine)
    voice = np.random.default_rng(0).integers(0, 2048, (12, 32))
    tok, mask = _prompt(tiny_engine, context=[(1, "The voice.", voice)])
    P = 20
    for g in (ref, new):
        g.prefill(0, tok[:P], mask[:P], seed=1, temperature=0.9, topk=1)
    prefix = (P, ref.cached_kv(0, P))
    for g in (ref, new):
        a = P
        for n in (5, 17, tok.shape[0] - P - 22):
            g.prefill(2, tok[a:a + n], mask[a:a + n], seed=4, temperature=0.9, topk=1,
                      prefix=prefix if a == P else None, start=a, last=a + n == tok.shape[0])
            a += n
    _same(ref, new, 2, tok.shape[0])
    for _ in range(3):
        assert torch.equal(ref.step(2, 3, 1), new.step(2, 3, 1))


def test_a_bucket_past_the_window_end_is_clamped(tiny_engine):
    """The window ends 4 positions after the prompt; its second chunk, from position 20, pads to a
    bucket that runs past the end."""
    tok, mask = _prompt(tiny_engine)
    T = tok.shape[0]
    ref, new = _pair(tiny_engine, window=T + 4, rows=1)
    sp = new.static_prefill
    assert sp.buckets[-1] == T + 4 and 20 + sp.bucket(T - 20) > T + 4
    for g in (ref, new):
        g.prefill(0, tok[:20], mask[:20], seed=2, temperature=0.9, topk=1, last=False)
        g.prefill(0, tok[20:], mask[20:], seed=2, temperature=0.9, topk=1, start=20)
    _same(ref, new, 0, T)
    for _ in range(3):  # up to the window's last position
        assert torch.equal(ref.step(0, 1, 1), new.step(0, 1, 1))
