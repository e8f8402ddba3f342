"""Audit of patch_hf under mixed precision: fp32 weights under autocast (how HF users train), fp16 weights, and a model
patched then moved with ``.to(dtype)``. The patched model's error against an fp32 reference must stay within ~2x the
unpatched model's at the same precision (plus a small absolute slack for the tiny model's rounding noise).

fp16 only for the GEMM kernels (the Triton interpreter's bf16 tl.dot is wrong); note also that the interpreter rounds
fp32 -> bf16 by truncation, so bf16 comparisons of any kernel under the interpreter overstate its error ~2x."""
from __future__ import annotations

import copy

import pytest
import torch

from llava_fast.patching import patch_hf

from test_patch_hf import _inputs
from tiny import hf_model


def _run(model, kw, autocast=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(**kw)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float().detach(), out.loss.float().detach(), grads


def _within(name, got, low, ref, slack):
    err, base = (got - ref).abs().max().item(), (low - ref).abs().max().item()
    assert err <= 2 * base + slack, f"{name}: patched error {err:.3e} > 2 x unpatched {base:.3e} + {slack:.0e}"


def _check_against_ref(patched, unpatched, ref, slack=2e-4):
    (pl, ploss, pg), (ul, uloss, ug), (rl, rloss, rg) = patched, unpatched, ref
    _within("logits", pl, ul, rl, slack)
    _within("loss", ploss, uloss, rloss, slack)
    assert pg.keys() == ug.keys()
    for n in pg:
        _within(n, pg[n], ug[n], rg[n], slack * max(1.0, rg[n].abs().max().item()))


def test_attention_under_autocast(forced):
    """fp32 weights under fp16 autocast: transformers' RoPE multiplies q/k by its fp32 cos/sin, so the attention gets fp32
    q/k next to an fp16 v. The patched attention handed them to the kernel as they were, which refuses mixed dtypes
    (ValueError on every training step); transformers' eager / SDPA paths run the attention in the autocast dtype."""
    base = hf_model("llava")
    ids = torch.randint(0, 100, (2, 16))
    kw = dict(input_ids=ids, labels=ids)
    ref = _run(copy.deepcopy(base), kw)
    low = _run(copy.deepcopy(base), kw, torch.float16)
    hf = patch_hf(copy.deepcopy(base), rms_norm=False, swiglu=False, projector=False)
    forced("attention")
    got = _run(hf, kw, torch.float16)
    _check_against_ref(got, low, ref)


def test_projector_under_autocast(forced):
    """fp32 weights under fp16 autocast: the patched projector passed the fp32 weights and the features to the fused op,
    which refuses mixed dtypes (ValueError); nn.Linear under autocast runs in the autocast dtype."""
    hf = hf_model("llava")
    proj = hf.model.multi_modal_projector
    x = torch.randn(2, 9, proj.linear_1.in_features)

    def run(autocast):
        proj.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            y = proj(xi)
        y.float().pow(2).sum().backward()
        return y, [xi.grad] + [p.grad.clone() for p in proj.parameters()]

    ref_y, ref_g = run(None)
    low_y, low_g = run(torch.float16)
    patch_hf(hf)
    forced("projector")
    y, g = run(torch.float16)
    assert y.dtype == low_y.dtype == torch.float16
    assert [t.dtype for t in g] == [t.dtype for t in low_g]  # fp32 gradients for the fp32 master weights
    _within("y", y.float(), low_y.float(), ref_y, 1e-4)
    for i, (a, b, r) in enumerate(zip(g, low_g, ref_g)):
        _within(f"grad {i}", a, b, r, 1e-4 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("case", ["autocast", "patch_then_to"])
def test_patched_model_mixed_precision(case, forced):
    """The whole patched model, every kernel forced: fp32 weights under fp16 autocast, and a model patched in fp32 then
    moved with ``.to(torch.float16)``, against the unpatched model at the same precision."""
    base = hf_model("llava")
    kw = _inputs("llava")
    ref = _run(copy.deepcopy(base), kw)
    if case == "autocast":
        low = _run(copy.deepcopy(base), kw, torch.float16)
        hf, ac = patch_hf(copy.deepcopy(base)), torch.float16
    else:
        kw = dict(kw, pixel_values=kw["pixel_values"].half())
        low = _run(copy.deepcopy(base).to(torch.float16), kw)
        hf, ac = patch_hf(copy.deepcopy(base)).to(torch.float16), None
    forced("rms_norm", "swiglu", "attention", "vision_attention", "projector")
    got = _run(hf, kw, ac)
    _check_against_ref(got, low, ref, slack=5e-4)
