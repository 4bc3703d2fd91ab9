"""engine/model.py's CSM and engine/tiny.py's shapes: what building a model costs and gives."""

import pytest
import torch

from csmstream.engine.model import CSM
from csmstream.engine.tiny import tiny_config
from tests.fresh import last_line


def test_built_on_meta_it_imports_no_dynamo():
    """A checkpoint load (and bench/kernel_report.py) builds CSM on the meta device. nn.Embedding's
    own init and a multiply there would go through torch's Python decompositions, which import
    torch._dynamo (~3-4 s on CI's machine) for values nobody reads."""
    code = ("import sys, torch; from csmstream.engine.model import CSM; from csmstream.engine.tiny import tiny_config\n"
            "with torch.device('meta'):\n    m = CSM(tiny_config(100))\n"
            "print(m.audio_embed.weight.device, 'torch._dynamo' in sys.modules)")
    assert last_line(code) == "meta False"


@pytest.mark.parametrize("n", [32, 4])
def test_audio_offsets_start_each_codebooks_rows(n):
    cfg = tiny_config(100, num_codebooks=n)
    m = CSM(cfg)
    assert m.audio_offsets.tolist() == [i * cfg.audio_vocab for i in range(n)]
    assert m.audio_embed.weight.shape == (n * cfg.audio_vocab, cfg.backbone.dim)
    assert m.depth_heads.shape == (n - 1, cfg.depth.dim, cfg.audio_vocab)
    assert cfg.depth.max_seq_len == n + 1 and m.depth_embed is m.audio_embed  # tied, as CSM-1B's
    assert m.audio_offsets.dtype == torch.int64


@pytest.mark.parametrize("n", [1, 33, 0, 4.0, "4", True])
def test_a_tiny_with_codebooks_out_of_range_is_refused(n):
    with pytest.raises(ValueError, match=f"num_codebooks must be an int in 2..32, got {n!r}"):
        tiny_config(100, num_codebooks=n)
