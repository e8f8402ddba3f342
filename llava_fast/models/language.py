"""Llama / Qwen2 / Mistral decoder in plain PyTorch, with transformers 5.x parameter names.

Runs padded batches (B, L) with an attention mask, or one packed sequence of several samples (``cu_seqlens``,
per-sample ``position_ids``) where each sample attends only to itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_fast import backend

from llava_fast.models.config import TextConfig
from llava_fast.models.layers import RMSNorm, RotaryEmbedding, apply_rope, get_activation


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=cfg.o_bias)

    def forward(self, x, cos, sin, attn, cache=None, layer_idx=0, position_ids=None, rope_theta=None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos is None:  # fused RoPE kernel on (B, S, H, D), positions per token
            from llava_fast.ops.rope import rope

            q, k = rope(q, k, position_ids, theta=rope_theta)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        o = attn(q, k, v, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x):
        if self.act is F.silu and backend.use_fast("swiglu", x.device.type):
            from llava_fast.ops.swiglu import swiglu

            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn, cache=None, layer_idx=0, position_ids=None, rope_theta=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache, layer_idx, position_ids, rope_theta)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of past tokens per layer, (B, Hkv, S, D), grown by concatenation (reference path)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished sequences dropped)."""
        self.k = [None if t is None else t[rows] for t in self.k]
        self.v = [None if t is None else t[rows] for t in self.v]


class LanguageModel(nn.Module):
    """The decoder stack (``model.language_model`` in transformers 5.x); the lm_head lives on the LLaVA class."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                cache: KVCache | None = None):
        """inputs_embeds (B, L, D). Padded form: ``attention_mask`` (B, L) of 1/0 (or None). Packed form: B == 1,
        ``cu_seqlens`` int32 (n+1,), ``position_ids`` (1, L) restarting per sample. With ``cache`` (padded form only),
        the new tokens attend to the cached ones too and ``attention_mask`` covers past + new tokens."""
        from llava_fast.models import dispatch

        b, n, _ = inputs_embeds.shape
        if position_ids is None:
            if cu_seqlens is not None:
                raise ValueError("position_ids is required with cu_seqlens (positions restart at each sample)")
            past = cache.length if cache is not None else 0
            position_ids = torch.arange(past, past + n, device=inputs_embeds.device)[None].expand(b, n)
        fused_rope = backend.use_fast("rope", inputs_embeds.device.type)
        cos, sin = (None, None) if fused_rope else self.rotary_emb(position_ids, inputs_embeds.dtype)
        if cache is not None and cu_seqlens is not None:
            raise ValueError("a KV cache is supported with the padded form only (no cu_seqlens)")
        lk = n + (cache.length if cache is not None else 0)
        attn = dispatch.text_attention(b, n, inputs_embeds.dtype, inputs_embeds.device, attention_mask, cu_seqlens,
                                       max_seqlen, lk=lk, head_dim=self.cfg.head_dim)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn, None, i, position_ids,
                                                      self.cfg.rope_theta, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn, cache, i, position_ids, self.cfg.rope_theta)
        return self.norm(x)
