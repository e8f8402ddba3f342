"""LayerNorm (the vision towers' norms) forward / backward / fwd+bwd in GB/s, and the backward as act_linear runs it.

Providers, all measured in this run: ``llava_fast`` (ops/layer_norm.py, forced on: it is opt-in), ``torch``
(``F.layer_norm``: transformers' CLIP/SigLIP call), ``compile`` (``torch.compile`` of it; left out of ``--quick``
unless ``--compile``). A large bf16 ``copy_`` gives this GPU's copy bandwidth in the same run; our rows say "% of copy".
x, weight and bias all require gradients (a training step of the towers); torch's backward computes dweight/dbias
only where asked, ours always here, so the comparison does not favour us.

The mode that decides the end-to-end question is ``recompute+bwd``: act_linear keeps x and recomputes norm(x) in the
backward for q/k/v's (or fc1's) weight gradients. Ours is one launch (``layer_norm_bwd(..., want_out=True)``: dx,
dweight, dbias and y); torch's is ``native_layer_norm`` (the forward again) + ``native_layer_norm_backward`` (grad
input + GammaBeta: two kernels).

Bytes (b = element size, M rows, N width): fwd 2 M N b; bwd 3 M N b (reads dy, x; writes dx); recompute+bwd 4 M N b
(ours: reads dy, x; writes dx, y; torch moves 2 M N b more: its forward reads x again and its two backward kernels
each read dy and x). Shapes: SigLIP-so400m tiles of OneVision (13 x 729 tokens, 1152), CLIP-L at stage 1
(16 x 577, 1024) and at the NeXT prefill (40 x 577, 1024).

Run: ``python benchmarks/bench_layer_norm.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one;
``--smoke``: the CPU check of this script under the Triton interpreter).
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rms_norm import _finish, measure, report, measure_modes, op_bench_setup  # noqa: E402
from bench_utils import Row, randn  # noqa: E402

SHAPES = [(13 * 729, 1152, 1e-6, "SigLIP OV"), (16 * 577, 1024, 1e-5, "CLIP-L stage 1"),
          (40 * 577, 1024, 1e-5, "CLIP-L prefill")]


def main(argv=None):
    b = op_bench_setup("layer_norm", argv)
    if b is None:
        return 0
    args, dev, dtype, warmup, rep, rows, copy_gbps = b.args, b.dev, b.dtype, b.warmup, b.rep, b.rows, b.copy_gbps
    import llava_fast
    from llava_fast.ops.layer_norm import layer_norm, layer_norm_bwd

    llava_fast.set_backend("layer_norm", "triton")
    shapes = [(16, 40, 1e-6, "smoke")] if args.smoke else SHAPES
    with_compile = b.with_compile
    compiled = torch.compile(F.layer_norm, dynamic=False) if dev == "cuda" and with_compile else F.layer_norm
    for m, n, eps, label in shapes:
        shape = f"{m}x{n} {label}"
        try:
            eb = torch.tensor([], dtype=dtype).element_size()
            x = randn(m, n, device=dev, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * randn(n, device=dev, dtype=torch.float32)).to(dtype).requires_grad_()
            b = (0.1 * randn(n, device=dev, dtype=torch.float32)).to(dtype).requires_grad_()
            gy = randn(m, n, device=dev, dtype=dtype)
            providers = {"llava_fast": lambda x, w, b: (layer_norm(x, w, b, eps),),
                         "torch": lambda x, w, b: (F.layer_norm(x, (n,), w, b, eps),),
                         "compile": lambda x, w, b: (compiled(x, (n,), w, b, eps),)}
            if not with_compile:
                del providers["compile"]
            nb_f, nb_b = 2 * m * n * eb, 3 * m * n * eb
            for prov, f in providers.items():
                measure_modes(rows, "layer_norm", prov, shape, dtype, f, (x, w, b), (gy,), nb_f, nb_b, warmup, rep)
            xd, wd, bd = x.detach(), w.detach(), b.detach()
            nb_rb = 4 * m * n * eb
            measure(rows, "layer_norm", "llava_fast", shape, dtype, "recompute+bwd",
                    lambda: layer_norm_bwd(gy, xd, wd, bd, eps, want_out=True), nb_rb, warmup, rep)

            def torch_rb():
                y, mean, rstd = torch.native_layer_norm(xd, (n,), wd, bd, eps)
                return y, torch.ops.aten.native_layer_norm_backward(gy, xd, (n,), mean, rstd, wd, bd,
                                                                    [True, True, True])
            measure(rows, "layer_norm", "torch", shape, dtype, "recompute+bwd", torch_rb, nb_rb, warmup, rep)
            del x
        except Exception as e:  # one shape failing must not end the run
            rows.append(Row(bench="layer_norm", provider="-", shape=shape, dtype=args.dtype,
                            note=f"shape failed: {type(e).__name__}: {str(e)[:120]}"))
            print(f"{shape}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        _finish(rows, copy_gbps, args.smoke, "layer_norm")
        print(f"{shape}: done ({len(rows)} rows)", flush=True)
    return report(rows, copy_gbps, args.smoke, "layer_norm")


if __name__ == "__main__":
    sys.exit(main())
