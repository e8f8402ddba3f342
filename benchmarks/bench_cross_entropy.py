"""Fused linear cross-entropy (lm_head GEMM + causal-LM loss), forward + backward, in TFLOP/s and peak memory.

Providers, all measured in this run on the same inputs:
  ``llava_fast``  fused_linear_cross_entropy (chunked cuBLAS GEMMs + Triton loss/gradient kernel)
  ``llava_fast_vocab``  the same with ``schedule="vocab"`` (blocks of the vocabulary instead of chunks of tokens: one
                  more logits GEMM, no (V, H) fp32 accumulator, ~4x less extra memory; opt-in until it is measured.
                  ``llava_fast``'s ratio against it is token / vocab speed)
  ``llava_fast_vocab_20mb``  the vocab schedule with a 20 MiB budget (LLAVA_FAST_CE_VOCAB_BUDGET_MB=20: chunks of
                  tokens as well), Liger's footprint at 8k x 152064 x 896
  ``hf``          HF eager: ``F.linear`` (lm_head) then ``ForCausalLMLoss`` on fp32-upcast logits
  ``compile``     ``torch.compile`` of the HF eager function (``--quick``: left out unless ``--compile``, then only at
                  V=152064 H=896; its Inductor compiles take ~20 s per shape)
  ``liger``       ``LigerFusedLinearCrossEntropyLoss`` when ``liger_kernel`` imports (skipped otherwise)

FLOPs counted (the same nominal count for every provider): 3 GEMMs of 2*N*V*H (logits, d hidden, d weight) =
6*N*V*H; the softmax/loss elementwise work is not counted. TFLOP/s = 6 N V H / time. Peak memory is what
``fwd+bwd`` allocates beyond its inputs, including the returned ``hidden.grad`` and ``weight.grad`` (the gradients of
the previous call are dropped before the baseline is read); the note column gives "extra" = peak minus those returned
gradients (the < 1 GB target at vocab 152064). The session-4 H100 table read the baseline with the previous call's
gradients still held: its "peak" column is really the extra memory, its "extra" column is low by the gradients' size.

Mode ``fwd+bwd``: every label supervised. Mode ``fwd+bwd 60% ign``: 60% of labels are -100 (LLaVA prompt/image
tokens); llava_fast drops those rows before its GEMMs, the others compute them anyway.

Run: ``python benchmarks/bench_cross_entropy.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without
one). Results are saved after every shape, so a time limit keeps what was measured.
``--smoke`` checks the script on CPU (Triton interpreter, tiny sizes).
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import Row, add_ratios, bench, peak_memory, save, to_markdown  # noqa: E402


def make_hf_eager():
    """HF 5.x: logits = lm_head(hidden); ForCausalLMLoss upcasts to fp32 and calls F.cross_entropy. Our labels are
    already shifted, so they go in as ``shift_labels`` (a transformers without that argument gets the same
    computation spelled out)."""
    import inspect

    from transformers.loss.loss_utils import ForCausalLMLoss

    if "shift_labels" in inspect.signature(ForCausalLMLoss).parameters:
        def hf_eager(hidden, weight, labels):
            return ForCausalLMLoss(F.linear(hidden, weight), None, vocab_size=weight.shape[0], shift_labels=labels)
    else:
        def hf_eager(hidden, weight, labels):
            return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)
    return hf_eager


OURS = ("llava_fast", "llava_fast_vocab", "llava_fast_vocab_20mb")   # each gets its ratios against the others


def with_vocab_budget(mb, fused):
    """The vocab schedule with LLAVA_FAST_CE_VOCAB_BUDGET_MB=mb for this call only (chunks of tokens as well)."""
    def f(hh, ww, ll):
        old = os.environ.get("LLAVA_FAST_CE_VOCAB_BUDGET_MB")
        os.environ["LLAVA_FAST_CE_VOCAB_BUDGET_MB"] = str(mb)
        try:
            return fused(hh, ww, ll, schedule="vocab")
        finally:
            if old is None:
                del os.environ["LLAVA_FAST_CE_VOCAB_BUDGET_MB"]
            else:
                os.environ["LLAVA_FAST_CE_VOCAB_BUDGET_MB"] = old
    return f


def measure(rows, provider, shape, dtype, mode, fn, flops, warmup, rep, grads_bytes, leaves):
    def drop_grads():
        for t in leaves:
            t.grad = None

    try:
        t = bench(fn, warmup, rep)
        peak = peak_memory(fn, reset=drop_grads)
        note = f"extra {peak - grads_bytes / 2**30:.2f} GiB" if peak is not None else ""
        rows.append(Row(bench="cross_entropy", provider=provider, shape=shape, dtype=str(dtype).split(".")[-1],
                        mode=mode, ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=flops / t["ms"] / 1e9,
                        unit="TFLOP/s", peak_gib=peak, note=note))
    except Exception as e:  # a baseline failing (e.g. out of memory) must not stop the run
        rows.append(Row(bench="cross_entropy", provider=provider, shape=shape, dtype=str(dtype).split(".")[-1],
                        mode=mode, note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer repetitions, no torch.compile baseline "
                                                         "(add --compile)")
    ap.add_argument("--compile", action="store_true", help="with --quick: keep the torch.compile baseline (one shape)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (Triton interpreter, tiny sizes)")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("bench_cross_entropy: needs a CUDA GPU; nothing measured on this machine.")
        return 0

    import llava_fast
    from llava_fast.ops.cross_entropy import fused_linear_cross_entropy

    if args.smoke:
        llava_fast.set_backend("cross_entropy", "triton")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger_loss = LigerFusedLinearCrossEntropyLoss()
    except Exception as e:
        liger_loss = None
        print(f"liger_kernel not importable ({type(e).__name__}); the liger provider is skipped")

    hf_eager = make_hf_eager()
    dtype = getattr(torch, args.dtype)
    n = args.tokens
    # (vocab, hidden): Vicuna/LLaVA-1.5-7B, Qwen2-0.5B (OneVision-0.5B), Qwen2-7B (OneVision-7B)
    shapes = [(32064, 4096), (152064, 896), (152064, 3584)]
    warmup, rep = (5, 20)
    modes = ["fwd+bwd", "fwd+bwd 60% ign"]
    compile_shapes = set(shapes)
    if args.quick:
        shapes, warmup, rep, modes = [(32064, 4096), (152064, 896)], 2, 5, ["fwd+bwd"]
        compile_shapes = {(152064, 896)} if args.compile else set()   # Inductor compiles take ~20 s per shape
    if args.smoke:
        n, shapes, warmup, rep, modes, compile_shapes = 64, [(431, 32)], 1, 1, ["fwd+bwd", "fwd+bwd 60% ign"], set()

    rows: list[Row] = []
    for v, h in shapes:
        shape = f"N={n} V={v} H={h}"
        hidden = (torch.randn(n, h, device=dev) * 1.0).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, device=dev) * (2.5 / h ** 0.5)).to(dtype).requires_grad_()
        grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
        flops = 6 * n * v * h
        compiled = torch.compile(hf_eager) if (v, h) in compile_shapes else None
        for mode in modes:
            labels = torch.randint(0, v, (n,), device=dev)
            if "ign" in mode:
                labels[torch.rand(n, device=dev) < 0.6] = -100

            def step(f):
                def run():
                    hidden.grad = weight.grad = None
                    f(hidden, weight, labels).backward()
                return run

            providers = {
                "llava_fast": lambda hh, ww, ll: fused_linear_cross_entropy(hh, ww, ll, schedule="token"),
                "llava_fast_vocab": lambda hh, ww, ll: fused_linear_cross_entropy(hh, ww, ll, schedule="vocab"),
                "llava_fast_vocab_20mb": with_vocab_budget(20, fused_linear_cross_entropy),
                "hf": hf_eager,
            }
            if compiled is not None:
                providers["compile"] = compiled
            if liger_loss is not None:
                providers["liger"] = lambda hh, ww, ll: liger_loss(ww, hh, ll)
            for name, f in providers.items():
                measure(rows, name, shape, dtype, mode, step(f), flops, warmup, rep, grads_bytes, (hidden, weight))
                r = rows[-1]
                print(f"{shape:28s} {mode:16s} {name:11s} "
                      + (f"{r.ms:8.3f} ms {r.metric:7.1f} TFLOP/s peak {r.peak_gib or 0:6.2f} GiB {r.note}"
                         if r.ms is not None else r.note), flush=True)
        del hidden, weight, compiled
        for ours in OURS:
            add_ratios(rows, ours=ours)
        if not args.smoke:
            save(rows, "cross_entropy")  # keep what is measured so far, in case a time limit stops the run
    for ours in OURS:
        add_ratios(rows, ours=ours)
    print(to_markdown(rows))
    if not args.smoke:
        print(f"saved {save(rows, 'cross_entropy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
