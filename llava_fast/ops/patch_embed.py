"""Patch embedding of the vision towers: CLIP's and SigLIP's ``Conv2d(C, D, kernel_size=p, stride=p)`` (no padding) as
one GEMM over the image's patches.

A convolution whose kernel equals its stride is a matrix product: each output position reads one p x p patch of
every channel, and no two positions share a pixel. cuDNN does not run it as one: in session 19's H200 profiles the
patch embedding was ``cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x5_nhwc_align8`` (an Ampere mma.sync
kernel: K = 3 x 14 x 14 = 588 is not a multiple of 8) at ~39 TFLOP/s, plus ``nchwToNhwc`` / ``nhwcToNchw`` layout
copies: ~1.0 ms per NeXT-7B prefill step (40 tiles of 336 px), ~0.43 ms per stage-1 step (16 tiles), ~0.72 ms per
OneVision step (14 SigLIP tiles of 384 px: the forward, its ``Wgrad`` kernel and the copies). Here: the patches
gathered into one (tiles x patches, C p p) matrix (one copy of the pixels, ``reshape`` of a permuted view), then
``F.linear`` on cuBLAS. FLOPs: 2 x tiles x patches x D x C p p (27.7 GFLOP for the prefill's 40 x 576 x 1024 x 588);
bytes: the pixels read twice and written once (the gather) plus the output, ~75 MB there. The output is (B, N, D)
contiguous: SigLIP's transposed-conv-output copy (models/vision.py) becomes a no-op.

The CUDA default since session 28 (H200, ``benchmarks/bench_gemm.py``'s ``patch_embed`` rows against the convolution
in the same run): forward 4.07x (prefill, 0.215 vs 0.877 ms), 3.78x (stage 1), 4.50x (OneVision's SigLIP), forward +
weight gradient 1.77x (OneVision, 0.483 vs 0.856 ms); its cuda tests (bf16/fp16 by flash-attn's rule) passed there.
``set_backend("patch_embed", "reference")`` or ``LLAVA_FAST_BACKEND_PATCH_EMBED=reference`` keeps the convolution.
Numerics: the same products, summed in another order (both
paths accumulate in fp32), so not bit-identical to the convolution; the CPU path stays the convolution (the model
matches transformers exactly there).

Layout (docs/style.md): reference -> the GEMM form -> functional ``patch_embed(conv, pixel_values)`` (no kernel of our
own and no autograd Function: autograd differentiates both forms; the model calls the conv module itself unless the
GEMM form computes exactly what the call would: :func:`gemm_usable`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llava_fast import backend
from llava_fast.ops.act_linear import unhooked


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def patch_embed_ref(pixel_values: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv2d(pixel_values, weight, bias, stride=p)`` as (B, N, D): transformers' ``.flatten(2).transpose(1, 2)``
    (a transposed view of the convolution's (B, D, N) output)."""
    p = weight.shape[-1]
    return F.conv2d(pixel_values, weight, bias, stride=p).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# 2. the GEMM form
# --------------------------------------------------------------------------------------------------------------------
def patch_embed_gemm(pixel_values: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The same (B, N, D), contiguous, as one GEMM: patches in the convolution's order (row-major over the grid), each
    flattened as the weight is, (C, p, p); rows and columns past the last whole patch are dropped, as the
    convolution drops them."""
    b, c, h, w = pixel_values.shape
    d, _, p, _ = weight.shape
    gh, gw = h // p, w // p
    x = pixel_values[:, :, :gh * p, :gw * p]
    patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * p * p)
    return F.linear(patches, weight.reshape(d, c * p * p), bias).view(b, gh * gw, d)


backend.register_fast("patch_embed", "cuda")


# --------------------------------------------------------------------------------------------------------------------
# 3. functional
# --------------------------------------------------------------------------------------------------------------------
def gemm_usable(conv: nn.Module, pixel_values: torch.Tensor) -> bool:
    """Whether the model may compute ``conv`` (a tower's ``patch_embedding``) by :func:`patch_embed_gemm`: the backend
    says so for ``pixel_values``' device (CUDA, unless set to "reference"), and calling the module would compute
    exactly that conv: a plain ``nn.Conv2d`` (not a subclass with its own forward, such as a LoRA layer) with
    kernel = stride, no padding or dilation, one group, and no hooks (which only a call would run)."""
    return (backend.use_fast("patch_embed", pixel_values.device.type) and type(conv) is nn.Conv2d
            and pixel_values.dim() == 4 and conv.kernel_size == conv.stride
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.padding == (0, 0) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and unhooked(conv))


def patch_embed(conv: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``conv(pixel_values)`` as (B, N, D) patch embeddings: the GEMM form where :func:`gemm_usable`, else the module
    itself (its hooks and subclass forward included) with transformers' ``.flatten(2).transpose(1, 2)``."""
    if gemm_usable(conv, pixel_values):
        return patch_embed_gemm(pixel_values, conv.weight, conv.bias)
    return conv(pixel_values).flatten(2).transpose(1, 2)
