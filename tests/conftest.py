import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a network
os.environ.setdefault("TRITON_INTERPRET", "1")


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker's torch (and every server or CLI process a test starts, which
    inherits the setting) takes cores / workers threads, not all the cores: N workers each running
    N OpenMP threads on N cores spin against each other. On CI's 2 cores, 2 workers: the parity,
    stream and Mimi tests took 120 s so, 40 s with a thread each (2026-12-07). A thread count set
    by hand (OMP_NUM_THREADS) is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores()  # before torch is imported in this process


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.interp import speed_up

        speed_up()  # the interpreter's three costs that buy nothing (tests/interp.py)


@pytest.fixture(scope="session")
def tiny_engine():
    import csmstream

    return csmstream.load("tiny", device="cpu", max_streams=4)


@pytest.fixture(scope="session")
def short_engine():
    """tiny cut to 4 codebooks (engine.tiny.tiny_config), with a 4-codebook tiny codec: a depth loop
    of 3 steps a frame, not 31. The engine of the tests that check the GPU frame step and its
    variants interpreted, whose time is almost all depth steps (~5x less a frame);
    test_fast_step's first test runs tiny's whole 32."""
    from csmstream.engine.codec import Codec
    from csmstream.engine.engine import Engine
    from csmstream.engine.model import CSM
    from csmstream.engine.tiny import init_random, tiny_config
    from csmstream.engine.tokenizer import TextTokenizer

    tok = TextTokenizer.tiny()
    model = CSM(tiny_config(tok.vocab_size, num_codebooks=4))
    init_random(model)
    return Engine(model.eval(), tok, name="tiny-4", max_streams=4, codec=Codec.tiny("cpu", num_codebooks=4))


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


@pytest.fixture(scope="module")
def server():
    """A real csm-stream server on tiny (8 slots) on a free loopback port, for one test module."""
    import csmstream
    from tests.servers import RunningServer

    engine = csmstream.load("tiny", device="cpu", max_streams=8)
    rs = RunningServer(engine).start()
    yield rs
    rs.stop()
