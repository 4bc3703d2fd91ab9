"""Engine.stream(): audio from the first frame, equal to the reference's generated audio."""

import numpy as np
import pytest
import torch

import csmstream
from csmstream.kernels.audio import float_to_int16
from tests.checkpoints import reference_ids

SUPPRESS = dict(suppress_tokens=[2048, 2049, 2050], depth_decoder_suppress_tokens=[2048, 2049, 2050])


def test_stream_equals_reference_generate_audio(checkpoint, checkpoint_engine):
    _, ref, tok = checkpoint
    text, n = "Hello there, how are you?", 16
    chunks = list(checkpoint_engine.stream(text, 0, topk=1, max_frames=n))
    assert all(c.dtype == np.int16 and c.shape == (1920,) for c in chunks)
    ours = np.concatenate(chunks)
    with torch.no_grad():
        audio = ref.generate(input_ids=torch.tensor([reference_ids(tok, 0, text)]), max_new_tokens=n,
                             do_sample=False, depth_decoder_do_sample=False, output_audio=True, **SUPPRESS)
    want = float_to_int16(audio[0].numpy())
    assert ours.shape == want.shape
    assert np.abs(ours.astype(np.int32) - want.astype(np.int32)).max() <= 1


def test_first_audio_comes_before_the_last_frame(tiny_engine):
    it = tiny_engine.stream("A longer sentence so that there are many frames to come.", seed=1, max_frames=40)
    first = next(it)
    assert first.shape == (1920,)
    gen = tiny_engine.gen
    assert max(gen.host_pos) > 0  # generation still in progress: the stream is live, not buffered
    rest = list(it)
    assert len(rest) >= 1


def test_context_audio_matches_reference(checkpoint, checkpoint_engine):
    """Context given as 24 kHz audio: encoded with Mimi, and frames equal the reference's with the
    same audio through its own processor path (input_values + <|AUDIO|> placeholders)."""
    _, ref, tok = checkpoint
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(1920 * 5) * 0.1).astype(np.float32)
    ctx = [csmstream.Segment(1, "Hello there.", audio=audio)]
    text, n = "How are you?", 20
    ours = np.stack(list(checkpoint_engine.frames(text, 0, context=ctx, topk=1, max_frames=n)))

    with torch.no_grad():
        n_audio = ref.codec_model.encode(torch.from_numpy(audio)[None, None]).audio_codes.shape[-1]
    a_id, eos_id = ref.config.audio_token_id, ref.config.audio_eos_token_id
    ids = reference_ids(tok, 1, "Hello there.") + [a_id] * n_audio + [eos_id] + reference_ids(tok, 0, text)
    with torch.no_grad():
        # attention_mask as CsmProcessor returns it (pad id == audio id, so generate must not infer one)
        out = ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           input_values=torch.from_numpy(audio)[None, None],
                           input_values_cutoffs=torch.tensor([[len(audio)]]), max_new_tokens=n,
                           do_sample=False, depth_decoder_do_sample=False, **SUPPRESS)
    np.testing.assert_array_equal(ours, out[0].numpy()[-n:])


@pytest.mark.parametrize("audio,match", [
    (np.zeros((2, 4800), dtype=np.float32), "must be mono"),
    (np.zeros(0, dtype=np.float32), "is empty"),
    (np.zeros(24000 * 121, dtype=np.float32), "at most 120 s"),
    (np.zeros(4800, dtype=np.int32), "float in \\[-1, 1\\] or int16"),
    ("not audio", "numpy array"),
    (np.array([np.nan] * 1920, dtype=np.float32), "NaN"),
    (np.full(1920, 2.5, dtype=np.float32), r"peaks at 2\.5; float samples must lie in \[-1, 1\]$"),
    (np.arange(1920, dtype=np.float64) - 960, "peaks at 960; .* divide by 32768, or pass the int16 array"),
])
def test_bad_context_audio(tiny_engine, audio, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.frames("Hi.", context=[csmstream.Segment(0, "x", audio=audio)])


def test_float_context_a_little_past_full_scale_is_accepted(tiny_engine):
    x = np.sin(np.linspace(0, 200, 4800)).astype(np.float32) * 1.1  # a resampler's overshoot
    assert len(list(tiny_engine.frames("Hi.", context=[csmstream.Segment(0, "x", audio=x)], seed=1, max_frames=2)))


def test_int16_context_accepted(tiny_engine):
    pcm = (np.random.default_rng(1).standard_normal(4800) * 3000).astype(np.int16)
    frames = list(tiny_engine.frames("Hi.", context=[csmstream.Segment(0, "x", audio=pcm)], seed=1, max_frames=3))
    assert len(frames) <= 3


@pytest.mark.parametrize("speed", [0.8, 1.5])
def test_stream_at_a_speed_is_the_stretched_audio_and_frees_its_slot(tiny_engine, speed):
    """stream(speed=): the speed-1 stream's PCM for the same seed through the whole-signal WSOLA
    reference (kernels/stretch.py's stretch_ref, not the streaming kernel), sample for sample,
    yielded frame by frame (the first chunk before the last frame); closing it early frees the slot."""
    from csmstream.kernels.stretch import stretch_ref

    text = "A sentence at another speaking rate."
    plain = np.concatenate(list(tiny_engine.stream(text, seed=4, max_frames=12)))
    it = tiny_engine.stream(text, seed=4, max_frames=12, speed=speed)
    first = next(it)
    assert 0 < len(first) < len(plain) and max(tiny_engine.gen.host_pos) > 0  # live, not buffered
    chunks = [first, *it]
    assert len(chunks) >= len(plain) // 1920 and all(c.dtype == np.int16 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), stretch_ref(plain, speed))
    assert len(np.concatenate(chunks)) == round(len(plain) / speed)
    free = len(tiny_engine._free)
    cut = tiny_engine.stream(text, seed=4, max_frames=12, speed=speed)
    next(cut)
    assert len(tiny_engine._free) == free - 1
    cut.close()
    assert len(tiny_engine._free) == free


@pytest.mark.parametrize("speed", [0, 5, float("nan"), "fast", True, None])
def test_a_bad_speed_is_refused_before_any_work(tiny_engine, speed):
    with pytest.raises(ValueError, match=r"speed must be a number in 0.25..4"):
        tiny_engine.stream("Hello.", speed=speed)
