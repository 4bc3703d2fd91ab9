"""Prompt rows for the backbone: N audio columns + 1 text column per position, with a mask.

A turn is `[BOS] [speaker]text [EOS]` as text rows; context audio follows its text as code rows
and one all-zero end-of-audio frame. This is the layout of Sesame's reference and of transformers'
processor (`<|AUDIO|>` positions carry summed codebook embeddings, `<|audio_eos|>` the zero frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class Segment:
    """One context turn: who spoke, what was said, and the audio of it.

    `audio` is 24 kHz mono PCM (float in [-1, 1] or int16), encoded by the engine's codec; or give
    `codes` ([frames, 32] int) when they are already known, e.g. audio the engine just generated.
    """

    speaker_id: int
    text: str
    audio: np.ndarray | None = field(default=None, repr=False)
    codes: np.ndarray | None = field(default=None, repr=False)


def text_rows(tok: TextTokenizer, speaker_id: int, text: str, n_codebooks: int):
    ids = np.asarray(tok.encode_turn(speaker_id, text), dtype=np.int64)
    tokens = np.zeros((len(ids), n_codebooks + 1), dtype=np.int64)
    mask = np.zeros_like(tokens, dtype=bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: np.ndarray, n_codebooks: int):
    codes = np.asarray(codes, dtype=np.int64)
    frames = np.concatenate([codes, np.zeros((1, n_codebooks), dtype=np.int64)])  # + end-of-audio
    tokens = np.zeros((len(frames), n_codebooks + 1), dtype=np.int64)
    mask = np.zeros_like(tokens, dtype=bool)
    tokens[:, :-1] = frames
    mask[:, :-1] = True
    return tokens, mask


def turn_positions(tok: TextTokenizer, speaker_id: int, text: str, n_frames: int) -> int:
    """Positions a context turn with audio takes: its text rows, its frames, the end-of-audio frame."""
    return len(tok.encode_turn(speaker_id, text)) + n_frames + 1


def context_rows(tok: TextTokenizer, context, n_codebooks: int):
    """Rows of the context turns alone. context: iterable of (speaker_id, text, codes [F, N] or None)."""
    parts = []
    for spk, ctx_text, codes in context:
        parts.append(text_rows(tok, spk, ctx_text, n_codebooks))
        if codes is not None and len(codes):
            parts.append(audio_rows(codes, n_codebooks))
    if not parts:
        return np.zeros((0, n_codebooks + 1), np.int64), np.zeros((0, n_codebooks + 1), bool)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def build_prompt(tok: TextTokenizer, text: str, speaker_id: int, context, n_codebooks: int):
    """context: iterable of (speaker_id, text, codes [F, N] or None). Returns tokens, mask [T, N+1]."""
    ctx_tokens, ctx_mask = context_rows(tok, context, n_codebooks)
    tokens, mask = text_rows(tok, speaker_id, text, n_codebooks)
    return np.concatenate([ctx_tokens, tokens]), np.concatenate([ctx_mask, mask])
