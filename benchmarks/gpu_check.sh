#!/usr/bin/env bash
# The one script for a lent GPU machine (no network): build the extension there, run the GPU tests, run the
# benchmarks, and leave logs + JSON in $OUT (default ./bench_out). Budget: under 8 minutes on an H100.
# Each stage runs even if an earlier one failed; the summary at the end lists every stage's exit code.
set -u
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
declare -a summary=()

stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $((SECONDS - t0))s")
  tail -n 25 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2
  git rev-parse --short HEAD 2>/dev/null || true
  date -u +%FT%TZ
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage build 300 $PY setup.py build_ext --inplace
stage tests_gpu 180 $PY -m pytest tests -m gpu -q -x -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml"
stage bench_adam 240 $PY benchmarks/bench_adam.py --device cuda --sets resnet34,100m --compile \
  --out "$OUT/bench_adam_cuda.json"

echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
