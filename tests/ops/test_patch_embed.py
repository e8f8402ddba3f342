"""Patch embedding as one GEMM (ops/patch_embed.py) against the convolution it replaces: outputs and every gradient,
odd image sizes (the convolution drops partial patches), bias on and off; the model calls the conv module itself
(hooks, subclasses, other strides) unless the GEMM computes exactly that call. The whole model with it forced:
tests/models/test_model_kernels.py, test_host_syncs.py and test_compile_breaks.py (their KERNELS).

Tolerance (CPU, fp32): both sum the same products per output in different orders; each is within (n - 1) eps32
sum|terms| of the exact sum of its n terms (the recursive-summation bound), so they differ by at most
2 n eps32 sum|terms|, elementwise, with sum|terms| computed exactly as the same op on |x|, |w| (and |dy|).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import llava_fast
from llava_fast.ops.patch_embed import gemm_usable, patch_embed, patch_embed_gemm, patch_embed_ref

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def gemm_on():
    llava_fast.set_backend("patch_embed", "cuda")
    yield
    llava_fast.set_backend("patch_embed", "auto")


def _bound(x, w, gout=None):
    """Elementwise 2 n eps32 sum|terms| of the output (gout None) or of the gradients (x, weight, bias)."""
    xa, wa = x.detach().abs().requires_grad_(), w.detach().abs().requires_grad_()
    out = patch_embed_ref(xa, wa, None)
    if gout is None:
        return 2 * w[0].numel() * EPS32 * out.detach()
    gx, gw = torch.autograd.grad(out, [xa, wa], gout.abs())
    n_pos = out.shape[0] * out.shape[1]
    gb = gout.abs().sum((0, 1))
    return 2 * w.shape[0] * EPS32 * gx, 2 * n_pos * EPS32 * gw, 2 * n_pos * EPS32 * gb


def _assert_within(a, r, bound, name):
    err = (a - r).abs()
    assert bool((err <= bound + 1e-30).all()), f"{name}: max err {float(err.max()):.3e}, bound there " \
                                              f"{float(bound.flatten()[err.argmax()]):.3e}"


@pytest.mark.parametrize("b,c,h,w,p,d,bias", [(3, 3, 28, 28, 14, 32, False),    # CLIP-like, 2 x 2 patches
                                              (2, 3, 30, 44, 14, 24, True),     # partial patches dropped
                                              (1, 3, 14, 14, 14, 8, True),      # one patch
                                              (2, 1, 32, 48, 16, 20, True)])    # p = 16, one channel
def test_gemm_equals_conv_forward_and_backward(b, c, h, w, p, d, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g, requires_grad=True)
    conv = nn.Conv2d(c, d, p, stride=p, bias=bias)
    ref = patch_embed_ref(x, conv.weight, conv.bias)
    out = patch_embed_gemm(x, conv.weight, conv.bias)
    assert out.shape == ref.shape == (b, (h // p) * (w // p), d) and out.is_contiguous()
    _assert_within(out.detach(), ref.detach(), _bound(x, conv.weight), "out")
    gout = torch.randn(out.shape, generator=g)
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    g_ref = torch.autograd.grad(ref, params, gout)
    g_out = torch.autograd.grad(out, params, gout)
    for name, a, r, bnd in zip(["x", "weight", "bias"], g_out, g_ref, _bound(x, conv.weight, gout)):
        _assert_within(a, r, bnd, name)


def test_dispatch_calls_the_module_unless_the_gemm_is_exact(gemm_on):
    x = torch.randn(2, 3, 28, 28)
    conv = nn.Conv2d(3, 16, 14, stride=14)
    assert gemm_usable(conv, x)
    with torch.no_grad():
        _assert_within(patch_embed(conv, x), patch_embed_ref(x, conv.weight, conv.bias), _bound(x, conv.weight),
                       "out")
    calls = []
    h = conv.register_forward_hook(lambda m, i, o: calls.append(1))
    assert not gemm_usable(conv, x)
    patch_embed(conv, x)
    assert calls == [1]   # a hooked module is called, so its hook runs
    h.remove()

    class Scaled(nn.Conv2d):   # a subclass with its own forward (as an adapter would be)
        def forward(self, t):
            return 2 * super().forward(t)

    sub = Scaled(3, 16, 14, stride=14)
    torch.testing.assert_close(patch_embed(sub, x), 2 * patch_embed_ref(x, sub.weight, sub.bias))
    for other in (nn.Conv2d(3, 16, 14, stride=7), nn.Conv2d(3, 16, 14, stride=14, padding=1),
                  nn.Conv2d(3, 16, (14, 7), stride=(14, 7))):
        assert not gemm_usable(other, x)
        torch.testing.assert_close(patch_embed(other, x), other(x).flatten(2).transpose(1, 2))


def test_auto_is_the_convolution_on_cpu_and_the_gemm_on_cuda(monkeypatch):
    """"auto" runs the module on the CPU (the model matches transformers exactly there) and the GEMM form on CUDA
    (measured 1.77-4.50x the convolution on an H200, session 28); "reference" keeps the convolution on CUDA too."""
    from llava_fast import backend

    conv = nn.Conv2d(3, 16, 14, stride=14)
    assert not gemm_usable(conv, torch.randn(1, 3, 14, 14))
    assert "patch_embed" not in backend.AUTO_REFERENCE
    monkeypatch.setattr(backend, "_UNSUPPORTED_GPU", "")     # as on an H100 (no GPU here to ask)
    assert backend.use_fast("patch_embed", "cuda")
    backend.set_backend("patch_embed", "reference")
    try:
        assert not backend.use_fast("patch_embed", "cuda")
    finally:
        backend.set_backend("patch_embed", "auto")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tiles,size,d,bias", [(8, 336, 1024, False), (6, 384, 1152, True)])
def test_cuda_gemm_by_flash_rule(tiles, size, d, bias, dtype):
    """CLIP-L/336's and SigLIP/384's patch embeddings (forward and weight gradient; fewer tiles than the workloads:
    the fp32 reference runs on the CPU, with no TF32) on the GPU: the GEMM form within twice the error of the
    convolution in the same dtype."""
    from utils import assert_flash_rule

    torch.manual_seed(0)
    x32 = torch.randn(tiles, 3, size, size)
    conv = nn.Conv2d(3, d, 14, stride=14, bias=bias)
    gout32 = torch.randn(tiles, (size // 14) ** 2, d)
    ref = patch_embed_ref(x32, conv.weight, conv.bias)
    (ref_w,) = torch.autograd.grad(ref, [conv.weight], gout32)
    low = conv.to("cuda", dtype)
    x, gout = x32.to("cuda", dtype), gout32.to("cuda", dtype)
    res = {}
    for name, fn in (("gemm", patch_embed_gemm), ("conv", patch_embed_ref)):
        y = fn(x, low.weight, low.bias)
        (gw,) = torch.autograd.grad(y, [low.weight], gout)
        res[name] = (y.float().cpu(), gw.float().cpu())
    assert_flash_rule(res["gemm"][0], ref, res["conv"][0], name="out")
    assert_flash_rule(res["gemm"][1], ref_w, res["conv"][1], name="d weight")
