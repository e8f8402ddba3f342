"""Checkpoints of the original LLaVA training code (haotian-liu/LLaVA for LLaVA-1.5, LLaVA-VL/LLaVA-NeXT for NeXT and
OneVision) -> llava-hf folders (``llava-fast convert``).

An original checkpoint folder is the language model's HF folder with LLaVA's additions: ``config.json`` has the
language model's fields plus ``mm_*`` ones (``mm_vision_tower``, ``mm_projector_type``, ``mm_vision_select_layer``,
``image_aspect_ratio``, ``image_grid_pinpoints``, ...), the weights hold ``model.*`` / ``lm_head`` plus
``model.mm_projector.{0,2}.*``, ``model.image_newline`` (NeXT, OneVision) and, when the tower was trained,
``model.vision_tower.vision_tower.vision_model.*`` (reference-spec.md 4.3). The tower's configuration is not in the
folder (``mm_vision_tower`` names a Hub model): a local copy of it is needed (``--vision-tower DIR``).

:func:`settings` reads such a config into what :func:`llava_fast.train.build.assemble` needs, with the rules of
reference-spec.md 1.2 and of transformers' conversion scripts: a CLIP tower keeps its layers and takes
``mm_vision_select_layer`` (``patch`` -> ``"default"``: CLS dropped; ``cls_patch`` -> ``"full"``); a SigLIP tower loses
its last layer (the original deletes it and takes ``hidden_states[-1]``, all 729 tokens: ``-1``, ``"full"`` on the
shortened tower, as llava-hf's OneVision). ``image_aspect_ratio`` picks the model type (``pad`` -> ``llava``,
``anyres`` -> ``llava_next``, ``anyres_max_N`` -> ``llava_onevision``). Settings llava-hf has no equivalent for are
refused with the setting named.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

_TEXT_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
_ARCH_TEXT = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
              "LlavaQwenForCausalLM": "qwen2"}
_TEXT_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def is_original(config: dict) -> bool:
    """Whether a ``config.json`` dict is an original LLaVA checkpoint's (the language model's config + ``mm_*``)."""
    return isinstance(config, dict) and "mm_vision_tower" in config and "text_config" not in config


@dataclass
class Settings:
    """What an original config says, in llava-hf terms."""
    model_type: str
    text_config: dict
    select_layer: int = -2                   # mm_vision_select_layer (CLIP towers)
    select_feature: str = "patch"            # mm_vision_select_feature (CLIP towers)
    aspect_ratio: str = "pad"                # image_aspect_ratio
    pinpoints: object = None                 # list of [h, w], or the "(AxB),...,(CxD)" range of tile counts

    def features(self, siglip: bool) -> dict:
        """llava-hf config fields for the tower: a SigLIP tower loses its last layer in the original, which takes
        ``hidden_states[-1]``, every token (``-1``, ``"full"`` on the shortened tower; ``mm_vision_select_layer`` is
        ignored there, as the original ignores it); a CLIP tower takes ``mm_vision_select_layer``, ``patch`` dropping
        the CLS token."""
        out = ({"vision_feature_layer": -1, "vision_feature_select_strategy": "full"} if siglip else
               {"vision_feature_layer": self.select_layer,
                "vision_feature_select_strategy": "default" if self.select_feature == "patch" else "full"})
        if self.model_type == "llava_onevision":
            out["vision_aspect_ratio"] = self.aspect_ratio
        return out


def settings(config: dict, source: str = "config.json") -> Settings:
    """An original LLaVA config -> :class:`Settings`; ValueError naming the setting for what llava-hf cannot hold."""
    text_type = _TEXT_TYPES.get(config.get("model_type")) or next(
        (_ARCH_TEXT[a] for a in config.get("architectures") or [] if a in _ARCH_TEXT), None)
    if text_type is None:
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} / architectures "
                         f"{config.get('architectures')} is not an original LLaVA language model (llava_llama, "
                         f"llava_mistral, llava_qwen)")

    def refuse(key, why):
        raise ValueError(f"{source}: {key}={config.get(key)!r}: {why}; llava-hf (and llava_fast) cannot hold it")

    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        refuse("mm_projector_type", "only the mlp2x_gelu projector (Linear, GELU, Linear) is supported")
    if config.get("mm_use_im_start_end"):
        refuse("mm_use_im_start_end", "image start/end tokens are not part of the llava-hf models")
    ar = config.get("image_aspect_ratio") or "pad"
    if ar in ("pad", "square"):
        model_type = "llava"
    elif ar == "anyres":
        model_type = "llava_next"
    elif re.fullmatch(r"anyres_max_\d+", ar):
        model_type = "llava_onevision"
    else:
        refuse("image_aspect_ratio", "expected pad, anyres or anyres_max_N")
    if model_type != "llava" and config.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        refuse("mm_patch_merge_type", "llava-hf's AnyRes models unpad and add image_newline (spatial_unpad)")
    if model_type == "llava_onevision" and config.get("mm_spatial_pool_mode", "bilinear") != "bilinear":
        refuse("mm_spatial_pool_mode", "llava-hf's OneVision pools video frames bilinearly")
    if model_type == "llava_onevision" and config.get("mm_newline_position", "one_token") != "one_token":
        # NXT's llava_arch reads it with "one_token" as the default; LLaVA-Video's "grid" puts a newline per row
        refuse("mm_newline_position", "llava-hf's OneVision puts one image_newline after a video (one_token)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        refuse("mm_vision_select_feature", "expected patch or cls_patch")
    text = {k: v for k, v in config.items()
            if not k.startswith(("mm_", "image_", "tune_", "unfreeze_", "freeze_", "tokenizer_", "use_mm_",
                                 "add_faster_video", "faster_token", "pos_skipping", "vision_"))}
    text.update(model_type=text_type, architectures=[_TEXT_ARCH[text_type]])
    return Settings(model_type, text, int(config.get("mm_vision_select_layer", -2)), feature, ar,
                    config.get("image_grid_pinpoints") if model_type != "llava" else None)


def pinpoints_for(pinpoints, tile: int):
    """``image_grid_pinpoints`` as a list of [h, w]: LLaVA-NeXT's string form ``"(1x1),...,(6x6)"`` is every tile
    count between the first and last, times the tile (NXT ``llava_arch``), in that order."""
    if not isinstance(pinpoints, str):
        return pinpoints
    m = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
    if not m:
        raise ValueError(f"image_grid_pinpoints {pinpoints!r}: expected a list of [h, w] or '(AxB),...,(CxD)'")
    (a0, b0), (a1, b1) = (tuple(map(int, m[0])), tuple(map(int, m[-1])))
    return [[i * tile, j * tile] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]


def is_lora(folder: str) -> bool:
    """Whether an original output folder holds a LoRA run (``--lora_enable True``): ``adapter_config.json`` and
    ``adapter_model.{safetensors,bin}`` (peft's) next to ``non_lora_trainables.bin`` (projector, ...) and config."""
    return os.path.isfile(os.path.join(folder, "adapter_config.json"))


def lora_merged(src: str, model_base: str) -> dict:
    """The weights of an original LoRA run folded into its base language model, as the original's
    ``merge_lora_weights.py`` (peft ``merge_and_unload``): ``W + (B @ A) * lora_alpha / r`` (``/ sqrt(r)`` with
    rslora) in fp32, cast back; then ``non_lora_trainables.bin`` (projector, newline, trained tower layers) over them.
    Keys are the original checkpoint's (``model.layers.*``, ``model.mm_projector.*``). Adapters peft can hold but the
    original never trains (DoRA, per-layer ranks, embedding adapters, trained biases) are refused by name."""
    import math

    from llava_fast.train.build import _load_folder, _torch_load

    with open(os.path.join(src, "adapter_config.json")) as f:
        acfg = json.load(f)
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if acfg.get(key) == bad:
            raise ValueError(f"{src}/adapter_config.json: {key}={bad} is not supported (the original LoRA recipe "
                             f"uses plain LoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if acfg.get(key):
            raise ValueError(f"{src}/adapter_config.json: {key} (per-layer ranks) is not supported")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scale = alpha / (math.sqrt(r) if acfg.get("use_rslora") else r)
    names = os.listdir(src)
    if "adapter_model.safetensors" in names:
        from safetensors.torch import load_file

        adapter = load_file(os.path.join(src, "adapter_model.safetensors"))
    elif "adapter_model.bin" in names:
        adapter = _torch_load(os.path.join(src, "adapter_model.bin"))
    else:
        raise FileNotFoundError(f"{src}: adapter_config.json but no adapter_model.safetensors / adapter_model.bin")
    state = _load_folder(model_base)

    def key(k):  # PeftModel's names -> the wrapped model's
        return k[len("base_model.model."):] if k.startswith("base_model.model.") else k

    merged = 0
    for k, a in adapter.items():
        if k.endswith(".lora_B.weight"):
            continue
        if not k.endswith(".lora_A.weight"):
            raise ValueError(f"{src}: adapter tensor {k} is not a LoRA A/B matrix of a Linear layer (embedding "
                             f"adapters, trained biases); not supported")
        mod = key(k[: -len(".lora_A.weight")])
        b = adapter.get(k.replace(".lora_A.weight", ".lora_B.weight"))
        w = state.get(mod + ".weight")
        if b is None or w is None:
            raise ValueError(f"{src}: adapter {k} has no " + ("lora_B matrix" if b is None else
                             f"base weight {mod}.weight in --model-base {model_base} (another base model?)"))
        if w.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"{src}: adapter {k} gives a {b.shape[0]}x{a.shape[1]} update for {mod}.weight "
                             f"{tuple(w.shape)} of --model-base {model_base} (another base model?)")
        state[mod + ".weight"] = (w.float() + (b.float() @ a.float()) * scale).to(w.dtype)
        merged += 1
    extra = os.path.join(src, "non_lora_trainables.bin")
    if os.path.isfile(extra):
        state.update({key(k): v for k, v in _torch_load(extra).items()})
    if not merged:
        raise ValueError(f"{src}: the adapter holds no LoRA matrices")
    return state


def convert(src: str, vision_tower: str, out: str, model_type: str | None = None, log=print,
            model_base: str | None = None) -> str:
    """An original LLaVA checkpoint folder ``src`` + a local copy of its vision tower -> a llava-hf folder ``out``
    (config.json, safetensors, tokenizer with ``<image>`` (and ``<video>``), processor files) that transformers and
    llava_fast load. A LoRA run's folder (:func:`is_lora`) is merged into ``model_base``, its language model (whose
    tokenizer it takes, as the original's loader). Written to a temporary folder and renamed when complete: a crash
    leaves no half-written ``out``."""
    from llava_fast.models.io import save_pretrained
    from llava_fast.train.build import assemble
    from llava_fast.train.checkpoint import check_new_folder, write_new_folder
    from llava_fast.train.trainer import _save_image_processor

    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{src}: no config.json (expected an original LLaVA checkpoint folder)")
    with open(cfg_path) as f:
        config = json.load(f)
    if not is_original(config):
        raise ValueError(f"{src}: not an original LLaVA checkpoint (config.json has no mm_vision_tower)"
                         + ("; it is a llava-hf folder already: load it as it is" if "text_config" in config else ""))
    if not os.path.isdir(vision_tower):
        raise FileNotFoundError(f"--vision-tower {vision_tower}: no such folder; the checkpoint was trained with "
                                f"{config.get('mm_vision_tower')!r}: give a local copy of it (config.json + weights)")
    check_new_folder(out)  # (before the merge and assembly: minutes for a 7B)
    orig = settings(config, cfg_path)
    weights = None
    if is_lora(src):
        if not model_base or not os.path.isdir(model_base):
            raise FileNotFoundError(f"{src} is a LoRA run (adapter_config.json): give --model-base, a local copy of "
                                    f"the language model it was trained on ({config.get('_name_or_path')!r}), as the "
                                    f"original's merge_lora_weights.py" + (f"; {model_base}: no such folder"
                                                                           if model_base else ""))
        weights = lora_merged(src, model_base)
        log(f"merged the LoRA adapters of {src} into {model_base}")
    elif model_base:
        raise ValueError(f"--model-base {model_base}: {src} is not a LoRA run (no adapter_config.json); its weights "
                         f"are complete, drop --model-base")
    model, tok = assemble(src, vision_tower, model_type or orig.model_type, log=log, weights=weights,
                          tokenizer_dir=model_base if weights is not None else None)
    spec = None
    if model.config.model_type == "llava":
        from llava_fast.data.images import image_config

        # "pad" trained on images padded to a square with the mean colour ("square": resized and centre-cropped):
        # written as LlavaImageProcessor(do_pad=True), so chat, predict and transformers see images as it was trained
        spec = image_config(model.config, do_pad=orig.aspect_ratio == "pad")

    # the chat template of the format the original trained it with (its conv template: Vicuna v1 for Llama, Llama 3's
    # for a Llama 3 tokenizer, ChatML for Qwen2), so transformers' processor prompts it as it was trained
    from llava_fast.data.templates import chat_template_for
    from llava_fast.predict import default_template

    try:
        chat = chat_template_for(default_template(model.config, tok))
    except ValueError:  # another language model: the tokenizer's
        chat = None

    def fill(tmp):
        save_pretrained(model, tmp)
        tok.save_pretrained(tmp)
        _save_image_processor(model.config, tmp, tok, spec, chat)

    write_new_folder(out, fill)
    log(f"converted {src} ({config.get('mm_vision_tower')}, image_aspect_ratio "
        f"{config.get('image_aspect_ratio', 'pad')}) to a {model.config.model_type} llava-hf folder: {out}")
    return out
