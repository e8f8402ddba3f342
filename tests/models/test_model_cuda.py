"""GPU checks of the whole model (skipped without CUDA): our bf16/fp16 model, with whatever fast kernels are wired
in, against transformers eager in fp32 on the same weights, by flash-attn's rule (our error at most twice the error of
transformers eager run in the same low precision)."""
from __future__ import annotations

import pytest
import torch

import llava_fast

from test_llava_parity import SIZES, hf_pixels, make_batch
from tiny import save_tiny
from utils import assert_flash_rule


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_low_precision_against_fp32_reference(tmp_path, model_type, dtype):
    hf, path = save_tiny(tmp_path, model_type)
    hf = hf.cuda()
    hf_low = type(hf).from_pretrained(path, dtype=dtype, attn_implementation="eager").cuda().eval()
    ours = llava_fast.from_pretrained(path, dtype=dtype, device="cuda")
    sizes = [SIZES[2], SIZES[5]] if model_type != "llava" else [(28, 28), (28, 28)]
    batch = make_batch(model_type, [[sizes[0]], [sizes[1]]], left_pad=False)
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if model_type != "llava":
        kw["image_sizes"] = batch["image_sizes"]
    with torch.no_grad():
        ref = hf(pixel_values=hf_pixels(model_type, batch).cuda(), **kw).logits
        low = hf_low(pixel_values=hf_pixels(model_type, batch).cuda().to(dtype), **kw).logits
        out = ours(pixel_values=batch["pixel_values"].to(dtype), **kw).logits
    valid = batch["attention_mask"].bool()
    assert_flash_rule(out[valid], ref[valid], low[valid], name=f"{model_type} logits")
