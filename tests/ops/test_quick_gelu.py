"""QuickGELU: Triton kernel vs the reference (transformers' ``QuickGELUActivation``), forward and backward, and the CLIP
MLP through act_linear with the kernel against the eager one.

CPU: kernel under TRITON_INTERPRET=1 on small fp32/fp16 shapes. GPU (`cuda` marker): bf16/fp16 at the CLIP towers'
sizes with flash-attn's rule, and torch.compile.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import QuickGELUActivation

import llava_fast
from llava_fast.ops.quick_gelu import QuickGELUFunction, QuickGeluAct, quick_gelu, quick_gelu_fwd, quick_gelu_ref
from tests.utils import assert_close_verbose, assert_flash_rule

# fp32 kernel vs torch: x/(1+exp(-t)) vs torch's sigmoid, exp by ex2 in Triton: a few ulp relative
FP32_TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture
def kdev(device):
    """Small kernel tests: the CPU interpreter here, the real GPU on a CUDA machine."""
    with torch.device(device):
        yield device


def _grad(y, x, g):
    return torch.autograd.grad(y, x, g, retain_graph=True)[0]


# ---------------------------------------------------------------------------------------------------------------- CPU
def test_reference_is_transformers():
    x = torch.randn(4, 33) * 5
    assert torch.equal(quick_gelu_ref(x), QuickGELUActivation()(x))
    assert torch.equal(quick_gelu_ref(x.bfloat16()), QuickGELUActivation()(x.bfloat16()))


@pytest.mark.parametrize("shape", [(1,), (7, 123), (2, 3, 431), (5, 2048 + 3)])
def test_kernel_fp32_small(shape, kdev):
    x = (torch.randn(shape) * 6).requires_grad_()   # out to the saturated ends of the sigmoid
    y = QuickGELUFunction.apply(x)
    r = quick_gelu_ref(x)
    assert_close_verbose(y, r, name="out", **FP32_TOL)
    g = torch.randn_like(y)
    assert_close_verbose(_grad(y, x, g), _grad(r, x, g), name="dx", **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])   # bf16 since session 36 (_ext.interpreter_bf16)
def test_kernel_fp16_interpreter_flash_rule(kdev, dtype):
    x = (torch.randn(6, 300) * 4).to(dtype).requires_grad_()
    y = QuickGELUFunction.apply(x)
    s = quick_gelu_ref(x)
    x32 = x.detach().float().requires_grad_()
    f = quick_gelu_ref(x32)
    assert_flash_rule(y, f, s, name="out")
    g = torch.randn_like(y)
    assert_flash_rule(_grad(y, x, g), _grad(f, x32, g.float()), _grad(s, x, g), name="dx")


def test_forward_rounds_as_transformers(kdev):
    """In fp16 the forward rounds 1.702 * x and the sigmoid to fp16 as torch's ops do: the kernel's output equals the
    eager expression's except where Triton's exp and torch's differ by an ulp before the rounding (rare)."""
    x = torch.randn(4096) * 4
    y = quick_gelu_fwd(x.half())
    r = quick_gelu_ref(x.half())
    assert (y != r).float().mean() < 0.01
    assert_close_verbose(y.float(), r.float(), name="out", atol=1e-3, rtol=1e-3)


def test_backward_writes_the_forward_output(kdev):
    """grad_with_output (act_linear's fused recomputation) returns the forward kernel's output bit for bit."""
    act = QuickGeluAct()
    llava_fast.set_backend("quick_gelu", "triton")
    try:
        for dtype in (torch.float32, torch.float16):
            h = torch.randn(3, 517).to(dtype) * 3
            da = torch.randn(3, 517).to(dtype)
            (dx,), out = act.grad_with_output(da, (h,), (True,))
            assert torch.equal(out, quick_gelu_fwd(h))
            assert torch.equal(dx, act.grad(da, (h,), None, (True,))[0])
    finally:
        llava_fast.set_backend("quick_gelu", "auto")


def test_clip_mlp_through_act_linear(kdev):
    """fc2(quick_gelu(fc1(x))) by act_linear with the kernel (recomputed, differentiated by the backward kernel)
    against the eager MLP: output and every gradient."""
    from llava_fast.ops.act_linear import act_linear

    g = torch.Generator(device=kdev).manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g, device=kdev).requires_grad_()
    w1, w2 = (torch.randn(n, k, generator=g, device=kdev).div(4).requires_grad_() for n, k in ((40, 16), (16, 40)))
    b1, b2 = (torch.randn(n, generator=g, device=kdev).requires_grad_() for n in (40, 16))
    gy = torch.randn(2, 9, 16, generator=g, device=kdev)
    leaves = [x, w1, b1, w2, b2]
    ref = F.linear(quick_gelu_ref(F.linear(x, w1, b1)), w2, b2)
    want = torch.autograd.grad(ref, leaves, gy)
    llava_fast.set_backend("quick_gelu", "triton")
    try:
        out = act_linear(QuickGeluAct(), (F.linear(x, w1, b1),), w2, b2)
        got = torch.autograd.grad(out, leaves, gy)
    finally:
        llava_fast.set_backend("quick_gelu", "auto")
    assert_close_verbose(out, ref, name="out", atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["dx", "dw1", "db1", "dw2", "db2"], got, want):
        assert_close_verbose(a, b, name=name, atol=1e-4, rtol=1e-4)


def test_model_activation_is_exact_on_the_cpu():
    """The towers' quick_gelu on the CPU (no kernel) is transformers' expression, differentiated by autograd."""
    from llava_fast.models.layers import get_activation

    act = get_activation("quick_gelu")
    assert isinstance(act, QuickGeluAct) and not act.usable((torch.randn(2),))
    x = torch.randn(5, 7, requires_grad=True)
    assert torch.equal(act(x), QuickGELUActivation()(x))


def test_compile_aot_eager(kdev):
    x = torch.randn(4, 100, requires_grad=True)
    llava_fast.set_backend("quick_gelu", "triton")
    try:
        y = torch.compile(quick_gelu, backend="aot_eager", fullgraph=True)(x)
        g = _grad(y, x, torch.ones_like(y))
    finally:
        llava_fast.set_backend("quick_gelu", "auto")
    r = quick_gelu_ref(x)
    assert_close_verbose(y, r, name="out", **FP32_TOL)
    assert_close_verbose(g, _grad(r, x, torch.ones_like(r)), name="grad", **FP32_TOL)


def test_bad_inputs():
    with pytest.raises(ValueError, match="quick_gelu: x must be"):
        quick_gelu(torch.arange(4))


# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(9232, 4096), (16, 577, 4096), (3, 517, 1237), (1, 4096)])
def test_cuda_flash_rule(shape, dtype):
    x = (torch.randn(shape, device="cuda") * 4).to(dtype).requires_grad_()
    y = quick_gelu(x)
    assert "QuickGELUFunction" in type(y.grad_fn).__name__   # the kernel (the CUDA default), not the reference
    s = quick_gelu_ref(x)
    assert torch.isfinite(y).all()
    x32 = x.detach().float().requires_grad_()
    f = quick_gelu_ref(x32)
    assert_flash_rule(y, f, s, name="out")
    g = torch.randn_like(y)
    assert_flash_rule(_grad(y, x, g), _grad(f, x32, g.float()), _grad(s, x, g), name="dx")


@pytest.mark.cuda
def test_cuda_torch_compile():
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.compile(quick_gelu, fullgraph=True)(x)
    e = quick_gelu(x)
    assert torch.equal(y, e)
    g = torch.randn_like(y)
    assert torch.equal(_grad(y, x, g), _grad(e, x, g))

