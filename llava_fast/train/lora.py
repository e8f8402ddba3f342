"""LoRA on the language model through peft (optional extra: ``pip install llava_fast[peft]``).

Only the language model's attention/MLP projections get adapters; the projector and (OneVision) vision tower train
fully when listed in ``train.trainable``. :func:`merge_lora` folds the adapters into the weights before export, so the
exported folder is a plain llava-hf model.
"""
from __future__ import annotations

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def apply_lora(model, tcfg):
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("train.lora=true needs peft: pip install 'llava_fast[peft]'") from e
    lm = model.model.language_model
    # the whole language model is frozen, lm_head included (it lives on the LLaVA class, next to language_model): as
    # in the original LLaVA LoRA recipe only the adapters train there (an untied 7B lm_head is 131M parameters)
    for p in (*lm.parameters(), *model.lm_head.parameters()):
        p.requires_grad_(False)
    cfg = LoraConfig(r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
                     target_modules=TARGETS)
    inject_adapter_in_model(cfg, lm)
    for n, p in lm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return model


def merge_lora(model):
    """Fold every LoRA layer into its base weight and replace it by the base module (in place)."""
    import torch.nn as nn

    def fold(parent: nn.Module):
        for name, child in list(parent.named_children()):
            if hasattr(child, "merge") and hasattr(child, "base_layer"):
                child.merge()
                setattr(parent, name, child.base_layer)
            else:
                fold(child)

    fold(model)
    return model
