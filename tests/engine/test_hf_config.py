"""engine/hf_config.py reads config.json as transformers' CsmConfig does (the reference here), checks
every value it reads, and spares a checkpoint load the transformers import."""

import json

import pytest
from transformers import CsmConfig

import csmstream
from csmstream import CheckpointError
from csmstream.engine.config import CsmModelConfig
from csmstream.engine.hf_config import BACKBONE, DEPTH, read
from csmstream.engine.mimi import MimiSpec
from csmstream.engine.weights import read_config
from tests.fresh import last_line

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": 256, "text_vocab_size": 300}
SMALL_DEPTH = {"backbone_hidden_size": 64, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 96}


def theirs(raw: dict):
    return CsmConfig.from_dict(json.loads(json.dumps(dict(raw, model_type="csm"))))


def test_defaults_are_transformers_csm_config_defaults():
    ref, ours = CsmConfig(), read({})
    for name in BACKBONE:
        if name != "head_dim":  # (stated as None; transformers resolves it in place, from_hf the same way)
            assert getattr(ours, name) == getattr(ref, name), name
    for name in DEPTH:
        if name != "head_dim":
            assert getattr(ours.depth_decoder_config, name) == getattr(ref.depth_decoder_config, name), name
    assert CsmModelConfig.from_hf(ours) == CsmModelConfig.from_hf(ref) == CsmModelConfig.csm_1b()
    assert MimiSpec.from_config(ours.codec_config) == MimiSpec.from_config(ref.codec_config) == MimiSpec()


VARIANTS = {
    "empty (all defaults)": {},
    "small, llama3 rope in rope_parameters": dict(SMALL, rope_parameters=LLAMA3,
                                                 depth_decoder_config=dict(SMALL_DEPTH, rope_parameters=LLAMA3)),
    "old spelling: rope_scaling beside rope_theta (as sesame/csm-1b's file)": dict(
        SMALL, rope_scaling={"type": "llama3", **LLAMA3}, rope_theta=10_000,
        depth_decoder_config=dict(SMALL_DEPTH, rope_scaling=dict(LLAMA3, original_max_position_embeddings=16),
                                  rope_theta=20_000.0)),
    "rope_theta alone": dict(SMALL, rope_theta=1234.0, depth_decoder_config=dict(SMALL_DEPTH, rope_theta=77.0)),
    "codebook_size for vocab_size": dict(SMALL, codebook_size=1030, depth_decoder_config=dict(SMALL_DEPTH,
                                                                                           codebook_size=1030)),
    "nulls resolved: heads, head_dim, bos, depth config": dict(num_key_value_heads=None, head_dim=None,
                                                               bos_token_id=None, depth_decoder_config=None),
    "explicit head_dim and untied codebooks": dict(SMALL, head_dim=32, tie_codebooks_embeddings=False,
                                                   depth_decoder_config=dict(SMALL_DEPTH, head_dim=24)),
    "a codec_config of its own": dict(SMALL, depth_decoder_config=SMALL_DEPTH, codec_config={
        "hidden_size": 32, "num_filters": 8, "codebook_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
        "codebook_size": 1024, "upsampling_ratios": [8, 6, 5, 4]}),
}


@pytest.mark.parametrize("raw", VARIANTS.values(), ids=list(VARIANTS))
def test_reads_what_transformers_reads(raw):
    ours, ref = read(json.loads(json.dumps(raw))), theirs(raw)
    assert CsmModelConfig.from_hf(ours) == CsmModelConfig.from_hf(ref)
    assert MimiSpec.from_config(ours.codec_config) == MimiSpec.from_config(ref.codec_config)
    assert ours.num_codebooks == ref.num_codebooks


def test_reads_a_saved_checkpoints_file_as_transformers_does(checkpoint):
    path, ref_model, _ = checkpoint
    ours = read_config(path)
    assert CsmModelConfig.from_hf(ours) == CsmModelConfig.from_hf(ref_model.config)
    assert MimiSpec.from_config(ours.codec_config) == MimiSpec.from_config(ref_model.config.codec_config)


