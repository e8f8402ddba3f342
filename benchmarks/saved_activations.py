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
it, transformers keeps the fp32 logits), then the predicted GPU memory of the whole step at full depth
(:func:`predict_full_depth`); exits 1 if ours keeps more than transformers in total.
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

    def text(b, n, dtype, device, attention_mask, cu_seqlens, max_seqlen, lk=None, head_dim=None, kv_cache=None,
             **kw):
        if attention_mask is None and cu_seqlens is None and kv_cache is None and (lk is None or lk == n):
            return lambda q, k, v, scale: sdpa(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
        return orig_t(b, n, dtype, device, attention_mask, cu_seqlens, max_seqlen, lk, head_dim, kv_cache, **kw)

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
    results, layer_classes = {}, {}
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
            layer_classes[provider] = _layer_classes(m)
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
    return results, n_vis, inp["tokens"], layer_classes


def _layer_classes(model) -> dict:
    """{"text": classes, "vision": classes}: the module classes inside one decoder / encoder layer (what repeats with
    depth), found as the first ``layers`` ModuleList under the language model and under the vision tower."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod):
            kind = "vision" if "vision" in name else "text"
            out.setdefault(kind, {type(x).__name__ for x in mod[0].modules()})
    return out


def predict_full_depth(res, layer_classes, n_vis, n_txt, workload: str, run_layers: dict, tiny: bool = False) -> dict:
    """Predicted GPU memory of the workload's whole step at full depth and the benchmark's batch (bf16 weights, as
    bench_model runs it): what autograd keeps, from this run's per-token counts (the classes of one layer times the
    depth, the rest once), plus weights, gradients and AdamW's two states of the trained parameters. Transient buffers
    are not modelled except transformers' loss: at the start of its backward the fp32 logits (kept by log_softmax) meet
    their fp32 and bf16 gradients. Returns {provider: {part: bytes}}."""
    cfg = bench_model.hf_configs(workload, None, tiny)
    inp_shape = bench_model.workload_shape(workload, cfg, tiny)
    batch, n_img, n_txt_tokens, tiles, _ = inp_shape
    vc, tc = cfg.vision_config, cfg.text_config
    tokens = batch * (n_img + n_txt_tokens)
    vis_tokens = batch * tiles * ((vc.image_size // vc.patch_size) ** 2 + (1 if workload == "stage1" else 0))
    depth = {"text": tc.num_hidden_layers, "vision": vc.num_hidden_layers}
    pc = bench_model.param_counts(cfg)
    tied = getattr(tc, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False)
    n_params = pc["vision"] + pc["patch_embed"] + tc.num_hidden_layers * pc["llm_layer"] + pc["projector"] \
        + pc["embed"] * (1 if tied else 2)
    trained = n_params if workload == "ov_ft" else pc["projector"]
    out = {}
    for provider, saved in res.items():
        parts = {"weights": 2 * n_params, "gradients + AdamW states": 6 * trained}
        act = 0.0
        for c, b in saved.items():
            if c == "(loss: logits)":
                continue
            vision = "Vision" in c or "Siglip" in c or "CLIP" in c
            per_token = b / (n_vis if vision else n_txt)  # fp32 bytes per token of its stream
            kind = "vision" if vision else "text"
            mult = depth[kind] / run_layers[kind] if c in layer_classes[provider].get(kind, ()) else 1
            act += per_token / 2 * mult * (vis_tokens if vision else tokens)   # bf16: half the fp32 bytes
        parts["saved activations"] = act
        if provider != "llava_fast":   # fp32 logits kept, then their fp32 and bf16 gradients at the backward's start
            parts["loss: fp32 logits + their gradients"] = tokens * tc.vocab_size * (4 + 4 + 2)
        out[provider] = parts
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="ov_ft", choices=["ov_ft", "stage1"])
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="toy widths (bench_model --tiny): a fast check, same structure")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    res, n_vis, n_txt, layer_classes = measure(a.workload, a.vision_layers, a.text_layers, tiny=a.tiny)
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
    pred = predict_full_depth(res, layer_classes, n_vis, n_txt, a.workload,
                              {"text": a.text_layers, "vision": a.vision_layers}, a.tiny)
    print(f"predicted GPU memory of the whole step at full depth, the benchmark's batch, bf16 (GiB; transients not "
          f"modelled but transformers' loss):")
    for part in dict.fromkeys(k for v in pred.values() for k in v):
        print(f"  {part:38s} {pred['llava_fast'].get(part, 0) / 2 ** 30:10.2f} {pred['hf_sdpa'].get(part, 0) / 2 ** 30:10.2f}")
    tl, th = (sum(pred[k].values()) / 2 ** 30 for k in ("llava_fast", "hf_sdpa"))
    print(f"  {'total':38s} {tl:10.2f} {th:10.2f}   ratio {tl / th:.2f}x")
    return 0 if tot["llava_fast"] <= tot["hf_sdpa"] else 1


if __name__ == "__main__":
    sys.exit(main())
