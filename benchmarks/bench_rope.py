"""RoPE on q and k (packed tokens, per-token position ids) forward / backward / fwd+bwd in GB/s.

Providers, all measured in this run: ``llava_fast`` (one Triton kernel for q and k, cos/sin recomputed in-kernel from
position ids), ``llava_fast_inplace`` (fwd only, no grad: writes into q/k), ``hf`` (``apply_rotary_pos_emb`` on HF's
``(1, H, T, D)`` views with cos/sin precomputed by ``LlamaRotaryEmbedding`` outside the timed region, as HF computes
them once per model forward), ``compile`` (``torch.compile`` of ``apply_rotary_pos_emb``; left out of ``--quick``
unless ``--compile``: its Inductor compiles take tens of seconds per shape), ``liger``
(``liger_rotary_pos_emb`` when ``liger_kernel`` imports), ``llava_fast_hf_tables`` (``patch_hf(rope=True)``'s path:
``llava_fast.ops.rope.apply_rotary_pos_emb`` on the same HF views and cos/sin as ``hf`` and ``liger``, its token rows
made outside the timed region, as patch_hf makes them once per forward). A large bf16 ``copy_`` gives this GPU's
copy bandwidth.

Bytes (same for every provider; b = element size): fwd = bwd = 2 T (Hq + Hkv) D b + 8 T (read + write q and k,
position ids); the HF baselines also read cos/sin (not counted).

Run: ``python benchmarks/bench_rope.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one).
Results are saved after every shape, so a time limit keeps what was measured; a shape that raises is recorded as
failed and the run goes on to the next.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rms_norm import _finish as _finish_common  # noqa: E402
from bench_rms_norm import QUICK_HELP, measure, measure_modes, op_bench_setup, report  # noqa: E402
from bench_utils import Row, add_ratios, randn  # noqa: E402

MODELS = {  # name: (Hq, Hkv, D, theta)
    "qwen2-0.5b": (14, 2, 64, 1e6),
    "llama-7b": (32, 32, 128, 1e4),
}


def _finish(rows, copy_gbps, smoke):
    add_ratios(rows, ours="llava_fast_hf_tables")   # patch_hf's path against hf and liger on the same tables
    return _finish_common(rows, copy_gbps, smoke, "rope")


def main():
    b = op_bench_setup("rope", quick_help=QUICK_HELP)
    if b is None:
        return 0
    args, dev, dtype, warmup, rep, with_compile, rows, copy_gbps = (b.args, b.dev, b.dtype, b.warmup, b.rep,
                                                                    b.with_compile, b.rows, b.copy_gbps)

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from llava_fast.ops.rope import apply_rotary_pos_emb as lf_apply
    from llava_fast.ops.rope import rope, rope_inv_freq, rotary_rows

    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        liger_rotary_pos_emb = None

    tokens = [8192] if args.quick else [8192, 16384]
    models = MODELS
    if args.smoke:
        tokens, models = [12], {"tiny": (3, 1, 8, 1e4)}
    # Inductor compiles take tens of seconds per shape: --quick skips them (on CPU, --smoke, "compile" is the eager
    # code: a check of the script)
    compile_apply = (torch.compile(apply_rotary_pos_emb, dynamic=False) if dev == "cuda" and with_compile
                     else apply_rotary_pos_emb)

    for t in tokens:
        for name, (hq, hkv, d, theta) in models.items():
            shape = f"T{t} {name} {hq}/{hkv}x{d}"
            try:
                b = torch.tensor([], dtype=dtype).element_size()
                # packed samples of 1000..3000 tokens, positions restarting per sample
                lengths, left = [], t
                while left > 0:
                    lengths.append(min(left, 1000 + (len(lengths) * 731) % 2000))
                    left -= lengths[-1]
                pos = torch.cat([torch.arange(n) for n in lengths]).to(dev)
                q = randn(t, hq, d, device=dev, dtype=dtype, requires_grad=True)
                k = randn(t, hkv, d, device=dev, dtype=dtype, requires_grad=True)
                inv = rope_inv_freq(d, theta, dev)
                cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                                  rope_theta=theta)
                cos, sin = LlamaRotaryEmbedding(cfg).to(dev)(q, pos[None])
                tok_rows = rotary_rows(cos, 1)

                def hf_layout(x):  # HF: proj(x).view(B, S, H, D).transpose(1, 2)
                    return x.unsqueeze(0).transpose(1, 2)

                providers = {
                    "llava_fast": lambda q, k: rope(q, k, pos, inv_freq=inv),
                    "hf": lambda q, k: apply_rotary_pos_emb(hf_layout(q), hf_layout(k), cos, sin),
                    "compile": lambda q, k: compile_apply(hf_layout(q), hf_layout(k), cos, sin),
                    "llava_fast_hf_tables": lambda q, k: lf_apply(hf_layout(q), hf_layout(k), cos, sin,
                                                                  rows=tok_rows),
                }
                if liger_rotary_pos_emb is not None:
                    providers["liger"] = lambda q, k: liger_rotary_pos_emb(hf_layout(q), hf_layout(k), cos, sin)
                if not with_compile:
                    del providers["compile"]
                nbytes = 2 * t * (hq + hkv) * d * b + 8 * t
                for prov, f in providers.items():
                    measure_modes(rows, "rope", prov, shape, dtype, f, (q, k), None, nbytes, nbytes, warmup, rep)
                # our backward kernel alone (the rotation by -theta), graph-timed; the "bwd" rows are eager autograd
                qd, kd = q.detach(), k.detach()
                measure(rows, "rope", "llava_fast", shape, dtype, "bwd kernels",
                        lambda: torch.ops.llava_fast.rope(qd, kd, pos, inv, None, None, True), nbytes, warmup, rep)
                qi, ki = q.detach().clone(), k.detach().clone()

                def inplace():
                    with torch.no_grad():
                        return rope(qi, ki, pos, inv_freq=inv, inplace=True)

                measure(rows, "rope", "llava_fast_inplace", shape, dtype, "fwd", inplace, nbytes, warmup, rep)
                del q, k, qi, ki, cos, sin
            except Exception as e:  # one shape failing (an input draw, out of memory, ...) must not end the run
                rows.append(Row(bench="rope", provider="-", shape=shape, dtype=args.dtype,
                                note=f"shape failed: {type(e).__name__}: {str(e)[:120]}"))
                print(f"{shape}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
            _finish(rows, copy_gbps, args.smoke)  # keep what is measured so far, in case a time limit stops the run
            print(f"{shape}: done ({len(rows)} rows)", flush=True)

    return report(rows, copy_gbps, args.smoke, "rope")


if __name__ == "__main__":
    sys.exit(main())
