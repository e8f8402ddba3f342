"""RMSNorm (plain and fused residual add) forward / backward / fwd+bwd in GB/s.

Providers, all measured in this run: ``llava_fast`` (Triton), ``hf`` (eager ``LlamaRMSNorm``; the fused variant is
``residual + x`` then the norm, as the HF decoder layer does), ``compile`` (``torch.compile`` of the HF eager code;
left out of ``--quick`` unless ``--compile``: its Inductor compiles take tens of seconds per shape),
``liger`` (``LigerRMSNorm`` / ``LigerFusedAddRMSNorm`` when ``liger_kernel`` imports; skipped otherwise).
A large bf16 ``copy_`` gives the copy bandwidth of this GPU in the same run; our rows say "% of copy".

Bytes counted per provider (the same essential traffic for all; b = element size, M rows, N hidden):
  fwd: (2 M N b) + 4 M  [fused: (4 M N b) + 4 M: reads x, residual, writes out, s]
  bwd: (3 M N b) + 4 M  [fused: (4 M N b) + 4 M: reads dy, x, ds, writes dx (= dresidual)]; dweight is ignored.

Run: ``python benchmarks/bench_rms_norm.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one).
Results are saved after every shape, so a time limit keeps what was measured; a shape that raises is recorded as
failed and the run goes on to the next.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import Row, add_ratios, bench, copy_bandwidth, peak_memory, save, to_markdown  # noqa: E402
from bench_utils import randn, randn_like  # noqa: E402


def measure(rows, name, provider, shape, dtype, mode, fn, nbytes, warmup, rep):
    """One row: GB/s from the kernels' own time (CUDA graph replay, cold L2: what the bandwidth targets are about),
    with the eager per-call time (Python + dispatch + kernels, what an uncompiled training step pays) in the note."""
    # "bwd" replays autograd over a graph recorded outside the capture: its kernels would go to the forward's stream,
    # not the capturing one, so it is timed eagerly (its ratios compare eager rows only)
    timing = "eager" if mode == "bwd" else os.environ.get("LLAVA_FAST_BENCH_TIMING", "graph")
    try:
        t = bench(fn, warmup, rep, timing=timing)
        eager = bench(fn, warmup, rep, timing="eager") if t["timing"].startswith("graph") else None
        peak = peak_memory(fn)
        note = t["timing"] + (f"; eager call {eager['ms']:.3f} ms" if eager else "")
        rows.append(Row(bench=name, provider=provider, shape=shape, dtype=str(dtype).split(".")[-1], mode=mode,
                        ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=nbytes / t["ms"] / 1e6,
                        unit="GB/s", peak_gib=peak, note=note, timing=t["timing"]))
    except Exception as e:  # a baseline failing must not stop the run
        rows.append(Row(bench=name, provider=provider, shape=shape, dtype=str(dtype).split(".")[-1], mode=mode,
                        note=f"failed: {type(e).__name__}: {str(e)[:120]}"))


def _grad_fn(f, inputs, gouts=None):
    """(fwd, bwd, fwd+bwd) closures for f(*inputs) -> tuple of outputs (random output grads when gouts is None)."""
    outs = f(*inputs)
    if gouts is None:
        gouts = tuple(randn_like(o) for o in outs)
    # fwd+bwd differentiates leaves of its own: the "bwd" closure keeps ``outs``' graph alive and with it the inputs'
    # AccumulateGrad nodes, made on the default stream; a CUDA-graph capture (a side stream) of a backward that reached
    # them failed on the H200 (session 14, bench_quick_gelu 9232 x 4096: autograd's "AccumulateGrad node's stream does
    # not match" warning, then AcceleratorError in both tries; also bench_rms_norm's fwd+bwd row on the H100, session
    # 12). With fresh leaves the nodes live only as long as each call's graph.
    fresh = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs)
    return (lambda: f(*inputs),
            lambda: torch.autograd.grad(outs, inputs, gouts, retain_graph=True),
            lambda: torch.autograd.grad(f(*fresh), fresh, gouts))


def measure_modes(rows, name, provider, shape, dtype, f, inputs, gouts, nb_f, nb_b, warmup, rep):
    """fwd, bwd and fwd+bwd rows of f(*inputs) (nb_f / nb_b bytes); a provider that cannot even run is a failed row.
    Shared by bench_swiglu.py and bench_rope.py."""
    try:
        fwd, bwd, both = _grad_fn(f, inputs, gouts)
    except Exception as e:
        rows.append(Row(bench=name, provider=provider, shape=shape, dtype=str(dtype).split(".")[-1], mode="fwd",
                        note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
        return
    measure(rows, name, provider, shape, dtype, "fwd", fwd, nb_f, warmup, rep)
    measure(rows, name, provider, shape, dtype, "bwd", bwd, nb_b, warmup, rep)
    measure(rows, name, provider, shape, dtype, "fwd+bwd", both, nb_f + nb_b, warmup, rep)


def _finish(rows, copy_gbps, smoke, name="rms_norm"):
    """Ratios, then "% of copy" in front of each of our rows' note (idempotent: saved after every shape); shared by
    bench_rope.py and bench_swiglu.py."""
    add_ratios(rows, ours="llava_fast")
    for row in rows:
        if row.provider.startswith("llava_fast") and row.metric:
            rest = row.note.split("% of copy; ", 1)[1] if "% of copy; " in row.note else row.note
            row.note = f"{100 * row.metric / copy_gbps:.0f}% of copy; {rest}"
    return None if smoke else save(rows, name)


def report(rows, copy_gbps, smoke, name="rms_norm") -> int:
    """The op benches' end: ratios and "% of copy" (:func:`_finish`), saved as ``name`` unless ``smoke``, the table
    printed; returns the exit code 0."""
    path = _finish(rows, copy_gbps, smoke, name)
    print(to_markdown(rows))
    if path:
        print(f"saved {path}")
    return 0


QUICK_HELP = "8192 tokens only, fewer repetitions, no torch.compile baseline (add --compile)"


def op_bench_setup(name: str, argv=None, quick_help: str = "fewer repetitions, no torch.compile baseline (add "
                   "--compile)", op: str | None = None):
    """The command line shared by the memory-bound op benches (--quick, --compile, --dtype, --smoke) and their set-up:
    a namespace with ``args``, ``dev``, ``dtype``, ``warmup``, ``rep``, ``with_compile``, ``rows`` (the copy row in it)
    and ``copy_gbps``; None without a GPU (the caller returns 0). ``--smoke`` runs on the CPU under the Triton
    interpreter with backend ``op`` (default ``name``) forced to the kernel."""
    from types import SimpleNamespace

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--compile", action="store_true", help="with --quick: keep the torch.compile baseline")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (Triton interpreter, tiny sizes)")
    args = ap.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        import llava_fast
        llava_fast.set_backend(op or name, "triton")
    elif not torch.cuda.is_available():
        print(f"bench_{name}: needs a CUDA GPU; nothing measured on this machine.")
        return None
    warmup, rep = (1, 1) if args.smoke else (3, 10) if args.quick else (10, 50)
    rows: list[Row] = []
    copy_gbps = copy_bandwidth(rows, device=dev, numel=1 << (14 if args.smoke else 28))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    return SimpleNamespace(args=args, dev=dev, dtype=getattr(torch, args.dtype), warmup=warmup, rep=rep,
                           with_compile=not args.quick or args.compile, rows=rows, copy_gbps=copy_gbps)


def activation_main(name: str, shapes, load, extra=None, argv=None) -> int:
    """The command line of the one-input activation benches (bench_quick_gelu.py, bench_gelu.py): ``load()`` returns
    ``(ours, ref)``, imported after the set-up (``--smoke`` must turn the Triton interpreter on before a kernel is
    defined: imported earlier, every kernel row of a smoke run from a shell failed "0 active drivers"); for each shape
    ``(tokens, width, label, kwargs)`` the providers ``llava_fast`` (``ours(x, **kwargs)``), ``hf`` (``ref``) and
    ``compile`` (``torch.compile`` of ``ref``; not in ``--quick`` unless ``--compile``), fwd / bwd / fwd+bwd in GB/s
    (bytes 2 T I b and 3 T I b), our backward kernel alone (``torch.ops.llava_fast.<name>_bwd``), and
    ``extra(rows, x, gy, shape, dtype, kwargs, warmup, rep)`` for more rows. Saved after every shape."""
    b = op_bench_setup(name, argv)
    if b is None:
        return 0
    args, dev, dtype, warmup, rep, with_compile, rows, copy_gbps = (b.args, b.dev, b.dtype, b.warmup, b.rep,
                                                                    b.with_compile, b.rows, b.copy_gbps)
    ours, ref = load()
    if args.smoke:
        shapes = [(8, 100, shapes[0][2], shapes[0][3])]
    compiled = torch.compile(ref, dynamic=False) if dev == "cuda" and with_compile else ref
    bwd_op = getattr(torch.ops.llava_fast, f"{name}_bwd")
    for t, width, label, kw in shapes:
        shape = f"{t}x{width}" + (f" {label}" if label else "")
        try:
            eb = torch.tensor([], dtype=dtype).element_size()
            x = randn(t, width, device=dev, dtype=dtype, requires_grad=True)
            gy = randn(t, width, device=dev, dtype=dtype)
            providers = {"llava_fast": lambda x: (ours(x, **kw),), "hf": lambda x: (ref(x, **kw),),
                         "compile": lambda x: (compiled(x, **kw),)}
            if not with_compile:
                del providers["compile"]
            nb_f, nb_b = 2 * t * width * eb, 3 * t * width * eb
            for prov, f in providers.items():
                measure_modes(rows, name, prov, shape, dtype, f, (x,), (gy,), nb_f, nb_b, warmup, rep)
            xd = x.detach()
            measure(rows, name, "llava_fast", shape, dtype, "bwd kernels", lambda: bwd_op(gy, xd, *kw.values()),
                    nb_b, warmup, rep)
            if extra is not None:
                extra(rows, xd, gy, shape, dtype, kw, warmup, rep)
            del x, gy
        except Exception as e:  # one shape failing must not end the run
            rows.append(Row(bench=name, provider="-", shape=shape, dtype=args.dtype,
                            note=f"shape failed: {type(e).__name__}: {str(e)[:120]}"))
            print(f"{shape}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        _finish(rows, copy_gbps, args.smoke, name)
        print(f"{shape}: done ({len(rows)} rows)", flush=True)
    return report(rows, copy_gbps, args.smoke, name)


def main():
    b = op_bench_setup("rms_norm", quick_help=QUICK_HELP)
    if b is None:
        return 0
    args, dev, dtype, warmup, rep, with_compile, rows, copy_gbps = (b.args, b.dev, b.dtype, b.warmup, b.rep,
                                                                    b.with_compile, b.rows, b.copy_gbps)

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llava_fast.ops.rms_norm import rms_norm

    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except Exception:
        LigerRMSNorm = None
    try:
        from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm
    except Exception:
        LigerFusedAddRMSNorm = None

    tokens = [8192] if args.quick else [8192, 16384]
    hiddens = [896, 3584, 4096]
    if args.smoke:
        tokens, hiddens = [16], [40]
    eps = 1e-6
    # (on CPU, --smoke, "compile" is the eager code: a script check)

    for m in tokens:
        for n in hiddens:
            shape = f"{m}x{n}"
            try:
                b = torch.tensor([], dtype=dtype).element_size()
                x = randn(m, n, device=dev, dtype=dtype, requires_grad=True)
                r = randn(m, n, device=dev, dtype=dtype, requires_grad=True)
                hf = LlamaRMSNorm(n, eps=eps).to(dev, dtype)
                with torch.no_grad():
                    hf.weight.copy_(1 + 0.1 * randn(n, device="cpu"))
                w = hf.weight
                gy = randn(m, n, device=dev, dtype=dtype)
                gs = randn(m, n, device=dev, dtype=dtype)
                call = torch.func.functional_call

                # Every provider takes the weight it is given (the modules through functional_call), and the
                # backward asks for dweight too: the fwd+bwd rows differentiate fresh copies of x, r and w
                # (_grad_fn), which a module's own weight would leave unused (every baseline's fwd+bwd row failed
                # "not used in the graph" from session 14 to 33; the bwd rows, on the originals, were measured).
                # functional_call's own host time is outside the CUDA-graph replays these rows are timed by; an
                # eager-timed row (after a failed capture) carries it, and says so in its timing column.
                def hf_plain(x, w):
                    return call(hf, {"weight": w}, (x,))

                def hf_fused(x, r, w):
                    s = r + x
                    return call(hf, {"weight": w}, (s,)), s

                compiled = torch.compile(hf_plain, dynamic=False) if dev == "cuda" and with_compile else hf_plain
                compiled_fused = torch.compile(hf_fused, dynamic=False) if dev == "cuda" and with_compile else hf_fused
                plain = {
                    "llava_fast": lambda x, w: (rms_norm(x, w, eps),),
                    "hf": lambda x, w: (hf_plain(x, w),),
                    "compile": lambda x, w: (compiled(x, w),),
                }
                fused = {
                    "llava_fast": lambda x, r, w: rms_norm(x, w, eps, residual=r),
                    "hf": hf_fused,
                    "compile": compiled_fused,
                }
                if not with_compile:  # Inductor compiles take tens of seconds per shape: --quick skips them
                    del plain["compile"], fused["compile"]
                if LigerRMSNorm is not None:
                    lg = LigerRMSNorm(n, eps=eps).to(dev, dtype)
                    plain["liger"] = lambda x, w: (call(lg, {"weight": w}, (x,)),)
                if LigerFusedAddRMSNorm is not None:
                    try:
                        lgf = LigerFusedAddRMSNorm(n, eps=eps).to(dev, dtype)
                        fused["liger"] = lambda x, r, w: tuple(call(lgf, {"weight": w}, (x, r)))
                    except Exception:
                        pass
                for variant, providers, inputs, gouts, nb_f, nb_b in (
                    ("rms_norm", plain, (x, w), (gy,), 2 * m * n * b + 4 * m, 3 * m * n * b + 4 * m),
                    ("rms_norm+residual", fused, (x, r, w), (gy, gs), 4 * m * n * b + 4 * m, 4 * m * n * b + 4 * m),
                ):
                    for prov, f in providers.items():
                        measure_modes(rows, variant, prov, shape, dtype, f, inputs, gouts, nb_f, nb_b, warmup, rep)
                    # our backward kernels alone, graph-timed (the "bwd" rows above are eager autograd calls: the
                    # bandwidth target of issue 6 is about the kernels)
                    res = r.detach() if variant != "rms_norm" else None
                    _, s_, rstd = torch.ops.llava_fast.rms_norm_fwd(x.detach(), w.detach(), res, eps)
                    xs = s_ if res is not None else x.detach()
                    dres = gs if res is not None else None
                    measure(rows, variant, "llava_fast", shape, dtype, "bwd kernels",
                            lambda: torch.ops.llava_fast.rms_norm_bwd(gy, xs, w.detach(), rstd, dres), nb_b, warmup,
                            rep)
                    # the backward tile experiment (LLAVA_FAST_RMS_BWD_TILE; default 2048 elements): more rows per
                    # loop iteration only where N <= 1024 (at N >= 2048 every tile is one row either way)
                    for tile in ((4096, 8192) if n <= 1024 else ()):
                        os.environ["LLAVA_FAST_RMS_BWD_TILE"] = str(tile)
                        try:
                            measure(rows, variant, f"llava_fast_bwd{tile}", shape, dtype, "bwd kernels",
                                    lambda: torch.ops.llava_fast.rms_norm_bwd(gy, xs, w.detach(), rstd, dres), nb_b,
                                    warmup, rep)
                        finally:
                            os.environ.pop("LLAVA_FAST_RMS_BWD_TILE", None)
                del x, r, gy, gs, hf
            except Exception as e:  # one shape failing (an input draw, out of memory, ...) must not end the run
                rows.append(Row(bench="rms_norm", provider="-", shape=shape, dtype=args.dtype,
                                note=f"shape failed: {type(e).__name__}: {str(e)[:120]}"))
                print(f"{shape}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
            _finish(rows, copy_gbps, args.smoke)  # keep what is measured so far, in case a time limit stops the run
            print(f"{shape}: done ({len(rows)} rows)", flush=True)

    return report(rows, copy_gbps, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
