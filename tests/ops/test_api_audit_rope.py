"""API audit of ``rope``: the Triton path (forced, interpreter on CPU) against the reference path of the same public
function, on the layouts and autograd situations tests/ops/test_rope.py does not cover.

Defects fixed (each test below fails without its fix):

* a ``cos_sin_cache`` whose tables are not dense row-major ``(P, D/2)`` (a transposed copy, a strided slice of a wider
  table, cos and sin with different row strides) was read as if it were: silently wrong angles, forward and backward;
* ``inplace=True`` with q and k sharing memory (the same tensor twice, overlapping views) rotated the shared elements
  twice; the reference rotates once (``q.copy_(qe); k.copy_(ke)``);
* ``inplace=True`` under autograd with q / k views of a fused qkv tensor (the documented layout) raised autograd's
  "modifies inplace an input that is a view ... cannot return more than one Tensor" error.
"""
import pytest
import torch

import llava_fast
from llava_fast.ops import rope as rope_mod
from llava_fast.ops.rope import rope, rope_cos_sin_cache
from tests.ops.audit_common import assert_same, both, kdev  # noqa: F401 (kdev: a fixture)

# fp32 kernel vs fp32 reference: cos/sin from numpy (interpreter) vs torch differ by 1-2 ulp (see test_rope.py)
TOL = dict(atol=2e-6, rtol=1e-5)


def _both(fn):
    return both("rope", fn, 7)


def _assert_same(ref, got, tol=TOL):
    assert_same(ref, got, **tol)


