"""Rotary helper: HF-default RoPE (``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``) on packed q/k in one kernel."""
from typing import Optional

import torch
from torch import nn

from llava_fast.ops.rope import rope, rope_cos_sin_cache, rope_inv_freq


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q ``(T, Hq, D)`` and k ``(T, Hkv, D)`` (or ``(B, S, H, D)``) given per-token position ids.

    Args:
        head_dim: D (even).
        theta: rope base (Llama 1e4, Qwen2 1e6).
        max_position_embeddings: when given with ``use_cache=True``, cos/sin come from an fp32 table of this many
            positions built by torch exactly as HF (positions must stay below it).
        use_cache: see above; otherwise cos/sin are recomputed in the kernel (no table traffic).
        inplace_inference: under ``torch.no_grad()`` write the result into q and k (they are temporaries of the
            attention block); with grad enabled the result is always a new tensor.
    The ``inv_freq`` buffer is non-persistent, as in HF, so state dicts are unaffected.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_position_embeddings: Optional[int] = None,
                 use_cache: bool = False, inplace_inference: bool = True, device=None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        if use_cache and not max_position_embeddings:
            raise ValueError("RotaryEmbedding: use_cache=True needs max_position_embeddings")
        self.head_dim, self.theta = head_dim, float(theta)
        self.max_position_embeddings = max_position_embeddings
        self.use_cache, self.inplace_inference = use_cache, inplace_inference
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, device), persistent=False)
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @classmethod
    def from_config(cls, config, **kw) -> "RotaryEmbedding":
        """From an HF Llama/Qwen2 text config (default rope_type only)."""
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
        if rope_type != "default":
            raise ValueError(f"RotaryEmbedding: only rope_type 'default' is implemented, config has {rope_type!r}")
        theta = params.get("rope_theta") if isinstance(params, dict) else None
        theta = theta or getattr(config, "rope_theta", 10000.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(head_dim, theta, getattr(config, "max_position_embeddings", None), **kw)

    def _get_cache(self, device):
        if self._cache is None or self._cache[0].device != device:
            self._cache = rope_cos_sin_cache(self.max_position_embeddings, self.head_dim, self.theta, device,
                                             inv_freq=self.inv_freq)
        return self._cache

    def cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF-style ``(cos, sin)`` of shape ``position_ids.shape + (D,)`` in x's dtype (for HF attention code)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
        """Returns ``(q_embed, k_embed)``."""
        cache = self._get_cache(q.device) if self.use_cache else None
        inplace = self.inplace_inference and not torch.is_grad_enabled()
        return rope(q, k, position_ids, self.theta, inv_freq=None if cache is not None else self.inv_freq,
                    cos_sin_cache=cache, inplace=inplace)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, use_cache={self.use_cache}"
