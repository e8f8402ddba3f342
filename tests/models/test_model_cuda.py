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


@pytest.mark.cuda
@pytest.mark.timeout(400)  # Inductor compiles a whole model: 150 s was not enough for NeXT with 12 tests in parallel
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_torch_compile_packed_training_step(tmp_path, model_type):
    """The model with every kernel, packed, under torch.compile (inductor): same loss and gradients as eager."""
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    batch = make_batch(model_type, [[SIZES[2]], [], [SIZES[5]]], left_pad=False)
    lens = [len(s) for s in batch["seqs"]]
    flat = torch.tensor([t for s in batch["seqs"] for t in s], device="cuda")[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    labels = torch.cat([batch["labels"][i, :n] for i, n in enumerate(lens)])[None].cuda()
    kw = dict(input_ids=flat, cu_seqlens=cu, position_ids=pos, max_seqlen=max(lens), logits=False, labels=labels,
              pixel_values=batch["pixel_values"].cuda().bfloat16(), image_sizes=batch["image_sizes"])
    ref = m(**kw).loss
    ref.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    loss = torch.compile(m)(**kw).loss
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)   # bf16: inductor may fuse/reorder elementwise ops
    for n, g in grads.items():
        torch.testing.assert_close(m.get_parameter(n).grad.float(), g.float(), atol=5e-2, rtol=5e-2)
