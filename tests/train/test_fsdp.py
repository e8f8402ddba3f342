"""FSDP2 on CPU (gloo, 2 processes): the losses equal a single-process run with the same global batch, also when
every sample of one rank's micro-batch fails to decode (that rank runs a filler, not fewer forwards: no hang), and
the samples a rank drops are counted in the main rank's log and checkpoints."""
import json
import os
import socket
import time

import pytest
import torch

from llava_fast import demo
from llava_fast.train.distributed import has_fsdp2

pytestmark = pytest.mark.skipif(not has_fsdp2() or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed.fsdp.fully_shard (FSDP2) and the gloo backend")


def _cfg(root, out, accum, extra=()):
    from llava_fast.train import apply_overrides, get_recipe

    cfg = get_recipe("stage2", "llava_next")
    cfg.model.path = os.path.join(root, "model")
    cfg.data.data = os.path.join(root, "data", "stage2.json")
    cfg.data.images = os.path.join(root, "data", "images")
    apply_overrides(cfg, ["data.max_len=400", "data.max_tokens=512", "data.num_workers=0",
                          "data.group_by_modality_length=false", "train.trainable=projector,newline,llm",
                          "train.activation_checkpointing=false", "train.device=cpu", f"train.accum={accum}",
                          "optim.lr=1e-3", "schedule.max_steps=3", f"checkpoint.out={out}",
                          "checkpoint.export=false", "log.tensorboard=false", "log.progress=false", *extra])
    return cfg


def _worker(rank, world, port, root, out, extra=()):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llava_fast.train import Trainer

    tr = Trainer(_cfg(root, out, accum=1, extra=extra), quiet=True)
    tr.train()
    tr.save()  # collective full-state save under FSDP2
    if rank == 0:
        with open(os.path.join(out, "drops.json"), "w") as f:
            json.dump(dict(tr.drops), f)
    with open(os.path.join(out, f"from_cache{rank}.json"), "w") as f:  # rank 0 indexes, rank 1 loads its index
        json.dump(tr.dataset.from_cache, f)
    _finish_rank(rank, out, tr)


def _finish_rank(rank, out, tr):
    """Rank 0 writes the trainer's history for _run_two_ranks; every rank then leaves the process group and exits."""
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


def _run_two_ranks(root, out, extra=(), worker=None):
    """Train on 2 gloo ranks (``worker(rank, world, port, root, out, extra)``, this file's by default); rank 0's
    history. Fails (instead of waiting forever) when the ranks hang."""
    ctx = torch.multiprocessing.spawn(worker or _worker, args=(2, _free_port(), root, out, extra), nprocs=2,
                                      join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the FSDP2 ranks hung (one ran other modules than the other)")
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)


def test_fsdp2_gloo_matches_single_process(tmp_path):
    root = str(tmp_path)
    demo.make_data(os.path.join(root, "data"), seed=2, n_caption=0, n_qa=24, n_eval=0)
    demo.build_tiny_model(os.path.join(root, "model"), seed=0, quick=True)
    from llava_fast.train import Trainer
    from llava_fast.train import checkpoint as ckpt

    single = Trainer(_cfg(root, str(tmp_path / "single"), accum=2), quiet=True).setup()
    # every image of rank 1's first micro-batch fails to decode (the headers still read): an empty micro-batch
    for i in single.sampler.steps()[0][1]:
        for bad in single.dataset.items[i].images:
            with open(bad, "rb") as f:
                data = f.read()
            with open(bad, "wb") as f:
                f.write(data[: len(data) // 2])
    out2 = str(tmp_path / "fsdp")
    dist_hist = _run_two_ranks(root, out2)
    with open(os.path.join(out2, "drops.json")) as f:
        dist_drops = json.load(f)
    # the main rank built the dataset index (OUT/dataset_index) while rank 1 waited; rank 1 loaded it
    assert [json.load(open(os.path.join(out2, f"from_cache{r}.json"))) for r in (0, 1)] == [False, True]
    single.train()
    assert single.drops["decode_error"] >= 1 and dist_drops == dict(single.drops)
    assert len(dist_hist) == len(single.history) == 3
    for d, s in zip(dist_hist, single.history):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-6)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4, abs=1e-6)
    # the FSDP2 checkpoint holds full (unsharded) weights equal to the single-process ones
    ms, _, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(out2, "checkpoints")))
    sd = single.model.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(ms[k], v, rtol=1e-4, atol=1e-5)


