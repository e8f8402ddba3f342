"""Thin module over :func:`llava_fast.ops.attention.flash_attn_varlen_func` (no parameters), for model code that
prefers a module in its attention block. The projections, RoPE and the output projection stay in the model."""
import torch

from llava_fast.ops.attention import flash_attn_varlen_func


class VarlenAttention(torch.nn.Module):
    """Attention over packed documents.

    Args:
        causal: bottom-right aligned causal mask inside each document.
        softmax_scale: defaults to ``head_dim ** -0.5``.

    Shapes: ``q (total_q, Hq, D)``, ``k, v (total_k, Hkv, D)`` (last dim contiguous, other strides free),
    ``cu_seqlens_q/k`` int32 ``(batch + 1,)``; returns ``(total_q, Hq, D)``.
    """

    def __init__(self, causal: bool = True, softmax_scale: float | None = None):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int):
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale=self.softmax_scale, causal=self.causal)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}"
