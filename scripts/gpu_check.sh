#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (DESIGN.md, "GPU checks"): build the
# extension in place for sm_90, run the CUDA tests, run the benchmarks at GPU sizes, and write logs
# and JSON under $OUT (./gpu_out when OUT is unset): summary.txt, build.log, pytest_cuda.log,
# bench.log and one JSON per benchmark suite. Nothing is installed from a registry: the
# machine's torch, numpy, safetensors, pytest, transformers and peft are used as they are.
# Budget: about 8 minutes in all. Usage: scripts/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=${1:-}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
t0=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} | tee -a "$summary"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYLORA_BUILD_CUDA=1
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  # An older pip or a read-only site-packages: build in place instead.
  $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { note "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1; }
fi
note "build: $(( $(date +%s) - t0 )) s"
$PY -m pylora info 2>&1 | tee -a "$summary"

timeout 300 $PY -m pytest -m cuda -q -p no:cacheprovider -rfE tests > "$OUT/pytest_cuda.log" 2>&1
note "pytest -m cuda: $(tail -1 "$OUT/pytest_cuda.log")  ($(( $(date +%s) - t0 )) s)"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -30 >> "$summary"

# The suites ship in the package (pylora.bench.<suite>, all on pylora.bench.harness): CUDA events, an L2
# flush before each call, CUDA graphs for launch-bound sizes, limits measured in the same run. Exit 4:
# a sanity check failed (a result below its floor, a model faster than its base); the JSON is then
# <name>.failed.json. Exit 3: an optional package (peft, transformers) is missing.
for suite in merge train_layer multi_kernel; do
  echo "===== $suite" >> "$OUT/bench.log"
  timeout "${BENCH_TIMEOUT:-200}" $PY -m pylora.bench.$suite --device cuda $QUICK --out "$OUT/${suite}_cuda.json" \
    > "$OUT/$suite.txt" 2>&1
  rc=$?
  case $rc in 0) what=ok;; 4) what="SANITY CHECKS FAILED";; 3) what="skipped (missing package)";; 124) what="timed out";; *) what=failed;; esac
  note "$suite: exit $rc, $what ($(( $(date +%s) - t0 )) s)"
  cat "$OUT/$suite.txt" >> "$OUT/bench.log"
  grep -E '^\|' "$OUT/$suite.txt" >> "$summary"
  grep -E '^  [a-z-]+: .*(below its floor|faster than)' "$OUT/$suite.txt" | head -20 >> "$summary"
  rm -f "$OUT/$suite.txt"
done
note "total: $(( $(date +%s) - t0 )) s"
