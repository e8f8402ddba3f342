"""Training: typed recipes, the loop (packing, accumulation, FSDP2), atomic resumable checkpoints, export.

    from llava_fast.train import Trainer, get_recipe
    cfg = get_recipe("stage2", "llava_next")
    cfg.model.path, cfg.data.data, cfg.data.images, cfg.checkpoint.out = "ckpt/", "data.json", "images/", "runs/x"
    Trainer(cfg).train()

The names below are loaded on first use (PEP 562): ``llava-fast --help`` and the CLI's argument errors, which import
``llava_fast.train.cli``, no longer wait ~5 s for torch and transformers through the trainer.
"""
import importlib

_WHERE = {
    "TrainConfig": "config", "apply_overrides": "config",
    "RECIPES": "recipes", "get_recipe": "recipes", "stage1": "recipes", "stage2": "recipes",
    "Trainer": "trainer", "cosine_lambda": "trainer", "param_groups": "trainer", "set_trainable": "trainer",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"llava_fast.train.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llava_fast.train' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
