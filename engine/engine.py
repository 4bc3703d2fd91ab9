"""The Engine: a loaded model, its slots, and the public frames() iterator."""

from __future__ import annotations

import heapq
import math
import secrets
import threading
from collections.abc import Iterable, Iterator
from numbers import Integral, Real

import numpy as np

from ..kernels.audio import float_to_int16
from ..kernels.stretch import TimeStretcher, check_speed
from .config import CsmModelConfig
from .generator import FrameGenerator
from .model import CSM
from .prefill import PrefillJob
from .prefix import PrefixCache
from .prompt import Segment, build_prompt, turn_positions
from .sampling import MAX_TEMPERATURE, MIN_TEMPERATURE
from .tokenizer import TextTokenizer

MAX_TEXT_CHARS = 5000


def _require_unicode(text: str, what: str) -> None:
    """ValueError unless `text` is valid Unicode: a lone UTF-16 surrogate (which a JSON escape such
    as \\ud800 makes) has no UTF-8 form, so no tokenizer can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: it holds an unpaired surrogate "
                         f"U+{ord(text[e.start]):04X} at character {e.start}; remove it, or pair a high "
                         "surrogate (U+D800-DBFF) with a low one (U+DC00-DFFF)") from None


class Engine:
    """A loaded CSM model ready to generate. Build one with `csmstream.load()`."""

    sample_rate = 24_000
    samples_per_frame = 1920

    def __init__(self, model: CSM, tokenizer: TextTokenizer, *, name: str, max_streams: int,
                 codec=None, cuda_graphs: bool | None = None) -> None:
        self.model, self.tokenizer, self.name, self.codec = model, tokenizer, name, codec
        model.requires_grad_(False)  # inference only: keeps autograd bookkeeping off every op
        self.config: CsmModelConfig = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_streams = max_streams
        self.gen = FrameGenerator(model, rows=max_streams, graphs=cuda_graphs)
        self._lock = threading.Lock()
        self._free = list(range(max_streams))  # a heap: the lowest free row first keeps batches dense
        self._decoder = None
        self._decode_graphs = None
        self.prefixes = PrefixCache()  # KV of pinned voice turns (engine.pin_voice)

    def __repr__(self) -> str:
        q = "" if self.quantize == "none" else f", quantize={self.quantize}"
        return f"Engine({self.name!r}, device={self.device}, dtype={self.dtype}{q}, streams={self.max_streams})"

    @property
    def quantize(self) -> str:
        """"int8-depth" when the depth decoder's weights are int8 (load(quantize=...)), else "none"."""
        return "int8-depth" if getattr(self.model, "depth_int8", None) is not None else "none"

    # -- public API ---------------------------------------------------------------------------
    def frames(self, text: str, speaker_id: int = 0, *, context: Iterable[Segment] = (),
               temperature: float = 0.9, topk: int = 50, seed: int | None = None,
               max_frames: int | None = None) -> Iterator[np.ndarray]:
        """Generate audio codes frame by frame.

        Args:
            text: what to say (non-empty, at most 5000 characters).
            speaker_id: integer speaker label >= 0, as in the prompt `[speaker]text`.
            context: earlier turns (`Segment`s) the voice and prosody follow; None is none.
            temperature: > 0; sampling temperature (taken as 1e-6 below it, already greedy, and as
                1e30 above it, already uniform over the top k: float32 holds no more).
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
               max_frames: int | None = None, speed: float = 1.0) -> Iterator[np.ndarray]:
        """Generate speech as int16 PCM, 24 kHz mono: 1920 samples per 80 ms frame, each yielded as
        soon as its frame exists (the first after the first frame). Arguments and errors are those
        of `frames()`. Samples beyond [-1, 1] are clipped, never wrapped.

        `speed` (0.25..4, default 1) plays the speech faster or slower with its pitch kept
        (kernels/stretch.py, the server's `speed`): the chunks then hold round(n / speed) samples
        in all for the n the frames made, in pieces of about 1920 / speed (a little of each frame
        waits for the next; the rest comes at the end). At 1 the frames' PCM is yielded as it is."""
        if self.codec is None:
            raise ValueError("this engine has no codec; stream() needs one to turn codes into audio")
        req = self._validate(text, speaker_id, context, temperature, topk, seed, max_frames)
        speed = check_speed(speed)
        pcm = self._run(*req, audio=True)
        return pcm if speed == 1 else _stretched(pcm, speed)

    def pin_voice(self, text: str, codes) -> None:
        """Cache the backbone KV of the context turn (text, codes) whenever it opens a request's
        context: the first such request stores it, later ones copy it into their slot instead of
        prefilling it (a named voice's prompt then adds no prefill time per request)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.config.num_codebooks:
            raise ValueError(f"codes must be [frames, {self.config.num_codebooks}], got {list(codes.shape)}")
        self.prefixes.pin(text, codes.astype(np.int64))

    def unpin_voice(self, text: str, codes) -> None:
        """Undo pin_voice: that turn's KV is freed and no longer cached (a voice removed or changed
        by a reload)."""
        self.prefixes.unpin(text, np.asarray(codes).astype(np.int64))

    # -- internals ----------------------------------------------------------------------------
    def _prefill(self, row: int, prepared, audio: bool) -> None:
        """Prefill `row` with a prepared prompt in one go (call with the lock held); uses or fills
        the prefix cache, and resets the row's streaming decoder when audio is wanted."""
        PrefillJob(self, row, prepared, audio).run()

    def _validate(self, text, speaker_id, context, temperature, topk, seed, max_frames):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty string, got {text!r:.40}")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed per request")
        _require_unicode(text, "text")
        if isinstance(speaker_id, bool) or not isinstance(speaker_id, Integral) or speaker_id < 0:
            raise ValueError(f"speaker_id must be an integer >= 0, got {speaker_id!r}")
        try:  # (any Real: numpy's isfinite refused ints past int64 and Fractions)
            t = float(temperature) if isinstance(temperature, Real) and not isinstance(temperature, bool) else math.nan
        except OverflowError:  # an integer past float's range: finite, and far past MAX_TEMPERATURE
            t = MAX_TEMPERATURE
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r:.40}")
        cs = self.config.codebook_size
        if isinstance(topk, bool) or not isinstance(topk, Integral) or not 1 <= topk <= cs:
            raise ValueError(f"topk must be an integer in 1..{cs} (1 is greedy), got {topk!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, Integral)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be an integer >= 1 or None, got {max_frames!r}")
        if context is None:
            context = ()
        elif not isinstance(context, Iterable):
            raise ValueError(f"context must be a sequence of csmstream.Segment, got {type(context).__name__}")
        ctx = [self._context_codes(s, i) for i, s in enumerate(context)]
        n = self.config.num_codebooks
        tokens, mask = build_prompt(self.tokenizer, text, int(speaker_id), ctx, n)
        prefix = None
        if ctx and ctx[0][2] is not None:  # a pinned voice turn first: its KV may be cached
            spk, first_text, first_codes = ctx[0]
            prefix = self.prefixes.lookup(spk, first_text, first_codes,
                                          turn_positions(self.tokenizer, spk, first_text, len(first_codes)))
        room = self.gen.max_seq_len - len(tokens)
        if room < 1:
            raise ValueError(
                f"prompt (text + context) is {len(tokens)} positions; the model's window is "
                f"{self.gen.max_seq_len}: shorten the text or drop context segments"
            )
        cap = max_frames if max_frames is not None else self.config.default_max_frames(len(text))
        seed = secrets.randbits(63) if seed is None else int(seed)
        if prefix is not None and prefix.kv is not None:
            tokens, mask = tokens[prefix.length :], mask[prefix.length :]  # the rest is copied in
        t = min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE)  # what float32 holds: see sampling.py
        return tokens, mask, seed, t, int(topk), min(int(cap), room), prefix

    def _context_codes(self, seg, i: int):
        if not isinstance(seg, Segment):
            raise ValueError(f"context[{i}] must be a csmstream.Segment, got {type(seg).__name__}")
        if isinstance(seg.speaker_id, bool) or not isinstance(seg.speaker_id, Integral) or seg.speaker_id < 0:
            raise ValueError(f"context[{i}].speaker_id must be an integer >= 0, got {seg.speaker_id!r}")
        if not isinstance(seg.text, str):
            raise ValueError(f"context[{i}].text must be a string")
        _require_unicode(seg.text, f"context[{i}].text")
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
        """The streaming Mimi decoder, one state slot per stream (built on first use; on CUDA with
        graphs on, its per-bucket graphs are captured then too)."""
        if self._decoder is None:
            from .mimi_stream import DecodeGraphs, StreamingMimiDecoder

            self._decoder = StreamingMimiDecoder(self.codec.mimi, rows=self.max_streams)
            fast = self.gen.fast
            if fast is not None and fast.use_graphs and self.codec.device.type == "cuda":
                self._decode_graphs = DecodeGraphs(self._decoder, fast.buckets, self.config.num_codebooks)
        return self._decoder

    @property
    def decode_graphs(self):
        """Per-bucket CUDA graphs of the streaming decode, or None (CPU, graphs off, no codec)."""
        if self._decoder is None and self.codec is not None:
            self.decoder  # noqa: B018 - builds them
        return self._decode_graphs

    def rows_unshared(self, bucket: int, mine) -> bool:
        """Whether every row in [0, bucket) is free or in `mine` (so a whole-bucket decode replay,
        which advances every row's decoder state, harms nobody)."""
        free = set(self._free)
        return all(r in free or r in mine for r in range(bucket))

    def _decode_rows(self, dev_codes, lo: int, rows: list[int], mine) -> dict[int, np.ndarray]:
        """Streaming decode of `rows` (sorted; row r's frame is dev_codes[r - lo]) -> row -> float32
        audio. One graph replay over the bucket when every row there is free or in `mine` (a replay
        advances every row's decoder state); else one eager decode per contiguous run of rows, so
        no state moves for a row outside them (e.g. a direct frames() user's)."""
        dg = self.decode_graphs
        a, b = rows[0], rows[-1] + 1
        if dg is not None and self.rows_unshared(dg.bucket(b), mine):
            wav = dg.decode(dev_codes[a - lo : b - lo], a, b).float().cpu().numpy()
            return {r: wav[r - a] for r in rows}
        out: dict[int, np.ndarray] = {}
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                a, b = rows[start], rows[i - 1] + 1
                wav = self.decoder.decode(dev_codes[a - lo : b - lo], a, b).float().cpu().numpy()
                out.update((r, wav[r - a]) for r in range(a, b))
                start = i
        return out

    def _run(self, *prepared, audio: bool = False) -> Iterator[np.ndarray]:
        topk, cap = prepared[4], prepared[5]
        row = self._acquire()
        try:
            with self._lock:
                self._prefill(row, prepared, audio)
            for _ in range(cap):
                with self._lock:
                    dev_codes = self.gen.step(row, row + 1, topk)
                    codes = dev_codes.cpu().numpy()[0]  # one D->H copy a tick
                    if not codes.any():
                        return  # end of speech: all-zero frame (never decoded)
                    if audio:
                        pcm = self._decode_rows(dev_codes, row, [row], (row,))[row]
                yield float_to_int16(pcm) if audio else codes
        finally:
            self._release(row)


def _stretched(pcm: Iterator[np.ndarray], speed: float) -> Iterator[np.ndarray]:
    """stream(speed=...): the frames' PCM through a TimeStretcher; closing it closes the frames'
    iterator (which frees the slot)."""
    stretcher = TimeStretcher(speed)
    try:
        for chunk in pcm:
            out = stretcher.process(chunk)
            if len(out):
                yield out
        out = stretcher.flush()
        if len(out):
            yield out
    finally:
        pcm.close()
