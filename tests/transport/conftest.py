import pytest


@pytest.fixture(scope="module")
def http():
    """A real server on tiny with its HTTP port (serve --http-port) open, for one test module."""
    import csmstream
    from tests.servers import RunningServer

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=4), http_port=0).start()
    yield rs
    rs.stop()
