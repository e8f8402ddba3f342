"""What each end-to-end target of issue 8 requires: FLOPs per step split by part (LLM GEMMs, lm_head, attention,
vision) from ``bench_model.flops``'s formula, at full depth and at the 4 LLM layers ``bench_model`` runs, and the
sustained rate each target implies against the anchor baselines of docs/performance-anchors.md (H200, GEMM
ceiling 753 TFLOP/s at 8192^3). No GPU, no model: configs and arithmetic only.

Usage: python benchmarks/targets.py        (the table of docs/perf-notes.md, "What each end-to-end target requires")
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402

CEILING = 753.0  # TFLOP/s, bf16 GEMM 8192^3 on the H200 (performance-anchors.md)
# workload -> (baseline per second, its unit, target ratio, steps per unit); HF sdpa on an H200 (performance-anchors.md)
ANCHORS = {"stage1": (23.8, "samples/s", 1.5), "prefill": (31.4e3, "tokens/s", 1.4), "ov_ft": (47.2e3, "tokens/s", 1.8)}


def split(name: str, layers: int | None) -> dict:
    """FLOPs per step of workload `name` by part (bench_model.flop_parts), as fractions of the total, and the lm_head
    FLOPs our fused loss skips (it computes logits only for supervised rows: bench_model.make_inputs labels every text
    token, the 8 before the image included, and the loss shifts labels left by one, so a row is supervised where the
    next token is text: n_txt - 1 rows per sample, not the n_txt - 8 counted before)."""
    cfg = bench_model.hf_configs(name, layers, False)
    batch, n_img, n_txt, tiles, _ = bench_model.workload_shape(name, cfg)
    inp = dict(tokens=batch * (n_img + n_txt), batch=batch, tiles=batch * tiles)
    parts = bench_model.flop_parts(name, cfg, inp)
    total = sum(parts.values())
    supervised = batch * (n_txt - 1) if name != "prefill" else inp["tokens"]
    # the last decoder layer's output projection and MLP on the unsupervised rows, which our training step skips
    # (models/llava.py _kept_rows, session 16): one layer's share of the LLM GEMMs, after its attention
    tc = cfg.text_config
    after = tc.hidden_size ** 2 + 3 * tc.hidden_size * tc.intermediate_size
    per_layer = parts["llm"] / tc.num_hidden_layers
    layer_params = bench_model.param_counts(cfg)["llm_layer"]
    last_skipped = per_layer * after / layer_params * (1 - supervised / inp["tokens"])
    return dict(total=total, llm=parts["llm"] / total, head=parts["head"] / total, attn=parts["attention"] / total,
                vision=parts["vision"] / total, projector=parts["projector"] / total,
                layers=tc.num_hidden_layers, tokens=inp["tokens"], batch=batch,
                head_skipped=parts["head"] * (1 - supervised / inp["tokens"]), last_skipped=last_skipped)


def rows() -> list[dict]:
    out = []
    for name, (base, unit, target) in ANCHORS.items():
        full, four = split(name, None), split(name, 4)
        per_unit = full["total"] / (full["batch"] if unit == "samples/s" else full["tokens"])
        base_rate = base * per_unit / 1e12
        # what our path computes: the fused loss and the last layer after its attention on the supervised rows only
        ours = full["total"] - full["head_skipped"] - full["last_skipped"]
        need = target * base * (ours / (full["total"] / per_unit)) / 1e12 if unit else 0.0
        out.append(dict(workload=name, full=full, four=four, base_rate=base_rate, target=target, unit=unit,
                        need=need, need_frac=need / CEILING, base_frac=base_rate / CEILING))
    return out


def main() -> int:
    print(f"| workload | FLOPs/step (full) | LLM GEMMs | lm_head | attention | vision | same at 4 layers "
          f"(LLM / head / attn / vision) | HF sdpa (H200) | target | needs (of {CEILING:.0f} TFLOP/s) |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|---|")
    for r in rows():
        f, g = r["full"], r["four"]
        print(f"| {r['workload']} | {f['total'] / 1e12:.0f} TF | {f['llm']:.1%} | {f['head']:.1%} | {f['attn']:.1%} | "
              f"{f['vision']:.1%} | {g['llm']:.0%} / {g['head']:.0%} / {g['attn']:.0%} / {g['vision']:.0%} | "
              f"{r['base_rate']:.0f} TFLOP/s ({r['base_frac']:.0%}) | {r['target']}x | "
              f"{r['need']:.0f} TFLOP/s = {r['need_frac']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
