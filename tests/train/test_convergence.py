"""Training with the kernels follows the reference path's training run, step after step (users.md §4.7: "mini-model
convergence"; Liger-Kernel's convergence tests compare loss curves the same way).

The op tests check one forward and backward; the model tests one step. Several steps of the trainer add what those
cannot see: state kept from one step to the next (the feature packing's plan caches, RoPE's cached rows, the
optimizer reading the kernels' gradients, micro-batches of other shapes in between), and whether the kernels' small
differences grow over a run.

- CPU (the interpreter, fp32): the kernels against the reference path: the same losses and gradient norms at every
  step to 1e-5, the same weights at the end. The language model's attention, RMSNorm, SwiGLU and RoPE stay on the
  reference here: under the interpreter they cost ~27, 2.2, 1.4 and 1.3 s per micro-batch of the demo's model
  (against ~0.45 s for the whole reference step), they keep no state between calls, and one training step of the
  model through them, every gradient, is tests/models/test_model_kernels.py's; the GPU test below runs them all.
- GPU (bf16 autocast, fp32 master weights, the kernels the model picks on CUDA): flash-attn's rule applied to the run:
  the kernels' distance from an fp32 run of the reference path, in loss at every step and in the trained weights at
  the end, is at most twice that of the reference path in bf16 (plus a floor for the rounding of the loss itself).
"""
import math

import pytest
import torch

import llava_fast

from test_trainer import make_cfg
from utils import MODEL_KERNELS, assert_run_flash_rule



def _run(assets, out, device="cpu", ops=(), backend="triton", **over):
    """A stage-2 run of the demo's tiny LLaVA-NeXT (every part trained, two micro-batches of different shapes per
    step) with ``ops`` set to ``backend``: its per-step history and final fp32 weights."""
    from llava_fast.train import Trainer

    over = {"schedule.max_steps": 3, "train.accum": 2, "checkpoint.every_steps": 0, **over}
    cfg = make_cfg(assets, out, **over)
    cfg.train.device = device
    llava_fast.set_backend("all", "auto")
    try:
        for op in ops:
            llava_fast.set_backend(op, backend)
        tr = Trainer(cfg, quiet=True)
        tr.train()
    finally:
        llava_fast.set_backend("all", "auto")
    weights = {k: v.detach().float().cpu() for k, v in tr.model.state_dict().items()}
    return tr.history, weights


def test_kernels_train_like_the_reference(assets, tmp_path):
    """Three steps of two micro-batches each (six forwards of different shapes through the kernels' caches): losses
    and gradient norms equal the reference run's at every step, and so do the trained weights (an Adam step moves a
    weight by ~lr = 1e-3, so 1e-5 sees one wrong update; a gradient of the wrong scale shows in the norms)."""
    ref_hist, ref_w = _run(assets, tmp_path / "ref")
    slow = ("attention", "rms_norm", "swiglu", "rope")   # under the interpreter (module docstring)
    hist, w = _run(assets, tmp_path / "kernels", ops=[op for op in MODEL_KERNELS if op not in slow])
    assert [h["step"] for h in hist] == [h["step"] for h in ref_hist] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        assert all(math.isfinite(h[key]) for h in hist)
        torch.testing.assert_close(torch.tensor([h[key] for h in hist], dtype=torch.float64),
                                   torch.tensor([h[key] for h in ref_hist], dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=lambda s: f"{key} per step: {s}")
    assert ref_hist[-1]["loss"] < ref_hist[0]["loss"]   # it trains
    assert ref_w.keys() == w.keys()
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=1e-5, msg=lambda s: f"{k}: {s}")


@pytest.mark.cuda
@pytest.mark.timeout(400)   # three runs; the first in a process compiles the kernels for the demo's shapes
def test_cuda_kernels_train_like_the_reference(assets, tmp_path):
    """Twelve steps on the GPU under bf16 autocast with the kernels the model picks there, against the reference path
    in bf16 and in fp32 (the oracle): the kernels' loss curve and trained weights are at most twice as far from the
    oracle as the reference path's in bf16 (flash-attn's rule over a run: tests/utils.assert_run_flash_rule)."""
    over = {"schedule.max_steps": 12}
    tf32 = torch.backends.cudnn.allow_tf32   # (on by default for convolutions: the patch embedding's reference)
    torch.backends.cudnn.allow_tf32 = False
    try:
        oracle = _run(assets, tmp_path / "fp32", "cuda", MODEL_KERNELS, "reference",
                      **{**over, "train.precision": "fp32"})
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    ref = _run(assets, tmp_path / "ref", "cuda", MODEL_KERNELS, "reference", **{**over, "train.precision": "bf16"})
    ours = _run(assets, tmp_path / "ours", "cuda", (), **{**over, "train.precision": "bf16"})
    assert len(ours[0]) == len(oracle[0]) == 12
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in ours[0])
    assert oracle[0][-1]["loss"] < oracle[0][0]["loss"]   # it trains
    assert_run_flash_rule("test_cuda_kernels_train_like_the_reference", ours, ref, oracle)
