"""Checkpoints the tests write themselves: random transformers CSM models saved with
save_pretrained, plus a tokenizer trained here (not the embedded one)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>"]
CORPUS = [
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "[0] [1] [2] [3] speaker turns and numbers 0123456789.",
    "Thanks for calling, your appointment is confirmed for Tuesday at ten.",
]


def make_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def small_mimi_config(**over):
    from transformers import MimiConfig

    kw = dict(hidden_size=32, num_filters=8, codebook_dim=16, vector_quantization_hidden_dimension=16,
              upsample_groups=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, sliding_window=250)
    kw.update(over)
    return MimiConfig(**kw)


@torch.no_grad()
def randomize_codebooks(mimi, std: float = 0.05) -> None:
    """Fresh Mimi codebooks are all zero (every code decodes alike); give them random centroids
    so that random-weight audio depends on the codes, as a trained codec's does (transformers'
    MimiModel, the reference; engine/mimi.init_random does this for ours)."""
    for module in mimi.modules():
        if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage"):
            module.embed_sum.normal_(0.0, std)
            module.cluster_usage.fill_(1.0)
            module._embed = None


def ours(hf_mimi):
    """engine/mimi.Mimi with the weights of transformers' MimiModel `hf_mimi` (nested names mapped)."""
    from csmstream.engine.mimi import Mimi, MimiSpec, load_state

    m = Mimi(MimiSpec.from_config(hf_mimi.config)).eval()
    load_state(m, hf_mimi.state_dict())
    return m


def csm_config(tok: Tokenizer, *, backbone=(64, 2, 4, 2, 128), depth=(48, 2, 4, 2, 96), rope="llama3",
               max_pos=256, codec=None):
    from transformers import CsmConfig

    rope_params = {"rope_type": "default", "rope_theta": 500000.0} if rope == "default" else {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hb, lb, nb, kb, fb = backbone
    hd, ld, nd, kd, fd = depth
    vocab = tok.get_vocab_size()
    return CsmConfig(
        text_vocab_size=vocab, hidden_size=hb, num_hidden_layers=lb, num_attention_heads=nb,
        num_key_value_heads=kb, intermediate_size=fb, max_position_embeddings=max_pos,
        rope_parameters=dict(rope_params),
        bos_token_id=tok.token_to_id(SPECIALS[0]), pad_token_id=tok.token_to_id(SPECIALS[2]),
        audio_token_id=tok.token_to_id(SPECIALS[2]), audio_eos_token_id=tok.token_to_id(SPECIALS[3]),
        depth_decoder_config=dict(backbone_hidden_size=hb, hidden_size=hd, num_hidden_layers=ld,
                                  num_attention_heads=nd, num_key_value_heads=kd, intermediate_size=fd,
                                  rope_parameters=dict(rope_params)),
        codec_config=(codec or small_mimi_config()).to_dict(),
    )


def write_checkpoint(path: Path, *, seed: int = 0, max_shard_size=None, **cfg_kw):
    """Save a random CsmForConditionalGeneration + tokenizer to `path`; return the model (eval)."""
    from transformers import CsmForConditionalGeneration

    path = Path(path)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(csm_config(tok, **cfg_kw)).eval()
    randomize_codebooks(model.codec_model)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "tokenizer_class": "PreTrainedTokenizerFast"}))
    return model, tok


def reference_ids(tok: Tokenizer, speaker: int, text: str) -> list[int]:
    """The turn layout written out by hand: BOS, `[speaker]text`, EOS."""
    ids = tok.encode(f"[{speaker}]{text}", add_special_tokens=False).ids
    return [tok.token_to_id(SPECIALS[0]), *ids, tok.token_to_id(SPECIALS[1])]
