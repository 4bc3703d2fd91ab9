"""What a fresh Python process does: the tests that check what an import or a load pulls in (torch,
numba, transformers, torch._dynamo) cannot ask their own process, which has it all loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_line(code: str, timeout: float = 300) -> str:
    """Run `code` with this Python from the repository's root; the last line it printed. A failed
    run fails the test with its standard error's end."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines, f"it printed nothing; stderr: {r.stderr[-2000:]}"
    return lines[-1]
