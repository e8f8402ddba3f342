"""``train.deterministic``: bitwise-repeatable runs (users.md §4.3: a switch that routes every kernel to an
atomic-free path, with a bitwise-repeatability test). Our kernels have no atomics; the switch turns on torch's
deterministic algorithms for the run and keeps attention's backward off cuDNN and SDPA's flash / efficient kernels
(models/dispatch.py, ``_deterministic_backward``)."""
import os

import pytest
import torch

from test_trainer import make_cfg


def _run(assets, out, device="cpu", **over):
    from llava_fast.train import Trainer

    over = {"schedule.max_steps": 2, "train.accum": 2, "checkpoint.every_steps": 0, "train.deterministic": "true",
            **over}
    cfg = make_cfg(assets, out, **over)
    cfg.train.device = device
    tr = Trainer(cfg, quiet=True)
    seen, step = [], tr.train_step
    tr.train_step = lambda mbs: (seen.append((torch.are_deterministic_algorithms_enabled(),
                                              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)),
                                 step(mbs))[1]
    tr.train()
    return tr, seen


def test_deterministic_run_repeats_and_restores_torch(assets, tmp_path, monkeypatch):
    """Two runs give the same weights bit for bit; during the steps torch's deterministic algorithms are on (so an op
    without a deterministic implementation raises instead of running), cuDNN deterministic and not benchmarking;
    after the run torch is as before; CUBLAS_WORKSPACE_CONFIG is set when it was not (and left alone when it was)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    a, seen = _run(assets, tmp_path / "a")
    assert seen == [(True, True, False)] * 2
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    b, _ = _run(assets, tmp_path / "b")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_off_by_default_and_restored_after_a_failed_step(assets, tmp_path):
    """Off, nothing changes; a run that fails mid-step still gives torch its settings back."""
    _, seen = _run(assets, tmp_path / "off", **{"train.deterministic": "false"})
    assert seen == [(False, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)] * 2

    from llava_fast.train import Trainer

    tr = Trainer(make_cfg(assets, tmp_path / "fail", **{"schedule.max_steps": 2, "train.deterministic": "true"}),
                 quiet=True)

    def boom(mbs):
        assert torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("simulated failure")
    tr.train_step = boom
    with pytest.raises(RuntimeError, match="simulated failure"):
        tr.train()
    assert not torch.are_deterministic_algorithms_enabled()


def test_dispatch_keeps_attention_backward_off_cudnn_and_flash():
    """Under deterministic algorithms with a backward to come: SDPA's math backend only, and no ops.cudnn_attention
    for the language model; without a backward (or without the switch), the usual choices."""
    from llava_fast.models import dispatch

    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    cpu = torch.device("cpu")
    assert dispatch._cudnn_text("cudnn", cpu)
    torch.use_deterministic_algorithms(True)
    try:
        assert dispatch._deterministic_backward(q, q, q)
        assert not dispatch._cudnn_text("cudnn", cpu)
        with dispatch._sdpa_backends(q, q, q):
            assert torch.backends.cuda.math_sdp_enabled()
            assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                        or torch.backends.cuda.cudnn_sdp_enabled())
        with torch.no_grad():
            assert not dispatch._deterministic_backward(q, q, q)
            with dispatch._sdpa_backends(q, q, q):
                assert torch.backends.cuda.cudnn_sdp_enabled()   # a forward alone: cuDNN first, as without it
    finally:
        torch.use_deterministic_algorithms(False)
    assert not dispatch._deterministic_backward(q, q, q)
    with dispatch._sdpa_backends(q, q, q):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.cuda
def test_cuda_deterministic_run_repeats(assets, tmp_path):
    """On the GPU, every part trained (the vision tower's attention included, which takes our kernels instead of
    cuDNN's here): two runs of three steps give the same weights bit for bit, and torch raised for no op of the step
    (session 36, not yet run on a GPU)."""
    over = {"schedule.max_steps": 3}
    a, seen = _run(assets, tmp_path / "a", "cuda", **over)
    b, _ = _run(assets, tmp_path / "b", "cuda", **over)
    assert seen and all(s[0] for s in seen)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
