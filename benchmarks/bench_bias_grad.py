"""Bias gradients (column sums of a linear's output gradient) in GB/s: ours against torch's ``dy.sum(0)``.

Providers, all measured in this run: ``llava_fast`` (ops/bias_grad.py's two kernels, forced on: it is opt-in),
``torch`` (``dy.sum(0)``: what autograd and act_linear use), ``gemv`` (``ones @ dy`` by cuBLAS: one launch; informative
only, its bf16 reduction may round in bf16), ``compile`` (``torch.compile`` of the sum; left out of ``--quick`` unless
``--compile``). A large bf16 ``copy_`` gives this GPU's copy bandwidth in the same run.

Bytes: M N b read (the output is N values). Shapes of the OneVision-0.5B step: SigLIP's q/k/v/out and fc2 (~10k
tokens x 1152), fc1 (x 4304), Qwen2's q (10906 x 896) and k/v (x 128) biases.

Run: ``python benchmarks/bench_bias_grad.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one;
``--smoke``: the CPU check of this script under the Triton interpreter).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rms_norm import _finish, measure, report, op_bench_setup  # noqa: E402
from bench_utils import randn  # noqa: E402

SHAPES = [(10206, 1152, "SigLIP q/k/v/o, fc2"), (10206, 4304, "SigLIP fc1"), (10906, 896, "Qwen2 q"),
          (10906, 128, "Qwen2 k/v")]


def main(argv=None):
    b = op_bench_setup("bias_grad", argv)
    if b is None:
        return 0
    args, dev, dtype, warmup, rep, rows, copy_gbps = b.args, b.dev, b.dtype, b.warmup, b.rep, b.rows, b.copy_gbps
    from llava_fast.ops.bias_grad import bias_grad_fwd

    shapes = [(100, 40, "smoke")] if args.smoke else SHAPES
    with_compile = b.with_compile
    summed = torch.compile(lambda t: t.sum(0), dynamic=False) if dev == "cuda" and with_compile else None
    for m, n, label in shapes:
        shape = f"{m}x{n} {label}"
        dy = randn(m, n, device=dev, dtype=dtype)
        ones = torch.ones(1, m, device=dev, dtype=dtype)
        nbytes = m * n * dy.element_size()
        providers = {"llava_fast": lambda: bias_grad_fwd(dy), "torch": lambda: dy.sum(0), "gemv": lambda: ones @ dy}
        if summed is not None:
            providers["compile"] = lambda: summed(dy)
        for prov, fn in providers.items():
            measure(rows, "bias_grad", prov, shape, dtype, "sum", fn, nbytes, warmup, rep)
        err = (bias_grad_fwd(dy).float() - dy.double().sum(0)).abs().max().item()
        base = (dy.sum(0).float() - dy.double().sum(0)).abs().max().item()
        gemv = ((ones @ dy).float().view(-1) - dy.double().sum(0)).abs().max().item()
        rows[-len(providers)].note += f"; max err vs fp64 {err:.2e} (torch {base:.2e}, gemv {gemv:.2e})"
        _finish(rows, copy_gbps, args.smoke, "bias_grad")
        print(f"{shape}: done ({len(rows)} rows)", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    return report(rows, copy_gbps, args.smoke, "bias_grad")


if __name__ == "__main__":
    sys.exit(main())
