"""Benchmark the multimodal projector (Linear -> GELU -> Linear) in bf16.

Providers, all measured in the same run:
  llava_fast            fused Triton GEMM1+bias+erf-GELU (writes h for backward), cuBLAS GEMM2; fused dGELU backward
  llava_fast_gemm2_triton  same, with GEMM2 in the Triton kernel too (the option we keep; pick the faster)
  llava_fast_tma        same as llava_fast with LLAVA_FAST_PROJECTOR_KERNEL=tma (persistent, TMA descriptor loads,
                        tile and K loops flattened for the pipeliner)
  llava_fast_tma_nested LLAVA_FAST_PROJECTOR_KERNEL=tma_nested: the same without the flattening (session 4's)
  llava_fast_cutlass    LLAVA_FAST_PROJECTOR_KERNEL=cutlass: the CUTLASS warp-specialized GELU GEMM (ping-pong) and
                        dGELU dgrad (cooperative) of csrc/cutlass/ (sm_90 only; skipped when the library is not built)
  llava_fast_cutlass_pp the same with LLAVA_FAST_PROJECTOR_CUTLASS_SCHED=pingpong (both GEMMs ping-pong)
  llava_fast_cutlass_coop  LLAVA_FAST_PROJECTOR_CUTLASS_SCHED=cooperative (both GEMMs cooperative 128x256)
  eager                 nn.Linear + nn.GELU() (erf) + nn.Linear
  compile               torch.compile of eager (default mode)
  cublaslt_gelu         torch._addmm_activation(b1, x, w1.t(), use_gelu=True) (cuBLASLt GELU_BIAS epilogue, tanh
                        GELU on CUDA) then addmm; forward only (it has no autograd formula)

FLOPs: fwd 2*M*(Dv*Dt + Dt*N2); fwd+bwd with input grad 3x fwd (backward = dA, dW2, dW1, dX GEMMs = 2x fwd).
Modes: fwd (grad enabled: ours saves h), fwd_nograd (inference), fwd+bwd (x requires grad, all weight grads).
Memory: "saved_act" rows give the GiB held between forward and backward beyond the output (lower is better).
Timing (--timing): loop by default, calls back to back, so a provider's Python and launch latency shows only where it
exceeds its kernels' time. The session 1-4 tables timed one call on an idle GPU ("eager"): at M=576 that made our
forward 0.237 ms against eager's 0.082 ms, mostly host latency before the first kernel.

Usage: python benchmarks/bench_projector.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import TIMINGS, Row, add_ratios, bench, peak_memory, save, to_markdown

OURS = "llava_fast"
KERNEL_ENV = "LLAVA_FAST_PROJECTOR_KERNEL"  # the kernel variant, read at every launch (llava_fast.ops.projector)
SCHED_ENV = "LLAVA_FAST_PROJECTOR_CUTLASS_SCHED"
# provider -> the environment it runs under (forward and backward)
PROVIDER_ENV = {
    "llava_fast_tma": {KERNEL_ENV: "tma"},
    "llava_fast_tma_nested": {KERNEL_ENV: "tma_nested"},
    "llava_fast_cutlass": {KERNEL_ENV: "cutlass"},
    "llava_fast_cutlass_pp": {KERNEL_ENV: "cutlass", SCHED_ENV: "pingpong"},
    "llava_fast_cutlass_coop": {KERNEL_ENV: "cutlass", SCHED_ENV: "cooperative"},
}


def flops(m, dv, dt, n2, mode):
    fwd = 2.0 * m * (dv * dt + dt * n2)
    return fwd * 3 if mode == "fwd+bwd" else fwd


# --quick leaves out what earlier runs measured as behind (docs/perf-notes.md) to keep device_check's step short
QUICK_SKIP = ("llava_fast_tma_nested", "llava_fast_gemm2_triton", "llava_fast_cutlass_pp")


def make_providers(dv, dt, dtype, with_compile=True):
    from llava_fast import backend
    from llava_fast.ops.projector import projector, set_gemm2_impl

    backend.set_backend("projector", "triton")  # the kernel, whatever "auto" picks (backend.AUTO_REFERENCE)

    eager = torch.nn.Sequential(torch.nn.Linear(dv, dt), torch.nn.GELU(), torch.nn.Linear(dt, dt)).cuda().to(dtype)
    w1, b1 = eager[0].weight, eager[0].bias
    w2, b2 = eager[2].weight, eager[2].bias
    compiled = torch.compile(eager) if with_compile else None

    def ours(x):
        set_gemm2_impl("cublas")
        return projector(x, w1, b1, w2, b2)

    def ours_t2(x):
        set_gemm2_impl("triton")
        try:
            return projector(x, w1, b1, w2, b2)
        finally:
            set_gemm2_impl("cublas")

    def ours_env(x):  # run() sets the provider's PROVIDER_ENV around it (forward and backward)
        return projector(x, w1, b1, w2, b2)

    def cublaslt(x):
        a = torch._addmm_activation(b1, x, w1.t(), use_gelu=True)
        return torch.addmm(b2, a, w2.t())

    provs = {OURS: ours, **{name: ours_env for name in PROVIDER_ENV},
             "llava_fast_gemm2_triton": ours_t2, "eager": eager,
             "compile": compiled, "cublaslt_gelu": cublaslt}
    if compiled is None:
        del provs["compile"]
    from llava_fast.ops.projector import cutlass_unusable

    why = cutlass_unusable(w1, approximate="none")  # sm_90 and the library (w1: any bf16 matrix with 16-byte rows)
    if why is not None:
        print(f"llava_fast_cutlass providers skipped: {why}")
        for name in [p for p in provs if p.startswith("llava_fast_cutlass")]:
            del provs[name]
    return provs, [w1, b1, w2, b2]


def make_call(fn, x, dy, params, mode):
    """The timed closure: a forward (grad enabled or not) or a forward + backward through every input."""
    xi = x.detach().requires_grad_(mode == "fwd+bwd")
    if mode == "fwd":
        return lambda: fn(xi)
    if mode == "fwd_nograd":
        def call():
            with torch.no_grad():
                return fn(xi)
        return call
    return lambda: torch.autograd.grad(fn(xi), [xi, *params], dy)


def saved_gib(fn, x):
    """GiB allocated by a grad-enabled forward and still held afterwards, minus the output itself."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    y = fn(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
    del y
    return held / 2**30


