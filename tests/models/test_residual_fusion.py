"""The decoder layers' residual adds fused into the RMSNorm kernels (models/language.py: ``norm_linears`` inside a
layer, the MLP output's add deferred into the next layer's input norm and the final norm). With the kernels forced
(the interpreter on the CPU) the model gives the bits of the unfused path (``LLAVA_FAST_FUSE_RESIDUAL=0``), logits
and every gradient; the adds are gone from the forward; hooked layers and modules keep their usual inputs and
outputs; checkpointed layers do not defer (they would keep two tensors each)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llava_fast
from llava_fast.ops import act_linear as al

from test_model_kernels import packed_inputs
from tiny import save_tiny


class _CountAdds(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add.Tensor:
            self.adds += 1
        return func(*args, **(kwargs or {}))


def _packed(model_type):
    return packed_inputs(model_type)


def _step(m, kw):
    m.zero_grad(set_to_none=True)
    out = m(**kw)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.fixture
def model(tmp_path, forced):
    _, path = save_tiny(tmp_path, "llava_onevision")
    forced("rms_norm")
    return llava_fast.from_pretrained(path)


def test_same_bits_as_unfused_path(model, monkeypatch):
    kw = _packed("llava_onevision")
    calls = []
    real = al.ResidualActLinearFunction.apply
    monkeypatch.setattr(al.ResidualActLinearFunction, "apply", staticmethod(lambda *a: calls.append(1) or real(*a)))
    logits, grads = _step(model, kw)
    n_layers = len(model.model.language_model.layers)
    assert len(calls) == 2 * n_layers - 1, len(calls)   # every norm but the first layer's input norm (no pending add)
    monkeypatch.setenv("LLAVA_FAST_FUSE_RESIDUAL", "0")
    calls.clear()
    want_logits, want_grads = _step(model, kw)
    assert not calls
    assert torch.equal(logits, want_logits)
    assert grads.keys() == want_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], atol=1e-6, rtol=1e-6, msg=lambda s: f"{n}: {s}")


def test_adds_leave_the_forward(model, monkeypatch):
    """Two residual adds per layer gone from the language model's forward (the last one into the final norm)."""
    kw = _packed("llava_onevision")
    lm = model.model.language_model
    emb = torch.randn(1, 40, lm.cfg.hidden_size)
    pos = torch.arange(40)[None]

    def adds():
        with torch.no_grad(), _CountAdds() as c:
            lm(emb, position_ids=pos)
        return c.adds
    fused = adds()
    monkeypatch.setenv("LLAVA_FAST_FUSE_RESIDUAL", "0")
    assert adds() - fused == 2 * len(lm.layers)
    del kw


def test_hooks_see_the_usual_tensors(model):
    """A forward hook on a decoder layer, its MLP or its attention gets the layer's/module's usual output (a tensor),
    the same as without the fusion; the model's logits are unchanged by a hook that returns what it gets."""
    kw = _packed("llava_onevision")
    lm = model.model.language_model
    with torch.no_grad():
        want = model(**kw).logits
    seen = []
    hs = [lm.layers[0].register_forward_hook(lambda m, i, o: seen.append(("layer", o))),
          lm.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(("mlp", o))),
          lm.layers[1].self_attn.register_forward_hook(lambda m, i, o: seen.append(("attn", o)))]
    try:
        with torch.no_grad():
            got = model(**kw).logits
    finally:
        for h in hs:
            h.remove()
    assert sorted(k for k, _ in seen) == ["attn", "layer", "mlp"]
    assert all(isinstance(o, torch.Tensor) for _, o in seen), [type(o) for _, o in seen]
    assert torch.equal(got, want)


def test_fsdp_state_hooks_do_not_block_the_deferral():
    """FSDP2 hooks every layer (bound methods of its FSDPState): those layers still defer; any other hook does not."""
    from llava_fast.models.language import _plain_layer

    class FSDPState:
        def hook(self, *a, **k):
            return None
    layer = torch.nn.Linear(2, 2)
    layer.register_forward_pre_hook(FSDPState().hook)
    layer.register_forward_hook(FSDPState().hook)
    assert _plain_layer(layer)
    layer.register_forward_hook(lambda m, i, o: None)
    assert not _plain_layer(layer)


def test_checkpointed_layers_do_not_defer(model, monkeypatch):
    """Gradient checkpointing keeps each layer's input only: the layers get the whole stream, no pending add (the
    adds inside a layer are still fused), and the gradients equal the non-checkpointed ones."""
    kw = _packed("llava_onevision")
    lm = model.model.language_model
    _, want = _step(model, kw)
    seen = []
    for layer in lm.layers:
        layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("residual", a[8] if len(a) > 8 else None)),
                                        with_kwargs=True)
    lm.gradient_checkpointing = True
    model.train()
    _, got = _step(model, kw)
    assert seen and all(r is None for r in seen)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6, msg=lambda s: f"{n}: {s}")
