import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a network
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_engine():
    import csmstream

    return csmstream.load("tiny", device="cpu", max_streams=4)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A random transformers CSM (llama3 rope, GQA) saved with save_pretrained."""
    from tests.checkpoints import write_checkpoint

    path = tmp_path_factory.mktemp("csm_ckpt")
    ref, tok = write_checkpoint(path, seed=0)
    return path, ref, tok


@pytest.fixture(scope="session")
def checkpoint_engine(checkpoint):
    import csmstream

    return csmstream.load(str(checkpoint[0]), device="cpu", dtype="float32")
