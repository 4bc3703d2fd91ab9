# csm-stream: `make demo` and `make test` do all set-up on a fresh machine.
# CPU machines get the pinned CPU build of torch; GPU users: make install TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-check kernel-report gpu-bench gpu-wheels clean help nginx

help:
	@echo "make demo    - set up (venv + install) and stream a sentence on the embedded tiny model to out/demo.wav"
	@echo "make test    - set up and run the whole test suite (CPU only; TEST_WORKERS=2 processes, 0 for one)"
	@echo "make bench   - set up and run the pytest-benchmark suites in bench/ (saved under .benchmarks/)"
	@echo "make bench-check - run them again, compare with the last saved run, fail on a >30% median regression"
	@echo "make kernel-report - compile the GPU kernels for sm_90 (ARCH=80/86/89, TRITON=3.6.0, KR_ARGS=--pdl) without a GPU: registers, spills, loads"
	@echo "make gpu-bench - on a CUDA GPU: sweep the GEMV tiles, then bench/gpu.py with the measured ones (OUT=dir)"
	@echo "make gpu-wheels - download into .whl/ what a lent GPU's image lacks (websockets), for bench/gpu_session.sh"
	@echo "make install - only set up .venv (TORCH=... to choose the torch build)"

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m csmstream demo --device cpu --seed 7

# the load-balancer test (tests/deploy) runs nginx; install it when we can (root + apt), else say so
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -qq nginx-light >/dev/null 2>&1 || apt-get install -y -qq nginx >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nginx >/dev/null 2>&1)); } || \
	  echo "note: nginx is not installed and could not be; tests/deploy will fail (apt-get install nginx)"

# the suite runs in TEST_WORKERS processes (pytest-xdist; each test is independent and takes its own
# ports and temporary files): 2 fits a 2-core CI machine; TEST_WORKERS=0 runs it in this one process
TEST_WORKERS ?= 2
test: $(STAMP) nginx
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only --benchmark-autosave

BENCH_FAIL ?= median:30%
bench-check: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only --benchmark-autosave --benchmark-compare \
		--benchmark-compare-fail=$(BENCH_FAIL)

ARCH ?= 90
# TRITON=3.6.0: compile with that Triton instead of the venv's (installed beside it, not over it), e.g.
# the version a GPU image ships; KR_ARGS=--pdl / --int8 pass on to bench/kernel_report.py
TRITON ?=
KR_ARGS ?=
KR_SITE := $(if $(TRITON),$(VENV)/triton-$(TRITON),)
kernel-report: $(STAMP)
	$(if $(TRITON),[ -d $(KR_SITE)/triton ] || $(PY) -m pip install --quiet --no-deps --target $(KR_SITE) triton==$(TRITON),@true)
	TRITON_INTERPRET=0 PYTHONPATH=$(KR_SITE) $(PY) bench/kernel_report.py --arch $(ARCH) $(KR_ARGS)

# on a GPU machine (make install TORCH=... first): the tile sweep, then the engine benchmark run with
# the measured tiles (CSM_GEMV_TILES) -- one session, no code change in between; results in $(OUT)
OUT ?= out/gpu
ROWS ?= 1,2,8
gpu-bench: $(STAMP)
	mkdir -p $(OUT)
	bash -o pipefail -c '$(PY) bench/gemv_sweep.py --rows $(ROWS) --json $(OUT)/gemv_sweep.json | tee $(OUT)/gemv_sweep.txt'
	bash -o pipefail -c 'CSM_GEMV_TILES=$(OUT)/gemv_sweep.json $(PY) bench/gpu.py --json $(OUT)/gpu.json | tee $(OUT)/gpu.txt'

# a lent GPU machine (the device tool) has torch, triton and transformers but no websockets and no
# internet: its wheel, built for the image's Python, travels in the git-ignored .whl/ (carry=[".whl"])
GPU_PY ?= 3.12
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 -d .whl "websockets==$$($(PY) -c 'import websockets; print(websockets.__version__)')"
	@ls .whl

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks build *.egg-info
