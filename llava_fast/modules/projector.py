"""Drop-in for ``transformers``' ``LlavaMultiModalProjector``: same attributes (``linear_1``, ``act``, ``linear_2``) and
state-dict keys (``linear_1.weight``, ``linear_1.bias``, ``linear_2.weight``, ``linear_2.bias``), fused forward and
backward from :mod:`llava_fast.ops.projector` on CUDA, the plain PyTorch reference on CPU."""
from __future__ import annotations

import torch
from torch import nn

from llava_fast.ops.act_linear import plain_linears, unhooked
from llava_fast.ops.projector import normalize_act, projector

__all__ = ["LlavaMultiModalProjector", "Projector"]


class Projector(nn.Module):
    """``linear_2(gelu(linear_1(x)))``: (..., in_features) -> (..., out_features).

    Args:
        in_features: vision feature width Dv (times the number of stacked vision layers, as in HF).
        out_features: text hidden size Dt (both linears output Dt).
        bias: both linears carry a bias (HF ``multimodal_projector_bias``).
        act: "gelu" (exact erf, HF default) or a tanh GELU name ("gelu_pytorch_tanh", "gelu_new", "gelu_fast").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "gelu",
                 device=None, dtype=None):
        super().__init__()
        self.act_name = act
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        # parameter-free; kept so `.act(...)` works as in HF. It is what the forward computes: replaced by another
        # module, or hooked, it is called (with the linears) instead of the fused op
        self.act = nn.GELU(approximate=normalize_act(act))
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> Projector:
        """Build from an HF ``LlavaConfig`` / ``LlavaNextConfig`` / ``LlavaOnevisionConfig``."""
        layers = config.vision_feature_layer
        n = 1 if isinstance(layers, int) else len(layers)
        return cls(config.vision_config.hidden_size * n, config.text_config.hidden_size,
                   bias=getattr(config, "multimodal_projector_bias", True),
                   act=getattr(config, "projector_hidden_act", "gelu"), device=device, dtype=dtype)

    @classmethod
    def from_hf(cls, module: nn.Module, act: str = "gelu") -> Projector:
        """Copy an HF ``LlavaMultiModalProjector`` (weights shared, not copied). ``act`` names its activation."""
        l1, l2 = module.linear_1, module.linear_2
        new = cls(l1.in_features, l1.out_features, bias=l1.bias is not None, act=act, device="meta")
        new.linear_1, new.linear_2 = l1, l2
        return new

    @property
    def approximate(self) -> str | None:
        """The GELU approximation of ``self.act`` ("none" | "tanh"); None when ``act`` is not an ``nn.GELU``."""
        return self.act.approximate if isinstance(self.act, nn.GELU) else None

    def _fusable(self) -> bool:
        """The fused op computes exactly what calling the modules would: plain linears (no adapter, wrapper or
        hook: LoRA) and an ``nn.GELU`` activation with its own forward and no hooks."""
        act = self.act
        return (plain_linears(self.linear_1, self.linear_2) and isinstance(act, nn.GELU)
                and type(act).forward is nn.GELU.forward and unhooked(act))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if not self._fusable():
            return self.linear_2(self.act(self.linear_1(image_features)))
        w1, b1 = self.linear_1.weight, self.linear_1.bias
        w2, b2 = self.linear_2.weight, self.linear_2.bias
        return projector(image_features, w1, b1, w2, b2, self.act.approximate)  # (autocast casts inside)

    def extra_repr(self) -> str:
        return f"act={self.act_name!r}"


LlavaMultiModalProjector = Projector
