"""QuickGELU ``x * sigmoid(1.702 * x)`` (CLIP's MLP activation) forward / backward / fwd+bwd in GB/s.

Providers, all measured in this run: ``llava_fast`` (one Triton kernel each way; the backward recomputes the sigmoid),
``hf`` (transformers' ``QuickGELUActivation``: three elementwise kernels forward, autograd's five backward),
``compile`` (``torch.compile`` of it; left out of ``--quick`` unless ``--compile``). Liger-Kernel has no QuickGELU.
A large bf16 ``copy_`` gives this GPU's copy bandwidth in the same run.

Bytes (the same for every provider; b = element size, T tokens, I the MLP width): fwd 2 T I b (read x, write y); bwd
3 T I b (read dy, x; write dx). Eager's extra traffic (its temporaries) is not counted, so its GB/s is what an ideal
kernel would need to match. Shapes: the CLIP-L tower's fc1 output at stage 1 (16 x 577 tokens, 4096) and at the
NeXT prefill (40 tiles x 577).

Run: ``python benchmarks/bench_quick_gelu.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one).
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
        llava_fast.set_backend("quick_gelu", "triton")
    elif not torch.cuda.is_available():
        print("bench_quick_gelu: needs a CUDA GPU; nothing measured on this machine.")
        return 0

    from llava_fast.ops.quick_gelu import quick_gelu, quick_gelu_ref

    dtype = getattr(torch, args.dtype)
    warmup, rep = (3, 10) if args.quick else (10, 50)
    shapes = [(16 * 577, 4096), (40 * 577, 4096)]
    if args.smoke:
        warmup, rep, shapes = 1, 1, [(8, 100)]
    rows: list[Row] = []
    copy_gbps = copy_bandwidth(rows, device=dev, numel=1 << (14 if args.smoke else 28))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    with_compile = not args.quick or args.compile
    compiled = torch.compile(quick_gelu_ref, dynamic=False) if dev == "cuda" and with_compile else quick_gelu_ref
    for t, width in shapes:
        shape = f"{t}x{width}"
        try:
            eb = torch.tensor([], dtype=dtype).element_size()
            x = randn(t, width, device=dev, dtype=dtype, requires_grad=True)
            gy = randn(t, width, device=dev, dtype=dtype)
            providers = {"llava_fast": lambda x: (quick_gelu(x),), "hf": lambda x: (quick_gelu_ref(x),),
                         "compile": lambda x: (compiled(x),)}
            if not with_compile:
                del providers["compile"]
            nb_f, nb_b = 2 * t * width * eb, 3 * t * width * eb
            for prov, f in providers.items():
                measure_modes(rows, "quick_gelu", prov, shape, dtype, f, (x,), (gy,), nb_f, nb_b, warmup, rep)
            xd = x.detach()
            measure(rows, "quick_gelu", "llava_fast", shape, dtype, "bwd kernels",
                    lambda: torch.ops.llava_fast.quick_gelu_bwd(gy, xd), nb_b, warmup, rep)
            del x, gy
        except Exception as e:  # one shape failing must not end the run
            rows.append(Row(bench="quick_gelu", provider="-", shape=shape, dtype=args.dtype,
                            note=f"shape failed: {type(e).__name__}: {str(e)[:120]}"))
            print(f"{shape}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        _finish_common(rows, copy_gbps, args.smoke, "quick_gelu")
        print(f"{shape}: done ({len(rows)} rows)", flush=True)
    path = _finish_common(rows, copy_gbps, args.smoke, "quick_gelu")
    print(to_markdown(rows))
    if path:
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
