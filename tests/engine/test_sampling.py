import numpy as np
import torch

from csmstream.engine.sampling import NOISE_BITS, gumbel, gumbel_table, noise_index, sample


def draws(logits, temperature, k, n=4000, seed=0):
    """n independent draws for one logits row, via n rows with distinct seeds."""
    L = logits[None].expand(n, -1).contiguous()
    seeds, counters = torch.arange(n) + seed * n, torch.zeros(n, dtype=torch.long)
    return sample(L, torch.full((n,), temperature), torch.full((n,), k), k, seeds, counters, 0).numpy()


def test_topk_is_respected_and_frequencies_follow_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0, 2.5, 0.0, 1.5])
    got = draws(logits, 1.0, 3)
    top3 = set(torch.topk(logits, 3).indices.tolist())
    assert set(np.unique(got)) == top3  # all of the top 3, nothing else
    p = torch.softmax(logits[list(sorted(top3))], 0).numpy()
    freq = np.array([(got == i).mean() for i in sorted(top3)])
    np.testing.assert_allclose(freq, p, atol=0.03)


def test_temperature_changes_the_spread():
    logits = torch.randn(2048, generator=torch.Generator().manual_seed(1)) * 2

    def entropy(x):
        _, c = np.unique(x, return_counts=True)
        q = c / c.sum()
        return -(q * np.log(q)).sum()

    cold, warm = draws(logits, 0.3, 50), draws(logits, 2.0, 50)
    assert entropy(warm) > entropy(cold) + 0.5


def test_greedy_is_argmax():
    logits = torch.randn(16, 2048, generator=torch.Generator().manual_seed(2))
    out = sample(logits, torch.ones(16), torch.ones(16, dtype=torch.long), 1)
    assert torch.equal(out, logits.argmax(-1))
    # a row with k = 1 in a sampled batch is greedy too
    keys = torch.arange(16), torch.zeros(16, dtype=torch.long)
    out = sample(logits, torch.ones(16), torch.tensor([1, 50] * 8), 50, *keys, 3)
    assert torch.equal(out[::2], logits[::2].argmax(-1))


def test_noise_is_deterministic_and_keyed_by_every_part():
    codes = torch.arange(2048)
    base = gumbel(torch.tensor(1), torch.tensor(0), 0, codes)
    assert torch.equal(base, gumbel(torch.tensor(1), torch.tensor(0), 0, codes))
    for other in (gumbel(torch.tensor(2), torch.tensor(0), 0, codes),
                  gumbel(torch.tensor(1 << 40), torch.tensor(0), 0, codes),
                  gumbel(torch.tensor(1), torch.tensor(1), 0, codes),
                  gumbel(torch.tensor(1), torch.tensor(0), 1, codes)):
        assert (other != base).float().mean() > 0.99  # seed (low and high half), counter, codebook
    assert (base[1:] != base[:-1]).float().mean() > 0.99  # and the code id
    # the table holds Gumbel quantiles: its mean and spread are the distribution's
    t = gumbel_table().double()
    assert t.numel() == 1 << NOISE_BITS and torch.all(t[1:] > t[:-1])
    assert abs(t.mean() - 0.5772157) < 1e-3 and abs(t.var() - np.pi ** 2 / 6) < 0.01
    # and the hash spreads keys evenly over it
    idx = noise_index(torch.arange(200_000), torch.zeros(1, dtype=torch.long), 5, torch.tensor(17))
    counts = torch.bincount(idx >> (NOISE_BITS - 6), minlength=64).float()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def test_ties_at_the_kth_place_go_to_the_lower_code_ids():
    logits = torch.zeros(1, 64)
    logits[0, 40] = 5.0  # one clear best, then 63 tied at 0
    logits[0, 50] = -1.0
    seen = set()
    for seed in range(300):
        s, c = torch.tensor([seed]), torch.zeros(1, dtype=torch.long)
        seen.add(int(sample(logits, torch.tensor([50.0]), torch.tensor([4]), 4, s, c, 0)))
    assert seen == {40, 0, 1, 2}  # the best, then the three lowest of the tied ids


def test_reserved_codes_never_sampled(tmp_path):
    """Make reserved codes 2048-2050 the most likely in every head: they must still never appear."""
    import csmstream
    from tests.checkpoints import write_checkpoint

    ref, _ = write_checkpoint(tmp_path / "src", seed=1)
    with torch.no_grad():
        ref.lm_head.weight[2048:] = ref.lm_head.weight[:3] * 50
        ref.depth_decoder.codebooks_head.weight[:, :, 2048:] = 5.0
    ref.save_pretrained(tmp_path / "ckpt")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "ckpt" / f).write_bytes((tmp_path / "src" / f).read_bytes())
    eng = csmstream.load(str(tmp_path / "ckpt"), device="cpu", max_streams=1)
    for temperature in (0.5, 1.5):
        codes = np.stack(list(eng.frames("Hello there.", temperature=temperature, topk=50, seed=3, max_frames=30)))
        assert codes.shape[1] == 32 and codes.max() < 2048 and codes.min() >= 0


def test_same_seed_same_frames_and_batch_independent(tiny_engine):
    a = np.stack(list(tiny_engine.frames("Seeded text.", seed=11, max_frames=12)))
    b = np.stack(list(tiny_engine.frames("Seeded text.", seed=11, max_frames=12)))
    c = np.stack(list(tiny_engine.frames("Seeded text.", seed=12, max_frames=12)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # two rows stepped together give each row what it gets alone
    g = tiny_engine.gen
    from csmstream.engine.prompt import build_prompt

    t, m = build_prompt(tiny_engine.tokenizer, "Seeded text.", 0, [], 32)
    for row in (0, 1):
        g.prefill(row, torch.from_numpy(t), torch.from_numpy(m), seed=11 if row == 0 else 99,
                  temperature=0.9, topk=50)
    together = np.stack([g.step(0, 2, 50).numpy() for _ in range(12)])  # [12, 2, 32]
    g.release(0)
    g.release(1)
    np.testing.assert_array_equal(together[:, 0], a)
