"""The Mimi codec (engine/mimi.py): context encoding and whole-sequence decoding.

The streaming decoder (one frame in, 1920 samples out, state carried) builds on this module's
model; see engine/mimi_stream.py.
"""

from __future__ import annotations

import numpy as np
import torch

from .mimi import Mimi, MimiSpec, init_random, load_state

SAMPLE_RATE = 24_000
MAX_CONTEXT_SECONDS = 120
MAX_FLOAT_PEAK = 2.0  # float context audio up to this is taken as it is (resampling overshoots 1 a little)


class Codec:
    """Context encoding and whole-sequence decoding on `mimi` (engine/mimi.Mimi); the streaming
    decoder (engine/mimi_stream.py) runs on the same modules."""

    def __init__(self, mimi: Mimi, num_codebooks: int) -> None:
        self.mimi = mimi.eval().requires_grad_(False)
        self.n = num_codebooks
        self.device = next(mimi.parameters()).device
        if mimi.spec.num_quantizers < num_codebooks:
            raise ValueError(f"codec has {mimi.spec.num_quantizers} quantizers; CSM needs {num_codebooks}")
        self.samples_per_frame = mimi.spec.samples_per_frame

    @classmethod
    def tiny(cls, device, num_codebooks: int = 32, seed: int = 4321) -> Codec:
        """A small Mimi (same strides, 32 codebooks of 2048) with seeded random weights."""
        spec = MimiSpec(hidden_size=64, num_filters=8, codebook_dim=32, vector_quantization_hidden_dimension=32,
                        upsample_groups=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=16, num_quantizers=num_codebooks)
        return cls(init_random(Mimi(spec), seed).to(device), num_codebooks)

    @classmethod
    def from_state(cls, codec_config, state: dict[str, torch.Tensor], device, num_codebooks: int, where: str) -> Codec:
        """From a checkpoint's codec_model.* tensors (flat names, or transformers' nested ones) and
        its codec_config (a transformers MimiConfig, or config.json's dict)."""
        from .weights import CheckpointError

        if not state:
            raise CheckpointError(f"{where}: no codec_model.* tensors; CSM checkpoints carry the Mimi codec")
        try:
            mimi = Mimi(MimiSpec.from_config(codec_config, f"{where}: codec_config"))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        try:
            load_state(mimi, state)
        except ValueError as e:
            raise CheckpointError(f"{where}: codec_model tensors do not fit codec_config: {e}") from None
        return cls(mimi.to(device), num_codebooks)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Whole-sequence decode: codes [F, N] -> float32 audio [F * 1920]."""
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.device).T[None]  # [1, N, F]
        return self.mimi.decode(c)[0, 0].float().cpu().numpy()

    @torch.inference_mode()
    def encode_context(self, audio, *, what: str = "audio") -> np.ndarray:
        """24 kHz mono PCM (float in [-1, 1] or int16) -> codes [F, N] int64."""
        x = check_audio(audio, what)
        t = torch.from_numpy(x).to(self.device)[None, None]  # [1, 1, samples]
        codes = self.mimi.encode(t, num_quantizers=self.n)  # [1, N, F]
        return codes[0].T.cpu().numpy().astype(np.int64)


def check_audio(audio, what: str = "audio") -> np.ndarray:
    """Validate context audio; returns float32 mono samples in [-1, 1] (up to MAX_FLOAT_PEAK taken as is)."""
    if isinstance(audio, (list, tuple)):
        audio = np.asarray(audio)
    if not isinstance(audio, np.ndarray):
        raise ValueError(f"{what} must be a numpy array of 24 kHz mono PCM, got {type(audio).__name__}")
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise ValueError(f"{what} must be mono (1-D samples); got shape {audio.shape} — mix down stereo first")
    if audio.size == 0:
        raise ValueError(f"{what} is empty; give at least one 80 ms frame (1920 samples at 24 kHz)")
    if audio.size > MAX_CONTEXT_SECONDS * SAMPLE_RATE:
        raise ValueError(f"{what} is {audio.size / SAMPLE_RATE:.1f} s; at most {MAX_CONTEXT_SECONDS} s of context "
                         "is allowed")
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{what} must be float in [-1, 1] or int16; got {audio.dtype}")
    x = audio.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite samples")
    peak = float(np.abs(x).max())
    if peak > MAX_FLOAT_PEAK:  # (a little past 1 is a filter's overshoot; far past it is the wrong scale)
        hint = "; int16 values in a float array? divide by 32768, or pass the int16 array" if peak >= 256 else ""
        raise ValueError(f"{what} peaks at {peak:.4g}; float samples must lie in [-1, 1]{hint}")
    return x
