"""GELU (exact erf and tanh): Triton kernels vs torch's ``F.gelu`` / ``gelu_backward``, and the SigLIP-style MLP
through act_linear's GeluAct with the kernels (one backward launch that also writes the forward's output) against
the eager MLP.

CPU: kernels under TRITON_INTERPRET=1 on small fp32/fp16 shapes. GPU (`cuda` marker): bf16/fp16 at the SigLIP tower's
sizes with flash-attn's rule, and torch.compile.
"""
import pytest
import torch
import torch.nn.functional as F

import llava_fast
from llava_fast.ops.act_linear import GeluAct, act_linear
from llava_fast.ops.gelu import GELUFunction, gelu, gelu_fwd, gelu_ref
from tests.utils import assert_close_verbose, assert_flash_rule

FP32_TOL = dict(atol=2e-6, rtol=1e-5)
APPROX = ["none", "tanh"]


@pytest.fixture
def kdev(device):
    with torch.device(device):
        yield device


@pytest.fixture
def triton_gelu():
    llava_fast.set_backend("gelu", "triton")
    yield
    llava_fast.set_backend("gelu", "auto")


def _grad(y, x, g):
    return torch.autograd.grad(y, x, g, retain_graph=True)[0]


# ---------------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(1,), (7, 123), (2, 3, 431), (5, 2048 + 3)])
def test_kernel_fp32_small(shape, approximate, kdev):
    x = (torch.randn(shape) * 4).requires_grad_()
    y = GELUFunction.apply(x, approximate)
    r = gelu_ref(x, approximate)
    assert_close_verbose(y, r, name="out", **FP32_TOL)
    g = torch.randn_like(y)
    assert_close_verbose(_grad(y, x, g), _grad(r, x, g), name="dx", **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])   # bf16 since session 36 (_ext.interpreter_bf16)
@pytest.mark.parametrize("approximate", APPROX)
def test_kernel_fp16_interpreter_flash_rule(approximate, kdev, dtype):
    x = (torch.randn(6, 300) * 3).to(dtype).requires_grad_()
    y = GELUFunction.apply(x, approximate)
    s = gelu_ref(x, approximate)
    x32 = x.detach().float().requires_grad_()
    f = gelu_ref(x32, approximate)
    assert_flash_rule(y, f, s, name="out")
    g = torch.randn_like(y)
    assert_flash_rule(_grad(y, x, g), _grad(f, x32, g.float()), _grad(s, x, g), name="dx")


@pytest.mark.parametrize("approximate", APPROX)
def test_backward_writes_the_forward_output(approximate, kdev, triton_gelu):
    """GeluAct.grad_with_output (act_linear's fused recomputation) returns the forward kernel's output bit for bit,
    and the gradient :meth:`grad` gives."""
    act = GeluAct(approximate)
    for dtype in (torch.float32, torch.float16):
        h = torch.randn(3, 517).to(dtype) * 3
        da = torch.randn(3, 517).to(dtype)
        (dx,), out = act.grad_with_output(da, (h,), (True,))
        assert torch.equal(out, gelu_fwd(h, approximate)) and torch.equal(out, act(h))
        assert torch.equal(dx, act.grad(da, (h,), None, (True,))[0])


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("approximate", APPROX)
def test_mlp_through_act_linear(approximate, kernels, kdev):
    """fc2(gelu(fc1(x))) by act_linear (the activation recomputed in the backward, fc2's weight gradient from the
    backward's output) against the eager MLP: output and every gradient; torch's kernels on the CPU give the eager
    bits exactly."""
    g = torch.Generator(device=kdev).manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g, device=kdev).requires_grad_()
    w1, w2 = (torch.randn(n, k, generator=g, device=kdev).div(4).requires_grad_() for n, k in ((40, 16), (16, 40)))
    b1, b2 = (torch.randn(n, generator=g, device=kdev).requires_grad_() for n in (40, 16))
    gy = torch.randn(2, 9, 16, generator=g, device=kdev)
    leaves = [x, w1, b1, w2, b2]
    ref = F.linear(gelu_ref(F.linear(x, w1, b1), approximate), w2, b2)
    want = torch.autograd.grad(ref, leaves, gy)
    llava_fast.set_backend("gelu", "triton" if kernels else "reference")
    try:
        out = act_linear(GeluAct(approximate), (F.linear(x, w1, b1),), w2, b2)
        got = torch.autograd.grad(out, leaves, gy)
    finally:
        llava_fast.set_backend("gelu", "auto")
    tol = dict(atol=1e-5, rtol=1e-5) if kernels else dict(atol=0, rtol=0)
    assert_close_verbose(out, ref, name="out", **tol)
    for name, a, b in zip(["dx", "dw1", "db1", "dw2", "db2"], got, want):
        assert_close_verbose(a, b, name=name, **(dict(atol=1e-4, rtol=1e-4) if kernels else tol))


def test_compile_aot_eager(kdev, triton_gelu):
    x = torch.randn(4, 100, requires_grad=True)
    y = torch.compile(gelu, backend="aot_eager", fullgraph=True)(x, "tanh")
    gx = _grad(y, x, torch.ones_like(y))
    r = gelu_ref(x, "tanh")
    assert_close_verbose(y, r, name="out", **FP32_TOL)
    assert_close_verbose(gx, _grad(r, x, torch.ones_like(r)), name="grad", **FP32_TOL)


def test_bad_inputs():
    with pytest.raises(ValueError, match="gelu: x must be"):
        gelu(torch.arange(4))
    with pytest.raises(ValueError, match="approximate must be"):
        gelu(torch.randn(3), "sigmoid")


# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7290, 4304), (3, 517, 1237), (1, 4304)])
def test_cuda_flash_rule(shape, dtype, approximate, triton_gelu):
    x = (torch.randn(shape, device="cuda") * 3).to(dtype).requires_grad_()
    y = gelu(x, approximate)
    assert y.grad_fn is not None and "GELUFunction" in type(y.grad_fn).__name__   # the kernel, not F.gelu
    s = gelu_ref(x, approximate)
    x32 = x.detach().float().requires_grad_()
    f = gelu_ref(x32, approximate)
    assert_flash_rule(y, f, s, name="out")
    g = torch.randn_like(y)
    assert_flash_rule(_grad(y, x, g), _grad(f, x32, g.float()), _grad(s, x, g), name="dx")


@pytest.mark.cuda
def test_cuda_torch_compile(triton_gelu):
    x = torch.randn(2048, 4304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.compile(gelu, fullgraph=True)(x, "tanh")
    e = gelu(x, "tanh")
    assert torch.equal(y, e)
    g = torch.randn_like(y)
    assert torch.equal(_grad(y, x, g), _grad(e, x, g))

