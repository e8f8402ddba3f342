"""Bias gradient (column sums): the Triton kernels vs ``dy.sum(0)``, and act_linear's bias gradients with them.

CPU: kernels under TRITON_INTERPRET=1 on small fp32/fp16 shapes (odd widths, several row shares). GPU (`cuda` marker):
bf16/fp16 at the towers' sizes with flash-attn's rule.
"""
import pytest
import torch
import torch.nn.functional as F

import llava_fast
from llava_fast.ops.bias_grad import bias_grad, bias_grad_fwd, bias_grad_ref
from tests.utils import assert_close_verbose, assert_flash_rule


@pytest.fixture
def kdev(device):
    with torch.device(device):
        yield device


@pytest.fixture
def triton_bias():
    llava_fast.set_backend("bias_grad", "triton")
    yield
    llava_fast.set_backend("bias_grad", "auto")


@pytest.mark.parametrize("shape", [(1, 1), (7, 123), (100, 129), (257, 64), (33, 300)])
def test_kernel_fp32(shape, kdev):
    dy = torch.randn(shape) * 3
    # flash-attn's rule against an fp64 sum; in fp32 torch's own error can be ~0, so allow 8 ULP of sum(|dy|) more
    # (a summation in another order errs by up to rows x ULP of that)
    atol = 8 * torch.finfo(torch.float32).eps * dy.abs().sum(0).max().item()
    assert_flash_rule(bias_grad_fwd(dy), dy.double().sum(0).float(), bias_grad_ref(dy), name="db", atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])   # bf16 since session 36 (_ext.interpreter_bf16)
def test_kernel_fp16_flash_rule(kdev, dtype):
    dy = torch.randn(300, 77).to(dtype)
    assert_flash_rule(bias_grad_fwd(dy), dy.float().sum(0), bias_grad_ref(dy), name="db")


def test_no_rows_and_strided_rows(kdev):
    assert torch.equal(bias_grad_fwd(torch.zeros(0, 9)), torch.zeros(9))
    big = torch.randn(40, 50)
    view = big[:, :37]                  # rows of stride 50: read in place
    assert_close_verbose(bias_grad_fwd(view), view.sum(0), name="db", atol=1e-5, rtol=1e-5)


def test_deterministic(kdev):
    dy = torch.randn(513, 200)
    assert torch.equal(bias_grad_fwd(dy), bias_grad_fwd(dy))


def test_act_linear_bias_grads(kdev, triton_bias):
    """The linears' bias gradients in act_linear's backward come from the kernels and equal autograd's."""
    from llava_fast.ops.act_linear import GeluAct, act_linear

    g = torch.Generator(device=kdev).manual_seed(0)
    h = torch.randn(3, 11, 20, generator=g, device=kdev).requires_grad_()
    w = torch.randn(16, 20, generator=g, device=kdev).div(4).requires_grad_()
    b = torch.randn(16, generator=g, device=kdev).requires_grad_()
    gy = torch.randn(3, 11, 16, generator=g, device=kdev)
    want = torch.autograd.grad(F.linear(F.gelu(h), w, b), [h, w, b], gy)
    got = torch.autograd.grad(act_linear(GeluAct(), (h,), w, b), [h, w, b], gy)
    for name, a, e in zip(["dh", "dw", "db"], got, want):
        assert_close_verbose(a, e, name=name, atol=1e-4, rtol=1e-4)


def test_auto_keeps_torch_and_bad_input():
    dy = torch.randn(5, 3)
    assert torch.equal(bias_grad(dy), dy.sum(0))      # opt-in: "auto" is torch's sum
    with pytest.raises(ValueError, match="bias_grad: dy must be a 2-D"):
        bias_grad(torch.randn(2, 3, 4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(10206, 1152), (10206, 4304), (10906, 128), (1, 896), (9232, 1024)])
def test_cuda_flash_rule(shape, dtype, triton_bias):
    dy = torch.randn(shape, device="cuda").to(dtype)
    out = bias_grad(dy)
    assert_flash_rule(out, dy.float().sum(0), dy.sum(0), name="db")
