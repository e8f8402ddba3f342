"""Training: typed recipes, the loop (packing, accumulation, FSDP2), atomic resumable checkpoints, export.

    from llava_fast.train import Trainer, get_recipe
    cfg = get_recipe("stage2", "llava_next")
    cfg.model.path, cfg.data.data, cfg.data.images, cfg.checkpoint.out = "ckpt/", "data.json", "images/", "runs/x"
    Trainer(cfg).train()
"""
from llava_fast.train.config import TrainConfig, apply_overrides
from llava_fast.train.recipes import RECIPES, get_recipe, stage1, stage2
from llava_fast.train.trainer import Trainer, cosine_lambda, param_groups, set_trainable

__all__ = ["TrainConfig", "apply_overrides", "RECIPES", "get_recipe", "stage1", "stage2", "Trainer",
           "cosine_lambda", "param_groups", "set_trainable"]
