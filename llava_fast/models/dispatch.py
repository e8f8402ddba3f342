"""Which attention implementation the model calls: the fast kernel on CUDA when available, else the reference.

The reference path reproduces transformers' eager numerics on the CPU; on CUDA without the kernel it uses SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_fast import backend
from llava_fast.models.layers import causal_mask, eager_attention, varlen_attention_ref


def _fast_attention():
    """The Triton varlen kernel module when present and selected, else None."""
    try:
        from llava_fast.ops import attention as attn_op
    except Exception:
        return None
    return attn_op if hasattr(attn_op, "flash_attn_varlen_func") else None


def vision_attention(q, k, v, scale):
    """Non-causal attention over tiles: q/k/v (tiles, H, N, D)."""
    if q.is_cuda and backend.use_fast("attention", "cuda") and (op := _fast_attention()) is not None:
        b, h, n, d = q.shape
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
        flat = [t.transpose(1, 2).reshape(b * n, h, d) for t in (q, k, v)]
        o = op.flash_attn_varlen_func(*flat, cu, cu, n, n, softmax_scale=scale, causal=False)
        return o.view(b, n, h, d).transpose(1, 2)
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return eager_attention(q, k, v, scale)


def text_attention(b, n, dtype, device, attention_mask, cu_seqlens, max_seqlen, lk=None):
    """Returns attn(q, k, v, scale) for one forward of the language model; q (B, H, L, D), k/v (B, Hkv, Lk, D).
    ``lk`` > ``n`` when a KV cache holds earlier tokens (causal mask aligned bottom-right)."""
    lk = n if lk is None else lk
    fast = device.type == "cuda" and backend.use_fast("attention", "cuda") and _fast_attention()
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"packed form (cu_seqlens given) needs a batch of 1 sequence, got batch {b}")
        if fast:
            ms = int(max_seqlen) if max_seqlen is not None else n

            def attn(q, k, v, scale):
                o = fast.flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                                cu_seqlens, cu_seqlens, ms, ms, softmax_scale=scale, causal=True)
                return o.transpose(0, 1)[None]
            return attn

        def attn(q, k, v, scale):
            o = varlen_attention_ref(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens,
                                     scale, causal=True)
            return o.transpose(0, 1)[None]
        return attn

    if fast and attention_mask is None and lk == n:
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=device)

        def attn(q, k, v, scale):
            flat = [t.transpose(1, 2).reshape(b * t.shape[2], t.shape[1], t.shape[3]) for t in (q, k, v)]
            o = fast.flash_attn_varlen_func(*flat, cu, cu, n, n, softmax_scale=scale, causal=True)
            return o.view(b, n, q.shape[1], q.shape[3]).transpose(1, 2)
        return attn

    if attention_mask is not None and attention_mask.shape[-1] != lk:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but the keys are {lk} "
                         f"(cached + new); pass the mask of the whole sequence so far")
    mask = causal_mask(n, lk, dtype, device, attention_mask)
    if device.type == "cuda":
        def attn(q, k, v, scale):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        return attn
    return lambda q, k, v, scale: eager_attention(q, k, v, scale, mask)
