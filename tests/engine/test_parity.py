"""The engine against transformers' CsmForConditionalGeneration on identical weights."""

import numpy as np
import pytest
import torch

from tests.checkpoints import reference_ids

SUPPRESS = dict(suppress_tokens=[2048, 2049, 2050], depth_decoder_suppress_tokens=[2048, 2049, 2050])


def reference_frames(ref, *, input_ids=None, inputs_embeds=None, n=20):
    kw = dict(max_new_tokens=n, do_sample=False, depth_decoder_do_sample=False, **SUPPRESS)
    with torch.no_grad():
        if inputs_embeds is not None:
            out = ref.generate(inputs_embeds=inputs_embeds, **kw)
        else:
            out = ref.generate(input_ids=input_ids, **kw)
    return out[0, -n:].numpy() if inputs_embeds is None else out[0].numpy()[-n:]


@pytest.fixture(params=["kernel", "eager"])
def depth_path(request, checkpoint_engine):
    """Run a test through the CPU frame kernel (the default on CPU float32) and the eager path."""
    g = checkpoint_engine.gen
    kernel = g.cpu
    assert kernel is not None, "CPU float32 engines use the frame kernel"
    if request.param == "eager":
        g.cpu = None
    yield request.param
    g.cpu = kernel


def test_backbone_and_depth_logits_match(checkpoint, checkpoint_engine, depth_path):
    path, ref, tok = checkpoint
    eng = checkpoint_engine
    ids = torch.tensor([reference_ids(tok, 1, "The quick brown fox.")])
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
    ref_c0 = out.logits[0, -1]  # [V]
    h_ref = out.hidden_states[-1][0, -1]

    from csmstream.engine.prompt import build_prompt

    tokens, mask = build_prompt(eng.tokenizer, "The quick brown fox.", 1, [], 32)
    g = eng.gen
    g.prefill(0, torch.from_numpy(tokens), torch.from_numpy(mask), seed=0, temperature=1.0, topk=1)
    ours_c0 = g.h[0] @ eng.model.c0_head.weight.T
    torch.testing.assert_close(ours_c0, ref_c0, rtol=1e-4, atol=1e-5)

    # depth decoder, teacher-forced on a fixed random frame: logits of codebooks 1..31
    frame = torch.randint(0, 2048, (32,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dd = ref.depth_decoder(input_ids=torch.cat([torch.zeros(1, dtype=torch.long), frame[:31]])[None],
                               backbone_last_hidden_state=h_ref[None])
    ref_logits = dd.logits[0]  # [31, V]
    seen = []

    def draw(logits, j):
        seen.append(logits[0].clone())
        return frame[j : j + 1]

    with torch.inference_mode():
        if depth_path == "eager":
            g.depth_loop.run(0, 1, g.h[0:1], frame[0:1], draw)
            ours = torch.stack(seen)  # [31, codebook_size]
        else:
            rec = np.zeros((1, 31, 2048), np.float32)
            forced = g.cpu.depth_only(g.h[0:1], frame[0:1], g.temperature[0:1], g.topk[0:1], g.seed[0:1], g.frame[0:1],
                                      force=frame[None, 1:].numpy().copy(), record=rec)
            assert forced[0].tolist() == frame[1:].tolist()
            ours = torch.from_numpy(rec[0])
    torch.testing.assert_close(ours, ref_logits[:, :2048], rtol=1e-4, atol=1e-5)
    g.release(0)


@pytest.mark.parametrize("speaker,text", [
    (0, "Hello there, how are you doing today?"),
    (1, "Thanks for calling."),
    (3, "The quick brown fox jumps over the lazy dog."),
])
def test_greedy_frames_equal_reference(checkpoint, checkpoint_engine, depth_path, speaker, text):
    _, ref, tok = checkpoint
    n = 20
    ours = np.stack(list(checkpoint_engine.frames(text, speaker, topk=1, max_frames=n)))
    want = reference_frames(ref, input_ids=torch.tensor([reference_ids(tok, speaker, text)]), n=n)
    assert ours.shape == (n, 32)
    np.testing.assert_array_equal(ours, want)


def test_greedy_frames_with_context_equal_reference(checkpoint, checkpoint_engine, depth_path):
    """Context codes enter as summed audio embeddings plus a zero end-of-audio frame; the
    reference gets the same prompt built from its own embedding modules."""
    import csmstream

    _, ref, tok = checkpoint
    rng = np.random.default_rng(5)
    ctx_codes = rng.integers(0, 2048, size=(6, 32))
    ctx = [csmstream.Segment(1, "Hello there.", codes=ctx_codes)]
    text, n = "How are you?", 20
    ours = np.stack(list(checkpoint_engine.frames(text, 0, context=ctx, topk=1, max_frames=n)))

    with torch.no_grad():
        t1 = ref.embed_text_tokens(torch.tensor(reference_ids(tok, 1, "Hello there.")))
        frames = torch.cat([torch.from_numpy(ctx_codes), torch.zeros(1, 32, dtype=torch.long)])
        a1 = ref.backbone_model.embed_tokens(frames[None])[0]
        t2 = ref.embed_text_tokens(torch.tensor(reference_ids(tok, 0, text)))
        embeds = torch.cat([t1, a1, t2])[None]
    want = reference_frames(ref, inputs_embeds=embeds, n=n)
    np.testing.assert_array_equal(ours, want)
    # and the context matters: without it the frames differ
    plain = np.stack(list(checkpoint_engine.frames(text, 0, topk=1, max_frames=n)))
    assert not np.array_equal(plain, ours)


def test_default_rope_and_mqa_config(tmp_path):
    """A second shape: default RoPE, one KV head in the depth decoder, three backbone layers."""
    import csmstream
    from tests.checkpoints import write_checkpoint

    ref, tok = write_checkpoint(tmp_path, seed=7, rope="default", backbone=(96, 3, 6, 2, 160),
                                depth=(32, 1, 4, 1, 64))
    eng = csmstream.load(str(tmp_path), device="cpu", dtype="float32", max_streams=1)
    text = "Numbers 0123456789."
    ours = np.stack(list(eng.frames(text, 2, topk=1, max_frames=20)))
    want = reference_frames(ref, input_ids=torch.tensor([reference_ids(tok, 2, text)]), n=20)
    np.testing.assert_array_equal(ours, want)
