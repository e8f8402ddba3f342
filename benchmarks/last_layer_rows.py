"""Time a training step with the last decoder layer on the supervised rows only (the default) against every row
(``LLAVA_FAST_LAST_LAYER_ROWS=all``), alternating the two, on a random Llama-shaped LLaVA-1.5 model.

The loss and the gradients are the same (tests/models/test_last_layer_rows.py); what changes is the work of the last
layer after its attention: its output projection and MLP over the supervised rows instead of all of them. The
expected ratio for the language model's GEMMs alone is 1 / (1 - (1 - s) * a / L), with s the supervised share of the
rows, a the output projection + MLP share of a layer's GEMM FLOPs and L the layer count (docs/perf-notes.md, "The
last layer on the supervised rows"). bench_model's ``llava_fast_all_rows`` row measures the real workloads.

Usage: python benchmarks/last_layer_rows.py [--layers 4] [--hidden 1024] [--batch 4] [--seq 640] [--supervised 64]
       [--device cpu|cuda] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "llava_fast").is_dir() and str(ROOT) not in sys.path:   # a checkout (installed: llava_fast imports)
    sys.path.insert(0, str(ROOT))


def build(layers: int, hidden: int, path: str, dtype, device):
    import transformers as tf

    import llava_fast

    heads = max(1, hidden // 128)
    vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=28, patch_size=14, projection_dim=16)
    tc = tf.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                        max_position_embeddings=8192)
    cfg = tf.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=500)
    torch.manual_seed(0)
    tf.LlavaForConditionalGeneration(cfg).save_pretrained(path)
    return llava_fast.from_pretrained(path, dtype=dtype, device=device), cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=640)
    ap.add_argument("--supervised", type=int, default=64, help="supervised tokens at the end of each sample")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model, cfg = build(args.layers, args.hidden, tmp, dtype, args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -args.supervised:] = ids[:, -args.supervised:]
    host = dict(input_ids=ids, labels=labels)
    dev = {k: v.to(args.device) for k, v in host.items()}

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**dev, logits=False, host_inputs=host)
        out.loss.backward()
        return out.loss.detach()

    def timed():
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, float(loss)

    best, losses = {}, {}
    before = os.environ.get("LLAVA_FAST_LAST_LAYER_ROWS")
    try:
        for mode in ("supervised", "all") * 2:
            os.environ["LLAVA_FAST_LAST_LAYER_ROWS"] = mode
            step()  # warm-up (and, on a GPU, the autotuner's first runs)
            for _ in range(args.reps):
                t, losses[mode] = timed()
                best[mode] = min(best.get(mode, float("inf")), t)
    finally:
        if before is None:
            os.environ.pop("LLAVA_FAST_LAST_LAYER_ROWS", None)
        else:
            os.environ["LLAVA_FAST_LAST_LAYER_ROWS"] = before
    tc = cfg.text_config
    h, f = tc.hidden_size, tc.intermediate_size
    share = (h * h + 3 * h * f) / (4 * h * h + 3 * h * f)
    sup = (args.supervised - 1) / args.seq   # the last row of a sample has no next token
    want = 1 / (1 - (1 - sup) * share / args.layers)
    print(f"device {args.device}, {args.layers} layers, hidden {h}, MLP {f}, {args.batch} x {args.seq} tokens, "
          f"{args.supervised} supervised per sample")
    print(f"supervised rows {1e3 * best['supervised']:.1f} ms, every row {1e3 * best['all']:.1f} ms: "
          f"{best['all'] / best['supervised']:.3f}x (the language model's GEMMs alone: {want:.3f}x); "
          f"loss {losses['supervised']:.6f} vs {losses['all']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
