"""Loss modules. :class:`FusedLinearCrossEntropyLoss` replaces ``lm_head`` + ``ForCausalLMLoss`` in training."""
from __future__ import annotations

from typing import Optional

import torch

from llava_fast.ops.cross_entropy import fused_linear_cross_entropy


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against already-shifted ``labels``, computed in token chunks
    so the ``(tokens, vocab)`` logits are never held (Triton on CUDA, plain PyTorch elsewhere).

    Args:
        ignore_index: label value that is not supervised (HF's -100).
        reduction: ``"mean"`` over supervised tokens (0 when none) or ``"sum"``.

    ``forward(hidden, weight, labels, bias=None, num_items=None)``: ``hidden`` ``(..., H)``, ``labels`` with the same
    leading shape (flattened here), ``weight`` ``(V, H)`` (lm_head or tied embedding weight). With ``num_items`` the
    loss is ``sum / num_items`` (HF ``num_items_in_batch``). Returns an fp32 scalar.

    Example::

        loss_fn = FusedLinearCrossEntropyLoss()
        hidden = model.model(input_ids).last_hidden_state            # (B, T, H)
        labels = torch.nn.functional.pad(input_labels, (0, 1), value=-100)[:, 1:]   # shift per sample
        loss = loss_fn(hidden, model.lm_head.weight, labels)
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"FusedLinearCrossEntropyLoss: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: Optional[torch.Tensor] = None, num_items=None) -> torch.Tensor:
        if hidden.dim() < 2:
            raise ValueError(f"FusedLinearCrossEntropyLoss: hidden must be (..., H), got shape {tuple(hidden.shape)}")
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"FusedLinearCrossEntropyLoss: labels shape {tuple(labels.shape)} must equal hidden's "
                             f"leading shape {tuple(hidden.shape[:-1])} (hidden is {tuple(hidden.shape)})")
        return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), bias,
                                          ignore_index=self.ignore_index, reduction=self.reduction,
                                          num_items=num_items)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
