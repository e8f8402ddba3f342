"""Adapters, wrappers and hooks on the model's linears (and hooks on its norms) are honoured. The layers hand plain nn.Linear weights to
ops/act_linear.py (to recompute the norm / activation in the backward); a module that computes something else when
called (peft's LoRA layers, whose ``.weight`` is only the frozen base weight; quantized linears; modules with forward
hooks) must be called instead, with and without gradients, in both towers, the language model and the projector."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import llava_fast
from llava_fast.ops.act_linear import plain_linears

from test_llava_parity import make_batch
from tiny import save_tiny


class Shifted(nn.Linear):
    """A Linear whose forward adds 0.5 (a stand-in for an adapter: same weight, different output)."""

    def forward(self, x):
        return super().forward(x) + 0.5


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _fires(register, run) -> bool:
    """Whether a hook added with ``register`` (a module's forward or backward hook registrar) is called by ``run()``."""
    calls = []
    h = register(lambda *args: calls.append(1))
    try:
        run()
    finally:
        h.remove()
    return bool(calls)


def _shifted(lin: nn.Linear) -> Shifted:
    new = Shifted(lin.in_features, lin.out_features, bias=lin.bias is not None)
    new.load_state_dict(lin.state_dict())
    return new


def test_plain_linears():
    lin = nn.Linear(4, 3)
    assert plain_linears(lin, nn.Linear(3, 2))
    assert not plain_linears(lin, _shifted(lin))           # its own forward
    assert not plain_linears(nn.Identity())                 # not a linear at all
    h = lin.register_forward_hook(lambda m, i, o: o)
    assert not plain_linears(lin)                           # a hook would be skipped
    h.remove()
    assert plain_linears(lin)


@pytest.fixture(params=["reference", "kernels"])
def paths(request):
    """The CPU reference paths, or the fused kernels (interpreter) the model uses on CUDA, forced on."""
    if request.param == "kernels":
        for op in ("projector", "swiglu", "rms_norm", "rope"):
            llava_fast.set_backend(op, "triton")
    yield request.param
    llava_fast.set_backend("all", "auto")


def test_wrapped_lm_head_is_called_by_the_loss(tmp_path, paths):
    """The fused loss takes lm_head's weight; with an adapter on lm_head the model calls it and takes the plain
    loss on its logits instead."""
    _, path = save_tiny(tmp_path, "llava_next")
    m = llava_fast.from_pretrained(path)
    llava_fast.set_backend("cross_entropy", "triton" if paths == "kernels" else "auto")
    ids = torch.randint(0, 100, (2, 9))
    base = m(input_ids=ids, labels=ids, logits=False).loss  # logits=False: the fused loss
    m.lm_head = Doubled(m.lm_head.in_features, m.lm_head.out_features, bias=False)  # a constant shift would not
    m.lm_head.weight.data.copy_(m.model.language_model.embed_tokens.weight)       # change a softmax: a scale does
    shifted = m(input_ids=ids, labels=ids, logits=False).loss
    want = torch.nn.functional.cross_entropy(m(input_ids=ids).logits[:, :-1].reshape(-1, m.lm_head.out_features),
                                             ids[:, 1:].reshape(-1))
    assert not torch.equal(shifted, base)
    torch.testing.assert_close(shifted, want)


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_wrapped_and_hooked_linears_are_called(tmp_path, model_type, grad, paths):
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    m.train(grad)
    batch = make_batch(model_type, [[(40, 60)], []], left_pad=False)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])

    def logits():
        with torch.set_grad_enabled(grad):
            out = m(**kw).logits
        if grad:
            out.float().square().mean().backward()
        return out.detach()

    base = logits()
    lm, vt = m.model.language_model.layers[0], m.model.vision_tower
    vlayer = vt.layers[0] if hasattr(vt, "layers") else vt.encoder.layers[0]
    # every kind of site: LM q/k/v (with the norm), gate/up (with the norm), down; vision q/k/v, fc1, fc2; projector
    sites = {"lm.q_proj": (lm.self_attn, "q_proj"), "lm.up_proj": (lm.mlp, "up_proj"),
             "lm.down_proj": (lm.mlp, "down_proj"), "vision.v_proj": (vlayer.self_attn, "v_proj"),
             "vision.fc1": (vlayer.mlp, "fc1"), "vision.fc2": (vlayer.mlp, "fc2"),
             "projector.linear_2": (m.model.multi_modal_projector, "linear_2")}
    for name, (parent, attr) in sites.items():
        orig = getattr(parent, attr)
        setattr(parent, attr, _shifted(orig))
        try:
            assert not torch.equal(logits(), base), f"{name}: the wrapper's forward was not called"
        finally:
            setattr(parent, attr, orig)
        assert _fires(orig.register_forward_hook, logits), f"{name}: a forward hook on it was not called"
    # the norms whose output the fused paths recompute: a hook on one is called, and can change the output
    for name, norm in {"lm.input_layernorm": lm.input_layernorm, "lm.post_attention_layernorm":
                       lm.post_attention_layernorm, "vision.layer_norm1": vlayer.layer_norm1,
                       "vision.layer_norm2": vlayer.layer_norm2}.items():
        h = norm.register_forward_hook(lambda mod, i, o: o * 1.5)
        try:
            assert not torch.equal(logits(), base), f"{name}: a forward hook on it was not called"
        finally:
            h.remove()
    if grad:  # a backward hook on a module the fused paths compute without calling it still runs
        for name, mod in {"lm.k_proj": lm.self_attn.k_proj, "lm.input_layernorm": lm.input_layernorm,
                          "vision.fc2": vlayer.mlp.fc2}.items():
            assert _fires(mod.register_full_backward_hook, logits), f"{name}: a backward hook on it was not called"
    torch.testing.assert_close(logits(), base, atol=0, rtol=0)  # everything restored
