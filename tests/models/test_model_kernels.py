"""The model with the Triton kernels forced on (interpreter on CPU, real kernels on GPU) equals the reference path.

Each kernel has its own exhaustive tests in tests/ops; this checks the wiring: layouts, positions, GQA, tied lm_head,
packed sequences. fp32 kernels under the interpreter differ from PyTorch only by summation order, so the bound is a
few fp32 ULP of the logits (1e-4 absolute on logits of magnitude ~1)."""
from __future__ import annotations

import pytest
import torch

import llava_fast

from test_llava_parity import make_batch
from tiny import save_tiny
from utils import MODEL_KERNELS


def packed_inputs(model_type):
    """The forward's keyword arguments for one packed training sequence: a sample with an image, one without."""
    batch = make_batch(model_type, [[(20, 50)], []], left_pad=False)
    lens = [len(s) for s in batch["seqs"]]
    flat = torch.tensor([t for s in batch["seqs"] for t in s])[None]
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    labels = torch.cat([batch["labels"][i, :n] for i, n in enumerate(lens)])[None]
    return dict(input_ids=flat, cu_seqlens=cu, position_ids=pos, max_seqlen=max(lens),
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], labels=labels)


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_training_kernels_in_model(tmp_path, forced, model_type):
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    kw = packed_inputs(model_type)
    ref = m(**kw)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    forced(*MODEL_KERNELS)
    logits = m(**kw).logits
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    out = m(**kw, logits=False)             # fused linear cross-entropy: no logits materialised
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for n, p in m.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_pack_kernel_multi_image_and_video(tmp_path, forced):
    """OneVision multi-image (single tiles) and video through the fused packing kernel equal the reference."""
    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    batch = make_batch("llava_onevision", [[(40, 90), (70, 20)], [(100, 60)]], multi_image=True)
    from llava_fast.ops.anyres import num_video_tokens
    from tiny import TILE, VIDEO_TOKEN

    ids = torch.cat([batch["input_ids"], torch.full((2, num_video_tokens(2, TILE // 14)), VIDEO_TOKEN)], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, ids.shape[1] - batch["input_ids"].shape[1],
                                                          dtype=torch.long)], dim=1)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
              image_sizes=batch["image_sizes"], batch_num_images=torch.tensor(batch["bni"]),
              pixel_values_videos=torch.randn(2, 2, 3, TILE, TILE))
    ref = m(**kw).logits
    forced("pack_features")
    torch.testing.assert_close(m(**kw).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,dtype", [("llava_onevision", torch.bfloat16), ("llava_next", torch.bfloat16)])
def test_training_kernels_in_model_low_precision(tmp_path, forced, model_type, dtype):
    """The packed training step of test_training_kernels_in_model in bf16 with every kernel forced (the interpreter),
    against the fp32 reference path and the reference path in bf16, by flash-attn's rule: logits, the fused loss and
    every gradient (atol 1e-6 for entries ~0, as test_cuda_training_step_by_flash_rule). Session 36: the interpreter
    could not run bf16 kernels before (``_ext.interpreter_bf16``); the cuda tests check the same on a GPU."""
    from utils import assert_flash_rule, max_err

    _, path = save_tiny(tmp_path, model_type)
    kw = packed_inputs(model_type)

    def run(dt, kernels):
        if kernels:
            forced(*MODEL_KERNELS)
        try:
            m = llava_fast.from_pretrained(path, dtype=dt)
            args = dict(kw, pixel_values=kw["pixel_values"].to(dt))
            logits = m(**args).logits.detach().float()
            out = m(**args, logits=False)
            out.loss.backward()
            grads = {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
            return logits, out.loss.detach().float(), grads
        finally:
            llava_fast.set_backend("all", "auto")

    ref, low, ours = run(torch.float32, False), run(dtype, False), run(dtype, True)
    assert_flash_rule(ours[0], ref[0], low[0], name="logits")
    # a scalar: PyTorch's own error can be ~0 by luck. The floor (as test_cuda_patched_by_flash_rule's): a mean of
    # log-softmax entries moves by at most twice the largest logit error (log-softmax is 2-Lipschitz in the max norm)
    assert_flash_rule(ours[1], ref[1], low[1], name="loss", atol=2 * max_err(low[0], ref[0]))
    assert ours[2].keys() == ref[2].keys() == low[2].keys() and ref[2]
    for n in ref[2]:
        assert_flash_rule(ours[2][n], ref[2][n], low[2][n], name=n, atol=1e-6)