def test_fsdp2_text_only_and_image_packs_with_trained_vision(tmp_path):
    """With the vision tower trained (sharded per layer: OneVision stage 2) and single-modality packs
    (group_by_modality_length), one rank gets a text-only pack while the other runs the vision tower: the text-only
    micro-batch runs a filler image (all labels masked), or the ranks' collectives mismatch (gloo aborts, NCCL
    hangs). Losses and grad norms equal a single process."""
    root = str(tmp_path)
    demo.make_data(os.path.join(root, "data"), seed=2, n_caption=0, n_qa=24, n_eval=0)
    demo.build_tiny_model(os.path.join(root, "model"), seed=0, quick=True)
    path = os.path.join(root, "data", "stage2.json")
    with open(path) as f:
        recs = json.load(f)
    for r in recs[::2]:  # half of the samples text-only
        r.pop("image")
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "").strip()
    with open(path, "w") as f:
        json.dump(recs, f)
    extra = ("train.trainable=projector,newline,llm,vision", "data.group_by_modality_length=true")
    from llava_fast.train import Trainer

    single = Trainer(_cfg(root, str(tmp_path / "single"), accum=2, extra=extra), quiet=True).setup()
    text = [all(single.dataset.modality_lengths[i] < 0 for i in mb) for st in single.sampler.steps()[:3] for mb in st]
    assert any(t != u for t, u in zip(text[::2], text[1::2]))  # a step where one rank has text only, one images
    dist_hist = _run_two_ranks(root, str(tmp_path / "fsdp"), extra)
    single.train()
    assert len(dist_hist) == len(single.history) == 3
    for d, s in zip(dist_hist, single.history):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-6)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4, abs=1e-6)


def test_host_group_on_one_machine_only(monkeypatch):
    """The trainer's host numbers (sample counts, the stop flag) go through a gloo group of CPU tensors where the
    default group is NCCL and every rank runs on this machine (``LOCAL_WORLD_SIZE == WORLD_SIZE``): an NCCL
    all-reduce read back on the host waits for the GPU's queue. Not across machines (gloo's TCP may need
    GLOO_SOCKET_IFNAME where NCCL runs over InfiniBand), not with LLAVA_FAST_HOST_GROUP=0, not where the default
    group is gloo already. ``all_reduce_sums`` sums several numbers with one all-reduce on that group."""
    from llava_fast.train import distributed as D

    made = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(D.dist, "new_group", lambda **k: made.append(k) or "gloo-group")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert D._host_group(4) == "gloo-group" and made == [{"backend": "gloo"}]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")          # 2 machines x 2 GPUs
    assert D._host_group(4) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LLAVA_FAST_HOST_GROUP", "0")
    assert D._host_group(4) is None
    monkeypatch.delenv("LLAVA_FAST_HOST_GROUP")
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "gloo")
    assert D._host_group(4) is None and len(made) == 1

    calls = []

    def all_reduce(t, group=None):   # two ranks with the same numbers
        calls.append((t.device.type, t.dtype, t.tolist(), group))
        t.mul_(2)

    monkeypatch.setattr(D.dist, "all_reduce", all_reduce)
    info = D.DistInfo(0, 2, 0, torch.device("cuda", 0), host_group="gloo-group")
    assert D.all_reduce_sums([1, 2.5, 3, 0], info) == [2, 5, 6, 0]
    assert D.all_reduce_sum(7, info) == 14
    assert calls[0] == ("cpu", torch.float64, [1, 2.5, 3, 0], "gloo-group") and len(calls) == 2
    assert D.all_reduce_sums([1, 2], D.DistInfo()) == [1, 2]     # one process: the numbers as they are, no call
    assert len(calls) == 2
