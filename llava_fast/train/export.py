"""``llava-fast export RUN|CHECKPOINT --out DIR``: a llava-hf folder from a training checkpoint.

A run exports ``OUT/final`` when it ends; this writes the same folder from any checkpoint it saved
(``OUT/checkpoints/step_N``, or a run folder: its latest), to evaluate a run midway, or to export one that stopped
before its end. The checkpoint holds the full weights and the run's config; the model is rebuilt from the config's
sources (``model.path``, or ``model.language_model`` + ``model.vision_tower``: their config, tokenizer and image
processor, so they must still be there; their weights are not read), then takes the checkpoint's weights, LoRA
adapters merged. The folder is written to a temporary sibling and renamed when complete.
"""
from __future__ import annotations

import json
import os


def find_checkpoint(src: str) -> str:
    """``src`` when it is a complete checkpoint, else the latest complete one of the run folder ``src``."""
    from llava_fast.train import checkpoint as ckpt

    if ckpt.is_complete(src):
        return src
    path = ckpt.latest_checkpoint(os.path.join(src, "checkpoints"))
    if path is None:
        raise ValueError(f"{src}: neither a complete checkpoint (a run's OUT/checkpoints/step_N with meta.json) nor a "
                         f"run folder holding one (OUT/checkpoints/); a run saves them every checkpoint.every_steps")
    return path


def _check_sources(cfg, path: str) -> None:
    """The model sources the run was built from, still there: one error naming each one missing."""
    m, bad = cfg.model, []
    for key in (("path",) if m.path else ("language_model", "vision_tower")):
        v = getattr(m, key)
        if key == "vision_tower" and m.vision_weights:  # an open_clip architecture name, its weights a file
            v, key = m.vision_weights, "vision_weights"
        if not v or not os.path.exists(v):
            bad.append(f"model.{key}={v}")
    if bad:
        raise FileNotFoundError(f"{path} was trained from {', '.join(bad)}, which is not there any more: the export "
                                f"takes the model's config, tokenizer and image processor from it (the weights come "
                                f"from the checkpoint); put it back at that path")


def export_checkpoint(src: str, out: str, adapter: bool = False, log=print) -> str:
    """Writes the llava-hf folder ``out`` (new or empty) from the checkpoint ``src`` (or a run folder's latest);
    returns ``out``. ``adapter`` (a LoRA run): the adapters are not merged: ``out`` holds the base language model with
    the run's other trained parts (projector, image_newline, a trained tower), and ``out/adapter`` the adapters as a
    peft adapter (:func:`save_peft_adapter`)."""
    from llava_fast.train import checkpoint as ckpt
    from llava_fast.train.build import build_model
    from llava_fast.train.config import TrainConfig
    from llava_fast.train.trainer import run_chat_template, run_image_spec, write_llava_hf

    path = find_checkpoint(src)
    ckpt.check_new_folder(out)  # (before minutes of loading a 7B)
    state, st, _ = ckpt.load_checkpoint(path)
    if "config" not in st:
        raise ValueError(f"{path}: the checkpoint holds no run config (an older llava_fast wrote it); resume it with "
                         f"the run's own command and schedule.max_steps=its step, which exports at the end")
    cfg = TrainConfig.from_dict(json.loads(st["config"]))
    if adapter and not cfg.train.lora:
        raise ValueError(f"--adapter: {path} is not a LoRA run (train.lora=false): its weights are complete, export "
                         f"it without --adapter")
    _check_sources(cfg, path)
    m = cfg.model
    log(f"exporting {path} (step {st.get('global_step')}): the model's config, tokenizer and image processor from "
        f"{m.path or m.language_model + ' + ' + m.vision_tower}, its weights from the checkpoint")
    # the model on the meta device, filled from the checkpoint: the sources' weights are never read, and the weights
    # are in memory once (the checkpoint's tensors become the model's)
    model, tok = build_model(m, log=lambda *_: None, weights=False)
    if cfg.train.lora:
        from llava_fast.train.lora import apply_lora, merge_lora

        apply_lora(model, cfg.train)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model its config builds: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)")
    model.load_state_dict(state, assign=True)  # (no forward runs: buffers not in the state stay on the meta device)
    model.tie_weights()
    spec, chat = run_image_spec(cfg, model.config), run_chat_template(cfg, tok)
    if adapter:
        base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}

        def fill(tmp):
            write_llava_hf(model, base, tmp, tok, spec, chat)
            save_peft_adapter(model, cfg.train, os.path.join(tmp, "adapter"), base_model=os.path.abspath(out))
    else:
        if cfg.train.lora:
            merge_lora(model)

        def fill(tmp):
            write_llava_hf(model, model.state_dict(), tmp, tok, spec, chat)
    ckpt.write_new_folder(out, fill)
    log(f"exported llava-hf model to {out}" + (f", its LoRA adapters to {out}/adapter (peft)" if adapter else ""))
    return out


def save_peft_adapter(model, tcfg, path: str, base_model: str | None = None) -> None:
    """The language model's LoRA adapters of ``model`` (:func:`llava_fast.train.lora.apply_lora`) as a peft adapter
    folder (``adapter_config.json`` + ``adapter_model.safetensors``) for the transformers model of the same llava-hf
    folder: ``PeftModel.from_pretrained(Llava*ForConditionalGeneration.from_pretrained(folder), path)``. The target
    modules are those projections of the language model only (the tower's q/k/v projections share their names)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from llava_fast.train.lora import TARGETS

    names = "|".join(TARGETS)
    cfg = LoraConfig(r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
                     target_modules=rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})",
                     base_model_name_or_path=base_model)
    cfg.save_pretrained(path)
    tensors = {"base_model.model." + k.replace(".default.", "."): v.detach().to("cpu").contiguous()
               for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
