"""Building blocks shared by the vision towers and the language models, in plain PyTorch.

Numerics follow transformers' eager implementations (reference-spec.md section 7, traps 2, 4, 5): attention scores in
the model dtype, softmax in fp32; RMSNorm statistics in fp32 with the weight applied after the cast back; RoPE cos/sin
in fp32 cast to the activation dtype. The fast kernels plug in through ``attention`` and the op modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_fast import backend
from llava_fast.ops.act_linear import GeluAct
from llava_fast.ops.quick_gelu import QuickGeluAct, quick_gelu_ref as quick_gelu  # noqa: F401  (the eager expression)

# the GELUs carry their backward (ops/act_linear.ExplicitAct): act_linear recomputes them without a nested autograd
# pass; QuickGELU is one Triton kernel on CUDA (ops/quick_gelu.py), transformers' expression elsewhere
ACTIVATIONS = {
    "quick_gelu": QuickGeluAct(),
    "gelu": GeluAct("none"),
    "gelu_pytorch_tanh": GeluAct("tanh"),
    "gelu_new": GeluAct("tanh"),
    "silu": F.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def eager_attention(q, k, v, scale: float, mask: torch.Tensor | None = None):
    """transformers' eager attention. q (B, H, Lq, D), k/v (B, Hkv, Lk, D); ``mask`` additive, broadcastable to
    (B, H, Lq, Lk). GQA: k/v heads are repeated (repeat_kv)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def causal_mask(lq: int, lk: int, dtype, device, attention_mask: torch.Tensor | None = None):
    """Additive causal mask (B or 1, 1, Lq, Lk) with finfo.min, as transformers' eager path builds it; padding keys
    of ``attention_mask`` (B, Lk) are masked too."""
    minv = torch.finfo(dtype).min
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    allowed = (j <= i)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, minv)


def varlen_attention_ref(q, k, v, cu_seqlens: torch.Tensor, scale: float, causal: bool):
    """Attention over a packed sequence: q (T, H, D), k/v (T, Hkv, D), documents delimited by ``cu_seqlens``; each
    document attends only to itself (eager numerics per document)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qd, kd, vd = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        mask = causal_mask(e - s, e - s, q.dtype, q.device) if causal else None
        out[s:e] = eager_attention(qd, kd, vd, scale, mask)[0].transpose(0, 1)
    return out


class RMSNorm(nn.Module):
    """Llama/Qwen2 RMSNorm: fp32 statistics, ``weight * x.to(input_dtype)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return rms_norm_fn(x, self.weight, self.eps)

    def functional(self):
        """``f(x, weight)`` computing this norm: what ops/act_linear.py recomputes in the backward (the weight is an
        argument so that it gets its gradient there)."""
        eps = self.eps
        if backend.use_fast("rms_norm", self.weight.device.type):
            from llava_fast.ops.rms_norm import RMSNormAct

            return RMSNormAct(eps)   # differentiated without a nested autograd pass (ops/act_linear.ExplicitAct)
        return lambda x, weight: rms_norm_fn(x, weight, eps)


def rms_norm_fn(x, weight, eps: float):
    """RMSNorm of ``x`` with ``weight``: the fused kernel where the backend selects it, else transformers' expression
    (fp32 statistics, ``weight * x.to(input_dtype)``)."""
    if backend.use_fast("rms_norm", x.device.type):
        from llava_fast.ops.rms_norm import rms_norm

        return rms_norm(x, weight, eps)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE: inv_freq = 1 / theta^(2i/D); cos/sin computed in fp32 and cast to the activation dtype."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype):
        """position_ids (B, L) -> cos, sin (B, L, D)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, H, L, D), cos/sin (B, L, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
