"""Benchmark: llava_fast Triton varlen FlashAttention vs SDPA (flash / cuDNN / efficient), FlexAttention and flash-attn.

    python benchmarks/bench_attention.py [--quick] [--autotune] [--modes fwd,bwd,fwd+bwd] [--shapes a,b]

bf16, every baseline measured in the same run on the same GPU. TFLOP/s follow flash-attn's convention
(``benchmarks/benchmark_flash_attention.py::flops``): fwd = 4·B·H·Sq·Sk·D, halved when causal; bwd = 2.5 x fwd;
fwd+bwd = 3.5 x fwd; no recompute FLOPs counted. For packed documents only the useful FLOPs are counted
(sum over documents of 4·H·L²·D / 2), for every provider (the padded SDPA batch does more work than it is credited).
Ratios are ours / provider per (shape, mode). Peak memory is measured on fwd+bwd.

Besides ``llava_fast`` (the Triton kernels as the model runs them): ``llava_fast_cutlass`` (the opt-in CUTLASS forward,
on the shapes it takes) and ``llava_fast_cudnn`` (the opt-in cuDNN path of ``ops/cudnn_attention.py``). The atomic
5-GEMM backward and the TMA variants were removed in session 21 (measured not faster; docs/perf-notes.md).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import TIMINGS, Row, add_ratios, bench, device_name, peak_memory, save, to_markdown  # noqa: E402

OURS = "llava_fast"
# LLAVA_FAST_ATTN_CUTLASS=1: the forward on CUTLASS's Hopper FMHA (opt-in; documents of one length, Hq == Hkv, D 64
# or 128), the backward on our Triton kernels; only on the shapes it takes
OURS_CUTLASS = "llava_fast_cutlass"
# ops/cudnn_attention.py (opt-in, session 19): torch's cuDNN entry points with the backward on a thread of our own
# (safe from torch's cuDNN backward-graph cache); the gap to sdpa-cudnn is the thread hand-off
OURS_CUDNN = "llava_fast_cudnn"
DEVICE = "cuda"

# name: (batch, seqlen, Hq, Hkv, D, causal); "packed" is the 8-document case (lengths below).
SHAPES = {
    "causal-d128-4k": (4, 4096, 32, 32, 128, True),
    "causal-d128-16k": (1, 16384, 32, 32, 128, True),
    "qwen2-0.5b-gqa14/2-d64-4k": (4, 4096, 14, 2, 64, True),
    "qwen2-0.5b-gqa14/2-d64-2x5453": (2, 5453, 14, 2, 64, True),  # the OneVision-0.5B FT step's language model
    "llama7b-16x640-d128": (16, 640, 32, 32, 128, True),  # the LLaVA-1.5-7B stage-1 step's language model
    "clip-64x577-d64": (64, 577, 16, 16, 64, False),
    "siglip-32x729-d72": (32, 729, 16, 16, 72, False),
    "packed-8docs-d128": (8, None, 32, 32, 128, True),
}
# llama7b-16x640 (session 15): the stage-1 step's attention, ~35 ms of its 487 at full depth on the H200 (1.08 ms
# per layer); its cuDNN ratio decides LLAVA_FAST_TEXT_ATTENTION=sdpa for stage 1
QUICK = ["causal-d128-4k", "llama7b-16x640-d128", "siglip-32x729-d72", "clip-64x577-d64", "packed-8docs-d128"]
rng = random.Random(0)
PACKED_LENS = [rng.randint(600, 3500) for _ in range(8)]


def flops(batch_lens, hq, d, causal, mode):
    f = sum(4 * hq * s * s * d for s in batch_lens)
    if causal:
        f /= 2
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def _timed(fn_fwd, inputs, mode, warmup, rep, timing=None):
    """Time fwd, bwd (retain_graph) or fwd+bwd of fn_fwd() -> out (bench_utils.bench ``timing``)."""
    if mode == "fwd":
        with torch.no_grad():
            return bench(fn_fwd, warmup=warmup, rep=rep, timing=timing)
    out = fn_fwd()
    dout = torch.randn_like(out)
    if mode == "bwd":
        def step():
            for t in inputs:
                t.grad = None
            out.backward(dout, retain_graph=True)
        return bench(step, warmup=warmup, rep=rep, timing=timing)

    def step():
        for t in inputs:
            t.grad = None
        fn_fwd().backward(dout)
    return bench(step, warmup=warmup, rep=rep, timing=timing)


def _drop_grads(inputs):
    for t in inputs:
        t.grad = None


def _fwd_bwd_once(fn):
    out = fn()
    out.backward(torch.ones_like(out))


def _providers(name, shape, with_flex=True):
    """Yield (provider, make_fn, note): make_fn() -> (fwd_fn, leaf inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llava_fast.ops.attention import flash_attn_varlen_func

    b, s, hq, hkv, d, causal = shape
    lens = PACKED_LENS if s is None else [s] * b
    total, smax = sum(lens), max(lens)
    dev, dt = DEVICE, torch.bfloat16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)

    def packed_inputs():
        return [torch.randn(total, h, d, device=dev, dtype=dt, requires_grad=True) for h in (hq, hkv, hkv)]

    def ours():
        q, k, v = packed_inputs()
        return (lambda: flash_attn_varlen_func(q, k, v, cu, cu, smax, smax, causal=causal)), [q, k, v]

    yield OURS, ours, ""
    if s is not None and s % 8 == 0 and hq == hkv and d in (64, 128):  # what the FMHA takes (cutlass_fwd_unusable)
        yield OURS_CUTLASS, ours, "forward on CUTLASS's Hopper FMHA (LLAVA_FAST_ATTN_CUTLASS=1), Triton backward"
    if s is not None and hq % hkv == 0 and d % 8 == 0 and d <= 128:   # what ops.cudnn_attention takes
        def cudnn():
            from llava_fast.ops.cudnn_attention import cudnn_attention

            # (B, H, S, D) views of (B, S, H, D) projections, as the model passes them
            q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dt, requires_grad=True) for h in (hq, hkv, hkv))
            return (lambda: cudnn_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), d ** -0.5,
                                            causal)), [q, k, v]
        yield OURS_CUDNN, cudnn, "cuDNN, backward on our own thread (LLAVA_FAST_TEXT_ATTENTION=cudnn)"

    # SDPA on a (B, H, S, D) batch; for packed documents, a zero-padded batch of max length (the causal mask keeps
    # valid rows away from the padding at the end of each row).
    sb = len(lens)
    backends = (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION))
    for backend_name, backend in backends:
        def sdpa(backend=backend):
            q = torch.randn(sb, hq, smax, d, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(sb, hkv, smax, d, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(sb, hkv, smax, d, device=dev, dtype=dt, requires_grad=True)

            def fwd():
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                            enable_gqa=hq != hkv)
            return fwd, [q, k, v]
        yield backend_name, sdpa, "padded batch" if s is None else ""

    # FlexAttention: dense shapes with a causal mask (or none), packed documents as one sequence + document mask.
    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        if s is None:
            doc = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
            q = torch.randn(1, hq, total, d, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(1, hkv, total, d, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(1, hkv, total, d, device=dev, dtype=dt, requires_grad=True)

            def doc_causal(b_, h_, qi, ki):
                return (doc[qi] == doc[ki]) & (qi >= ki)
            mask = create_block_mask(doc_causal, 1, None, total, total, device=dev)
        else:
            q = torch.randn(b, hq, s, d, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(b, hkv, s, d, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(b, hkv, s, d, device=dev, dtype=dt, requires_grad=True)
            mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device=dev) if causal else None
        return (lambda: compiled(q, k, v, block_mask=mask, enable_gqa=hq != hkv)), [q, k, v]
    if with_flex:
        yield "flex", flex, "document mask on the packed sequence" if s is None else ""

    try:
        from flash_attn import flash_attn_varlen_func as fa_varlen
    except Exception:
        return

    def fa():
        q, k, v = packed_inputs()
        return (lambda: fa_varlen(q, k, v, cu, cu, smax, smax, causal=causal)), [q, k, v]
    yield "flash-attn", fa, ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"shapes {QUICK}, modes fwd and fwd+bwd, fewer reps, no FlexAttention (its torch.compile "
                         f"warm-up, fwd and fwd+bwd, takes ~30-60 s per shape: add --flex to include it)")
    ap.add_argument("--flex", action="store_true", help="with --quick: FlexAttention on the packed case too")
    ap.add_argument("--autotune", action="store_true", help="autotune our kernels (LLAVA_FAST_ATTN_AUTOTUNE=1)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)}")
    ap.add_argument("--modes", default=None, help="comma-separated subset of fwd,bwd,fwd+bwd")
    ap.add_argument("--timing", default=os.environ.get("LLAVA_FAST_BENCH_TIMING", "loop"), choices=TIMINGS,
                    help="bench_utils timing: loop (default: calls back to back, the GPU kept busy), eager (one "
                         "call on an idle GPU, launch latency included: what runs 1-3 used) or graph")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (Triton kernels, SDPA backends); nothing measured on "
              f"{device_name()}.")
        return 0
    if args.autotune:
        os.environ["LLAVA_FAST_ATTN_AUTOTUNE"] = "1"
    from llava_fast.ops import attention as attn_mod
    shapes = args.shapes.split(",") if args.shapes else (QUICK if args.quick else list(SHAPES))
    modes = args.modes.split(",") if args.modes else (["fwd", "fwd+bwd"] if args.quick else ["fwd", "bwd", "fwd+bwd"])
    warmup, rep = (2, 5) if args.quick else (3, 10)
    torch.manual_seed(0)
    rows: list[Row] = []
    print(f"GPU: {device_name()}; packed document lengths: {PACKED_LENS}")
    for name in shapes:
        shape = SHAPES[name]
        b, s, hq, hkv, d, causal = shape
        lens = PACKED_LENS if s is None else [s] * b
        label = f"{name} (B{len(lens)} Hq{hq} Hkv{hkv} D{d}{' causal' if causal else ''})"
        # FlexAttention compiles for ~30-60 s per shape (fwd+bwd): --quick leaves it out unless --flex (then only the
        # packed-documents case)
        with_flex = not args.quick or (args.flex and SHAPES[name][1] is None)
        for provider, make, note in _providers(name, shape, with_flex):
            provider_modes = modes
            if provider == OURS_CUTLASS:
                provider_modes = [m for m in modes if m in ("fwd", "fwd+bwd")]
            os.environ["LLAVA_FAST_ATTN_CUTLASS"] = "1" if provider == OURS_CUTLASS else "0"
            cutlass_runs = attn_mod._cutlass_runs
            if not provider_modes:
                continue
            try:
                fn, inputs = make()
                fn()  # compile / first call outside the timing
            except Exception as e:  # a backend without a kernel for this shape (e.g. efficient + GQA)
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                print(f"  {label:60s} {provider:22s} unavailable ({msg})")
                rows.append(Row("attention", provider, label, "bf16", "-", note=f"unavailable: {msg}"))
                continue
            peak = None
            for mode in provider_modes:
                try:
                    t = _timed(fn, inputs, mode, warmup, rep, args.timing)
                except Exception as e:
                    print(f"  {label:60s} {provider:22s} {mode:8s} failed ({type(e).__name__}: {e})")
                    continue
                tf = flops(lens, hq, d, causal, mode) / (t["ms"] * 1e-3) / 1e12
                if mode == "fwd+bwd":
                    peak = peak_memory(lambda: _fwd_bwd_once(fn), reset=lambda ins=inputs: _drop_grads(ins))
                row_note = note
                if provider == OURS_CUTLASS and attn_mod._cutlass_runs == cutlass_runs:
                    row_note = "FELL BACK to the Triton forward (see the warning above)"
                rows.append(Row("attention", provider, label, "bf16", mode, t["ms"], t["ms_p20"], t["ms_p80"], tf,
                                "TFLOP/s", peak if mode == "fwd+bwd" else None, note=row_note, timing=t["timing"]))
                print(f"  {label:60s} {provider:22s} {mode:8s} {t['ms']:8.3f} ms {tf:7.1f} TFLOP/s")
            del fn, inputs
            torch.cuda.empty_cache()
        add_ratios(rows, ours=OURS)
        save(rows, "attention")  # keep what is measured so far, in case a time limit stops the run
    add_ratios(rows, ours=OURS)
    print(to_markdown(rows))
    print("saved", save(rows, "attention"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
