"""RMSNorm drop-in for HF ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` (same constructor, ``weight`` and state dict)."""
from typing import Optional

import torch
from torch import nn

from llava_fast.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """``weight * normalize(x)`` with HF numerics; ``forward(x, residual)`` fuses the residual add before the norm.

    Args:
        hidden_size: size of the last dimension.
        eps: variance epsilon (HF attribute name ``variance_epsilon``).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """``(..., hidden)`` -> same shape; with ``residual`` returns ``(norm(x + residual), x + residual)``."""
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
