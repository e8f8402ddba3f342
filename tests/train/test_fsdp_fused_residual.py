"""FSDP2 (gloo, 2 CPU processes) with the RMSNorm kernel forced (the interpreter): FSDP2's hooks on every decoder
layer do not stop the deferred residual add (a layer returns ``(s, m)``), the fused path runs on every rank, and
the losses and gradient norms equal a single-process run with the same kernel and global batch."""
import json
import os

import pytest
import torch

from llava_fast import demo

from test_fsdp import _cfg, _finish_rank, _run_two_ranks, pytestmark  # noqa: F401  (the same skip rule)


def _worker(rank, world, port, root, out, extra=()):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llava_fast.ops import act_linear as al
    from llava_fast.train import Trainer

    calls = []
    real = al.ResidualActLinearFunction.apply
    al.ResidualActLinearFunction.apply = staticmethod(lambda *a: calls.append(1) or real(*a))
    tr = Trainer(_cfg(root, out, accum=1), quiet=True)
    tr.train()
    with open(os.path.join(out, f"fused_calls_{rank}.json"), "w") as f:
        json.dump(len(calls), f)
    _finish_rank(rank, out, tr)


def test_fsdp2_defers_the_residual_add(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_FAST_BACKEND_RMS_NORM", "triton")
    root = str(tmp_path)
    # (24 samples: no epoch ends within the 3 steps, whose partial last step one process trains and two ranks skip)
    demo.make_data(os.path.join(root, "data"), seed=2, n_caption=0, n_qa=24, n_eval=0)
    demo.build_tiny_model(os.path.join(root, "model"), seed=0, quick=True)
    out = str(tmp_path / "fsdp")
    os.makedirs(out)
    dist_hist = _run_two_ranks(root, out, worker=_worker)

    from llava_fast.train import Trainer

    single = Trainer(_cfg(root, str(tmp_path / "single"), accum=2), quiet=True)
    single.setup()
    n_layers = len(single.model.model.language_model.layers)
    for rank in (0, 1):
        with open(os.path.join(out, f"fused_calls_{rank}.json")) as f:
            # every norm but the first layer's input norm, per forward (3 steps, at least one micro-batch each)
            assert json.load(f) >= 3 * (2 * n_layers - 1), rank
    single.train()
    assert len(dist_hist) == len(single.history) == 3
    for d, s in zip(dist_hist, single.history):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-6)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4, abs=1e-6)
