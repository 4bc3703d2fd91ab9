"""csmstream.engine: model, weights, prompt, sampling, frame step, streaming codec, engine.

The only subsystem (with kernels/) that imports torch. Nothing here runs at import time.
"""
