"""SwiGLU MLP drop-in for HF ``LlamaMLP`` / ``Qwen2MLP``: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

State-dict names are HF's (``gate_proj``, ``up_proj``, ``down_proj``); the activation product is the fused
:func:`llava_fast.ops.swiglu.swiglu` (backward recomputes silu instead of storing it), and down_proj's input is
recomputed too (:mod:`llava_fast.ops.act_linear`).
"""
import torch
from torch import nn

from llava_fast.ops.act_linear import act_linear, plain_linears
from llava_fast.ops.swiglu import SwiGLUAct, swiglu

_SWIGLU = SwiGLUAct()   # swiglu with its own backward: no nested autograd pass in act_linear's (reference off CUDA)


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    @classmethod
    def from_config(cls, config, **kw) -> "SwiGLUMLP":
        """From an HF Llama/Qwen2 text config (``hidden_act`` must be silu)."""
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"SwiGLUMLP: config.hidden_act must be 'silu', got {act!r}; use the HF MLP instead")
        return cls(config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False), **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` -> ``(..., hidden)``; the gated product is recomputed in the backward, not kept
        (:mod:`llava_fast.ops.act_linear`)."""
        g, u = self.gate_proj(x), self.up_proj(x)
        if plain_linears(self.down_proj):
            return act_linear(_SWIGLU, (g, u), self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(swiglu(g, u))  # an adapter / wrapper (LoRA) on down_proj: call it
