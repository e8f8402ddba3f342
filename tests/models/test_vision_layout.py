"""The vision towers' residual stream is contiguous.

SigLIP's patch embedding is a conv whose (B, D, N) output is read as (B, N, D): a transposed view. Elementwise ops keep
their input's layout, so before session 10 the whole residual stream stayed transposed, and every layer paid six
strided copies and two strided adds (an H200 profile of the OneVision-0.5B step: 17 ms of its 104 ms of kernels at 4
LLM layers; docs/perf-notes.md). The embedding now returns a contiguous tensor; these tests fail without that.
"""
from __future__ import annotations

import pytest
import torch

import llava_fast

from tiny import TILE, save_tiny


@pytest.mark.parametrize("model_type", ["llava", "llava_onevision"])  # CLIP (class token: cat) and SigLIP (none)
def test_every_vision_layer_gets_a_contiguous_input(tmp_path, model_type):
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path, dtype=torch.float32)
    tower = m.model.vision_tower
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
             for layer in tower.encoder.layers]
    try:
        pixels = torch.randn(3, 3, TILE, TILE, requires_grad=True)
        out = tower(pixels, [-1])
        out.float().square().sum().backward()  # the backward runs through the same layouts
    finally:
        for h in hooks:
            h.remove()
    assert seen == [True] * len(tower.encoder.layers)
    assert out.is_contiguous()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_does_not_change_the_values(tmp_path, dtype):
    """The same input in the transposed layout (what the tower used to carry) gives the same bits, forward and
    backward: the contiguous copy is a layout change only."""
    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path, dtype=dtype)
    layers = m.model.vision_tower.encoder.layers
    torch.manual_seed(0)
    x = torch.randn(2, 4, m.model.vision_tower.cfg.hidden_size, dtype=dtype)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, the conv's memory order
    assert torch.equal(x, xt) and not xt.is_contiguous()
    results = []
    for inp in (x, xt):
        inp = inp.clone().requires_grad_(True) if inp.is_contiguous() else \
            inp.transpose(1, 2).clone().transpose(1, 2).requires_grad_(True)
        h = inp
        for layer in layers:
            h = layer(h)
        g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)
        h.backward(g)
        results.append((h.detach(), inp.grad, [p.grad.clone() for p in layers.parameters()]))
        m.zero_grad(set_to_none=True)
    (h0, g0, p0), (h1, g1, p1) = results
    assert torch.equal(h0, h1)
    assert torch.equal(g0, g1)
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)


def test_patch_hf_makes_siglip_layers_contiguous():
    """patch_hf(vision_layout=True) (the default) gives transformers' SigLIP tower the same fix, same bits."""
    import copy

    from llava_fast.patching import patch_hf
    from tiny import hf_model

    base = hf_model("llava_onevision")
    pixels = torch.randn(3, 3, TILE, TILE)

    def run(model):
        seen = []
        enc = _find(model, "SiglipEncoder")  # transformers 5.17 nests it in .vision_model, 5.24 does not
        hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
                 for layer in enc.layers]
        try:
            with torch.no_grad():
                out = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        finally:
            for h in hooks:
                h.remove()
        return seen, out

    seen, ref = run(base)
    assert not any(seen)  # transformers' own layout: this test would pass vacuously if this changed upstream
    patched = patch_hf(copy.deepcopy(base), rms_norm=False, swiglu=False, attention=False, projector=False)
    seen, out = run(patched)
    assert seen == [True] * len(_find(base, "SiglipEncoder").layers)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    unpatched = patch_hf(copy.deepcopy(base), vision_layout=False)
    assert not any(run(unpatched)[0])


def _find(model, cls_name):
    return next(m for m in model.modules() if type(m).__name__ == cls_name)