def _pos(t):
    return torch.cat([torch.arange(t // 2), torch.arange(t - t // 2)]) * 5


# ---------------------------------------------------------------------------------------------- fixed defects
@pytest.mark.parametrize("layout", ["transposed", "sliced", "mixed_strides"])
def test_cache_tables_of_any_layout(layout, kdev):
    t, hq, hkv, d = 7, 3, 2, 8
    cos, sin = rope_cos_sin_cache(64, d, 1e4, kdev)
    if layout == "transposed":  # column-major copy: same values, strides (1, P)
        cos, sin = cos.t().contiguous().t(), sin.t().contiguous().t()
    elif layout == "sliced":  # every other column of a wider table: last stride 2
        cos, sin = torch.stack([cos, -cos], -1).flatten(1)[:, ::2], torch.stack([sin, -sin], -1).flatten(1)[:, ::2]
    else:  # cos dense, sin the first half of a (P, D) table: row strides D/2 and D
        sin = torch.cat([sin, torch.zeros_like(sin)], 1)[:, : d // 2]
    assert cos.shape == sin.shape == (64, d // 2)

    def f():
        q = torch.randn(t, hq, d, requires_grad=True)
        k = torch.randn(t, hkv, d, requires_grad=True)
        qo, ko = rope(q, k, _pos(t), cos_sin_cache=(cos, sin))
        g = torch.autograd.grad((qo * torch.randn(qo.shape)).sum() + (ko * torch.randn(ko.shape)).sum(), [q, k])
        return [qo.detach(), ko.detach(), *g]

    _assert_same(*_both(f))


@pytest.mark.parametrize("alias", ["same_tensor", "overlapping_views"])
def test_inplace_with_q_and_k_sharing_memory(alias, kdev):
    t, d = 6, 8

    def f():
        x = torch.randn(t, 3, d)
        q, k = (x, x) if alias == "same_tensor" else (x[:, :2], x[:, 1:])
        with torch.no_grad():
            qo, ko = rope(q, k, _pos(t), inplace=True)
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
        return [qo.clone(), ko.clone(), x.clone()]

    _assert_same(*_both(f))


@pytest.mark.parametrize("grad_kind", ["random", "sum", "q_only"])
def test_inplace_on_fused_qkv_views_under_autograd(grad_kind, kdev):
    t, hq, hkv, d = 7, 3, 1, 8

    def f():
        w = torch.randn(t, hq + 2 * hkv, d, requires_grad=True)
        qkv = w * 1.5  # an activation: q and k are views of it, as slices of a fused qkv projection
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
        qo, ko = rope(q, k, _pos(t), inplace=True)
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
        if grad_kind == "random":
            loss = (qkv * torch.randn(qkv.shape)).sum()  # through the base: rotated q, k and untouched v
        elif grad_kind == "sum":
            loss = qo.sum() + ko.sum() + v.sum()
        else:
            loss = (qo ** 2).sum()
        (g,) = torch.autograd.grad(loss, [w])
        return [qkv.detach().clone(), g]

    _assert_same(*_both(f))


def test_fused_qkv_slices_are_not_treated_as_overlapping():
    """The in-place kernel keeps the no-copy fast path for the layouts models use."""
    _may_overlap = rope_mod._may_overlap
    t, hq, hkv, d = 5, 4, 2, 8
    qkv = torch.randn(t, hq + 2 * hkv, d)
    assert not _may_overlap(qkv[:, :hq], qkv[:, hq:hq + hkv])
    assert not _may_overlap(qkv[:1, :hq], qkv[:1, hq:hq + hkv])
    b4 = torch.randn(2, 3, hq + 2 * hkv, d)
    assert not _may_overlap(b4[:, :, :hq], b4[:, :, hq:hq + hkv])
    s3 = torch.randn(t, 3, hq, d)
    assert not _may_overlap(s3[:, 0], s3[:, 1])
    assert not _may_overlap(torch.randn(t, hq, d), torch.randn(t, hkv, d))
    x = torch.randn(t, 3, d)
    assert _may_overlap(x, x) and _may_overlap(x[:, :2], x[:, 1:]) and not _may_overlap(x[:, :2], x[:, 2:])


# ------------------------------------------------------------------------------ checked and found correct
@pytest.mark.parametrize("grad_kind", ["random", "expanded", "strided", "q_only"])
def test_fused_qkv_views_out_of_place(grad_kind, kdev):
    t, hq, hkv, d = 7, 3, 2, 8

    def f():
        w = torch.randn(t, hq + 2 * hkv, d, requires_grad=True)
        qkv = w * 1.0
        qo, ko = rope(qkv[:, :hq], qkv[:, hq:hq + hkv], _pos(t))
        if grad_kind == "random":
            loss = (qo * torch.randn(qo.shape)).sum() + (ko * torch.randn(ko.shape)).sum()
        elif grad_kind == "expanded":  # .sum() hands the backward an expanded (all-zero-stride) gradient
            loss = qo.sum() + ko.sum()
        elif grad_kind == "strided":
            loss = (qo[..., ::2] * torch.arange(d // 2)).sum() + (ko * 2).sum()
        else:  # k unused downstream: its gradient is materialized as zeros
            loss = (qo ** 2).sum()
        (g,) = torch.autograd.grad(loss, [w])
        return [qo.detach(), ko.detach(), g]

    _assert_same(*_both(f))


@pytest.mark.parametrize("case", ["transposed_4d", "zero_tokens", "single_token", "k_frozen", "same_tensor",
                                  "retain_graph", "int32_positions"])
def test_layouts_and_autograd_cases(case, kdev):
    def f():
        if case == "transposed_4d":  # (B, H, S, D) tensors viewed as (B, S, H, D)
            qb = torch.randn(2, 3, 5, 8, requires_grad=True)
            kb = torch.randn(2, 2, 5, 8, requires_grad=True)
            q, k, leaves = qb.transpose(1, 2), kb.transpose(1, 2), [qb, kb]
            pos = torch.stack([torch.arange(5), torch.arange(5) + 3])
        else:
            t = {"zero_tokens": 0, "single_token": 1}.get(case, 7)
            q = torch.randn(t, 3, 8, requires_grad=True)
            k = torch.randn(t, 2, 8, requires_grad=case != "k_frozen")
            if case == "same_tensor":
                k = q
            leaves = [q] if case in ("k_frozen", "same_tensor") else [q, k]
            pos = _pos(t)
            if case == "int32_positions":
                pos = pos.int()[None]
        qo, ko = rope(q, k, pos)
        loss = (qo * 1.5).sum() + (ko ** 2).sum()
        g = torch.autograd.grad(loss, leaves, retain_graph=case == "retain_graph")
        if case == "retain_graph":  # a second backward through the same graph gives the same gradients
            g2 = torch.autograd.grad(loss, leaves)
            for a, b in zip(g, g2):
                assert torch.equal(a, b)
        return [qo.detach(), ko.detach(), *g]

    _assert_same(*_both(f))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_keep_dtype(dtype, kdev):
    def f():
        q = torch.randn(6, 2, 8, dtype=dtype, requires_grad=True)
        k = torch.randn(6, 1, 8, dtype=dtype, requires_grad=True)
        qo, ko = rope(q, k, _pos(6))
        g = torch.autograd.grad(qo.float().sum() + (ko.float() ** 2).sum(), [q, k])
        return [qo.detach(), ko.detach(), *g]

    ref, got = _both(f)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype == dtype
    # the interpreter rounds fp32 -> bf16 by truncation: a couple of ulp of |x| <= ~5
    _assert_same(ref, got, tol=dict(atol=0.1 if dtype == torch.bfloat16 else 1e-2, rtol=2e-2))
