"""``llava-fast export RUN|CHECKPOINT --out DIR``: a llava-hf folder from a training checkpoint.

A run exports ``OUT/final`` when it ends; this writes the same folder from any checkpoint it saved
(``OUT/checkpoints/step_N``, or a run folder: its latest), to evaluate a run midway, or to export one that stopped
before its end. The checkpoint holds the full weights and the run's config; the model is rebuilt from the config's
sources (``model.path``, or ``model.language_model`` + ``model.vision_tower``: their config, tokenizer and image
processor, so they must still be there), then takes the checkpoint's weights, LoRA adapters merged. The folder is
written to a temporary sibling and renamed when complete.
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


def export_checkpoint(src: str, out: str, log=print) -> str:
    """Writes the llava-hf folder ``out`` (new or empty) from the checkpoint ``src`` (or a run folder's latest);
    returns ``out``."""
    from llava_fast.train import checkpoint as ckpt
    from llava_fast.train.build import build_model
    from llava_fast.train.config import TrainConfig
    from llava_fast.train.trainer import run_chat_template, run_image_spec, write_llava_hf

    path = find_checkpoint(src)
    if os.path.exists(out) and os.listdir(out):  # (before minutes of loading a 7B)
        raise FileExistsError(f"--out {out}: exists and is not empty; choose a new folder")
    state, st, _ = ckpt.load_checkpoint(path)
    if "config" not in st:
        raise ValueError(f"{path}: the checkpoint holds no run config (an older llava_fast wrote it); resume it with "
                         f"the run's own command and schedule.max_steps=its step, which exports at the end")
    cfg = TrainConfig.from_dict(json.loads(st["config"]))
    _check_sources(cfg, path)
    m = cfg.model
    log(f"exporting {path} (step {st.get('global_step')}): the model's config, tokenizer and image processor from "
        f"{m.path or m.language_model + ' + ' + m.vision_tower}, its weights from the checkpoint")
    model, tok = build_model(m, log=lambda *_: None)
    if tok is None:
        from llava_fast.data import load_tokenizer

        tok = load_tokenizer(cfg.model.path)
    if cfg.train.lora:
        from llava_fast.train.lora import apply_lora, merge_lora

        apply_lora(model, cfg.train)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model its config builds: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)")
    model.load_state_dict(state)
    if cfg.train.lora:
        merge_lora(model)
    spec, chat = run_image_spec(cfg, model.config), run_chat_template(cfg, tok)
    ckpt.write_new_folder(out, lambda tmp: write_llava_hf(model, model.state_dict(), tmp, tok, spec, chat))
    log(f"exported llava-hf model to {out}")
    return out