def run(ms_list, shapes, modes, dtype=torch.bfloat16, rep=20, with_compile=True, skip=(), timing="loop"):
    from llava_fast.ops import projector as P

    rows = []
    for dv, dt in shapes:
        provs, params = make_providers(dv, dt, dtype, with_compile)
        provs = {k: v for k, v in provs.items() if k not in skip}
        for m in ms_list:
            shape = f"M={m} {dv}->{dt}->{dt}"
            x = torch.randn(m, dv, device="cuda", dtype=dtype)
            dy = torch.randn(m, dt, device="cuda", dtype=dtype)
            for mode in modes:
                for name, fn in provs.items():
                    if name == "cublaslt_gelu" and mode == "fwd+bwd":
                        continue  # no autograd formula for _addmm_activation
                    call = make_call(fn, x, dy, params, mode)
                    env = PROVIDER_ENV.get(name, {KERNEL_ENV: "pointer"})
                    os.environ.update(env)
                    runs = P._cutlass_runs
                    try:
                        t = bench(call, warmup=5, rep=rep, timing=timing)
                        peak = peak_memory(call)
                    except Exception as e:  # noqa: BLE001  report and keep going (e.g. a provider missing on this stack)
                        print(f"{name} {shape} {mode}: failed: {type(e).__name__}: {e}")
                        continue
                    finally:
                        for k in env:
                            os.environ.pop(k, None)
                    tf = flops(m, dv, dt, dt, mode) / (t["ms"] * 1e-3) / 1e12
                    note = "tanh GELU" if name == "cublaslt_gelu" else ""
                    if name.startswith("llava_fast_cutlass") and P._cutlass_runs == runs:
                        note = "FELL BACK to Triton (CUTLASS refused: see the warning above)"
                    rows.append(Row("projector", name, shape, "bf16" if dtype == torch.bfloat16 else str(dtype),
                                    mode, t["ms"], t["ms_p20"], t["ms_p80"], tf, "TFLOP/s", peak, note=note,
                                    timing=t["timing"]))
                    print(f"{shape:28s} {mode:10s} {name:24s} {t['ms']:8.3f} ms {tf:7.1f} TFLOP/s", flush=True)
            # activation memory held for backward (x and weights require grad, as in training)
            for name in (OURS, "llava_fast_cutlass", "eager", "compile"):
                if name not in provs:
                    continue
                xi = x.detach().requires_grad_()
                env = PROVIDER_ENV.get(name, {})
                os.environ.update(env)
                try:
                    fn = provs[name]
                    fn(xi)  # warm up (compile / autotune) outside the measurement
                    g = saved_gib(fn, xi)
                except Exception as e:  # noqa: BLE001  report and keep going
                    print(f"{name} saved_act: failed: {e}")
                    continue
                finally:
                    for k in env:
                        os.environ.pop(k, None)
                rows.append(Row("projector", name, shape, "bf16", "saved_act", metric=g, unit="GiB",
                                note="GiB held between fwd and bwd beyond the output; lower is better"))
                print(f"{shape:28s} saved_act  {name:24s} {g:.3f} GiB", flush=True)
            del x, dy
            torch.cuda.empty_cache()
            add_ratios(rows, ours=OURS)
            save(rows, "projector")  # keep what is measured so far, in case a time limit stops the run
    return rows


