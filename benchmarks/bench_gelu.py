"""GELU (tanh: the SigLIP tower's MLP activation in LLaVA-OneVision; erf: the projector's) in GB/s, and what the
act_linear backward pays for it.

Providers, all measured in this run: ``llava_fast`` (Triton, ops/gelu.py), ``hf`` (torch's ``F.gelu``, one kernel
each way, as transformers), ``compile`` (``torch.compile`` of it; left out of ``--quick`` unless ``--compile``). The
row that matters for training is ``recompute+bwd``: act_linear recomputes the activation for fc2's weight gradient
and differentiates it, torch with two kernels (``gelu`` again, then ``gelu_backward``: 5 T I b moved), ours with
one that also writes the output (``gelu_bwd_out``: 4 T I b), both graph-timed. A large bf16 ``copy_`` gives this
GPU's copy bandwidth in the same run.

Bytes (b = element size, T tokens, I width): fwd 2 T I b, bwd 3 T I b (read dy, x; write dx), recompute+bwd 4 T I b
(what the fused kernel moves; torch's pair moves 5). Shapes: the OneVision-0.5B step's SigLIP fc1 output (10 tiles x
729 tokens, 4304) and 4x that.

Run: ``python benchmarks/bench_gelu.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rms_norm import _finish as _finish_common  # noqa: E402
from bench_rms_norm import copy_bandwidth, measure, measure_modes  # noqa: E402
from bench_utils import Row, randn, to_markdown  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile baseline (add --compile)")
    ap.add_argument("--compile", action="store_true", help="with --quick: keep the torch.compile baseline")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (Triton interpreter, tiny sizes)")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        import llava_fast
        llava_fast.set_backend("gelu", "triton")
    elif not torch.cuda.is_available():
        print("bench_gelu: needs a CUDA GPU; nothing measured on this machine.")
        return 0

    from llava_fast.ops.gelu import gelu, gelu_ref

    dtype = getattr(torch, args.dtype)
    warmup, rep = (3, 10) if args.quick else (10, 50)
    shapes = [(7290, 4304, "tanh"), (29160, 4304, "tanh")]
    if args.smoke:
        warmup, rep, shapes = 1, 1, [(8, 100, "tanh")]
    rows: list[Row] = []
    copy_gbps = copy_bandwidth(rows, device=dev, numel=1 << (14 if args.smoke else 28))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    with_compile = not args.quick or args.compile
    compiled = torch.compile(gelu_ref, dynamic=False) if dev == "cuda" and with_compile else gelu_ref
    for t, width, approx in shapes:
        shape = f"{t}x{width} {approx}"
        try:
            eb = torch.tensor([], dtype=dtype).element_size()
            x = randn(t, width, device=dev, dtype=dtype, requires_grad=True)
            gy = randn(t, width, device=dev, dtype=dtype)
            providers = {"llava_fast": lambda x: (gelu(x, approx),), "hf": lambda x: (gelu_ref(x, approx),),
                         "compile": lambda x: (compiled(x, approx),)}
            if not with_compile:
                del providers["compile"]
            nb_f, nb_b = 2 * t * width * eb, 3 * t * width * eb
            for prov, f in providers.items():
                measure_modes(rows, "gelu", prov, shape, dtype, f, (x,), (gy,), nb_f, nb_b, warmup, rep)
            xd = x.detach()
            nb_rb = 4 * t * width * eb
            measure(rows, "gelu", "llava_fast", shape, dtype, "recompute+bwd",
                    lambda: torch.ops.llava_fast.gelu_bwd_out(gy, xd, approx), nb_rb, warmup, rep)
            measure(rows, "gelu", "hf", shape, dtype, "recompute+bwd",
                    lambda: (gelu_ref(xd, approx), torch.ops.aten.gelu_backward(gy, xd, approximate=approx)),
                    nb_rb, warmup, rep)
            del x, gy
        except Exception as e:  # one shape failing must not end the run
            rows.append(Row(bench="gelu", provider="-", shape=shape, dtype=args.dtype,
                            note=f"shape failed: {type(e).__name__}: {str(e)[:120]}"))
            print(f"{shape}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        _finish_common(rows, copy_gbps, args.smoke, "gelu")
        print(f"{shape}: done ({len(rows)} rows)", flush=True)
    path = _finish_common(rows, copy_gbps, args.smoke, "gelu")
    print(to_markdown(rows))
    if path:
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
