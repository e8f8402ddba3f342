"""patch_hf: a transformers model patched with our kernels (forced on, interpreter on CPU) gives its own outputs."""
from __future__ import annotations

import pytest
import torch

import llava_fast
from llava_fast.patching import patch_hf

from test_llava_parity import hf_pixels, make_batch
from tiny import hf_model


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_patched_equals_unpatched(model_type):
    hf = hf_model(model_type)
    batch = make_batch(model_type, [[(20, 50) if model_type != "llava" else (28, 28)]], left_pad=False)
    kw = dict(input_ids=batch["input_ids"], pixel_values=hf_pixels(model_type, batch), labels=batch["labels"])
    if model_type != "llava":
        kw["image_sizes"] = batch["image_sizes"]
    ref = hf(**kw)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    patch_hf(hf)
    assert hf._llava_fast_patched["rms_norm"] > 0 and hf._llava_fast_patched["swiglu"] > 0
    try:
        for op in ("rms_norm", "swiglu", "attention", "vision_attention", "projector"):
            llava_fast.set_backend(op, "triton")
        out = hf(**kw)
        out.loss.backward()
    finally:
        llava_fast.set_backend("all", "auto")
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    for n, p in hf.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_patch_errors():
    hf = hf_model("llava_next")
    with pytest.raises(ValueError, match="rope"):
        patch_hf(hf, rope=True)
    with pytest.raises(ValueError, match="supports transformers"):
        patch_hf(torch.nn.Linear(2, 2))
