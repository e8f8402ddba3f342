"""API audit of ``swiglu``: the Triton path (forced, interpreter on CPU) against the reference path of the same public
function, on layouts and autograd situations tests/ops/test_swiglu.py does not cover. No defect was found; these
pin the cases checked."""
import pytest
import torch

import llava_fast
from llava_fast.ops.swiglu import swiglu
from tests.ops.audit_common import assert_same, both, kdev  # noqa: F401 (kdev: a fixture)

TOL = dict(atol=1e-6, rtol=1e-5)  # fp32 kernel vs torch (see test_swiglu.py)


def _both(fn):
    return both("swiglu", fn, 3)


def _assert_same(ref, got, tol=TOL):
    assert_same(ref, got, **tol)


@pytest.mark.parametrize("case", ["interleaved", "transposed_gate", "same_tensor", "expanded_gate", "row_broadcast",
                                  "zero_rows", "zero_cols", "single", "one_dim", "gate_frozen", "up_frozen",
                                  "expanded_grad", "strided_grad", "broadcast_grad", "retain_graph"])
def test_layouts_and_autograd_cases(case, kdev):
    shape = {"zero_rows": (0, 6), "zero_cols": (3, 0), "single": (1, 1), "one_dim": (7,)}.get(case, (2, 3, 6))

    def f():
        if case == "interleaved":  # gate/up interleaved in the last dim: non-unit last stride
            gu = torch.randn(*shape, 2, requires_grad=True)
            a, b, leaves = gu[..., 0], gu[..., 1], [gu]
        elif case == "transposed_gate":
            a0 = torch.randn(*reversed(shape), requires_grad=True)
            b0 = torch.randn(shape, requires_grad=True)
            a, b, leaves = a0.permute(*reversed(range(len(shape)))), b0, [a0, b0]
        elif case == "same_tensor":
            a0 = torch.randn(shape, requires_grad=True)
            a = b = a0
            leaves = [a0]
        elif case in ("expanded_gate", "row_broadcast"):  # zero strides in the last or the leading dims
            a0 = torch.randn(shape[-1] if case == "expanded_gate" else (*shape[:-1], 1), requires_grad=True)
            b0 = torch.randn(shape, requires_grad=True)
            a, b, leaves = a0.expand(shape), b0, [a0, b0]
        else:
            a0 = torch.randn(shape, requires_grad=case != "gate_frozen")
            b0 = torch.randn(shape, requires_grad=case != "up_frozen")
            a, b = a0 * 3, b0
            leaves = [t for t in (a0, b0) if t.requires_grad]
        c = swiglu(a, b)
        if case == "expanded_grad":
            loss = c.sum()
        elif case == "strided_grad":
            loss = (c[..., ::2] ** 2).sum()
        elif case == "broadcast_grad":  # grad of c is a (shape[-1],) vector expanded over the rows
            loss = (c * torch.randn(shape[-1])).sum()
        else:
            loss = (c * torch.randn(c.shape)).sum()
        g = torch.autograd.grad(loss, leaves, retain_graph=case == "retain_graph")
        if case == "retain_graph":
            for x, y in zip(g, torch.autograd.grad(loss, leaves)):
                assert torch.equal(x, y)
        return [c.detach(), *g]

    _assert_same(*_both(f))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_on_fused_halves(dtype, kdev):
    def f():
        gu = torch.randn(3, 34, dtype=dtype, requires_grad=True)
        a, b = gu.chunk(2, -1)
        c = swiglu(a, b)
        return [c.detach(), *torch.autograd.grad((c.float() * torch.randn(c.shape)).sum(), [gu])]

    ref, got = _both(f)
    assert got[0].dtype == got[1].dtype == dtype
    # the interpreter rounds fp32 -> bf16 by truncation: up to ~2 bf16 ulp of values <= ~4
    _assert_same(ref, got, tol=dict(atol=6e-2 if dtype == torch.bfloat16 else 4e-3, rtol=2e-2))
