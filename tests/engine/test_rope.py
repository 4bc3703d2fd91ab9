import torch

from csmstream.engine.config import RopeConfig
from csmstream.engine.rope import apply_rope_, interleave_rows, inv_frequencies, rope_table


def test_llama3_inv_frequencies_match_transformers():
    from transformers import CsmConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = CsmConfig()  # csm-1b defaults
    hf.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inv_frequencies(RopeConfig.from_hf(hf.rope_parameters, 2048), hf.head_dim)
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=0)


def test_interleaved_rotation_equals_half_split_rotation():
    """Rotating interleaved pairs of permuted q, k gives the same q.k as transformers' rotate_half."""
    hd, H, D, P = 16, 2, 12, 9
    rope = RopeConfig(kind="default", theta=10000.0)
    w = torch.randn(H * hd, D)
    x = torch.randn(P, D)
    q = (x @ w.T).view(P, H, hd)
    inv = inv_frequencies(rope, hd)
    ang = torch.arange(P).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot_half = torch.cat([-q[..., hd // 2:], q[..., : hd // 2]], -1)
    ref = q * cos + rot_half * sin
    ours = (x @ interleave_rows(w, H, hd).T).view(1, P, H, hd)
    apply_rope_(ours, rope_table(rope, hd, P)[None, :, None, :])
    scores_ref = torch.einsum("phd,qhd->hpq", ref, ref)
    scores = torch.einsum("phd,qhd->hpq", ours[0], ours[0])
    torch.testing.assert_close(scores, scores_ref, rtol=1e-5, atol=1e-5)
