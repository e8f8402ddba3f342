"""Correctness (and speed) of attention kernel variants on a GPU, each variant in its own process.

    python benchmarks/attention_variants.py [--dims 72,80,96] [--variants "default|MIN_D1=32|CFG=fwd=64,64,4,2"]
                                            [--jobs 8] [--time]

A variant is a set of environment overrides read by llava_fast.ops.attention at call time:
``CFG=...`` -> LLAVA_FAST_ATTN_CFG (kind=BLOCK_M,BLOCK_N,num_warps,num_stages;...), ``SPLIT=exact|masked|none``
-> LLAVA_FAST_ATTN_SPLIT (how the head dim is cut into register chunks, see attention._split_head_dim), ``MIN_D1=n``
-> LLAVA_FAST_ATTN_MIN_D1 (narrowest remainder chunk), ``ALIGN=0`` -> LLAVA_FAST_ATTN_ALIGN (no 16-byte stride
hint), ``FOLD=0`` -> LLAVA_FAST_ATTN_FOLD (the forward's session-4 softmax arithmetic: scores scaled before the max),
``GQA_SPLIT=kN|0`` -> LLAVA_FAST_ATTN_GQA_SPLIT, ``HEAVY=0|1`` -> LLAVA_FAST_ATTN_HEAVY_FIRST; several joined with
``+``. Each (variant, head dim) runs forward and
backward on packed bf16 documents (1, 17, 97, 577, 729 tokens; GQA 8/2; causal and not) against the fp32 reference
with the flash-attn rule (error <= 2 x PyTorch's bf16 error, + the fp32 reassociation floor of
tests/ops/test_attention.py), in a fresh
process, so that a variant that faults (illegal address) cannot poison the others. ``--time [SHAPE]`` adds fwd and
fwd+bwd milliseconds and TFLOP/s on one of TIME_SHAPES (siglip 32 x 729 H16 D72, clip 64 x 577 H16 D64, causal4k
B4 H32 D128, gqa64 B4 14/2 D64 causal); run timings with ``--jobs 1`` (parallel variants share the GPU). A config
sweep: ``--dims 128 --time causal4k --jobs 1 --variants "default|CFG=fwd=128,64,4,3|CFG=dkdv=64,128,8,2"``.
Written for the first GPU runs, where D = 72 faulted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_KEYS = {"CFG": "LLAVA_FAST_ATTN_CFG", "MIN_D1": "LLAVA_FAST_ATTN_MIN_D1", "SPLIT": "LLAVA_FAST_ATTN_SPLIT",
            "ALIGN": "LLAVA_FAST_ATTN_ALIGN", "FOLD": "LLAVA_FAST_ATTN_FOLD", "GQA_SPLIT": "LLAVA_FAST_ATTN_GQA_SPLIT", "HEAVY": "LLAVA_FAST_ATTN_HEAVY_FIRST"}
FP32_REL_ATOL = 1e-5
# --time SHAPE: bench_attention.py's equal-length shapes (batch, tokens each, Hq, Hkv, D, causal), short names
TIME_SHAPES = {"siglip": "siglip-32x729-d72", "clip": "clip-64x577-d64", "causal4k": "causal-d128-4k",
               "gqa64": "qwen2-0.5b-gqa14/2-d64-4k", "ov05": "qwen2-0.5b-gqa14/2-d64-2x5453",
               "stage1": "llama7b-16x640-d128"}


def _child(d: int, do_time) -> dict:
    import torch

    from llava_fast.ops.attention import FlashAttnVarlenFunction, attention_ref

    torch.manual_seed(0)
    res = {"d": d}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run under TRITON_INTERPRET=1
    lens = [1, 17, 97, 577, 729, 300] if dev == "cuda" else [1, 17, 40]
    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter has no bf16 arithmetic
    cu = torch.tensor([0] + list(__import__("itertools").accumulate(lens)), device=dev, dtype=torch.int32)
    worst = 0.0
    for causal in (False, True):
        q = torch.randn(sum(lens), 8, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(sum(lens), 2, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(sum(lens), 2, d, device=dev, dtype=dt, requires_grad=True)
        out = FlashAttnVarlenFunction.apply(q, k, v, cu, cu, max(lens), max(lens), d ** -0.5, causal, False)[0]
        dout = torch.randn_like(out)
        got = [out] + list(torch.autograd.grad(out, (q, k, v), dout))
        if dev == "cuda":
            torch.cuda.synchronize()
        ref = attention_ref(q, k, v, cu, cu, causal=causal, upcast=True)
        refs = [ref] + list(torch.autograd.grad(ref, (q, k, v), dout))
        low = attention_ref(q, k, v, cu, cu, causal=causal, upcast=False)
        lows = [low] + list(torch.autograd.grad(low, (q, k, v), dout))
        for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, refs, lows):
            err = (a.float() - b.float()).abs().max().item()
            base = (c.float() - b.float()).abs().max().item()
            atol = FP32_REL_ATOL * max(1.0, b.abs().max().item())
            ratio = err / (2 * base + atol)
            res[f"{'c' if causal else 'n'}-{name}"] = round(ratio, 3)
            worst = max(worst, ratio)
    res["worst"] = round(worst, 3)   # <= 1 passes
    if do_time:
        import triton

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_attention import SHAPES

        b, n, hq, hkv, td, causal = SHAPES[TIME_SHAPES[do_time]]
        t = b * n
        cu = torch.arange(0, t + 1, n, device="cuda", dtype=torch.int32)
        q = torch.randn(t, hq, td, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(t, hkv, td, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

        def fwd():
            return FlashAttnVarlenFunction.apply(q, k, v, cu, cu, n, n, td ** -0.5, causal, False)[0]

        o = fwd()
        do = torch.randn_like(o)
        res["shape"] = do_time
        res["fwd_ms"] = round(triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median"), 4)
        res["fwdbwd_ms"] = round(triton.testing.do_bench(lambda: torch.autograd.grad(fwd(), (q, k, v), do), warmup=25,
                                                         rep=100, return_mode="median"), 4)
        flops = 4 * b * hq * n * n * td / (2 if causal else 1)
        res["fwd_tflops"] = round(flops / res["fwd_ms"] * 1e-9, 1)
        res["fwdbwd_tflops"] = round(3.5 * flops / res["fwdbwd_ms"] * 1e-9, 1)
    return res


def _env_of(variant: str) -> dict:
    env = {}
    if variant != "default":
        for part in variant.split("+"):
            key, _, val = part.partition("=")
            if key not in ENV_KEYS:
                raise SystemExit(f"unknown variant key {key!r} in {variant!r}: use {sorted(ENV_KEYS)}")
            env[ENV_KEYS[key]] = val
    return env


def _run(variant: str, d: int, do_time: bool, timeout: float) -> dict:
    path = ([str(ROOT)] if (ROOT / "llava_fast").is_dir() else []) + [os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, **_env_of(variant), PYTHONPATH=os.pathsep.join(path))
    cmd = [sys.executable, __file__, "--child", str(d)] + (["--time", do_time] if do_time else [])
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "d": d, "status": f"timeout {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return {"variant": variant, "d": d, "status": f"rc={p.returncode}: " + (err[-1][:160] if err else "")}
    res = json.loads(lines[-1])
    res.update(variant=variant, status="ok" if res["worst"] <= 1.0 else "WRONG")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="72")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--time", nargs="?", const="siglip", default=None, choices=sorted(TIME_SHAPES),
                    help="also time fwd and fwd+bwd on this shape (default siglip); use --jobs 1 for timings")
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--out", default=None, help="also write the results as JSON lines here")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(_child(a.child, a.time)), flush=True)
        return 0
    jobs = [(v, int(d)) for v in a.variants.split("|") for d in a.dims.split(",")]
    if a.out:
        Path(a.out).write_text("")
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        # each result is printed and written as soon as it is in: a time limit that stops the run keeps the others
        for r in ex.map(lambda j: _run(j[0], j[1], a.time, a.timeout), jobs):
            extra = {k: v for k, v in r.items() if k not in ("variant", "d", "status")}
            print(f"{r['variant']:<40} D={r['d']:<4} {r['status']:<10} {json.dumps(extra)}", flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
