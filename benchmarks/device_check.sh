#!/usr/bin/env bash
# One GPU check that finishes in under 8 minutes on an H100/H200: build the extension, run the GPU tests
# (bf16/fp16 against the references), run the benchmarks against their baselines (same run), print a short table last.
#
# Usage (repo root, on the GPU machine):  bash benchmarks/device_check.sh
#   BUDGET_S=450     total seconds for everything after the build (steps that no longer fit are skipped, and said so)
#   FULL=1           full benchmark sweeps instead of --quick (does not fit in 8 minutes)
#   PYTHON=python3   interpreter;  OUT=dir  where logs and result tables go (default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
export LLAVA_FAST_RESULTS_DIR="$RES"
export LLAVA_FAST_CUDA_ARCHS=${LLAVA_FAST_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-16}
BUDGET_S=${BUDGET_S:-450}
QUICK=$([ "${FULL:-0}" = "1" ] && echo "" || echo "--quick")
t0=$(date +%s)
summary=()

step() {  # step NAME LIMIT_S CMD...   (the limit is cut to what is left of the budget)
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - t_budget) ))
  if [ "$left" -lt 15 ]; then summary+=("$(printf '%-22s skipped (time budget)' "$name")"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local s=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$RES/$name.log"
  local what="ok"; [ $rc -ne 0 ] && what="FAILED rc=$rc"; [ $rc -eq 124 ] && what="TIMEOUT"
  summary+=("$(printf '%-22s %-12s %4ss' "$name" "$what" "$(( $(date +%s) - s ))")")
}

$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
t_budget=$(date +%s)
BUDGET_S=$(( BUDGET_S + 150 )); step build 150 $PY -m pip install --no-build-isolation --no-deps -e . ; BUDGET_S=$(( BUDGET_S - 150 ))
t_budget=$(date +%s)
step env 30 $PY -m llava_fast.cli env
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
step gpu_tests 170 $PY -m pytest -q -x -m cuda $XDIST -p no:cacheprovider tests
for b in attention projector cross_entropy pack_features rms_norm swiglu rope anyres; do
  [ -f "benchmarks/bench_$b.py" ] && step "bench_$b" 45 $PY "benchmarks/bench_$b.py" $QUICK
done
step bench_model 120 $PY benchmarks/bench_model.py $QUICK --layers 4 --providers llava_fast,hf_sdpa,hf_eager,hf_sdpa_liger
step plot 20 $PY benchmarks/plot_results.py "$RES"

echo
echo "=== summary: $(( $(date +%s) - t0 ))s in all, on $($PY -c 'import torch; print(torch.cuda.get_device_name(0))')"
printf '%s\n' "${summary[@]}"
grep -hE "[0-9]+ (passed|failed)" "$RES/gpu_tests.log" | tail -n 1
for f in $(ls -t "$RES"/*.md 2>/dev/null | head -n 10); do
  echo "--- $(basename "$f")"
  grep '^| ' "$f" | cut -c1-220 | head -n 12
done
