"""``linear(act(*hs), weight, bias)`` that does not keep ``act(*hs)`` for the backward: the MLPs' second GEMM.

In an MLP ``fc2(act(fc1(x)))`` (CLIP / SigLIP towers) or ``down_proj(silu(gate) * up)`` (Llama / Qwen2), autograd
keeps, per token, the first GEMM's input, the activation's input(s) (for the activation's backward) and the
activation's output (for fc2's weight gradient). The output is a pure function of the inputs that are kept anyway,
so this op keeps only those and recomputes the activation (one elementwise pass) in the backward. Saved values per
token, counted with saved-tensor hooks (bf16, CPU): SigLIP-400M MLP 9760 -> 5456 (x, fc1 output; the GELU output
no longer), CLIP-L MLP 13312 -> 5120 (quick_gelu also kept its sigmoid), the Llama-7B MLP 37120 -> 26112 (x_ln,
gate, up; the product no longer). Per whole tower layer with a flash-style attention (q, k, v, out kept):
SigLIP ~19.0k -> ~14.7k (-23%), CLIP-L ~21.5k -> ~13.3k (-38%). GPU peak memory and time: ``benchmarks/
bench_model.py`` provider ``llava_fast_keep_act`` (``LLAVA_FAST_RECOMPUTE_ACT=0``, the previous path).

The recomputation runs the activation's own forward and backward (``torch.autograd.grad`` on the recomputed output),
so the gradients are those of the plain path up to the GEMMs' summation order (the weight gradient is computed as
``dy^T @ act`` on the flattened tokens, as autograd's linear backward does).

``LLAVA_FAST_RECOMPUTE_ACT=0`` (read at each call) keeps the activation instead; so do calls without gradients and
traces by torch.compile (its partitioner already recomputes cheap pointwise ops such as the activation instead of
saving them, and dynamo cannot trace the ``torch.autograd.grad`` of this backward). Under autocast the backward runs
in the forward's autocast state (as ``torch.amp.custom_bwd`` does).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["act_linear", "act_linear_ref", "ActLinearFunction", "recompute_enabled"]


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the path without gradients)
# --------------------------------------------------------------------------------------------------------------------
def act_linear_ref(act: Callable, hs: Sequence[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(act(*hs), weight, bias)


# --------------------------------------------------------------------------------------------------------------------
# 2. autograd Function (no kernel of its own: the activation's and torch's)
# --------------------------------------------------------------------------------------------------------------------
class ActLinearFunction(torch.autograd.Function):
    """forward(act, weight, bias, *hs) -> linear(act(*hs), weight, bias); saves hs and weight, not act(*hs)."""

    @staticmethod
    def forward(ctx, act, weight, bias, *hs):
        dev = hs[0].device.type
        # under autocast (the trainer's fp32 master weights on CUDA), the backward below runs in the same autocast
        # state, as torch.amp.custom_bwd does: the recomputed activation and the GEMMs match the forward's dtypes
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        with torch.no_grad():
            a = act(*hs)
        ctx.act = act
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, *hs)
        return F.linear(a, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, *hs = ctx.saved_tensors
        dev, enabled, dtype = ctx.autocast
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_h = [ctx.needs_input_grad[3 + i] for i in range(len(hs))]
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            with torch.enable_grad():
                leaves = [h.detach().requires_grad_(n) for h, n in zip(hs, need_h)]
                a = ctx.act(*leaves)
            n_out, n_in = weight.shape
            dy2 = dy.reshape(-1, n_out)
            # autograd casts each gradient to its input's dtype (fp32 master weights under autocast)
            dw = dy2.t().mm(a.detach().reshape(-1, n_in)) if need_w else None
            db = dy2.sum(0) if (need_b and ctx.has_bias) else None
            dhs = [None] * len(hs)
            if any(need_h):
                da = dy.matmul(weight)
                want = [leaf for leaf, n in zip(leaves, need_h) if n]
                grads = iter(torch.autograd.grad(a, want, da))
                dhs = [next(grads) if n else None for n in need_h]
        return (None, dw, db, *dhs)


# --------------------------------------------------------------------------------------------------------------------
# 3. functional
# --------------------------------------------------------------------------------------------------------------------
def recompute_enabled() -> bool:
    v = os.environ.get("LLAVA_FAST_RECOMPUTE_ACT", "1").strip().lower()
    if v not in ("0", "1"):
        raise ValueError(f"LLAVA_FAST_RECOMPUTE_ACT must be 0 or 1, got {v!r}")
    return v == "1"


def act_linear(act: Callable, hs: Sequence[torch.Tensor], weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(act(*hs), weight, bias)``; when a gradient is needed, the activation is recomputed in the backward
    instead of kept (see the module docstring). ``act`` must be a pure elementwise function of ``hs``."""
    grads = torch.is_grad_enabled() and (weight.requires_grad or any(h.requires_grad for h in hs)
                                         or (bias is not None and bias.requires_grad))
    if not grads or torch.compiler.is_compiling() or not recompute_enabled():
        return act_linear_ref(act, hs, weight, bias)
    return ActLinearFunction.apply(act, weight, bias, *hs)
