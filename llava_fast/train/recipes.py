"""Training recipes (reference-spec.md 5.6) as functions returning a :class:`TrainConfig`.

* ``stage1``: only the projector (and ``image_newline``) trains, lr 1e-3, ``plain`` template, cosine, warmup 3%,
  no weight decay; LLaVA-1.5 images resized and centre-cropped (the original pretrain script's ``square``).
* ``stage2``: projector + language model at lr 2e-5 with ``vicuna_v1`` (LLaVA-1.5 / NeXT) or ``qwen`` (OneVision);
  OneVision also trains the vision tower at 2e-6; LLaVA-1.5 images padded to a square with the mean colour first
  (the original fine-tune script's ``--image_aspect_ratio pad``).

Names: ``stage1`` / ``stage2`` (template picked from the model type), or explicitly
``llava15-stage1``, ``llava15-stage2``, ``next-stage1``, ``next-stage2``, ``onevision-stage1``, ``onevision-stage2``.
"""
from __future__ import annotations

from llava_fast.train.config import (DataSection, OptimSection, ScheduleSection, TrainConfig, TrainSection)

_ALIASES = {"llava15": "llava", "llava": "llava", "next": "llava_next", "llava_next": "llava_next",
            "onevision": "llava_onevision", "ov": "llava_onevision", "llava_onevision": "llava_onevision"}
_FAMILY = {"llava": "llava15", "llava_next": "next", "llava_onevision": "onevision"}  # model type -> recipe prefix


def stage1(model_type: str = "llava_next") -> TrainConfig:
    return TrainConfig(recipe=f"stage1:{model_type}",
                       data=DataSection(template="plain", max_len=8192 if model_type == "llava_onevision" else 2048,
                                        max_tokens=8192, pad_to_square=False if model_type == "llava" else None),
                       optim=OptimSection(lr=1e-3, weight_decay=0.0, max_grad_norm=1.0),
                       schedule=ScheduleSection(epochs=1, warmup_ratio=0.03),
                       train=TrainSection(trainable=["projector", "newline"]))


def stage2(model_type: str = "llava_next") -> TrainConfig:
    ov = model_type == "llava_onevision"
    return TrainConfig(recipe=f"stage2:{model_type}",
                       data=DataSection(template="qwen" if ov else "vicuna_v1", max_len=8192 if ov else 4096,
                                        max_tokens=8192, group_by_modality_length=True,
                                        pad_to_square=True if model_type == "llava" else None),
                       optim=OptimSection(lr=2e-5, vision_lr=2e-6 if ov else None, weight_decay=0.0,
                                          max_grad_norm=1.0),
                       schedule=ScheduleSection(epochs=1, warmup_ratio=0.03),
                       train=TrainSection(trainable=["projector", "newline", "llm"] + (["vision"] if ov else []),
                                          activation_checkpointing=True))


RECIPES = {"stage1": stage1, "stage2": stage2}


def get_recipe(name: str, model_type: str | None = None) -> TrainConfig:
    """``stage1``/``stage2`` (model_type from the model) or ``<family>-stage<N>``. A family that is not the
    model's type raises: its template and trained parts are another model's."""
    if model_type is not None and model_type not in _FAMILY:
        raise ValueError(f"model type {model_type!r} is not supported; the recipes are for {sorted(_FAMILY)} "
                         "(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision)")
    if name in RECIPES:
        cfg = RECIPES[name](model_type or "llava_next")
    elif "-" in name and name.rsplit("-", 1)[0] in _ALIASES and name.rsplit("-", 1)[1] in RECIPES:
        fam, st = name.rsplit("-", 1)
        if model_type is not None and _ALIASES[fam] != model_type:
            raise ValueError(f"recipe {name!r} is for {_ALIASES[fam]} models, but the model is {model_type}: use "
                             f"--recipe {st} (picks the template from the model) or {_FAMILY[model_type]}-{st}")
        cfg = RECIPES[st](_ALIASES[fam])
        model_type = _ALIASES[fam]
    else:
        names = sorted(RECIPES) + [f"{f}-{s}" for f in ("llava15", "next", "onevision") for s in RECIPES]
        raise ValueError(f"unknown recipe {name!r}; recipes: {names}")
    cfg.model.model_type = model_type or cfg.model.model_type
    return cfg
