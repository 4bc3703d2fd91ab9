import json
import shutil

import numpy as np
import pytest
import torch

import csmstream
from csmstream import CheckpointError


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_and_matches(checkpoint, checkpoint_engine, tmp_path, caplog):
    path, ref, tok = checkpoint
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="2MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / f, sharded / f)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    with caplog.at_level("INFO", logger="csmstream.engine"):
        eng = csmstream.load(str(sharded), device="cpu", max_streams=1)
    size = sum(f.stat().st_size for f in sharded.glob("model-*.safetensors"))  # what the load says it reads
    assert f"loading {sharded}: {size / 1e9:.2f} GB of weights onto cpu/float32 ..." in caplog.text
    a = np.stack(list(eng.frames("Hello there.", topk=1, max_frames=8)))
    b = np.stack(list(checkpoint_engine.frames("Hello there.", topk=1, max_frames=8)))
    np.testing.assert_array_equal(a, b)


def test_missing_shard_named(checkpoint, tmp_path):
    path, ref, _ = checkpoint
    d = tmp_path / "s"
    ref.save_pretrained(d, max_shard_size="2MB")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    shutil.copy(path / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(CheckpointError, match=shard.name):
        csmstream.load(str(d), device="cpu")


def test_missing_config(checkpoint, tmp_path):
    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        csmstream.load(str(d), device="cpu")


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000])  # (the second: json's RecursionError)
def test_bad_json_config(checkpoint, tmp_path, text):
    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        csmstream.load(str(d), device="cpu")


def test_wrong_shape_names_file_and_key(checkpoint, tmp_path):
    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 160  # weights were saved with 128
    (d / "config.json").write_text(json.dumps(cfg))
    key = r"backbone_model\.layers\.0\.mlp\.gate_proj\.weight"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}'"):
        csmstream.load(str(d), device="cpu")


def test_unknown_and_missing_tensors(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    tensors["backbone_model.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unknown tensor 'backbone_model.mystery.weight'"):
        csmstream.load(str(d), device="cpu")
    del tensors["backbone_model.mystery.weight"]
    del tensors["backbone_model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing.*backbone_model\.layers\.1\.self_attn\.k_proj"):
        csmstream.load(str(d), device="cpu")


def test_corrupt_safetensors(checkpoint, tmp_path):
    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        csmstream.load(str(d), device="cpu")


def test_missing_tokenizer(checkpoint, tmp_path):
    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        csmstream.load(str(d), device="cpu")


def test_offline_hub_id_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as e:
        csmstream.load("sesame/csm-1b", device="cpu")
    msg = str(e.value)
    assert "offline" in msg and "pass the directory" in msg


def test_a_hub_id_loads_from_the_hubs_cache_and_is_named_by_its_id(checkpoint, checkpoint_engine, monkeypatch,
                                                                     tmp_path):
    """huggingface_hub's own offline lookup over a cache laid out as it lays one out (refs/main
    naming a snapshot folder): the engine is the checkpoint's, and it is called sesame/csm-1b --
    in its log line, /metrics' build info and GET /v1/models -- not by the snapshot's commit hash."""
    path, _, _ = checkpoint
    repo = tmp_path / "hf" / "hub" / "models--sesame--csm-1b"
    commit = "0123456789abcdef0123456789abcdef01234567"
    copy_ckpt(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)  # (read at import: the environment alone comes too late)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    eng = csmstream.load("sesame/csm-1b", device="cpu", max_streams=1)
    assert eng.name == "sesame/csm-1b"
    a = np.stack(list(eng.frames("Hello there.", topk=1, max_frames=4)))
    np.testing.assert_array_equal(a, np.stack(list(checkpoint_engine.frames("Hello there.", topk=1, max_frames=4))))
    assert csmstream.load(str(path), device="cpu", max_streams=1).name == path.name  # (a folder: its name)


def test_not_a_dir_nor_hub_id():
    with pytest.raises(CheckpointError, match="no such directory, and not a hub id"):
        csmstream.load("./no/such/dir/here", device="cpu")


def test_the_checkpoints_codec_is_its_codec_model(checkpoint, checkpoint_engine):
    """engine/mimi.py loaded from the saved codec_model.* tensors decodes and encodes as the
    reference model's own codec_model (transformers' MimiModel) does."""
    _, ref, _ = checkpoint
    codes = np.random.default_rng(3).integers(0, 2048, size=(5, 32))
    want = ref.codec_model.decode(torch.as_tensor(codes).T[None]).audio_values[0, 0].detach().numpy()
    got = checkpoint_engine.codec.decode(codes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    audio = (want / max(1.0, float(np.abs(want).max()))).astype(np.float32)
    with torch.inference_mode():
        ref_codes = ref.codec_model.encode(torch.from_numpy(audio)[None, None], num_quantizers=32).audio_codes
    np.testing.assert_array_equal(checkpoint_engine.codec.encode_context(audio), ref_codes[0].T.numpy())


def test_codec_config_and_tensors_that_do_not_fit_are_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, codec_config=dict(cfg["codec_config"], use_causal_conv=False))))
    with pytest.raises(CheckpointError, match="codec_config: use_causal_conv=False is not supported"):
        csmstream.load(str(d), device="cpu")
    (d / "config.json").write_text(json.dumps(dict(cfg, codec_config=dict(cfg["codec_config"], num_filters=4))))
    with pytest.raises(CheckpointError, match=r"codec_model tensors do not fit codec_config: wrong shape .*"
                                              r"decoder\.layers\.0\.conv\.weight"):
        csmstream.load(str(d), device="cpu")
    (d / "config.json").write_text(json.dumps(cfg))
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["codec_model.quantizer.acoustic_residual_vector_quantizer.layers.3.codebook.embed_sum"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \(1\): quantizer\.acoustic_residual_vector_quantizer\.layers"
                                              r"\.3\.codebook\.embed_sum"):
        csmstream.load(str(d), device="cpu")


@pytest.mark.parametrize("weight_map,msg", [
    ([1, 2], "weight_map must be a non-empty object of tensor name -> shard file name, got '\\[1, 2\\]'"),
    ({}, "weight_map must be a non-empty object"),
    ({"lm_head.weight": 5}, "weight_map names shard 5; expected a file name in the checkpoint directory"),
    ({"lm_head.weight": "../model.safetensors"}, "weight_map names shard '../model.safetensors'; expected a file"),
    ({"lm_head.weight": "/etc/hostname"}, "weight_map names shard '/etc/hostname'"),
])
def test_a_bad_shard_index_is_refused_by_name(checkpoint, tmp_path, weight_map, msg):
    """An index's shard names are file names beside it; anything else (another type, a path that
    leaves the directory) is refused, not followed or crashed on."""
    d = copy_ckpt(checkpoint[0], tmp_path / "c")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: {msg}"):
        csmstream.load(str(d), device="cpu")