BAD = [
    ({"hidden_size": "2048"}, "hidden_size must be a positive integer, got '2048'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"num_attention_heads": 2.0}, "num_attention_heads must be a positive integer, got 2.0"),
    ({"num_key_value_heads": True}, "num_key_value_heads must be a positive integer or null, got True"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a positive number, got -1e-05"),
    ({"bos_token_id": -1}, "bos_token_id must be a non-negative integer or null, got -1"),
    ({"attention_bias": "no"}, "attention_bias must be true or false, got 'no'"),
    ({"tie_codebooks_embeddings": 1}, "tie_codebooks_embeddings must be true, false or null, got 1"),
    ({"hidden_act": None}, "hidden_act must be a string, got None"),
    ({"depth_decoder_config": 5}, "depth_decoder_config must be an object or null, got 5"),
    ({"depth_decoder_config": {"num_hidden_layers": -4}},
     "depth_decoder_config.num_hidden_layers must be a positive integer, got -4"),
    ({"codec_config": "mimi"}, "codec_config must be an object or null, got 'mimi'"),
    ({"rope_scaling": [1, 2]}, r"rope_scaling must be an object or null, got \[1, 2\]"),
    ({"rope_theta": "big"}, "rope_theta must be a number, got 'big'"),
    ({"hidden_size": "x" * 500}, "hidden_size must be a positive integer, got 'xxxx.*\\.\\.\\.$"),  # cut short
]


@pytest.mark.parametrize("patch,msg", BAD, ids=[next(iter(p)) for p, _ in BAD])
def test_a_bad_value_is_refused_naming_the_field_and_what_it_allows(tmp_path, patch, msg):
    (tmp_path / "config.json").write_text(json.dumps(dict(SMALL, model_type="csm", **patch)))
    with pytest.raises(CheckpointError, match=f"config.json: {msg}"):
        read_config(tmp_path)


@pytest.mark.parametrize("patch,msg", [
    ({"rope_parameters": dict(LLAMA3, factor="x")}, "rope_parameters.factor must be a positive number, got 'x'"),
    ({"rope_parameters": dict(LLAMA3, low_freq_factor=4.0)}, "llama3 needs low_freq_factor < high_freq_factor"),
    ({"rope_parameters": dict(LLAMA3, original_max_position_embeddings=10.5)},
     "original_max_position_embeddings must be an integer, got 10.5"),
    ({"depth_decoder_config": {"rope_parameters": {"rope_type": "yarn"}}},
     "depth_decoder_config: rope_type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    ({"codec_config": {"hidden_size": -32}}, "codec_config: hidden_size must be a positive integer, got -32"),
])
def test_a_checkpoint_with_a_bad_config_is_refused_by_load(checkpoint, tmp_path, patch, msg):
    import shutil

    d = shutil.copytree(checkpoint[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, **patch)))
    with pytest.raises(CheckpointError, match=msg) as e:
        csmstream.load(str(d), device="cpu")
    assert str(d) in str(e.value)  # which file


def test_a_config_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, got list"):
        read_config(tmp_path)


def test_a_checkpoint_loads_and_speaks_with_transformers_not_installed(checkpoint):
    """transformers is a test and bench dependency only (setup.py's dev extra): ~2 s of a load on
    CI's machine went to importing it to read one JSON file. Here any import of it fails."""
    code = ("import sys; sys.modules['transformers'] = None; import csmstream; "
            f"e = csmstream.load({str(checkpoint[0])!r}, device='cpu', max_streams=1); "
            "frames = list(e.frames('Hello there.', topk=1, max_frames=4)); "
            "import numpy as np; print(len(frames), e.codec.decode(np.stack(frames)).shape)")
    assert last_line(code) == "4 (7680,)"
