"""SwiGLU activation ``silu(gate) * up`` forward / backward / fwd+bwd in GB/s.

Providers, all measured in this run: ``llava_fast`` (Triton; backward recomputes silu), ``hf`` (eager
``act_fn(gate) * up`` as ``LlamaMLP``), ``compile`` (``torch.compile`` of it; left out of ``--quick`` unless
``--compile``: its Inductor compiles take tens of seconds per shape), ``liger`` (``LigerSiLUMulFunction`` when
``liger_kernel`` imports). A large bf16 ``copy_`` gives this GPU's copy bandwidth in the same run.

Bytes (same for every provider; b = element size, T tokens, I intermediate): fwd 3 T I b (read gate, up; write out);
bwd 5 T I b (read dout, gate, up; write dgate, dup). Eager's extra traffic (silu output, temporaries) is not counted.

Run: ``python benchmarks/bench_swiglu.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one).
Results are saved after every shape, so a time limit keeps what was measured; a shape that raises is recorded as
failed and the run goes on to the next.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rms_norm import _finish as _finish_common  # noqa: E402
from bench_rms_norm import QUICK_HELP, measure, measure_modes, op_bench_setup, report  # noqa: E402
from bench_utils import Row, randn  # noqa: E402


def _finish(rows, copy_gbps, smoke):
    return _finish_common(rows, copy_gbps, smoke, "swiglu")


def main():
    b = op_bench_setup("swiglu", quick_help=QUICK_HELP)
    if b is None:
        return 0
    args, dev, dtype, warmup, rep, with_compile, rows, copy_gbps = (b.args, b.dev, b.dtype, b.warmup, b.rep,
                                                                    b.with_compile, b.rows, b.copy_gbps)

    from llava_fast.ops.swiglu import swiglu

    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:
        LigerSiLUMulFunction = None

    tokens = [8192] if args.quick else [8192, 16384]
    inters = [4864, 11008, 18944]
    if args.smoke:
        tokens, inters = [8], [100]

    def eager(a, b):
        return torch.nn.functional.silu(a) * b

    # Inductor compiles take tens of seconds per shape: --quick skips them (on CPU, --smoke, "compile" is the eager
    # code: a check of the script)
    compiled = torch.compile(eager, dynamic=False) if dev == "cuda" and with_compile else eager
    for t in tokens:
        for inter in inters:
            shape = f"{t}x{inter}"
            try:
                eb = torch.tensor([], dtype=dtype).element_size()
                a = randn(t, inter, device=dev, dtype=dtype, requires_grad=True)
                b = randn(t, inter, device=dev, dtype=dtype, requires_grad=True)
                gc = randn(t, inter, device=dev, dtype=dtype)
                providers = {
                    "llava_fast": lambda a, b: (swiglu(a, b),),
                    "hf": lambda a, b: (eager(a, b),),
                    "compile": lambda a, b: (compiled(a, b),),
                }
                if LigerSiLUMulFunction is not None:
                    providers["liger"] = lambda a, b: (LigerSiLUMulFunction.apply(a, b),)
                if not with_compile:
                    del providers["compile"]
                nb_f, nb_b = 3 * t * inter * eb, 5 * t * inter * eb
                for prov, f in providers.items():
                    measure_modes(rows, "swiglu", prov, shape, dtype, f, (a, b), (gc,), nb_f, nb_b, warmup, rep)
                # our backward kernel alone, graph-timed (the "bwd" rows are eager autograd calls)
                ad, bd = a.detach(), b.detach()
                measure(rows, "swiglu", "llava_fast", shape, dtype, "bwd kernels",
                        lambda: torch.ops.llava_fast.swiglu_bwd(gc, ad, bd), nb_b, warmup, rep)
                del a, b, gc
            except Exception as e:  # one shape failing (an input draw, out of memory, ...) must not end the run
                rows.append(Row(bench="swiglu", provider="-", shape=shape, dtype=args.dtype,
                                note=f"shape failed: {type(e).__name__}: {str(e)[:120]}"))
                print(f"{shape}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
            _finish(rows, copy_gbps, args.smoke)  # keep what is measured so far, in case a time limit stops the run
            print(f"{shape}: done ({len(rows)} rows)", flush=True)

    return report(rows, copy_gbps, args.smoke, "swiglu")


if __name__ == "__main__":
    sys.exit(main())
