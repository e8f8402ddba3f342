"""API audit of ``rms_norm``: the Triton path (forced, interpreter on CPU) against the reference path of the same
public function, on the layouts and autograd situations tests/ops/test_rms_norm.py does not cover.

Defect fixed (the first test fails without it): a weight that is not a dense ``(N,)`` vector (a strided slice
``w[::2]``, an expanded scalar ``w.expand(N)``) was read as ``W + col``: silently wrong output, input gradient and
weight gradient (and out-of-bounds reads for the expanded case). The launchers now take ``weight.contiguous()``, so
:class:`RMSNormAct` and direct callers of ``rms_norm_fwd`` / ``rms_norm_bwd`` are covered too.
"""
import pytest
import torch

import llava_fast
from llava_fast.ops.rms_norm import rms_norm
from tests.ops.audit_common import assert_same, both, kdev  # noqa: F401 (kdev: a fixture)

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 kernel vs fp32 reference (see test_rms_norm.py)


def _both(fn):
    return both("rms_norm", fn, 11)


def _assert_same(ref, got, tol=TOL):
    assert_same(ref, got, **tol)


# ---------------------------------------------------------------------------------------------- fixed defect
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("weight_view", ["strided", "expanded"])
def test_weight_views(weight_view, residual, kdev):
    n = 12

    def f():
        x = torch.randn(5, n, requires_grad=True)
        r = torch.randn(5, n, requires_grad=True) if residual else None
        if weight_view == "strided":
            w0 = (1 + 0.3 * torch.randn(2 * n)).requires_grad_()
            w = w0[::2]
        else:
            w0 = torch.tensor([1.7], requires_grad=True)
            w = w0.expand(n)
        out = rms_norm(x, w, 1e-6, residual=r)
        y = out[0] if residual else out
        loss = (y * torch.randn(y.shape)).sum() + ((out[1] ** 2).sum() if residual else 0)
        leaves = [x, w0] + ([r] if residual else [])
        return [y.detach(), *torch.autograd.grad(loss, leaves)]

    _assert_same(*_both(f))


# ------------------------------------------------------------------------------ checked and found correct
@pytest.mark.parametrize("case", ["expanded_grad", "strided_grad", "transposed_x", "sliced_x", "zero_rows",
                                  "single_row", "odd_3d", "weight_frozen", "x_frozen", "only_y_used",
                                  "only_s_used", "residual_is_x", "retain_graph"])
def test_layouts_and_autograd_cases(case, kdev):
    n = 12
    residual = case in ("weight_frozen", "x_frozen", "only_y_used", "only_s_used", "residual_is_x",
                        "retain_graph", "strided_grad")

    def f():
        shape = {"zero_rows": (0, n), "single_row": (1, n), "odd_3d": (2, 3, 7)}.get(case, (3, 4, n))
        if case == "transposed_x":
            x0 = torch.randn(shape[-1], *shape[:-1], requires_grad=True)
            x = x0.movedim(0, -1)
        elif case == "sliced_x":
            x0 = torch.randn(*shape[:-1], 2 * shape[-1], requires_grad=True)
            x = x0[..., 1::2]
        else:
            x0 = x = torch.randn(shape, requires_grad=case != "x_frozen")
        w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_(case != "weight_frozen")
        r = None
        if residual:
            r = x if case == "residual_is_x" else torch.randn(shape, requires_grad=True)
        out = rms_norm(x, w, 1e-6, residual=r)
        y, s = out if residual else (out, None)
        if case == "expanded_grad":
            loss = y.sum()
        elif case == "strided_grad":
            loss = (y[..., ::2] * 3).sum() + (s[..., 1::2] ** 2).sum()
        elif case == "only_y_used":
            loss = (y * torch.randn(y.shape)).sum()
        elif case == "only_s_used":
            loss = (s ** 2).sum()
        else:
            loss = (y * torch.randn(y.shape)).sum() + ((s * torch.randn(s.shape)).sum() if residual else 0)
        leaves = [t for t in (x0, w, r) if t is not None and t.requires_grad]
        if case == "residual_is_x":
            leaves = [x0, w]
        g = torch.autograd.grad(loss, leaves, retain_graph=case == "retain_graph", allow_unused=True)
        # a weight that does not reach the loss gets None (reference) or zeros (kernel): same gradient
        g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, leaves)]
        if case == "retain_graph":
            g2 = torch.autograd.grad(loss, leaves)
            for a, b in zip(g, g2):
                assert torch.equal(a, b)
        return [y.detach()] + ([s.detach()] if residual else []) + list(g)

    _assert_same(*_both(f))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("residual", [False, True])
def test_mixed_dtypes_promote_like_the_reference(x_dtype, w_dtype, residual, kdev):
    """Output in ``promote(x, weight)``, ``s`` and the input gradients in x's dtype, dweight in the weight's."""
    def f():
        x = torch.randn(4, 16, dtype=x_dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(16)).to(w_dtype).requires_grad_()
        r = torch.randn(4, 16, dtype=x_dtype, requires_grad=True) if residual else None
        out = rms_norm(x, w, 1e-6, residual=r)
        y = out[0] if residual else out
        loss = (y.float() * torch.randn(y.shape)).sum() + ((out[1].float() ** 2).sum() if residual else 0)
        leaves = [x, w] + ([r] if residual else [])
        return [y.detach()] + ([out[1].detach()] if residual else []) + list(torch.autograd.grad(loss, leaves))

    ref, got = _both(f)
    assert got[0].dtype == torch.promote_types(x_dtype, w_dtype)
    _assert_same(ref, got, tol=dict(atol=1e-2, rtol=1e-2))
