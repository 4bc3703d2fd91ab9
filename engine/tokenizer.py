"""Text tokenizers: a checkpoint's own tokenizer.json, or the embedded byte-level one for `tiny`."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS_NAMES = ("<|begin_of_text|>", "<s>")
EOS_NAMES = ("<|end_of_text|>", "</s>")
TINY_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>")


class TextTokenizer:
    """Encodes `[speaker]text` to ids; BOS/EOS are added explicitly, never by a post-processor,
    so the prompt is the same whatever template the tokenizer file carries."""

    def __init__(self, tok: Tokenizer, bos_id: int, eos_id: int) -> None:
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_turn(self, speaker_id: int, text: str) -> list[int]:
        ids = self.tok.encode(f"[{speaker_id}]{text}", add_special_tokens=False).ids
        return [self.bos_id, *ids, self.eos_id]

    @classmethod
    def from_dir(cls, path: Path) -> TextTokenizer:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: missing. A CSM checkpoint directory needs the tokenizer.json it was trained "
                "with (sesame/csm-1b ships the Llama-3.2 one)"
            )
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{file}: not a valid tokenizers JSON file ({e})") from None
        config = _read_json(Path(path) / "tokenizer_config.json")
        bos = _special_id(tok, config.get("bos_token"), BOS_NAMES, file, "BOS")
        eos = _special_id(tok, config.get("eos_token"), EOS_NAMES, file, "EOS")
        return cls(tok, bos, eos)

    @classmethod
    def tiny(cls) -> TextTokenizer:
        """Byte-level tokenizer built in code (256 byte tokens + specials): needs no download."""
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {ch: i for i, ch in enumerate(alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(TINY_SPECIALS))
        return cls(tok, tok.token_to_id(TINY_SPECIALS[0]), tok.token_to_id(TINY_SPECIALS[1]))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _special_id(tok: Tokenizer, configured, names: tuple[str, ...], file: Path, what: str) -> int:
    if isinstance(configured, dict):
        configured = configured.get("content")
    for name in ([configured] if isinstance(configured, str) else []) + list(names):
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    raise ValueError(f"{file}: no {what} token found (looked for {', '.join(names)})")
