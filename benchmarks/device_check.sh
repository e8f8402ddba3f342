#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100/H200: build the extension, run the GPU tests (bf16/fp16 against the
# reference) and the benchmarks against the baselines, print a short table last.
# Usage (on the GPU machine, from the repo root): bash benchmarks/device_check.sh
# Results: benchmarks/results/ (or $OUT when set, e.g. on the lent device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
export LLAVA_FAST_RESULTS_DIR="$RES"
export LLAVA_FAST_CUDA_ARCHS=${LLAVA_FAST_CUDA_ARCHS:-90}
t0=$(date +%s)
status=()

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local s=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RES/$name.log"
  status+=("$(printf '%-28s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - s ))")")
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step build 180 $PY -m pip install --no-build-isolation --no-deps -e .
step env 60 $PY -m llava_fast.cli env
step gpu_tests 200 $PY -m pytest -q -x -m cuda tests -p no:cacheprovider
for b in attention projector pack_features rms_norm rope swiglu cross_entropy anyres; do
  [ -f "benchmarks/bench_$b.py" ] && step "bench_$b" 60 $PY "benchmarks/bench_$b.py" --quick
done
step bench_model 150 $PY benchmarks/bench_model.py --quick --layers 4 --providers llava_fast,hf_sdpa,hf_eager,hf_sdpa_liger

echo
echo "=== summary ($(( $(date +%s) - t0 ))s total)"
printf '%s\n' "${status[@]}"
grep -h "passed\|failed" "$RES/gpu_tests.log" | tail -n 1
for f in $(ls -t "$RES"/*.md 2>/dev/null | head -n 8); do
  echo "--- $(basename "$f")"
  grep '^| ' "$f" | cut -c1-200 | head -n 14
done
