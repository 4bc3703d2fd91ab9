"""The Engine: a loaded model, its slots, and the public frames() iterator."""

from __future__ import annotations

import heapq
import secrets
import threading
from collections.abc import Iterable, Iterator
from numbers import Integral, Real

import numpy as np
import torch

from ..kernels.audio import float_to_int16
from .config import CsmModelConfig
from .generator import FrameGenerator
from .model import CSM
from .prompt import Segment, build_prompt
from .tokenizer import TextTokenizer

MAX_TEXT_CHARS = 5000


class Engine:
    """A loaded CSM model ready to generate. Build one with `csmstream.load()`."""

    sample_rate = 24_000
    samples_per_frame = 1920

    def __init__(self, model: CSM, tokenizer: TextTokenizer, *, name: str, max_streams: int,
                 codec=None) -> None:
        self.model, self.tokenizer, self.name, self.codec = model, tokenizer, name, codec
        model.requires_grad_(False)  # inference only: keeps autograd bookkeeping off every op
        self.config: CsmModelConfig = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_streams = max_streams
        self.gen = FrameGenerator(model, rows=max_streams)
        self._lock = threading.Lock()
        self._free = list(range(max_streams))  # a heap: the lowest free row first keeps batches dense
        self._decoder = None

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, device={self.device}, dtype={self.dtype}, streams={self.max_streams})"

    # -- public API ---------------------------------------------------------------------------
    def frames(self, text: str, speaker_id: int = 0, *, context: Iterable[Segment] = (),
               temperature: float = 0.9, topk: int = 50, seed: int | None = None,
               max_frames: int | None = None) -> Iterator[np.ndarray]:
        """Generate audio codes frame by frame.

        Args:
            text: what to say (non-empty, at most 5000 characters).
            speaker_id: integer speaker label >= 0, as in the prompt `[speaker]text`.
            context: earlier turns (`Segment`s) the voice and prosody follow.
            temperature: > 0; sampling temperature.
            topk: 1..codebook size; 1 is greedy.
            seed: integer for reproducible sampling on the same device and dtype.
            max_frames: cap on generated frames (80 ms each); default scales with the text.

        Returns:
            An iterator of np.int64 arrays of shape (32,), one per 80 ms frame, each yielded as soon
            as it exists; it ends at end-of-speech (an all-zero frame, not yielded) or the cap.

        Raises:
            ValueError: a bad argument; the message names it and what is allowed.
        """
        req = self._validate(text, speaker_id, context, temperature, topk, seed, max_frames)
        return self._run(*req)

    def stream(self, text: str, speaker_id: int = 0, *, context: Iterable[Segment] = (),
               temperature: float = 0.9, topk: int = 50, seed: int | None = None,
               max_frames: int | None = None) -> Iterator[np.ndarray]:
        """Generate speech as int16 PCM, 24 kHz mono: 1920 samples per 80 ms frame, each yielded as
        soon as its frame exists (the first after the first frame). Arguments and errors are those
        of `frames()`. Samples beyond [-1, 1] are clipped, never wrapped."""
        if self.codec is None:
            raise ValueError("this engine has no codec; stream() needs one to turn codes into audio")
        req = self._validate(text, speaker_id, context, temperature, topk, seed, max_frames)
        return self._run(*req, audio=True)

    # -- internals ----------------------------------------------------------------------------
    def _validate(self, text, speaker_id, context, temperature, topk, seed, max_frames):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty string, got {text!r:.40}")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed per request")
        if isinstance(speaker_id, bool) or not isinstance(speaker_id, Integral) or speaker_id < 0:
            raise ValueError(f"speaker_id must be an integer >= 0, got {speaker_id!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or not temperature > 0 \
                or not np.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        cs = self.config.codebook_size
        if isinstance(topk, bool) or not isinstance(topk, Integral) or not 1 <= topk <= cs:
            raise ValueError(f"topk must be an integer in 1..{cs} (1 is greedy), got {topk!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, Integral)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be an integer >= 1 or None, got {max_frames!r}")
        ctx = [self._context_codes(s, i) for i, s in enumerate(context)]
        tokens, mask = build_prompt(self.tokenizer, text, int(speaker_id), ctx, self.config.num_codebooks)
        room = self.gen.max_seq_len - len(tokens)
        if room < 1:
            raise ValueError(
                f"prompt (text + context) is {len(tokens)} positions; the model's window is "
                f"{self.gen.max_seq_len}: shorten the text or drop context segments"
            )
        cap = max_frames if max_frames is not None else self.config.default_max_frames(len(text))
        seed = secrets.randbits(63) if seed is None else int(seed)
        return tokens, mask, seed, float(temperature), int(topk), min(int(cap), room)

    def _context_codes(self, seg, i: int):
        if not isinstance(seg, Segment):
            raise ValueError(f"context[{i}] must be a csmstream.Segment, got {type(seg).__name__}")
        if isinstance(seg.speaker_id, bool) or not isinstance(seg.speaker_id, Integral) or seg.speaker_id < 0:
            raise ValueError(f"context[{i}].speaker_id must be an integer >= 0, got {seg.speaker_id!r}")
        if not isinstance(seg.text, str):
            raise ValueError(f"context[{i}].text must be a string")
        if seg.codes is not None:
            codes = np.asarray(seg.codes)
            n = self.config.num_codebooks
            if codes.ndim != 2 or codes.shape[1] != n or not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"context[{i}].codes must be an integer array [frames, {n}], got "
                                 f"{codes.dtype}{list(codes.shape)}")
            if codes.size and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
                raise ValueError(f"context[{i}].codes must lie in 0..{self.config.codebook_size - 1}")
            return seg.speaker_id, seg.text, codes.astype(np.int64)
        if seg.audio is not None:
            if self.codec is None:
                raise ValueError(f"context[{i}] has audio but this engine has no codec to encode it")
            return seg.speaker_id, seg.text, self.codec.encode_context(seg.audio, what=f"context[{i}].audio")
        return seg.speaker_id, seg.text, None

    def _acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"all {self.max_streams} streams of this engine are busy; "
                                   "finish or close an iterator first, or load with a larger max_streams")
            return heapq.heappop(self._free)

    def _release(self, row: int) -> None:
        with self._lock:
            self.gen.release(row)
            heapq.heappush(self._free, row)

    @property
    def decoder(self):
        """The streaming Mimi decoder, one state slot per stream (built on first use)."""
        if self._decoder is None:
            from .mimi_stream import StreamingMimiDecoder

            self._decoder = StreamingMimiDecoder(self.codec.mimi, rows=self.max_streams)
        return self._decoder

    def _run(self, tokens, mask, seed, temperature, topk, cap, audio: bool = False) -> Iterator[np.ndarray]:
        row = self._acquire()
        try:
            with self._lock:
                self.gen.prefill(row, torch.from_numpy(tokens), torch.from_numpy(mask),
                                 seed=seed, temperature=temperature, topk=topk)
                if audio:
                    self.decoder.reset(row)
            for _ in range(cap):
                with self._lock:
                    dev_codes = self.gen.step(row, row + 1, topk)
                    codes = dev_codes.cpu().numpy()[0]  # one D->H copy a tick
                    if not codes.any():
                        return  # end of speech: all-zero frame (never decoded)
                    if audio:
                        pcm = self.decoder.decode(dev_codes, row, row + 1)[0].float().cpu().numpy()
                yield float_to_int16(pcm) if audio else codes
        finally:
            self._release(row)
