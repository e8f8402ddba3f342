"""What a training step keeps for its backward, by module: our model against transformers (sdpa), counted on the CPU
with saved-tensor hooks (no GPU needed). Activation memory is most of a fine-tuning step's peak (issue 8's
OneVision target: 0.6x transformers' peak memory); this says where it goes and whether we keep more than transformers
anywhere.

Counting: the storage of every tensor autograd saves during the forward, once (views of one allocation, or a tensor
saved by several nodes, count once, whole), parameters excluded (saving them allocates nothing), attributed to the
innermost module running when it was first saved. Numbers are per token of the module's input stream (vision tokens
for the tower, text tokens for the language model), in values (bytes divided by the element size), so that fp32 on
the CPU and bf16 on a GPU compare. The CPU attention paths differ from the GPU's (our CPU paths are eager attention,
which keeps the probabilities): the attention is therefore routed through SDPA for both models here, as on a GPU.

Usage: python benchmarks/saved_activations.py [--workload ov_ft|stage1] [--vision-layers 1] [--text-layers 1] [--tiny]
(real widths, 1 + 1 layers, one OneVision sample: ~2 minutes on 2 cores; --tiny: seconds).
Prints a table per module class and the totals (the loss on the logits apart: on a GPU our fused loss keeps none of
it, transformers keeps the fp32 logits); exits 1 if ours keeps more than transformers in total.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402


@contextlib.contextmanager
def count_saved(model: torch.nn.Module):
    """Yields a dict module-class -> bytes saved while the block runs (see the module docstring)."""
    stack: list[str] = ["(outside modules)"]
    out: dict = defaultdict(int)
    seen: set = set()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pre(mod, args):
        stack.append(type(mod).__name__)

    def post(mod, args, output):
        stack.pop()

    # not on leaf modules (linears, norms, embeddings): the fused paths call a hooked linear or norm as a module
    # (act_linear.plain_linears / unhooked: hooks must fire), which would turn off the recompute path being
    # measured; what a leaf saves counts under its parent module
    mods = [m for m in model.modules() if next(m.children(), None) is not None]
    hooks = [m.register_forward_pre_hook(pre) for m in mods]
    hooks += [m.register_forward_hook(post) for m in mods]

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen:  # views of one storage are one allocation: counted once, whole
            seen.add(ptr)
            out[stack[-1]] += st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield out
    finally:
        for h in hooks:
            h.remove()


def _sdpa_attention():
    """Route our CPU attention (vision tower, and the language model's unmasked causal batches) through SDPA, which
    keeps what the GPU kernels keep (q, k, v, out, log-sum-exp) rather than eager attention's probabilities."""
    from llava_fast.models import dispatch

    orig_v, orig_t = dispatch.vision_attention, dispatch.text_attention
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def vision(q, k, v, scale):
        return sdpa(q, k, v, scale=scale)

    def text(b, n, dtype, device, attention_mask, cu_seqlens, max_seqlen, lk=None, head_dim=None, kv_cache=None):
        if attention_mask is None and cu_seqlens is None and kv_cache is None and (lk is None or lk == n):
            return lambda q, k, v, scale: sdpa(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
        return orig_t(b, n, dtype, device, attention_mask, cu_seqlens, max_seqlen, lk, head_dim, kv_cache)

    dispatch.vision_attention, dispatch.text_attention = vision, text

    def restore():
        dispatch.vision_attention, dispatch.text_attention = orig_v, orig_t
    return restore


def measure(workload: str, vision_layers: int, text_layers: int, samples: int = 1, tiny: bool = False):
    cfg = bench_model.hf_configs(workload, text_layers, tiny)
    cfg.vision_config.num_hidden_layers = vision_layers
    if hasattr(cfg, "vision_feature_layer") and isinstance(cfg.vision_feature_layer, int):
        cfg.vision_feature_layer = (-1 if cfg.vision_feature_layer == -1
                                    else max(-vision_layers, cfg.vision_feature_layer))
    inp = bench_model.make_inputs(workload, cfg, "cpu", tiny)
    b = min(samples, inp["batch"])
    tiles_per = inp["tiles"] // inp["batch"]
    # copies, not views: a saved view would keep (and count) the whole batch's storage
    inp = dict(inp, ids=inp["ids"][:b].clone(), labels=inp["labels"][:b].clone(),
               pv=inp["pv"][: b * tiles_per].clone(), hf_pv=inp["hf_pv"][:b].clone(),
               sizes=inp["sizes"][:b] if inp["sizes"] is not None else None, batch=b, tiles=b * tiles_per,
               tokens=inp["ids"][:b].numel())
    vc = cfg.vision_config
    n_vis = inp["tiles"] * ((vc.image_size // vc.patch_size) ** 2 + (1 if workload == "stage1" else 0))
    results = {}
    restore = _sdpa_attention()
    try:
        for provider in ("llava_fast", "hf_sdpa"):
            m = bench_model.build(provider, workload, cfg, "cpu").float()
            kw = dict(input_ids=inp["ids"], labels=inp["labels"])
            if provider == "llava_fast":
                kw["logits"] = False  # as the trainer calls it (on a GPU: the fused loss, no logits kept)
            if inp["sizes"] is not None:
                kw["image_sizes"] = inp["sizes"]
            kw["pixel_values"] = inp["pv"] if provider == "llava_fast" else inp["hf_pv"]
            with count_saved(m) as saved:
                out = m(**kw)
            saved = dict(saved)
            # what the top-level module keeps itself is the loss on the logits (both models on the CPU; on a GPU our
            # fused loss keeps none of it): reported apart, left out of the comparison
            saved["(loss: logits)"] = saved.pop(type(m).__name__, 0)
            results[provider] = saved
            out.loss.backward()  # the saved tensors are usable (and the hooks did not change the result)
            del m, out
    finally:
        restore()
    return results, n_vis, inp["tokens"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="ov_ft", choices=["ov_ft", "stage1"])
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="toy widths (bench_model --tiny): a fast check, same structure")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    res, n_vis, n_txt = measure(a.workload, a.vision_layers, a.text_layers, tiny=a.tiny)
    classes = sorted(set(res["llava_fast"]) | set(res["hf_sdpa"]))
    print(f"saved for backward (fp32 values / token: vision modules per vision token of {n_vis}, others per text token "
          f"of {n_txt}); {a.vision_layers} vision, {a.text_layers} text layers, {a.workload}")
    print(f"{'module class':32s} {'llava_fast':>12s} {'hf_sdpa':>12s}")
    for c in classes:
        per = n_vis if ("Vision" in c or "Siglip" in c or "CLIP" in c) else n_txt
        o, h = res["llava_fast"].get(c, 0) / 4 / per, res["hf_sdpa"].get(c, 0) / 4 / per
        print(f"{c:32s} {o:12.0f} {h:12.0f}")
    tot = {k: sum(b for c, b in v.items() if c != "(loss: logits)") / 2 ** 20 for k, v in res.items()}
    print(f"{'total MiB (fp32), loss apart':32s} {tot['llava_fast']:12.1f} {tot['hf_sdpa']:12.1f}")
    return 0 if tot["llava_fast"] <= tot["hf_sdpa"] else 1


if __name__ == "__main__":
    sys.exit(main())
