"""FSDP2 on CPU (gloo, 2 processes): the losses equal a single-process run with the same global batch."""
import json
import os
import socket

import pytest
import torch

from llava_fast import demo
from llava_fast.train.distributed import has_fsdp2

pytestmark = pytest.mark.skipif(not has_fsdp2() or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed.fsdp.fully_shard (FSDP2) and the gloo backend")


def _cfg(root, out, accum):
    from llava_fast.train import apply_overrides, get_recipe

    cfg = get_recipe("stage2", "llava_next")
    cfg.model.path = os.path.join(root, "model")
    cfg.data.data = os.path.join(root, "data", "stage2.json")
    cfg.data.images = os.path.join(root, "data", "images")
    apply_overrides(cfg, ["data.max_len=400", "data.max_tokens=512", "data.num_workers=0",
                          "data.group_by_modality_length=false", "train.trainable=projector,newline,llm",
                          "train.activation_checkpointing=false", "train.device=cpu", f"train.accum={accum}",
                          "optim.lr=1e-3", "schedule.max_steps=3", f"checkpoint.out={out}",
                          "checkpoint.export=false", "log.tensorboard=false", "log.progress=false"])
    return cfg


def _worker(rank, world, port, root, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llava_fast.train import Trainer

    tr = Trainer(_cfg(root, out, accum=1), quiet=True)
    tr.train()
    tr.save()  # collective full-state save under FSDP2
    if rank == 0:
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(tr.history, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active exception");
    # the work is done and synchronised here, so leave without running C++ destructors.
    os._exit(0)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def test_fsdp2_gloo_matches_single_process(tmp_path):
    root = str(tmp_path)
    demo.make_data(os.path.join(root, "data"), seed=2, n_caption=0, n_qa=24, n_eval=0)
    demo.build_tiny_model(os.path.join(root, "model"), seed=0, quick=True)
    out2 = str(tmp_path / "fsdp")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), root, out2), nprocs=2, join=True)
    with open(os.path.join(out2, "history.json")) as f:
        dist_hist = json.load(f)
    from llava_fast.train import Trainer
    from llava_fast.train import checkpoint as ckpt

    single = Trainer(_cfg(root, str(tmp_path / "single"), accum=2), quiet=True)
    single.train()
    assert len(dist_hist) == len(single.history) == 3
    for d, s in zip(dist_hist, single.history):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-6)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4, abs=1e-6)
    # the FSDP2 checkpoint holds full (unsharded) weights equal to the single-process ones
    ms, _, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(out2, "checkpoints")))
    sd = single.model.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(ms[k], v, rtol=1e-4, atol=1e-5)
