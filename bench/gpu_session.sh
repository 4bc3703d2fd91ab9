#!/usr/bin/env bash
# Issue 7's GPU figures in ONE device call. A lent GPU comes with 15 minutes of device time, the
# machine's start included, and one command may run 600 s: this script is that command, most
# important first, every part under a timeout, every result written under $OUT as it is measured
# (the JSON files after every stage or sweep case), so a part that fails or runs out of time
# costs only itself.
#   1. the package (copied as setup.py maps it) and any carried wheels (.whl/: websockets) into $SITE;
#   2. the device's facts (nvidia-smi, torch, triton);
#   3. bench/gpu.py batch1,context,check,profile,int8 on the default tiles (the device's built-in
#      table, kernels/tiles/, where it has one, else the guess)                   -> first.json
#   3b. the kernel tests whose programs read each other's writes (split attention, the fold, split-K
#      GEMVs, their counters), compiled: what only a GPU can really check            (session.log)
#   4. bench/gemv_sweep.py --rows 1: the batch-1 tiles, measured (~1,760 candidates with the staged,
#      split and dot-path K loops: ~75 s to compile on 16 cores, ~110 s to time)   -> sweep.json
#   5. bench/gpu.py batch1,int8,profile again on the measured tiles (CSM_GEMV_TILES) -> tiles.json
#   6. bench/gpu.py ttfa,prefill,sample,buckets,live (measured tiles if any)      -> rest.json
#   7. the rest of the Triton kernel tests compiled (TRITON_INTERPRET=0), while time is left (session.log)
# From the checkout's root, through the device tool:
#   make gpu-wheels    (here, once: websockets for the image's Python 3.12 into the git-ignored .whl/)
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Env: OUT (default out/gpu), BUDGET seconds for the whole script (default 540), PY (python3),
# SITE (/tmp/csm-site); DRY=1 is the CPU dry run the tests make (micro config, kernels interpreted,
# no sweep, no compiled tests; its times mean nothing).
set -u
OUT=${OUT:-out/gpu}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
SITE=$(realpath -m "${SITE:-/tmp/csm-site}")
DRY=${DRY:-0}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2  # (absolute: the parts run from $SITE)
exec > >(tee -a "$OUT/session.log") 2>&1
TEE=$!

T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }
say() { echo "[gpu_session +$((SECONDS - T0))s] $*"; }
cap() {  # cap WANT RESERVE: WANT seconds, or what is left after keeping RESERVE for the later parts
  local l=$(($(left) - ${2:-0}))
  echo $(($1 < l ? $1 : l))
}
part() {  # part NAME SECONDS COMMAND...: run it under a timeout; the script goes on whatever it does
  local name=$1 limit=$2 rc
  shift 2
  if ((limit < 20)); then
    say "$name: skipped, $(left) s of the budget left"
    return 99
  fi
  say "$name: start (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  say "$name: exit $rc$( ((rc == 124)) && echo ', timed out')"
  return $rc
}

# 1. the package: csmstream/ with the subsystem folders inside it, as setup.py's package_dir maps
# them (a copy: building a wheel needs setuptools' build environment, which an offline image lacks),
# and beside it bench/, tests/ and pytest.ini; everything below runs from there. Not from the
# checkout: `python -c`/`-m pytest` put the working directory first on sys.path, where the bare
# csmstream/ (no subsystems inside) would shadow the copy (the first call of 2026-12-04 failed so:
# a venv's editable install hides that, a GPU image has none)
rm -rf "$SITE" && mkdir -p "$SITE" && cp -r csmstream bench tests pytest.ini "$SITE/" || { say "cannot write $SITE"; exit 2; }
for d in engine kernels transport integrations; do  # = setup.py's SUBSYSTEMS
  cp -r "$d" "$SITE/csmstream/$d" || exit 2
done
wheels=(.whl/*.whl)
if [ "$DRY" != 1 ] && [ -e "${wheels[0]}" ]; then  # (built for the image's Python, not this one)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" ||
    say "the carried wheels did not install; going on without them"
fi
cd "$SITE" || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import csmstream.engine.cuda_step as m; print('csmstream.engine from', m.__file__)" ||
  { say "the package does not import"; exit 2; }

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  GPU=(--device cpu --config micro --iters 1 --warmup 0 --check-frames 1 --ttfa-requests 1 --continue-turns 0 --buckets 1,2
       --streams 2 --seconds 0.16 --sample-batches 1 --sample-draws 2)
else
  GPU=()
fi

# 2. facts
say "device facts"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version \
  --format=csv
"$PY" -c "import sys, torch, triton, transformers, numpy; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| numpy',
numpy.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
"$PY" -c "import websockets" 2>/dev/null || say "websockets is missing: the server TTFA rows will say n/a (make gpu-wheels)"

# 3. batch 1 first: the issue's open target, and what it is made of
part first "$(cap 240 150)" "$PY" bench/gpu.py "${GPU[@]}" --stages batch1,context,check,profile,int8 --json "$OUT/first.json"

# 3b. compiled on the GPU, the kernel tests whose programs hand results to each other through memory
# and counters (interpreted, programs run one after another, so CI cannot see an ordering bug);
# -v names each test as it runs and pytest-timeout (in the image) ends a hung one; with them the
# dot path's (tl.dot, which interpreted gets fp32 operands, compiled bf16 ones)
KTESTS=(tests/kernels/test_triton_ops.py tests/kernels/test_triton_attn.py tests/kernels/test_triton_gemv.py)
CROSS="split or fold or merge or counter or rope or dot"
if [ "$DRY" != 1 ]; then
  part cross-program-tests "$(cap 90 300)" env TRITON_INTERPRET=0 "$PY" -m pytest -v --tb=short -p no:cacheprovider \
    -o timeout=60 -k "$CROSS" "${KTESTS[@]}"
fi

# 4-5. the batch-1 tiles measured, then batch 1 on them
TILES=()
if [ "$DRY" != 1 ]; then
  part sweep "$(cap 220 150)" "$PY" bench/gemv_sweep.py --rows 1 --json "$OUT/sweep.json"
  if [ -s "$OUT/sweep.json" ]; then
    TILES=(env "CSM_GEMV_TILES=$OUT/sweep.json")
    part tiles "$(cap 150 90)" "${TILES[@]}" "$PY" bench/gpu.py --stages batch1,int8,profile --json "$OUT/tiles.json"
  fi
fi

# 6. the rest of the table; gpu.py starts no stage past its budget
rest=$(($(left) - 30))
part rest "$(cap 600 20)" "${TILES[@]}" "$PY" bench/gpu.py "${GPU[@]}" --stages ttfa,prefill,sample,buckets,live \
  --budget-s "$((rest > 0 ? rest * 2 / 3 : 0))" --json "$OUT/rest.json"

# 7. the kernels' other tests, compiled, with what is left: the files whose tensors go to the GPU when
# there is one (test_pdl's harness is CPU-only by design: it poisons tensors inside the interpreter).
# -v and the per-test timeout as in 3b, so a stuck test is named in the log rather than eating the
# budget (2026-12-04: the run ended in its timeout, unnamed)
if [ "$DRY" != 1 ]; then
  part kernel-tests "$(cap 600 5)" env TRITON_INTERPRET=0 "$PY" -m pytest -v --tb=short -p no:cacheprovider \
    -o timeout=60 -k "not ($CROSS)" "${KTESTS[@]}"
fi
say "done; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # session.log complete before the device tool collects $OUT
