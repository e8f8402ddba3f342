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
    """FLOPs per step of workload `name` by part, as bench_model.flops counts them (no tensors built)."""
    from llava_fast.ops.anyres import num_image_tokens, num_tiles

    cfg = bench_model.hf_configs(name, layers, False)
    vc, tc = cfg.vision_config, cfg.text_config
    t, tps = vc.image_size, vc.image_size // vc.patch_size
    if name == "stage1":
        batch, n_img, n_txt, tiles = 16, tps * tps, 64, 1
    else:
        batch = 8 if name == "prefill" else 2
        n_img = num_image_tokens(bench_model.IMAGE_HW, cfg.image_grid_pinpoints, t, tps, 9 if name == "ov_ft" else None)
        tiles = num_tiles(bench_model.IMAGE_HW, cfg.image_grid_pinpoints, t)
        n_txt = 256 if name == "prefill" else 512
    inp = dict(tokens=batch * (n_img + n_txt), batch=batch, tiles=batch * tiles)
    total = bench_model.flops(name, cfg, inp)
    hd = tc.hidden_size // tc.num_attention_heads
    kv = tc.num_key_value_heads * hd
    seq = inp["tokens"] // batch
    layer = tc.hidden_size * (tc.hidden_size + 2 * kv) + tc.hidden_size ** 2 + 3 * tc.hidden_size * tc.intermediate_size
    llm = 2 * tc.num_hidden_layers * layer * inp["tokens"]
    head = 2 * tc.hidden_size * tc.vocab_size * inp["tokens"]
    attn = batch * tc.num_hidden_layers * 2 * seq * seq * tc.hidden_size
    n_vis = tps * tps + (1 if name != "ov_ft" else 0)
    vis_p = vc.num_hidden_layers * (4 * vc.hidden_size ** 2 + 2 * vc.hidden_size * vc.intermediate_size)
    vis = inp["tiles"] * (2 * vis_p * n_vis + vc.num_hidden_layers * 4 * n_vis * n_vis * vc.hidden_size)
    proj = 2 * inp["tiles"] * n_vis * (vc.hidden_size * tc.hidden_size + tc.hidden_size ** 2)
    m = {"prefill": 1, "stage1": 2, "ov_ft": 3}[name]      # backward passes through the LLM (frozen in stage 1: no dW)
    mv = 3 if name == "ov_ft" else 1                         # the tower trains only in the full fine-tune
    mp = 1 if name == "prefill" else 3                       # the projector trains in both training workloads
    # the fused loss computes logits only for supervised rows (text tokens after the image: all text but the first 8)
    supervised = batch * (n_txt - 8) if name != "prefill" else inp["tokens"]
    return dict(total=total, llm=m * llm / total, head=m * head / total, attn=m * attn / total, vision=mv * vis / total,
                projector=mp * proj / total,
                layers=tc.num_hidden_layers, tokens=inp["tokens"], batch=batch,
                head_skipped=m * head * (1 - supervised / inp["tokens"]) if name != "prefill" else 0.0)


def rows() -> list[dict]:
    out = []
    for name, (base, unit, target) in ANCHORS.items():
        full, four = split(name, None), split(name, 4)
        per_unit = full["total"] / (full["batch"] if unit == "samples/s" else full["tokens"])
        base_rate = base * per_unit / 1e12
        ours = full["total"] - full["head_skipped"]     # what our path computes (fused loss: supervised rows only)
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
