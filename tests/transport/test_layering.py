"""The layering rule: transport/ and integrations/ never import torch (only engine/ and kernels/
may), and nothing heavy happens at import time."""

import subprocess
import sys

from tests.fresh import last_line

MODULES = ["csmstream.transport.server", "csmstream.transport.client", "csmstream.transport.elevenlabs",
           "csmstream.transport.elevenlabs_multi", "csmstream.transport.http_server",
           "csmstream.integrations.telnyx_service", "csmstream.integrations.telnyx_bridge",
           "csmstream.integrations.call_control", "csmstream.integrations.telnyx_listen", "csmstream.benchtool",
           "csmstream.cli"]


def test_transport_and_integrations_import_without_torch():
    code = f"import sys, importlib; [importlib.import_module(m) for m in {MODULES!r}]; print('torch' in sys.modules)"
    assert last_line(code, timeout=120) == "False"


def test_a_say_client_checks_its_flags_without_numba_or_torch():
    """`csm-stream say --url ...` checks --speed (kernels/speed.py) and connects without importing
    numba (~0.5 s: kernels/stretch.py's kernel is the server's) or torch. Here it runs to a port
    nothing listens on, through the CLI's own entry point."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    code = ("import sys; from csmstream.cli import main\n"
            f"rc = main(['say', 'Hi.', '--speed', '1.25', '--url', 'ws://127.0.0.1:{port}/ws/generate'])\n"
            "print(rc, 'numba' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "1 False False", out.stderr
    assert "cannot connect" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "csmstream", "say", "Hi.", "--speed", "9"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--speed must be a number in 0.25..4" in bad.stderr
