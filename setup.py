"""csm-stream: the four subsystem folders install inside the csmstream namespace (package_dir),
so imports read `csmstream.engine...` and no bare `engine` package is installed."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SUBSYSTEMS = ("engine", "kernels", "transport", "integrations")


def _packages():
    dirs = {"csmstream": "csmstream", **{f"csmstream.{s}": s for s in SUBSYSTEMS}}
    found = dict(dirs)
    for pkg, folder in dirs.items():  # sub-packages below each folder, if any
        for init in sorted((ROOT / folder).glob("*/**/__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            found[".".join((pkg, *rel.parts))] = str(Path(folder, rel))
    return found


def _version():
    for line in (ROOT / "csmstream" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in csmstream/__init__.py")


PACKAGES = _packages()

setup(
    name="csm-stream",
    version=_version(),
    description="Real-time streaming text-to-speech server for Sesame's CSM-1B",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # asyncio.timeout, Task.cancelling
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"csmstream.kernels": ["tiles/*.json"]},  # measured GEMV tiles per GPU model (gemv_tiles.py)
    install_requires=[
        # CPU machines: install torch==2.13.0 first (the Makefile does); GPU: a CUDA build of torch.
        "torch>=2.5",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "huggingface_hub>=0.30",
        "numpy>=1.26",
        "numba>=0.60",
        "triton>=3.0",
        "uvloop>=0.19; sys_platform != 'win32'",
        "websockets>=13",
        "httpx>=0.27",  # Telnyx Call Control API (integrations/call_control.py)
        "lameenc>=1.7",  # mp3 output (transport/mp3.py): OpenAI's and ElevenLabs' clients ask for it by default
        "av>=14",  # Ogg Opus output (transport/opus.py: FFmpeg's libopus); its G.722 is the tests' reference
    ],
    extras_require={
        # openai, elevenlabs: their SDKs are independent clients in the tests of the compatible endpoints
        # transformers: the reference the tests hold the engine, the codec and config.json's reading to
        # (and bench/test_frame_step.py's baseline); serving never imports it (engine/hf_config.py)
        "dev": ["transformers>=5.0",
                "pytest>=8", "pytest-xdist>=3.5", "pytest-benchmark>=4", "pytest-asyncio>=0.23", "hypothesis>=6",
                "matplotlib>=3.7", "openai>=1.40", "elevenlabs>=2.70,<3",
                "soundfile>=0.12",  # independent MP3 and Ogg Opus decoders (libsndfile: mpg123, libogg + libopus)
                "trustme>=1.1",  # a throwaway CA and server certificate for the TLS tests
                "ruff==0.17.5"],  # tests/test_style.py: pinned, as each release adds rules
        "bench": ["matplotlib>=3.7"],  # plots of `csm-stream bench`
    },
    entry_points={"console_scripts": ["csm-stream=csmstream.cli:main"]},
)
