"""The checkout's kernels/ folder is csmstream.kernels; with the checkout's root on sys.path (pytest,
`python -m csmstream` run from the root) it must not stand in for Hugging Face's top-level `kernels`
package, which transformers >= 5.25 imports with its first model."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, ''); " + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_top_level_name_goes_to_the_installed_package_or_fails_like_a_missing_one():
    p = _from_root("import kernels; print(kernels.__file__)")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # no such package: the import fails as it would anywhere
        assert p.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in p.stderr
        assert "is csmstream.kernels" in p.stderr
    else:
        assert p.returncode == 0, p.stderr
        where = Path(p.stdout.strip()).resolve()
        assert ROOT not in where.parents or ".venv" in where.parts, where  # not the checkout's folder


def test_transformers_models_and_our_kernels_load_side_by_side_from_the_root():
    p = _from_root("from transformers import MimiModel, MimiConfig; MimiModel(MimiConfig(num_hidden_layers=1)); "
                   "import csmstream.kernels.g711 as g; print(g.__file__)")
    assert p.returncode == 0, p.stderr[-2000:]
    assert Path(p.stdout.strip()) == ROOT / "kernels" / "g711.py"
