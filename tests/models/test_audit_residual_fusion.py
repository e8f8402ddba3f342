"""Audit of the residual adds fused into the RMSNorm kernels (models/language.py ``norm_linears`` / the deferred MLP
add, ops/act_linear.py ``residual_act_linears``): cases the change's own tests left out. Each test runs a tiny
language model with the kernels forced (the interpreter on the CPU) and compares with the unfused path
(``LLAVA_FAST_FUSE_RESIDUAL=0``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.modules.module as nn_module

from llava_fast.models.config import TextConfig
from llava_fast.models.language import MLP, Attention, DecoderLayer, LanguageModel
from llava_fast.models.layers import RMSNorm

D = 48


def _lm(layers=3, seed=0):
    cfg = TextConfig.from_dict(dict(model_type="qwen2", vocab_size=128, hidden_size=D, intermediate_size=72,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(seed)
    m = LanguageModel(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def _run(m, emb, monkeypatch, fuse: bool):
    """Output and every gradient (parameters and input) of one forward + backward."""
    monkeypatch.setenv("LLAVA_FAST_FUSE_RESIDUAL", "1" if fuse else "0")
    m.zero_grad(set_to_none=True)
    e = emb.detach().clone().requires_grad_()
    out = m(e)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    grads["inputs_embeds"] = e.grad.clone()
    return out.detach(), grads


def _assert_same(got, want):
    assert torch.equal(got[0], want[0]), (got[0] - want[0]).abs().max()
    assert got[1].keys() == want[1].keys()
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], atol=1e-6, rtol=1e-6, msg=lambda s: f"{n}: {s}")


@pytest.fixture
def kernels(forced):
    forced("rms_norm", "rope", "swiglu")


# --------------------------------------------------------------------------------------------------------------------
# hooks registered for every module (torch.nn.modules.module.register_module_forward_hook and the like)
# --------------------------------------------------------------------------------------------------------------------
def test_global_forward_hooks_see_the_usual_outputs(kernels, monkeypatch):
    """A global forward hook sees each decoder layer's, MLP's and attention's usual output (one tensor), and the
    output it returns replaces it, as on the unfused path; a global hook on the norms fires for the final norm too
    (the deferred add must not skip calling it)."""
    m = _lm()
    emb = torch.randn(2, 9, D)
    seen = []

    def hook(mod, args, out):
        if isinstance(mod, (DecoderLayer, MLP, Attention, RMSNorm)):
            seen.append((type(mod).__name__, type(out).__name__))
        if isinstance(mod, DecoderLayer) and isinstance(out, torch.Tensor):
            return out * 1.25
        if mod is m.norm:
            return out - 0.5

    h = nn_module.register_module_forward_hook(hook)
    try:
        got = _run(m, emb, monkeypatch, True)
        fused_seen, seen[:] = list(seen), []
        want = _run(m, emb, monkeypatch, False)
    finally:
        h.remove()
    assert {t for _, t in fused_seen} == {"Tensor"}, sorted(set(fused_seen))
    assert {t for _, t in seen} == {"Tensor"}, sorted(set(seen))
    assert ("RMSNorm", "Tensor") in fused_seen                  # the final norm was called
    assert sorted(fused_seen) == sorted(seen)
    _assert_same(got, want)


def test_global_backward_hook_gets_one_output_gradient_per_layer(kernels, monkeypatch):
    """A global full backward hook gets a decoder layer's output gradient (one tensor), not a deferred pair's."""
    m = _lm()
    emb = torch.randn(2, 9, D)
    sizes = []

    def hook(mod, grad_in, grad_out):
        if isinstance(mod, DecoderLayer):
            sizes.append(len(grad_out))

    h = nn_module.register_module_full_backward_hook(hook)
    try:
        _run(m, emb, monkeypatch, True)
    finally:
        h.remove()
    assert sizes == [1] * len(m.layers), sizes


# --------------------------------------------------------------------------------------------------------------------
# a wrapper around a decoder layer, its MLP or its attention (torch.compile(module), checkpoint_wrapper): the wrapped
# module's hooks still see its usual output, so the wrapper is not handed a pair
# --------------------------------------------------------------------------------------------------------------------
def _compiled(layer):
    return torch.compile(layer, backend="eager")


def _checkpointed(layer):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapper(layer)


@pytest.mark.parametrize("wrap", [_compiled, _checkpointed], ids=["torch_compile", "checkpoint_wrapper"])
@pytest.mark.parametrize("where", ["layer", "mlp", "self_attn"])
def test_wrapped_hooked_module_sees_its_usual_output(kernels, monkeypatch, wrap, where):
    """A hook on a decoder layer, its MLP or its attention, the module then wrapped (replaced in the model by
    ``torch.compile(module)`` or ``checkpoint_wrapper(module)``): the hook gets the module's usual output (a tensor)
    and what it returns replaces it, as on the unfused path."""
    m = _lm()
    emb = torch.randn(2, 9, D)
    seen = []

    def hook(mod, args, out):
        seen.append(type(out).__name__)
        return out * 1.5 if isinstance(out, torch.Tensor) else None

    parent, name = (m.layers, "1") if where == "layer" else (m.layers[1], where)
    module = getattr(parent, name)
    module.register_forward_hook(hook)
    setattr(parent, name, wrap(module))
    try:
        got = _run(m, emb, monkeypatch, True)
        want = _run(m, emb, monkeypatch, False)
    finally:
        torch._dynamo.reset()
    assert seen == ["Tensor"] * 2, seen
    _assert_same(got, want)
