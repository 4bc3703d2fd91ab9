"""Standard 16-bit mono WAV files (stdlib wave), written as audio arrives."""

from __future__ import annotations

import errno
import os
import wave
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# suffixes of other audio containers: a WAV written under one of them plays as noise or not at all
NOT_WAV = frozenset({".mp3", ".ogg", ".oga", ".opus", ".flac", ".aac", ".m4a", ".webm", ".ulaw", ".alaw", ".raw",
                     ".pcm"})


class WavWriter:
    """A 16-bit mono WAV opened at once (so a path that cannot be written fails before any work) and
    written chunk by chunk; closing it, however the writing ended, leaves a playable file of what
    arrived. Use as a context manager.

    The audio goes to a hidden `.NAME.part` beside the path, which close() renames over it in one
    step: a reader never sees a half-written file, and a run that ends with nothing (discard(), an
    exception before the first chunk, or any close with keep_empty=False) leaves whatever file was
    at the path as it was.

    Raises:
        ValueError: the path cannot be written (a directory, no permission, ...), a chunk is not 1-D
            int16, or the sample rate is not a positive integer.
    """

    def __init__(self, path: str | Path, sample_rate: int = 24_000, *, keep_empty: bool = True) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if str(path).endswith(("/", os.sep)):  # (Path drops the slash and would write a file by that name)
            raise ValueError(f"cannot write {str(path)!r}: it names a folder; give a file name such as "
                             f"{os.path.join(str(path), 'out.wav')!r}")
        self.path, self.rate, self.samples, self.keep_empty = Path(path), sample_rate, 0, keep_empty
        if self.path.suffix.lower() in NOT_WAV:
            raise ValueError(f"cannot write {str(self.path)!r}: this writes a WAV file, and "
                             f"{self.path.suffix!r} names another format; use a .wav name")
        self._part = self.path.with_name(f".{self.path.name}.part")
        try:  # (opened here, not by wave.open: a Wave_write whose open failed raises again in __del__)
            if self.path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._part, "wb")  # noqa: SIM115 (closed by close())
        except FileExistsError:  # (mkdir: a file where a folder of the path should be)
            raise ValueError(f"cannot write {str(self.path)!r}: a file is in the way of its folder "
                             f"{str(self.path.parent)!r}") from None
        except OSError as e:  # IsADirectoryError, PermissionError, NotADirectoryError, ...
            raise ValueError(f"cannot write {str(self.path)!r}: {e.strerror or e}") from None
        w = wave.open(self._file, "wb")
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        self._w = w

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk)
        if chunk.dtype != np.int16 or chunk.ndim != 1:
            raise ValueError(f"WAV chunks must be 1-D int16 arrays, got {chunk.dtype}{list(chunk.shape)}")
        self._w.writeframes(chunk.astype("<i2", copy=False).tobytes())
        self.samples += len(chunk)

    @property
    def seconds(self) -> float:
        return self.samples / self.rate

    def close(self) -> None:
        """Finish the header and put the file at its path, unless it is empty and keep_empty is
        False: then discard() (a second call does nothing)."""
        if not self.samples and not self.keep_empty:
            self.discard()
        elif self._end():
            os.replace(self._part, self.path)

    def discard(self) -> None:
        """Drop what was written: the path keeps whatever file it had (a second call does nothing)."""
        if self._end():
            self._part.unlink(missing_ok=True)

    def _end(self) -> bool:
        """Close the part file (True), or False if it already was."""
        if self._file.closed:
            return False
        try:
            self._w.close()  # (the header's lengths are set here)
        finally:
            self._file.close()
        return True

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not self.samples:  # failed before any audio: nothing to keep
            self.discard()
        else:
            self.close()


def write_wav(path: str | Path, chunks: Iterable[np.ndarray], sample_rate: int = 24_000) -> int:
    """Write int16 mono chunks to a WAV file as they arrive; returns the number of samples.

    Raises:
        ValueError: as WavWriter.
    """
    with WavWriter(path, sample_rate) as w:
        for chunk in chunks:
            w.write(chunk)
    return w.samples


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV: (int16 samples [n] or [n, channels], sample_rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit WAV; only 16-bit PCM is supported")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
        ch = w.getnchannels()
        return (data if ch == 1 else data.reshape(-1, ch)), w.getframerate()
