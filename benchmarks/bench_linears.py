"""q, k and v as one GEMM (``act_linear.linears`` with ``LLAVA_FAST_FUSED_QKV=1``) against three GEMMs, in TFLOP/s.

Why: session 14's H200 stage-1 profile ran the Llama-7B q/k/v/o GEMMs (M = 10240, N = K = 4096) at ~580 TFLOP/s and
the wider MLP GEMMs above 800. Providers, all measured in this run:
``separate`` (three ``F.linear``: what the model does by default), ``llava_fast_fused`` (``linears``: the weights
concatenated per call, then one GEMM: what ``LLAVA_FAST_FUSED_QKV=1`` does), ``llava_fast_fused_cached`` (one GEMM
over weights concatenated once: the GEMM alone, the bound on what fusing can give), for the forward (``fwd``) and the
input gradient (``dX``: three GEMMs chained with ``addmm_`` against the output gradients and weights concatenated
and one GEMM). FLOPs: 2 M K (N_q + N_k + N_v) either way. Timed as CUDA-graph replays (the kernels' own time).

Shapes: LLaVA-1.5-7B stage 1 (16 x 640 tokens) and the NeXT-7B prefill (8 x 2498), Llama-7B widths; CLIP-L at stage 1
(16 x 577); SigLIP-so400m (14 tiles x 729, biases); Qwen2-0.5B (2 x 5453, 896 / 128 / 128, biases).

Run: ``python benchmarks/bench_linears.py [--quick]`` (needs a CUDA GPU; ``--smoke``: a CPU check of this script).
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import Row, add_ratios, bench, save, to_markdown  # noqa: E402

SHAPES = [(16 * 640, 4096, (4096, 4096, 4096), False, "Llama-7B stage 1"),
          (8 * 2498, 4096, (4096, 4096, 4096), False, "Llama-7B prefill"),
          (16 * 577, 1024, (1024, 1024, 1024), True, "CLIP-L stage 1"),
          (14 * 729, 1152, (1152, 1152, 1152), True, "SigLIP OV"),
          (2 * 5453, 896, (896, 128, 128), True, "Qwen2-0.5B OV")]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (tiny sizes)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_linears: needs a CUDA GPU; nothing measured on this machine.")
        return 0
    from llava_fast.ops.act_linear import linears

    dev, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    warmup, rep = (1, 1) if args.smoke else (3, 10) if args.quick else (10, 30)
    shapes = [(64, 32, (32, 8, 8), True, "smoke")] if args.smoke else SHAPES
    rows: list[Row] = []
    g = torch.Generator(device=dev).manual_seed(0)
    for m, k, ns, has_bias, label in shapes:
        shape = f"M={m} K={k} N={'+'.join(map(str, ns))} {label}"
        a = torch.randn(m, k, device=dev, dtype=dtype, generator=g)
        ws = [torch.randn(n, k, device=dev, dtype=dtype, generator=g) / k ** 0.5 for n in ns]
        bs = [torch.randn(n, device=dev, dtype=dtype, generator=g) if has_bias else None for n in ns]
        w_cat = torch.cat(ws)
        b_cat = torch.cat(bs) if has_bias else None
        flop = 2 * m * k * sum(ns)

        def fused():
            os.environ["LLAVA_FAST_FUSED_QKV"] = "1"
            try:
                return linears(a, ws, bs)
            finally:
                os.environ.pop("LLAVA_FAST_FUSED_QKV", None)

        dys = [torch.randn(m, n, device=dev, dtype=dtype, generator=g) for n in ns]
        dy_cat = torch.cat(dys, dim=1)

        def dx_separate():   # act_linear's default backward: the input gradients chained in addmm_'s epilogue
            da = dys[0].mm(ws[0])
            for dy, w in zip(dys[1:], ws[1:]):
                da.addmm_(dy, w)
            return da

        modes = {"fwd": {"separate": lambda: tuple(F.linear(a, w, b) for w, b in zip(ws, bs)),
                         "llava_fast_fused": fused,
                         "llava_fast_fused_cached": lambda: F.linear(a, w_cat, b_cat)},
                 # the input gradient (what stage 1's frozen language model computes in its backward)
                 "dX": {"separate": dx_separate,
                        "llava_fast_fused": lambda: torch.cat(dys, dim=1).mm(torch.cat(ws)),
                        "llava_fast_fused_cached": lambda: dy_cat.mm(w_cat)}}
        for mode, providers in modes.items():
            ref = providers["separate"]()
            got = providers["llava_fast_fused"]()
            err = max((o.float() - r.float()).abs().max().item()
                      for o, r in zip(got if mode == "fwd" else (got,), ref if mode == "fwd" else (ref,)))
            for prov, fn in providers.items():
                try:
                    t = bench(fn, warmup, rep, timing="graph" if dev == "cuda" else None)
                    rows.append(Row(bench="linears", provider=prov, shape=shape, dtype=str(dtype)[6:], mode=mode,
                                    ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=flop / t["ms"] / 1e9,
                                    unit="TFLOP/s", timing=t["timing"],
                                    note=t["timing"] + (f"; max |fused - separate| {err:.2e}"
                                                        if prov == "llava_fast_fused" else "")))
                except Exception as e:  # one provider failing must not end the run
                    rows.append(Row(bench="linears", provider=prov, shape=shape, dtype=str(dtype)[6:], mode=mode,
                                    note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
        print(f"{shape}: done", flush=True)
    add_ratios(rows, ours="llava_fast_fused")
    print(to_markdown(rows))
    if not args.smoke:
        print(f"saved {save(rows, 'linears')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
