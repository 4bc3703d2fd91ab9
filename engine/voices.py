"""Named voices: a directory of NAME.wav + NAME.txt pairs, encoded once into context codes.

Each WAV (8, 16, 24 or 32-bit PCM, any sample rate, mono or stereo) is mixed to mono, resampled
to 24 kHz and encoded with the model's codec; its transcript is NAME.txt. A request with "voice": NAME then
starts from that (text, codes) turn as context, so the model continues in that voice.
"""

from __future__ import annotations

import logging
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernels.resample import Resampler

log = logging.getLogger("csmstream.engine")
SAMPLE_RATE = 24_000
MIN_ROOM = 64  # positions a voice must leave free: a short text and a few seconds of speech


@dataclass(frozen=True)
class Voice:
    name: str
    text: str
    codes: np.ndarray  # [frames, num_codebooks]

    @property
    def seconds(self) -> float:
        return len(self.codes) * 0.08


def pcm_samples(raw: bytes, width: int) -> np.ndarray:
    """Little-endian PCM of `width` bytes a sample (WAV's: 8-bit unsigned, 16/24/32-bit signed) ->
    float32 on the int16 scale (24- and 32-bit keep their fraction: no rounding before resampling)."""
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) * 256.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32)
    if width == 3:
        b = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return (np.where(v >= 1 << 23, v - (1 << 24), v) / 256.0).astype(np.float32)
    if width == 4:
        return (np.frombuffer(raw, "<i4") / 65536.0).astype(np.float32)
    raise ValueError(f"{8 * width}-bit samples")


