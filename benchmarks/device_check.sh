#!/usr/bin/env bash
# One GPU check that fits one 10-minute device command on an H100/H200: build the extension, run the GPU tests
# (bf16/fp16 against the references), the end-to-end benchmark, then the per-op benchmarks against their baselines
# (same run), and print a short table last. Steps that no longer fit the time budget are skipped, and said so.
#
# Usage (repo root, on the GPU machine):  bash benchmarks/device_check.sh
#   DEADLINE_S=470     seconds from the script's start by which every step has ended (each step's limit is cut to
#                      what is left, minus 10 s for the summary); pass the device call's timeout_s minus ~20
#   STEPS=all          comma list of: build,env,tests,ops,plot (e.g. STEPS=build,ops for a second call)
#   OPS="attention ..." benchmarks to run, in this order ("model" is the end-to-end bench_model.py with 4 layers,
#                      "variants", not in the default list since session 10 (its H200 run changed no default), is
#                      attention_variants.py: head dim 72 and 64 variants, correctness + SigLIP / CLIP timing, ~115 s;
#                      "profile" is profile_model.py: the end-to-end step's GPU time by kernel class;
#                      "sweep", not in the default list, times 12 attention variants at causal D128 4k, <= 400 s;
#                      "model_full", not in the default list either: bench_model at full depth, <= 240 s;
#                      "sweep64": head-dim-64 configs on the CLIP shape, <= 200 s; "sweep_projector": the CUTLASS
#                      projector schedules, <= 90 s; "model_compiled": the OneVision step with every layer under
#                      torch.compile against eager and transformers, 4 LLM layers (COMPILED_LAYERS=full: every one),
#                      <= 180 s; "host": host_overhead.py, the
#                      OneVision step's host time with launches stubbed and the host time per layer, on this
#                      box's CPU, ~25 s; "profile_full":
#                      profile_model.py at full depth with --host, ~60 s; "gqa": the opt-in GQA split of the
#                      dK/dV kernel on Qwen2-0.5B's attention shape, ~150 s; "dkdv128": the spill-free D128
#                      dK/dV configs at the stage-1 shape and causal 4k, ~90 s; "gemm": bench_gemm.py, cuBLAS
#                      against the token count M and under a sustained load with the clock sampled, ~60 s;
#                      "profile_full_s1": profile_model.py on stage 1 at full depth with its GEMMs by shape, ~60-90 s;
#                      "demo": `llava-fast demo` (the full one) on this GPU, its held-out accuracy in demo.log);
#                      default (the end-to-end A/B rows, their breakdown, then the op benches never run on a GPU
#                      (session 23: layer_norm, bias_grad, gelu; the opt-in kernels measured 0.85-0.97x end to end
#                      with no op-level number to say why), attention (call 2 runs it too), then the rest):
#                      model profile layer_norm bias_grad gelu attention anyres projector rms_norm swiglu quick_gelu
#                      rope cross_entropy pack_features mixed
#                      ("mixed": bench_model's mixed-length stage-2 run, packing fill vs transformers' padding waste).
#                      A second call can pass the reverse order to reach first what the first call did not.
#   TESTS_S=330        limit of the GPU test step (152 s on the H100 in session 4; on the H200 in session 10, 200 s
#                      ran 260 of ~370 quick tests: the projector and model tests were still running; session 14's
#                      H200 run: 396 tests in 292 s of a 300 s limit);
#                      XDIST=12  pytest-xdist workers
#   GPU_TESTS=quick    quick: a representative subset of the `cuda` tests (every kernel and code path, fewer
#                      head dims / dtypes / shapes in the big parametrize grids; ~170 s with -n 8 on an H100);
#                      full: all `cuda` tests (about 4-6 minutes: run it in a call of its own, STEPS=build,env,tests)
#   FULL=1             full benchmark sweeps instead of --quick (does not fit in one call)
#   PYTHON=python3     interpreter;  RES=dir  where logs and result tables go (default benchmarks/results)
#   OUT=dir            (set by the device tool) RES defaults to /tmp/device_check instead, and after every step all of
#                      it is packed into $OUT/device_check.tgz, plus $OUT/summary.txt: the tool returns at most 8 files
# Every step writes $OUT/<step>.log; a failing step does not stop the later ones (each one's status is in the summary).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then RES=${RES:-/tmp/device_check}; else RES=${RES:-benchmarks/results}; fi
mkdir -p "$RES"
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/device_check.tgz" -C "$RES" . 2>/dev/null; true; }
export LLAVA_FAST_RESULTS_DIR="$RES"
export LLAVA_FAST_RESULTS_STAMP=${LLAVA_FAST_RESULTS_STAMP:-$(date +%Y%m%d-%H%M%S)}  # one file per bench, rewritten as it goes
# the extension for this GPU's architecture only (one arch builds fastest); 90 when nvidia-smi cannot say
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
case "$CAP" in ''|*[!0-9]*) CAP=90 ;; esac
export LLAVA_FAST_CUDA_ARCHS=${LLAVA_FAST_CUDA_ARCHS:-$CAP}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
DEADLINE_S=${DEADLINE_S:-470}  # under 8 minutes in all, as the developers' guide asks
TESTS_S=${TESTS_S:-330}
STEPS=${STEPS:-all}
GPU_TESTS=${GPU_TESTS:-quick}
OPS=${OPS:-"model profile layer_norm bias_grad gelu attention anyres projector rms_norm swiglu quick_gelu rope cross_entropy pack_features mixed"}
QUICK=$([ "${FULL:-0}" = "1" ] && echo "" || echo "--quick")
t0=$(date +%s)
summary=()

