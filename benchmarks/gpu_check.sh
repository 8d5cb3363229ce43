#!/usr/bin/env bash
# The one script for a lent GPU machine (no network): build the extension there, run the GPU tests, run the
# benchmarks, and leave logs + JSON in $OUT (default ./bench_out). Budget: the default stages' timeouts add up to
# under 600 s, one device call's limit (the last full run took ~285 s on an H200). Each stage runs even if an
# earlier one failed; summary.txt lists the environment and every stage's exit code. FCK_STAGES picks stages
# (default: those in STAGES below, in this order). At most 8 files come back from the device tool: the benchmark
# logs are joined into bench.log and the JSON rows into bench_cuda.json, leaving at most 5 (build.log,
# tests_gpu.log, bench.log, bench_cuda.json, summary.txt).
set -u
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The device tool's copy of the tree has carried a stale git HEAD: pass FCK_COMMIT=<the commit sent>. The env line
# and every JSON row use it.
export FCK_COMMIT=${FCK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
PY=${PYTHON:-python3}
# bench_adam, bench_learner (measured on the H100 runs of 2026-11-26/27), bench_rnn_per_step, bench_bn_fused (H200,
# 2026-11-28), bench_rnn_autocast (never run on a GPU yet) and ncu_rnn run only when FCK_STAGES names them.
DEFAULT_STAGES="build tests_gpu bench_embedding_bag bench_bag_atomics bench_rnn bench_batch_norm bench_bn_scalar"
STAGES=" ${FCK_STAGES:-$DEFAULT_STAGES} "
declare -a summary=()

stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  [[ $STAGES == *" $name "* ]] || return 0
  local t0=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $((SECONDS - t0))s")
  tail -n 30 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "nvcc: $(command -v nvcc) $(nvcc --version | tail -n 1)"
  echo "commit: ${FCK_COMMIT}  date: $(date -u +%FT%TZ)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage build 130 $PY setup.py build_ext --inplace
# Tests in 8 processes: most of their time is Triton compiling kernels on the host's cores.
# -v: each result is logged as it lands, so a stage cut off by its timeout still names what failed.
# FCK_TEST_K: a pytest -k expression to run only some of them.
test_args=()
[[ -n ${FCK_TEST_K:-} ]] && test_args=(-k "$FCK_TEST_K")
stage tests_gpu 150 $PY -m pytest tests -m gpu -v -p no:cacheprovider -n 8 --timeout 120 -rfE --tb=short \
  ${test_args[@]+"${test_args[@]}"}
# A test that killed its worker leaves no traceback of the C++ side: rerun the first one under cuda-gdb for one.
crashed=$(grep -a -o "worker '[^']*' crashed while running '[^']*'" "$OUT/tests_gpu.log" 2>/dev/null | head -n 1 \
  | sed "s/.*running '\(.*\)'/\1/")
if [[ -n $crashed ]] && command -v cuda-gdb >/dev/null; then
  echo "=== backtrace of $crashed" | tee -a "$OUT/tests_gpu.log"
  timeout 90 cuda-gdb -batch -ex run -ex bt --args $PY -m pytest "$crashed" -q -p no:cacheprovider 2>&1 \
    | tail -n 60 | tee -a "$OUT/tests_gpu.log"
fi
stage bench_embedding_bag 45 $PY benchmarks/bench_embedding_bag.py --device cuda \
  --out "$OUT/bench_embedding_bag_cuda.json"
# The embedding backward with atomics for every case (FCK_BAG_ROWS_CUDA=0; the default goes row by row from 8M
# index-columns: the text cases): the A/B of fck/embedding_bag_rows.h, in one run.
stage bench_bag_atomics 30 env FCK_BAG_ROWS_CUDA=0 $PY benchmarks/bench_embedding_bag.py --device cuda --no-large \
  --out "$OUT/bench_bag_atomics_cuda.json"
# FCK_RNN_ARGS: extra bench_rnn arguments (e.g. --dtype bfloat16 --quick).
stage bench_rnn 75 $PY benchmarks/bench_rnn.py --device cuda ${FCK_RNN_ARGS:-} --out "$OUT/bench_rnn_cuda.json"
# The per-step CUDA loop (the persistent kernels switched off) against cuDNN, lesson-7 shapes and cells;
# FCK_RNN_PER_STEP_ARGS="" adds hidden 128/256 and AWD (the A/B of the persistent kernels past hidden 64).
stage bench_rnn_per_step 45 env FCK_RNN_PERSISTENT_CUDA=0 $PY benchmarks/bench_rnn.py --device cuda \
  ${FCK_RNN_PER_STEP_ARGS---quick} --backends cuda --out "$OUT/bench_rnn_per_step_cuda.json"
# fp32 modules stepped inside torch.autocast (fp16): our half-precision kernels against cuDNN's autocast RNNs.
stage bench_rnn_autocast 40 $PY benchmarks/bench_rnn.py --device cuda --autocast --quick \
  --out "$OUT/bench_rnn_autocast_cuda.json"
stage bench_batch_norm 110 $PY benchmarks/bench_batch_norm.py --device cuda ${FCK_BN_ARGS:---compile --channels-last --conv-train} \
  --out "$OUT/bench_batch_norm_cuda.json"
# The same batch norms at 56x56 (planar and channels-last) and tabular with scalar accesses and the ReLU mask from y
# (FCK_BN_VECTOR_CUDA=0): the A/B of the 16-byte passes and the mask from x, in one run.
stage bench_bn_scalar 40 env FCK_BN_VECTOR_CUDA=0 $PY benchmarks/bench_batch_norm.py --device cuda --stages 0 \
  --channels-last --no-conv --out "$OUT/bench_bn_scalar_cuda.json"
# The opt-in one-kernel batch norm for small planar channels (14x14, 7x7 at batch 64) against cuDNN.
stage bench_bn_fused 40 env FCK_BN_FUSED_CUDA=1 $PY benchmarks/bench_batch_norm.py --device cuda --stages 2,3 --no-conv \
  --out "$OUT/bench_bn_fused_cuda.json"
stage bench_adam 100 bash -c "$PY benchmarks/bench_adam.py --device cuda --sets resnet34 --compile \
  --out $OUT/adam_resnet34.json && $PY benchmarks/bench_adam.py --device cuda --sets 100m \
  --out $OUT/adam_100m.json"
# Nsight Compute on the persistent LSTM/GRU kernels of one lesson-7 fwd+bwd: the LSTM forward took 2x its
# backward's time on the H200 (run 4: 95 vs 48 us a layer) at the same issue rate, which its SASS explained (a
# branch per dot group, serialized activations; both removed since). Each warp stall reason in cycles per issued
# instruction and the instruction mix for all four kernels, then the LSTM forward's SASS with its per-line stall
# samples. Needs a runtime whose counters ncu can read (Firecracker). FCK_NCU_HIDDEN=128 or 256: those kernels (batch
# 32) instead of lesson 7's.
ncu_rnn() {
  local prog="
import os, torch, fastcore_kernels as fck
from fastcore_kernels import nn as fnn
H = int(os.environ.get('FCK_NCU_HIDDEN', '64')); B = 64 if H <= 64 else 32
for cls in (fnn.LSTM, fnn.GRU):
    m = cls(H, H, 1).cuda(); x = torch.randn(70, B, H, device='cuda', requires_grad=True)
    with fck.use_backend('cuda'): m(x)[0].sum().backward()
torch.cuda.synchronize()"
  local common=(--clock-control none --kernel-name-base demangled)
  ncu "${common[@]}" -k "regex:Lstm|Gru|PackGlobal" -c 6 --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,\
smsp__inst_executed.sum,smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_shared_st.sum,\
smsp__inst_executed_op_global_ld.sum,smsp__inst_executed_op_branch.sum,smsp__inst_executed_pipe_xu.sum,\
smsp__inst_executed_pipe_fma.sum,sm__cycles_elapsed.max,gpu__time_duration.sum" $PY -c "$prog"
  ncu "${common[@]}" -k "regex:LstmFwd" -c 1 --section SourceCounters --section WarpStateStats --page source \
    --print-source sass $PY -c "$prog"
}
export -f ncu_rnn
export PY
stage ncu_rnn 120 bash -c ncu_rnn
stage bench_learner 50 $PY benchmarks/bench_learner.py --device cuda --out "$OUT/bench_learner_cuda.json"

# One JSON of every benchmark row, one benchmark log: the device tool brings back at most 8 files.
$PY -c "import json, os, sys; json.dump(sum((json.load(open(f)) for f in sys.argv[2:] if os.path.exists(f)), []), open(sys.argv[1], 'w'), indent=1)" \
  "$OUT/bench_cuda.json" "$OUT"/adam_*.json "$OUT"/bench_*_cuda.json && rm -f "$OUT"/adam_*.json "$OUT"/bench_*_cuda.json
for f in "$OUT"/bench_*.log; do echo "##### $(basename "$f")"; cat "$f"; done >"$OUT/bench.log.tmp"
rm -f "$OUT"/bench_*.log && mv "$OUT/bench.log.tmp" "$OUT/bench.log"

echo "=== summary"
{ cat "$OUT/env.txt"; printf '%s\n' "${summary[@]}"; } | tee "$OUT/summary.txt"
rm -f "$OUT/env.txt"