def read_wav_24k_mono(path: Path) -> np.ndarray:
    """PCM WAV (8, 16, 24 or 32-bit, any rate, any channels) -> int16 mono 24 kHz. ValueError naming
    the file otherwise."""
    try:
        with wave.open(str(path), "rb") as w:
            width, ch, rate, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        why = "; float WAVs are not read: export 16- or 24-bit PCM" if "unknown format: 3" in str(e) else ""
        raise ValueError(f"{path}: not a readable WAV file ({e}){why}") from None
    try:
        x = pcm_samples(raw, width)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; voices must be 8, 16, 24 or 32-bit PCM WAV") from None
    if ch > 1:
        x = x[: len(x) // ch * ch].reshape(-1, ch).mean(axis=1)
    if x.size == 0:
        raise ValueError(f"{path}: no audio")
    return to_24k(x, rate)


def to_24k(x: np.ndarray, rate: int) -> np.ndarray:
    """Mono samples on the int16 scale (int16, or float keeping a fraction) at `rate` -> int16 at
    24 kHz, the codec's rate (resampled whole, its filter's tail flushed)."""
    x = np.asarray(x, np.float32)
    if rate != SAMPLE_RATE:
        r = Resampler(rate, SAMPLE_RATE)
        x = np.concatenate([r.process_float(x), r.flush_float()])
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def load_voices(directory: str | Path, engine) -> dict[str, Voice]:
    """Every NAME.wav in `directory` with its NAME.txt, encoded with the engine's codec."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"voices directory {str(d)!r} does not exist")
    if engine.codec is None:
        raise ValueError("this model has no codec to encode voice prompts")
    wavs = sorted(p for p in d.iterdir() if p.suffix.lower() == ".wav" and p.is_file())  # NAME.WAV too
    if not wavs:
        raise ValueError(f"voices directory {str(d)!r} has no NAME.wav files (each needs a NAME.txt transcript)")
    voices = {}
    for wav in wavs:
        if wav.stem in voices:
            raise ValueError(f"{wav}: a second voice named {wav.stem!r} (file names differ only in case)")
        txt = _transcript(wav)
        if txt is None:
            raise ValueError(f"{wav}: missing transcript {wav.stem}.txt (the words spoken in the WAV)")
        try:  # (utf-8-sig: a byte-order mark, as Windows editors write, is not part of the words)
            text = txt.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{txt}: not UTF-8 text ({e.reason} at byte {e.start}); save the transcript as "
                             "UTF-8") from None
        if not text:
            raise ValueError(f"{txt}: empty transcript")
        codes = engine.codec.encode_context(read_wav_24k_mono(wav), what=str(wav))
        voices[wav.stem] = Voice(wav.stem, text, codes)
        log.info("voice %r: %.1f s, %d frames", wav.stem, len(codes) * 0.08, len(codes))
        check_room(voices[wav.stem], engine, wav)
    return voices


def check_room(voice: Voice, engine, wav: Path) -> None:
    """A voice's turn opens every request that uses it, in the same context window as the text and
    the speech made (a frame a position): refuse one that leaves no room, warn of one that leaves
    less than half, since it caps how long its replies can be (they stop there, not with an error)."""
    from .prompt import turn_positions

    window = engine.gen.max_seq_len
    used = turn_positions(engine.tokenizer, 0, voice.text, len(voice.codes))
    room = window - used
    fit = (window // 2 - used + len(voice.codes)) * 0.08  # seconds of audio that leave half the window
    shorter = (f"under {fit:.0f} s of audio leaves half the window" if fit >= 1 else
               f"its transcript alone takes {used - len(voice.codes)} positions: shorten it")
    if room < MIN_ROOM:
        raise ValueError(f"{wav}: {voice.seconds:.1f} s of audio with its transcript take {used} of the model's "
                         f"{window} positions, leaving {max(room, 0)} for a request's text and speech (at least "
                         f"{MIN_ROOM} needed); {shorter}")
    if room < window // 2:
        log.warning("voice %r: %.1f s of audio with its transcript take %d of the model's %d positions; its replies "
                    "stop after at most %.0f s of speech (less with a long text); %s", voice.name, voice.seconds,
                    used, window, room * 0.08, shorter)

def _transcript(wav: Path) -> Path | None:
    """NAME.txt beside NAME.wav (the extension in any case), or None."""
    exact = wav.with_suffix(".txt")
    if exact.is_file():
        return exact
    return next((p for p in sorted(wav.parent.iterdir()) if p.stem == wav.stem and p.suffix.lower() == ".txt"
                 and p.is_file()), None)


def with_aliases(voices: dict[str, Voice], aliases: dict[str, str] | None = None,
                 default: str | None = None) -> dict[str, Voice]:
    """The voices plus each alias as another key for its target's `Voice` (so a client's voice
    name, OpenAI's "alloy" or an ElevenLabs voice id, can mean one of these). ValueError saying what
    is wrong when an alias or the default does not name one of `voices`, or an alias is a voice's
    own name."""
    out = dict(voices)
    known = ", ".join(sorted(voices)) or "none are loaded"
    if default is not None and default not in voices:
        raise ValueError(f"default voice {default!r}: no such voice (voices: {known})")
    for alias, target in (aliases or {}).items():
        if not isinstance(alias, str) or not alias or not isinstance(target, str):
            raise ValueError(f"voice alias {alias!r} -> {target!r}: both must be non-empty names")
        if alias in voices:
            raise ValueError(f"voice alias {alias!r} is already a voice's own name; pick another alias")
        if target not in voices:
            raise ValueError(f"voice alias {alias!r} -> {target!r}: no such voice (voices: {known})")
        out[alias] = voices[target]
    return out


def parse_aliases(specs) -> dict[str, str]:
    """`ALIAS=VOICE` pairs, several in one spec joined by commas ("alloy=ada,nova=ben"), into
    {alias: voice}; ValueError naming the bad pair."""
    aliases: dict[str, str] = {}
    for spec in specs or ():
        for pair in spec.split(","):
            alias, sep, target = (s.strip() for s in pair.partition("="))
            if not (sep and alias and target):
                raise ValueError(f"voice alias {pair.strip()!r}: write ALIAS=VOICE, e.g. alloy=ada (a client's "
                                 "voice name = one of the --voices)")
            if aliases.setdefault(alias, target) != target:
                raise ValueError(f"voice alias {alias!r} is given twice, for {aliases[alias]!r} and {target!r}")
    return aliases
