"""The model under torch.compile on the CPU (aot_eager: dynamo + AOTAutograd, no C++ compiler needed): a packed
OneVision training step gives the eager loss and gradients. The GPU twin with Inductor and every kernel is
test_model_cuda.py::test_torch_compile_packed_training_step. Graph breaks are allowed (the AnyRes host planning and
the input checks run in Python)."""
from __future__ import annotations

import torch

import llava_fast

from test_llava_parity import SIZES, make_batch
from tiny import save_tiny


def test_torch_compile_packed_training_step_cpu(tmp_path):
    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path, dtype=torch.float32, device="cpu")
    batch = make_batch("llava_onevision", [[SIZES[2]], [], [SIZES[5]]], left_pad=False)
    lens = [len(s) for s in batch["seqs"]]
    flat = torch.tensor([t for s in batch["seqs"] for t in s])[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    labels = torch.cat([batch["labels"][i, :n] for i, n in enumerate(lens)])[None]
    kw = dict(input_ids=flat, cu_seqlens=cu, position_ids=pos, max_seqlen=max(lens), logits=False, labels=labels,
              pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    ref = m(**kw).loss
    ref.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads
    m.zero_grad(set_to_none=True)
    loss = torch.compile(m, backend="aot_eager")(**kw).loss
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(m.get_parameter(n).grad, g, atol=1e-5, rtol=1e-5, msg=lambda s: f"{n}: {s}")