want() { [ "$STEPS" = "all" ] || [[ ",$STEPS," == *",$1,"* ]]; }

step() {  # step NAME LIMIT_S CMD...   (the limit is cut to what is left of the budget)
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE_S - 10 - ($(date +%s) - t0) ))
  if [ "$left" -lt 15 ]; then summary+=("$(printf '%-22s skipped (time budget)' "$name")"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local s=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  # SIGTERM first (Python prints its traceback, benchmarks keep what they saved), SIGKILL 10 s later
  timeout -k 10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$RES/$name.log"
  local what="ok"; [ $rc -ne 0 ] && what="FAILED rc=$rc"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMEOUT"
  summary+=("$(printf '%-22s %-12s %4ss' "$name" "$what" "$(( $(date +%s) - s ))")")
  pack
}

$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
if want build; then
  # Optional baselines the GPU box lacks (liger-kernel is pure Python + Triton): wheels placed in .whl/ (git-ignored)
  # travel with `carry: [".whl"]` and are installed here, e.g. on this side:
  #   pip download --no-deps --only-binary=:all: -d .whl liger-kernel
  if ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install --no-deps -q .whl/*.whl || echo "WARNING: .whl install failed"; fi
  # --no-build-isolation: pyproject's build requirements must already be installed (no network on the GPU box)
  $PY -c "import setuptools, wheel, pybind11, cmake, ninja" 2>/dev/null \
    || echo "WARNING: missing build requirements (setuptools wheel pybind11 cmake ninja); the build will likely fail"
  # The CUTLASS library (csrc/cutlass/) is built on the CPU machine and travels with
  # `carry: ["llava_fast/_cutlass_sm90.so"]`. If it is missing or does not load here (another set of system
  # libraries) and its headers travelled too (`carry: [".cutlass"]`, a copy of CUTLASS's include/), build it here:
  # five translation units in parallel, ~1-2 minutes on 16 cores (the build step's limit grows to 300 s).
  BUILD_S=150
  if [ -f .cutlass/include/cutlass/cutlass.h ] && ! $PY -c "import sys; from llava_fast import _ext; sys.exit(0 if _ext.cutlass_lib() else 1)" 2>/dev/null; then
    export LLAVA_FAST_CUTLASS_DIR="$PWD/.cutlass"
    BUILD_S=300
    echo "CUTLASS library missing or not loading: building it here from .cutlass/include"
  fi
  # LLAVA_FAST_REQUIRE_EXT=1: here a failed CUDA build must fail the step (a user's install falls back to C++ only)
  step build "$BUILD_S" env LLAVA_FAST_REQUIRE_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e .
  $PY -c "from llava_fast import _ext; l = _ext.cutlass_lib(); print('CUTLASS library:', ('loaded, attention forward ' + ('built' if l.llava_fast_cutlass_has_attn_fwd() else 'not built')) if l else _ext.CUTLASS_ERROR)"
fi
want env && step env 30 $PY -m llava_fast.cli env
# SDPA's own backend order after a first call (recent torch puts cuDNN first on Hopper itself: the vision towers'
# default path; models/dispatch._prefer_cudnn), appended to env.log
want env && $PY -c "
import torch
from torch.nn.attention import SDPBackend as B
x = torch.zeros(1, 1, 8, 64, device='cuda', dtype=torch.bfloat16)
torch.nn.functional.scaled_dot_product_attention(x, x, x)
n = {int(getattr(B, k)): k for k in ('MATH', 'FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'CUDNN_ATTENTION')}
print('SDPA own order:', ' > '.join(n.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order()),
      '| cuDNN', torch.backends.cudnn.version())" >> "$RES/env.log" 2>&1 || true

if want tests; then
  NW=$($PY -c "import xdist" 2>/dev/null && echo "${XDIST:-12}" || echo "")
  XDIST=${NW:+-n $NW}
  # the longest cuda tests first, one per worker (tests/conftest.py, tests/utils.long_first_order): session 18's
  # two torch.compile model tests ran back to back on one worker, 235 s of the 298 s step
  export LLAVA_FAST_XDIST_WORKERS=$NW
  # a hung test fails alone instead of eating the whole step (pytest-timeout is on the GPU image)
  PTO=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=150" || echo "")
  KSEL=()
  if [ "$GPU_TESTS" != "full" ]; then
    # Drop the most compile-heavy corners of the big grids: head dims 80/96 (no LLaVA model uses them), fp16 repeats
    # of the GQA / KV-cache attention grids, and fp16 of the projector beyond the 7B shape. Session 23: the GPU
    # encoder's opt-in versions v1 and v3 too (bit-identical to v2/v4 in the CPU emulation, passed on the H200 in
    # sessions 10-19; 34 tests, ~400 s of worker time, ~30 s of the step): v4 (the default) and v2 stay
    KSEL=(-k "not (test_cuda_docs_x_headdim and (-80- or -96-)) and not (test_cuda_gqa and dtype1) \
and not (test_cuda_seqused_k and dtype1) and not (test_cuda_full_shapes and dtype1 and not dims0) \
and not (test_cuda_cutlass and dtype1 and not dims0) \
and not (test_cuda_flash_rule and dtype1 and (test_gelu or test_quick_gelu or test_layer_norm)) \
and not ((test_cuda_encoder or test_cuda_patch_layout) and (gpu_v1 or gpu_v3))")
  fi
  # -v: one line per finished test (xdist prints them as they land), so a timeout still says what passed/failed.
  # No -x: a first GPU run should report every failure it can, not only the first.
  # --durations: the slowest tests at the end of the log (session 16: the step took 292 of call 1's 456 s in session
  # 14 and nothing said which tests: the list tells what to trim or run apart next)
  step gpu_tests "$TESTS_S" $PY -m pytest -v -m cuda $XDIST $PTO --maxfail=100 --tb=short -rfE -p no:cacheprovider \
    --durations=25 \
    ${KSEL[@]+"${KSEL[@]}"} tests
fi

if want ops; then
  for b in $OPS; do
    if [ "$b" = "sweep" ]; then  # not in the default list: forward/backward configs at causal D128 4k, one at a time;
      # the dK/dV candidates are the low-spill ones of benchmarks/aot_check.py (triton 3.6, docs/perf-notes.md);
      # fwd=64,64,4,x: one warpgroup per CTA, 112 / 80 KB, <= 190 registers: two CTAs per SM whose barriers are
      # independent, so one's softmax can run under the other's GEMMs (the default's two warpgroups meet at a
      # BAR.SYNC every key block)
      step attention_sweep 400 $PY benchmarks/attention_variants.py --dims 128 --jobs 1 --time causal4k \
        --variants "default|FOLD=0|CFG=fwd=64,64,4,3|CFG=fwd=64,64,4,2|CFG=dkdv=64,64,8,3|CFG=dkdv=64,128,8,3|CFG=dq=128,64,8,2|CFG=dq=64,64,4,3|CFG=dq=64,64,8,3|CFG=fwd=128,64,8,3" \
        --out "$RES/attention_sweep.jsonl"
    elif [ "$b" = "sweep64" ]; then  # not in the default list: head dim 64 (CLIP towers, Qwen2-0.5B) configs on the
      # CLIP shape (non-causal 64 x 577), screened by aot_check (triton 3.6: all spill-free but dK/dV 128x64, dQ 128x64)
      step attention_sweep64 200 $PY benchmarks/attention_variants.py --dims 64 --jobs 1 --time clip \
        --variants "default|CFG=fwd=128,64,8,3|CFG=fwd=128,128,8,3|CFG=fwd=64,64,4,3|CFG=dkdv=64,128,8,3|CFG=dq=64,64,4,3" \
        --out "$RES/attention_sweep64.jsonl"
    elif [ "$b" = "sweep_projector" ]; then  # not in the default list: every CUTLASS schedule built into
      # llava_fast/_cutlass_sm90.so (carried: the box cannot compile CUTLASS), fwd and fwd+bwd at M=23040, with errors
      step projector_sweep 90 $PY benchmarks/bench_projector.py --cutlass-sweep
    elif [ "$b" = "variants" ]; then  # each variant in its own process: a faulting one cannot take the others down;
      # D=72 (SigLIP): default (overlap split, dK/dV 64x128 2 stages since session 4), FOLD=0 (session 5's softmax
      # arithmetic undone), the session-3 default (exact split, dK/dV 64x64 3 stages); D=64 (CLIP)
      step attention_variants 140 $PY benchmarks/attention_variants.py --dims 72 --jobs 1 --time siglip \
        --variants "default|FOLD=0|SPLIT=exact+CFG=dkdv=64,64,8,3|CFG=dkdv=64,64,8,3" \
        --out "$RES/attention_variants.jsonl"
      step attention_variants_d64 75 $PY benchmarks/attention_variants.py --dims 64 --jobs 1 --time clip \
        --variants "default|FOLD=0" --out "$RES/attention_variants_d64.jsonl"
    elif [ "$b" = "profile" ]; then  # where the end-to-end step's GPU time goes, by kernel class (OneVision FT, stage 1)
      # --sites: where the step's 106 bf16 adds (1.9 ms on the H200, session 14) come from: the towers' residual adds
      # and autograd's gradient accumulations, or other places (decides whether to fuse them into the LayerNorm)
      step profile_model 60 $PY benchmarks/profile_model.py --workload ov_ft --layers 4 --gemms --sites "CUDAFunctor_add"
      step profile_model_stage1 45 $PY benchmarks/profile_model.py --workload stage1 --layers 4 --gemms --sites "Memcpy DtoD"
      # the prefill (1.36x HF sdpa on the H200 in session 14, target 1.4x) has never been profiled
      step profile_model_prefill 40 $PY benchmarks/profile_model.py --workload prefill --layers 4 --gemms
    elif [ "$b" = "gqa" ]; then  # not in the default list: the opt-in GQA split of the dK/dV kernel (session 10,
      # attention._gqa_split) on the OneVision-0.5B language model's attention (14 / 2 heads, D64, 2 x 5453), ~60 s;
      # and the dK/dV configs without spills at D64 causal (aot_check, triton 3.6, session 14: the default 64x128 8w
      # 2st uses 255 registers and spills 36 B; 32x128 8w 2st 224 regs and 16x128 8w 2st 191, no spills)
      # session 15: the kernel-side split GQA_SPLIT=kN (N programs per kv head, fp32 partials, longest first, no
      # K/V repeat; benchmarks/dkdv_schedule.py: 0.67 -> 0.98 busy at k4, prediction dK/dV 1.25-1.4x; k1 = the
      # order alone, 0.67: a control; session 10's repeat split was removed in session 21: k7 is its partition)
      # and HEAVY=1: the causal forward and dQ kernels heaviest query block first across all heads (K/V <= 16 MB)
      # session 17 (H200): k4 + HEAVY=1 fwd 1.16x, fwd+bwd 1.25x the then default: both are the default now, so
      # "default" below is k4 + HEAVY=1 and GQA_SPLIT=0+HEAVY=0 is the old default (the control)
      step attention_gqa 180 $PY benchmarks/attention_variants.py --dims 64 --jobs 1 --time ov05 \
        --variants "default|GQA_SPLIT=0+HEAVY=0|GQA_SPLIT=k4+HEAVY=0|GQA_SPLIT=0|GQA_SPLIT=k2|GQA_SPLIT=k7|CFG=dkdv=32,128,8,2" \
        --out "$RES/attention_gqa.jsonl"
    elif [ "$b" = "dkdv128" ]; then  # not in the default list (session 15): the dK/dV configs without spills at
      # D128 (aot_check, triton 3.6: the default 64x128 8w 2st spills 160 B; 16x128 8w 2st none at 242 registers,
      # 32x128 8w 2st 32 B) on the stage-1 step's attention (16 x 640, ~35 ms of its 487) and causal 4k, ~90 s
      # session 16: + the forward with one warpgroup per CTA (64x64 w4: 80 / 112 KB, <= 190 registers, two CTAs per
      # SM) at that shape: 640-token causal documents give the default 128x128 forward ~3 key blocks per program (1
      # CTA per SM, 224 KB), so its fixed cost is not hidden (~204 TFLOP/s there in session 14, 440 at 4k)
      # session 17 (H200): 64x64 w4 s3 forward 0.2405 -> 0.2006 ms at the stage-1 shape (1.20x), 0.96x at 4k: the
      # default for D128 with documents <= 1024 tokens now (attention._FWD_SHORT_CFG_D128); fwd=128,128,8,3 is the
      # old default (the control), 64x128 w4 s2 a neighbour; the spill-free dK/dV configs lost at both shapes
      # + two dQ configs for the stage-1 backward (~0.73 ms per layer, 23 ms per full-depth step), screened by
      # aot_check (triton 3.6): 128x32 w8 s3 (112 KB, 149 registers) and 64x64 w4 s2 (96 KB, 242), no spills
      step attention_dkdv128_s1 110 $PY benchmarks/attention_variants.py --dims 128 --jobs 1 --time stage1 \
        --variants "default|CFG=fwd=128,128,8,3|CFG=fwd=64,128,4,2|CFG=fwd=128,64,8,3|CFG=dq=128,32,8,3|CFG=dq=64,64,4,2" \
        --out "$RES/attention_dkdv128_s1.jsonl"
      # (and the 64x64 w4 s3 forward at 4k too: if it wins there as well, the prefill's 2498-token documents gain)
      step attention_dkdv128_4k 75 $PY benchmarks/attention_variants.py --dims 128 --jobs 1 --time causal4k \
        --variants "default|CFG=fwd=64,128,4,2|CFG=fwd=128,64,8,3" \
        --out "$RES/attention_dkdv128_4k.jsonl"
    elif [ "$b" = "profile_full" ]; then  # not in the default list: the OneVision step at full depth (24 Qwen2
      # layers), where session 10's H200 run found 6.25 ms of wall time per LLM layer against ~3.7 ms of kernels
      # (GPU busy %, the host cost per op call, a cProfile of one step); ~60 s
      step profile_model_full 100 $PY benchmarks/profile_model.py --workload ov_ft --layers 24 --steps 2 --host
    elif [ "$b" = "profile_full_s1" ]; then  # not in the default list: stage 1 at full depth (32 Llama layers), the
      # GEMMs' rates in the real step: session 22 read 14.45 ms per extra layer at full depth against 12.1 ms of the
      # 4-layer profile's kernels, as if the clock dropped under long GEMM stretches (perf-notes "GEMM rate against
      # M"); the 4-layer profile's GEMMs ran 785 TFLOP/s; ~60-90 s (the 7B model built at full depth)
      step profile_model_full_s1 120 $PY benchmarks/profile_model.py --workload stage1 --layers 32 --steps 2 --gemms
    elif [ "$b" = "demo" ]; then  # not in the default list (session 23): the README's first command on this GPU, the
      # full demo (stage 1 + 2 through the trainer, fp32 master weights under bf16 autocast, generation); exits 1
      # below its 90% held-out accuracy; ~2 min on the 2-core dev CPU; on the H200 (session 28) stage 1 took 19 s and
      # stage 2 ran ~32 steps/s (2808 steps) until a 105 s deadline cut it: give it ~150 s
      step demo 240 $PY -m llava_fast.cli demo --out "${TMPDIR:-/tmp}/llava_fast_demo" --device cuda
    elif [ "$b" = "mixed" ]; then  # the realistic mixed-length stage-2 run: packing fill vs padding waste
      step bench_model_mixed 120 $PY benchmarks/bench_model.py $QUICK --layers 4 --workloads mixed --name bench_model_mixed \
        --providers llava_fast,llava_fast_sdpa_text,hf_sdpa,hf_sdpa_patched,hf_sdpa_packed,hf_sdpa_patched_packed
    elif [ "$b" = "model_full" ]; then  # not in the default list (a second call): the issue's exact shapes, every
      # LLM layer (7B: 32, OneVision-0.5B: 24), where the language model's share and our kernels' weight are real
      # (llava_fast_triton_text: session 28's cuDNN training attention against our kernels, paired, at full depth;
      # 63 s without it in session 28; hf_sdpa_patched: patch_hf as users apply it, against Liger, since session 34)
      step bench_model_full 240 $PY benchmarks/bench_model.py $QUICK --workloads ov_ft,prefill,stage1 \
        --name bench_model_full --providers llava_fast,llava_fast_triton_text,hf_sdpa,hf_sdpa_liger,hf_sdpa_liger_flce,hf_sdpa_patched,llava_fast_graph
    elif [ "$b" = "model_compiled" ]; then  # not in the default list: every layer under torch.compile (the remedy
      # if profile_model finds the OneVision step host-bound); compiles once per layer type, then times the step
      # COMPILED_LAYERS=full: every LLM layer (where session 19's box was host-bound: eager 202 ms, graph 155 ms)
      cl=(--layers "${COMPILED_LAYERS:-4}"); [ "${COMPILED_LAYERS:-4}" = full ] && cl=()
      step bench_model_compiled 180 $PY benchmarks/bench_model.py $QUICK "${cl[@]}" --workloads ov_ft \
        --name bench_model_compiled --providers llava_fast,llava_fast_compiled,llava_fast_compiled_cg,hf_sdpa
    elif [ "$b" = "host" ]; then  # not in the default list: the OneVision step's host time with every launch stubbed,
      # on this box's CPU (benchmarks/host_overhead.py; 125 ms on the 2-core dev CPU, session 9): calibrates the dev
      # CPU's host-time numbers against the GPU host's, ~15 s
      step host_overhead 40 $PY benchmarks/host_overhead.py --steps 5
      # each tower's host time per layer alone (Python, dispatcher, autograd; ~0.70 ms per Qwen2 layer, ~0.40 per
      # SigLIP layer on the dev CPU, session 20): this box's host speed against the dev CPU's, ~10 s
      step host_per_layer 30 $PY benchmarks/host_overhead.py --per-layer
    elif [ "$b" = "ab7b" ]; then  # not in the default list (a second call): the A/B rows aimed at the 7B targets
      # (stage 1 1.44x of 1.5x, prefill 1.36x of 1.4x on the H200 in session 14), paired with the default, ~60 s in
      # session 15; session 16 added two stage-1 rows (~+30 s) and put stage 1 first (the rows most of them are about)
      step bench_model_ab7b 150 $PY benchmarks/bench_model.py $QUICK --layers 4 --workloads stage1,prefill \
        --name bench_model_ab7b --providers llava_fast,llava_fast_pad256,llava_fast_triton_text,llava_fast_all_rows,llava_fast_sdpa_text,llava_fast_cutlass_attn,llava_fast_ln_triton,hf_sdpa
    elif [ "$b" = "model" ]; then  # llava_fast_graph last: a failed CUDA-graph capture must not cost the other rows;
      # OneVision first (session 14: the A/B rows are now also timed paired, ~+40 s, and the step's limit is what the
      # deadline leaves after the tests: the workload most A/B rows are about must not be the one cut). Session 18
      # cut the rows decided the same way in three or more runs (unfused_res, sep_recompute, gelu_triton,
      # triton_launch, bias_triton; fused_qkv was removed in session 21); `model_ab` runs them
      step bench_model 150 $PY benchmarks/bench_model.py $QUICK --layers 4 --workloads ov_ft,stage1,prefill \
        --providers llava_fast,llava_fast_recompute_vision,llava_fast_triton_text,llava_fast_keep_act,llava_fast_no_gqa_split,llava_fast_sdpa_own,llava_fast_sdpa_cudnn,llava_fast_qgelu_ref,llava_fast_ln_triton,llava_fast_all_rows,llava_fast_pad256,llava_fast_sdpa_text,hf_sdpa,hf_eager,hf_sdpa_liger,hf_sdpa_liger_flce,llava_fast_graph
    elif [ "$b" = "model_ab" ]; then  # not in the default list: the A/B rows decided in three or more runs (the
      # paths they switch stay in the tests), for a call with time to spare
      step bench_model_ab 150 $PY benchmarks/bench_model.py $QUICK --layers 4 --workloads ov_ft,stage1 \
        --name bench_model_ab --providers llava_fast,llava_fast_unfused_res,llava_fast_sep_recompute,llava_fast_gelu_triton,llava_fast_triton_launch,llava_fast_bias_triton,hf_sdpa
    elif [ -f "benchmarks/bench_$b.py" ]; then
      # cross_entropy: five providers since session 5 (token and vocab schedules, the 20 MiB one, HF, Liger);
      # anyres: 28 s on the H100 in session 4, + the v3 and v4 rows since
      # projector: 39 s on the H100 in session 4; since session 7 two CUTLASS providers (and two old ones fewer):
      # 50 s reached only M=576 on the H200 in session 10; rms_norm / swiglu: 40 s did not finish there either;
      # gemm (session 22): ~60 s predicted with --quick, its 32-layer sustained rows included
      step "bench_$b" "$(case "$b" in attention) echo 60;; cross_entropy) echo 55;; anyres) echo 50;; projector) echo 180;; gemm) echo 120;; *) echo 60;; esac)" \
        $PY "benchmarks/bench_$b.py" $QUICK
    else
      summary+=("$(printf '%-22s unknown (no benchmarks/bench_%s.py)' "$b" "$b")")
    fi
  done
fi
want plot && step plot 20 $PY benchmarks/plot_results.py "$RES"

{
  echo
  echo "=== summary: $(( $(date +%s) - t0 ))s in all, on $($PY -c 'import torch; print(torch.cuda.get_device_name(0))')"
  printf '%s\n' "${summary[@]}"
  $PY -c "from llava_fast import _ext; l = _ext.cutlass_lib(); print('CUTLASS library:', ('loaded, attention forward ' + ('built' if l.llava_fast_cutlass_has_attn_fwd() else 'not built')) if l else _ext.CUTLASS_ERROR)" 2>&1
  for f in "$RES/host_overhead.log" "$RES/host_per_layer.log"; do
    [ -f "$f" ] && grep -h "^host_overhead" "$f" | cut -c1-200
  done
  [ -f "$RES/gpu_tests.log" ] && grep -hE "[0-9]+ (passed|failed)" "$RES/gpu_tests.log" | tail -n 1
  # (the -v lines, which survive a step killed by its time limit: session 10's log had no pytest summary line)
  [ -f "$RES/gpu_tests.log" ] && echo "gpu_tests lines: $(grep -c '\] PASSED ' "$RES/gpu_tests.log") passed," \
    "$(grep -c '\] FAILED ' "$RES/gpu_tests.log") failed, $(grep -c '\] ERROR ' "$RES/gpu_tests.log") errors," \
    "$(grep -c '\] SKIPPED ' "$RES/gpu_tests.log") skipped"
  [ -f "$RES/gpu_tests.log" ] && grep -hE "\] (FAILED|ERROR) " "$RES/gpu_tests.log" | sed 's/.*\] //' | cut -c1-200 | head -n 30
  [ -f "$RES/gpu_tests.log" ] && grep -hE "^(FAILED|ERROR) " "$RES/gpu_tests.log" | cut -c1-200 | head -n 30
  [ -f "$RES/gpu_tests.log" ] && grep -hA10 "slowest .*durations" "$RES/gpu_tests.log" | cut -c1-160
  # what cuda tests measured (tests/utils.record: convergence distances, demo accuracy, generation errors)
  [ -f "$RES/cuda_test_measurements.jsonl" ] && { echo "--- cuda_test_measurements.jsonl"; cut -c1-300 "$RES/cuda_test_measurements.jsonl"; }
  for f in "$RES"/attention_variants.jsonl "$RES"/attention_variants_d64.jsonl "$RES"/attention_sweep.jsonl \
           "$RES"/attention_sweep64.jsonl "$RES"/attention_gqa.jsonl; do  # variant, D, status, TFLOP/s
    [ -f "$f" ] || continue
    echo "--- $(basename "$f") (variant D status fwd fwd+bwd TFLOP/s, worst error ratio <= 1 passes)"
    $PY -c "import json,sys
for ln in open(sys.argv[1]):
    r = json.loads(ln); print(f\"{r['variant'][:44]:44s} D={r['d']} {r['status'][:40]:10s} {r.get('fwd_tflops', '-')} {r.get('fwdbwd_tflops', '-')} worst={r.get('worst', '-')}\")" "$f"
  done
  for f in $(ls -t "$RES"/*.md 2>/dev/null | head -n 10); do
    echo "--- $(basename "$f")"
    case "$(basename "$f")" in
      profile_model-*)  # the kernel classes, GPU busy, host syncs, and (--host) the host cost per op call
        grep '^| ' "$f" | head -n 10
        grep -hE "^(Wall time|Host synchronisations)" "$f" | cut -c1-240
        grep -A12 "^Host cost per call" "$f" | grep '^| ' ;;
      gemm-*)  # no "ours" here: the rates one at a time and sustained, exact M against padded (prefill first)
        grep '^| ' "$f" | awk -F'|' 'NR == 1 || $3 ~ /NeXT|stage1/' | cut -c1-220 | head -n 30 ;;
      *)  # the header and our rows (the ones carrying the ratios to every baseline of the same run)
        grep '^| ' "$f" | awk -F'|' 'NR == 1 || $10 ~ /[0-9]x/' | cut -c1-240 | head -n 16 ;;
    esac
  done
  # what the rules written before this run say about each pending experiment (benchmarks/decide.py), last
  echo "--- decisions"
  $PY benchmarks/decide.py "$RES" 2>&1 | grep -v "not measured" | cut -c1-260 | tail -n +3
} 2>&1 | tee "$RES/summary.txt"
pack
[ -n "${OUT:-}" ] && cp "$RES/summary.txt" "$OUT/"
exit 0
