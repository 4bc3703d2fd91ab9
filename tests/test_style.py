"""The repository keeps the style its ruff.toml names: a plain `ruff check` over the tree is clean
(unused imports and names, import order, 120-column lines, bugbear's traps such as a zip() of
lists that should match in length without strict=True)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "ruff.toml" not in out.stderr, out.stderr  # (a config this ruff cannot read fails loudly)
    assert out.returncode == 0, out.stdout + out.stderr