SWEEP_FWD = ("pingpong", "cooperative", "pingpong_c12", "cooperative_256")  # with the dgrad on "auto"
SWEEP_BWD = ("pingpong", "cooperative_256")                                  # with the forward on "auto"


def cutlass_sweep(m=23040, dv=1024, dt=4096, rep=10, timing="loop"):
    """Every CUTLASS schedule built into the library (csrc/cutlass/projector_sm90.cuh ``Schedule``; the GPU box cannot
    compile new ones), timed fwd and fwd+bwd at one shape in bf16 next to eager and the Triton kernel, each with its
    output's error ratio against an fp32 reference (flash-attn rule: <= 2 passes). Rows "projector_sweep"."""
    from llava_fast.ops import projector as P

    dtype = torch.bfloat16
    provs, params = make_providers(dv, dt, dtype, with_compile=False)
    if "llava_fast_cutlass" not in provs:
        return []
    shape = f"M={m} {dv}->{dt}->{dt}"
    x = torch.randn(m, dv, device="cuda", dtype=dtype)
    dy = torch.randn(m, dt, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref32 = P.projector_ref(x.float(), *[p.float() for p in params])
        base_err = (P.projector_ref(x, *params).float() - ref32).abs().max().item()
    combos = [("eager", {}), (OURS, {KERNEL_ENV: "pointer"})]
    combos += [(f"cutlass {f}/auto", {KERNEL_ENV: "cutlass", SCHED_ENV: f"{f}/auto"}) for f in SWEEP_FWD]
    combos += [(f"cutlass auto/{b}", {KERNEL_ENV: "cutlass", SCHED_ENV: f"auto/{b}"}) for b in SWEEP_BWD]
    rows = []
    for name, env in combos:
        fn = provs["eager" if name == "eager" else OURS]
        os.environ.update(env)
        runs = P._cutlass_runs
        try:
            with torch.no_grad():
                err = (fn(x).float() - ref32).abs().max().item() / max(base_err, 1e-30)
            for mode in ("fwd", "fwd+bwd"):
                t = bench(make_call(fn, x, dy, params, mode), warmup=5, rep=rep, timing=timing)
                tf = flops(m, dv, dt, dt, mode) / (t["ms"] * 1e-3) / 1e12
                fell = name.startswith("cutlass") and P._cutlass_runs == runs
                note = f"out error {err:.2f}x bf16 eager's" + ("; FELL BACK to Triton" if fell else "")
                rows.append(Row("projector_sweep", name, shape, "bf16", mode, t["ms"], t["ms_p20"], t["ms_p80"], tf,
                                "TFLOP/s", note=note, timing=t["timing"]))
                print(f"{shape:28s} {mode:8s} {name:34s} {t['ms']:8.3f} ms {tf:7.1f} TFLOP/s  {note}", flush=True)
        except Exception as e:  # noqa: BLE001  one failing schedule must not end the sweep
            print(f"{name}: failed: {type(e).__name__}: {e}")
        finally:
            for k in env:
                os.environ.pop(k, None)
        save(rows, "projector_sweep")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M in {576, 23040}, 1024->4096->4096 only, no torch.compile "
                                                         "baseline (its warm-ups take a minute; add --compile)")
    ap.add_argument("--compile", action="store_true", help="with --quick: keep the torch.compile baseline")
    ap.add_argument("--cutlass-sweep", action="store_true",
                    help="only the CUTLASS schedule sweep at M=23040 (bf16, fwd and fwd+bwd, with error ratios)")
    ap.add_argument("--timing", default=os.environ.get("LLAVA_FAST_BENCH_TIMING", "loop"), choices=TIMINGS,
                    help="bench_utils timing: loop (default since session 7: calls back to back, the GPU kept busy, "
                         "as bench_attention), eager (one call on an idle GPU, Python and launch latency included: "
                         "what the session 1-4 tables used) or graph (the kernels alone)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_projector: needs a CUDA GPU (Triton kernels and cuBLAS baselines); nothing to do on CPU.")
        return 0
    if args.cutlass_sweep:
        rows = cutlass_sweep(timing=args.timing)
        print(to_markdown(rows) if rows else "no CUTLASS library or not sm_90: nothing swept")
        return 0
    if args.quick:
        ms_list, shapes = [576, 23040], [(1024, 4096)]
    else:
        ms_list, shapes = [576, 2880, 23040, 46080], [(1024, 4096), (1152, 3584)]
    rows = run(ms_list, shapes, ["fwd", "fwd_nograd", "fwd+bwd"], rep=10 if args.quick else 20,
               with_compile=not args.quick or args.compile, skip=QUICK_SKIP if args.quick else (),
               timing=args.timing)
    add_ratios(rows, ours=OURS)
    print(to_markdown(rows))
    print(f"saved: {save(rows, 'projector')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
