"""An open_clip ViT as a LLaVA vision tower: its weights loaded into our (HF CLIP-named) tower by a name map.

open_clip (``pip install llava_fast[openclip]``) is only used to read the architecture config by name; the weights
come from a local file. Name map (open_clip ``visual.*`` -> HF CLIPVisionModel without ``vision_model.``):
``conv1`` -> ``embeddings.patch_embedding``, ``class_embedding``, ``positional_embedding`` ->
``embeddings.position_embedding.weight``, ``ln_pre`` -> ``pre_layrnorm``, ``transformer.resblocks.i.ln_1/ln_2`` ->
``encoder.layers.i.layer_norm1/2``, ``attn.in_proj_{weight,bias}`` split into ``self_attn.{q,k,v}_proj``,
``attn.out_proj`` -> ``self_attn.out_proj``, ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``, ``ln_post`` -> ``post_layernorm``;
the output projection ``proj`` is not used by LLaVA and dropped. LayerScale (``ls_1/ls_2.gamma``, open_clip's
``ls_init_value``: ``x + gamma * f(x)``) has no HF CLIP counterpart: it is folded into the rows of the linear it scales
(``self_attn.out_proj``, ``mlp.fc2``), which gives the same output.
"""
from __future__ import annotations

import torch


def open_clip_vision_config(name: str) -> dict:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("an open_clip vision tower needs open_clip_torch: pip install 'llava_fast[openclip]'") from e
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")
    v = cfg["vision_cfg"]
    if v.get("timm_model_name") or isinstance(v.get("layers"), (list, tuple)):
        raise ValueError(f"open_clip architecture {name!r} is not a plain ViT (timm/ResNet towers are not supported)")
    if v.get("no_ln_pre"):
        raise ValueError(f"open_clip architecture {name!r} has no ln_pre (CLIPA-style): a llava-hf CLIP tower always "
                         f"normalizes the embeddings (pre_layrnorm), so this tower cannot be converted; use one with "
                         f"ln_pre")
    width = int(v["width"])
    head_width = int(v.get("head_width", 64))
    quick = bool(cfg.get("quick_gelu", False)) or "quickgelu" in name.lower()
    return {"model_type": "clip_vision_model", "hidden_size": width,
            "intermediate_size": int(width * float(v.get("mlp_ratio", 4.0))), "num_hidden_layers": int(v["layers"]),
            "num_attention_heads": width // head_width, "image_size": int(v["image_size"]),
            "patch_size": int(v["patch_size"]), "hidden_act": "quick_gelu" if quick else "gelu",
            "layer_norm_eps": 1e-5}


def map_open_clip_state(sd: dict) -> dict:
    """open_clip (full model or visual-only) state dict -> our vision tower keys."""
    pre = "visual." if any(k.startswith("visual.") for k in sd) else ""
    out, scales = {}, {}
    for k, v in sd.items():
        if not k.startswith(pre):
            continue
        k = k[len(pre):]
        if k == "conv1.weight":
            out["embeddings.patch_embedding.weight"] = v
        elif k == "class_embedding":
            out["embeddings.class_embedding"] = v
        elif k == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_pre."):
            out["pre_layrnorm." + k[len("ln_pre."):]] = v
        elif k.startswith("ln_post."):
            out["post_layernorm." + k[len("ln_post."):]] = v
        elif k.startswith("transformer.resblocks."):
            i, rest = k[len("transformer.resblocks."):].split(".", 1)
            base = f"encoder.layers.{i}."
            if rest in ("ls_1.gamma", "ls_2.gamma"):
                scales[base + ("self_attn.out_proj." if rest == "ls_1.gamma" else "mlp.fc2.")] = v
            elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[base + f"self_attn.{name}.{kind}"] = part.clone()
            else:
                rest = (rest.replace("ln_1.", "layer_norm1.").replace("ln_2.", "layer_norm2.")
                        .replace("mlp.c_fc.", "mlp.fc1.").replace("mlp.c_proj.", "mlp.fc2.")
                        .replace("attn.out_proj.", "self_attn.out_proj."))
                out[base + rest] = v
    for lin, g in scales.items():  # gamma * (W x + b) = (gamma[:, None] * W) x + gamma * b
        out[lin + "weight"] = out[lin + "weight"] * g[:, None]
        if lin + "bias" in out:
            out[lin + "bias"] = out[lin + "bias"] * g
    return out


def open_clip_to_hf(name: str, weights: str) -> tuple[dict, dict]:
    """(vision_config dict, tower state dict) from an open_clip architecture name and a local weights file."""
    cfg = open_clip_vision_config(name)
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(weights)
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return cfg, map_open_clip_state(sd)
