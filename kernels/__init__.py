"""csmstream.kernels: Triton kernels (GPU hot path) and numba kernels (the CPU depth-decoder loop,
CPU audio), each beside a plain reference implementation it is tested against."""

if __name__ == "kernels":
    # Imported by the wrong name. This folder is csmstream.kernels (setup.py maps it), but where the
    # checkout's root is on sys.path (pytest, `python -m csmstream` run from the root) it also answers
    # to the top-level name `kernels`, which is Hugging Face's kernels package: transformers >= 5.25
    # depends on it and imports it with the first model. Hand the name over to that package, or fail
    # the way a missing package does.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (the folder {_root}/kernels is csmstream.kernels)",
                                  name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
