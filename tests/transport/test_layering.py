"""The layering rule: transport/ and integrations/ never import torch (only engine/ and kernels/
may), and nothing heavy happens at import time."""

import subprocess
import sys

MODULES = ["csmstream.transport.server", "csmstream.transport.client", "csmstream.transport.elevenlabs",
           "csmstream.transport.elevenlabs_multi", "csmstream.transport.http_server",
           "csmstream.integrations.telnyx_service", "csmstream.integrations.telnyx_bridge",
           "csmstream.integrations.call_control", "csmstream.integrations.telnyx_listen", "csmstream.benchtool",
           "csmstream.cli"]


def test_transport_and_integrations_import_without_torch():
    code = f"import sys, importlib; [importlib.import_module(m) for m in {MODULES!r}]; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
