"""engine/mimi.py, our Mimi, against transformers' MimiModel (the reference) on the same weights:
the same codes from the same audio, the same audio from the same codes; its config reading, its
strict loading and its errors; and that loading `tiny` no longer imports transformers."""

import json

import pytest
import torch

from csmstream.engine.codec import Codec
from csmstream.engine.mimi import Mimi, MimiSpec, flat_key, init_random, load_state
from tests.checkpoints import ours, randomize_codebooks, small_mimi_config
from tests.fresh import last_line


def _pair(cfg, seed=0):
    from transformers import MimiModel

    torch.manual_seed(seed)
    ref = MimiModel(cfg).eval()
    randomize_codebooks(ref)
    return ref, ours(ref)


@pytest.mark.parametrize("kind", ["small", "gqa", "full"])
def test_same_codes_and_audio_as_transformers(kind):
    from transformers import MimiConfig

    cfg = {"small": small_mimi_config(), "gqa": small_mimi_config(num_attention_heads=4, num_key_value_heads=2,
                                                                  sliding_window=5),
           "full": MimiConfig()}[kind]
    ref, mine = _pair(cfg)
    frames = 3 if kind == "full" else 9  # gqa: 18 transformer steps, past its 5-step window
    codes = torch.randint(0, 2048, (2, 32, frames), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref.decode(codes).audio_values
        got = mine.decode(codes)
        assert got.shape == want.shape == (2, 1, frames * 1920)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # encoding: a length that is not a whole frame (the last frame's padding), and a few codebooks
        audio = want[:, :, : frames * 1920 - 700]
        for n in (32, 8, 1):
            assert torch.equal(mine.encode(audio, n), ref.encode(audio, num_quantizers=n).audio_codes)
        # the semantic and acoustic halves decode their own codebooks
        torch.testing.assert_close(mine.quantizer.decode(codes[:, :5]), ref.quantizer.decode(codes[:, :5]))


def test_config_reading_defaults_and_refusals():
    from transformers import MimiConfig

    assert MimiSpec.from_config(MimiConfig()) == MimiSpec()  # our defaults are Mimi's
    raw = json.loads(MimiConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1).to_json_string())
    spec = MimiSpec.from_config(raw)  # config.json's dict: frame rate derived, head_dim from the width
    assert (spec.hidden_size, spec.head_dim, spec.frame_rate, spec.samples_per_frame) == (32, 16, 12.5, 1920)
    # what transformers makes of a dict that leaves things out or states null, we make too
    sparse = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": None}
    want = MimiConfig(**sparse)
    got = MimiSpec.from_config(sparse)
    assert (got.codebook_dim, got.head_dim, got.frame_rate) == (want.codebook_dim, want.head_dim, want.frame_rate)
    assert got.codebook_dim == 256 and MimiSpec.from_config(dict(sparse, codebook_dim=None)).codebook_dim == 32
    assert MimiSpec.from_config({"frame_rate": 25.0}).latent_stride == 1  # stated: kept (no down/upsampling)
    for bad, msg in (({"use_causal_conv": False}, "use_causal_conv=False is not supported"),
                     ({"hidden_act": "swish2"}, "hidden_act 'swish2' is not supported"),
                     ({"pad_mode": "reflect"}, "pad_mode 'reflect' is not supported"),
                     ({"num_semantic_quantizers": 32}, "num_semantic_quantizers must be in"),
                     # every value's kind is checked, naming the field and what it allows
                     ({"num_semantic_quantizers": 0}, "num_semantic_quantizers must be a positive integer, got 0"),
                     ({"hidden_size": "32"}, "hidden_size must be a positive integer, got '32'"),
                     ({"num_filters": True}, "num_filters must be a positive integer, got True"),
                     ({"norm_eps": "tiny"}, "norm_eps must be a finite number, got 'tiny'"),
                     ({"upsampling_ratios": [8, 0]}, "upsampling_ratios must be a non-empty list of positive"),
                     ({"upsampling_ratios": 8}, "upsampling_ratios must be a non-empty list of positive"),
                     ({"pad_mode": 3}, "pad_mode must be a string, got 3"),
                     ({"use_causal_conv": "yes"}, "use_causal_conv='yes' is not supported"),
                     ({"rope_parameters": [1]}, r"rope_parameters must be an object, got \[1\]"),
                     ({"rope_parameters": {"rope_theta": "big"}}, "rope_theta must be a finite number"),
                     ({"num_key_value_heads": 3}, "num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
                     ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope type 'yarn'")):
        with pytest.raises(ValueError, match=msg):
            MimiSpec.from_config(dict(raw, **bad), "ckpt: codec_config")


def test_strict_load_names_what_does_not_fit():
    spec = MimiSpec.from_config(small_mimi_config())
    state = init_random(Mimi(spec), 1).state_dict()
    assert flat_key("decoder.decoder_seanet.layers.1.conv.weight") == "decoder.layers.1.conv.weight"
    assert flat_key("decoder.layers.1.conv.weight") == "decoder.layers.1.conv.weight"
    m = Mimi(spec)
    load_state(m, state)  # its own names load
    bad = dict(state)
    bad.pop("downsample.conv.weight")
    bad["encoder.layers.99.conv.weight"] = torch.zeros(1)
    bad["upsample.conv.weight"] = torch.zeros(3, 3, 3)
    with pytest.raises(ValueError) as e:
        load_state(Mimi(spec), bad)
    msg = str(e.value)
    assert "missing (1): downsample.conv.weight" in msg and "unexpected (1): encoder.layers.99" in msg
    assert "upsample.conv.weight (3, 3, 3) (expected (32, 1, 4))" in msg


def test_a_codebooks_vectors_follow_a_load():
    """The centroids are cached; a later load (or init) must not leave the old ones in use."""
    spec = MimiSpec.from_config(small_mimi_config())
    a, b = init_random(Mimi(spec), 1), init_random(Mimi(spec), 2)
    codes = torch.randint(0, 2048, (1, 32, 2), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = a.decode(codes)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a.decode(codes), b.decode(codes)) and not torch.equal(before, b.decode(codes))


def test_tiny_codec_is_seeded_and_its_frames_are_1920_samples():
    a, b = Codec.tiny("cpu"), Codec.tiny("cpu")
    codes = torch.randint(0, 2048, (4, 32), generator=torch.Generator().manual_seed(0)).numpy()
    x = a.decode(codes)
    assert x.shape == (4 * 1920,) and (x == b.decode(codes)).all() and x.std() > 0
    assert a.encode_context(x.clip(-1, 1)).shape == (4, 32)  # (random weights: no unit peak)


def test_loading_tiny_imports_no_transformers():
    """The point of our own Mimi: a process that loads `tiny` and speaks never imports transformers
    (~4.4 s of imports on CI's machine)."""
    code = ("import sys, csmstream; e = csmstream.load('tiny', device='cpu'); "
            "import numpy as np; print(e.codec.decode(np.zeros((2, 32), dtype=np.int64)).shape, "
            "sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    assert last_line(code) == "(3840,) []"
