"""The trainer and the demo on a GPU (``cuda`` marker; skipped on CPU-only machines).

Until session 23 no test ran :class:`llava_fast.train.Trainer` or ``llava-fast demo`` on a GPU: bench_model times model
steps with bf16 weights, while the trainer on CUDA keeps fp32 master weights under bf16 autocast, uses the fused
AdamW, pinned-memory loading, its checkpoints and the export. These tests run that path as a user does, with every
kernel the model picks on CUDA (the demo's tiny model: head dims 16 and 32, hidden 64 / 128).
"""
import json
import math
import os
import re

import pytest
import torch

from test_trainer import make_cfg
from utils import record

pytestmark = pytest.mark.cuda


def _cuda_cfg(assets, out, **over):
    cfg = make_cfg(assets, out, **over)
    cfg.train.device = "cuda"
    return cfg


def test_cuda_resume_continues_the_run(assets, tmp_path):
    """Six accumulated steps on the GPU, against three, a checkpoint, and a resumed run to six: the resumed weights
    equal the uninterrupted run's up to the GPU's summation order (atol 1e-5 on fp32 master weights: an optimizer
    state lost at the resume moves them by ~lr = 1e-3), the losses fall, and the step reports the GPU's peak
    memory. The checkpoint holds fp32 weights that load back."""
    from llava_fast.train import Trainer
    from llava_fast.train import checkpoint as ckpt

    over = {"schedule.max_steps": 6, "train.accum": 2}
    a = Trainer(_cuda_cfg(assets, tmp_path / "a", **over), quiet=True)
    metrics, step = [], a.train_step
    a.train_step = lambda mbs: (lambda m: (metrics.append(m), m)[1])(step(mbs))
    a.train()
    assert next(a.model.parameters()).device.type == "cuda"
    b1 = Trainer(_cuda_cfg(assets, tmp_path / "b", **over), quiet=True)
    r = b1.train(stop_at_step=3)
    assert r["steps"] == 3 and ckpt.is_complete(r["checkpoint"])
    b2 = Trainer(_cuda_cfg(assets, tmp_path / "b", **over), quiet=True)
    b2.train()
    assert b2.global_step == 6 and len(b2.history) == 6   # the first three restored from the checkpoint
    losses = [h["loss"] for h in a.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert len(metrics) == 6 and all(m["peak_mem_gb"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    torch.testing.assert_close([h["loss"] for h in b2.history], losses, rtol=0, atol=1e-3)
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    for k in sa:
        assert sa[k].dtype == torch.float32, k   # fp32 master weights under bf16 autocast
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-5, msg=k)
    ms, ts, _ = ckpt.load_checkpoint(r["checkpoint"])
    assert ts["global_step"] == 3 and all(t.device.type == "cpu" for t in ms.values())


@pytest.mark.timeout(400)  # the first trainer test in a process compiles every kernel for the demo's shapes
def test_cuda_train_step_synchronizes_once(assets, tmp_path):
    """A trainer step on the GPU waits for the device once, for its loss and gradient norm together (session 29:
    it waited three times, the last for the optimizer's kernels), so the host queues the next step's data and
    forward while the optimizer runs. Counted by torch's sync debug mode, which warns at each synchronising call."""
    import warnings

    from llava_fast.train import Trainer

    tr = Trainer(_cuda_cfg(assets, tmp_path / "s"), quiet=True).setup()
    it = iter(tr._loader())
    steps = [[next(it), next(it)] for _ in range(2)]
    for mbs in steps:   # the same batches first: the kernels compile for their shapes, the optimizer makes its state
        tr.train_step(mbs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ms = [tr.train_step(mbs) for mbs in steps]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    # each from _ext.host_copies' one stream synchronisation (before: trainer.py's float(loss), float(grad_norm) and
    # torch.cuda.synchronize, three per step)
    assert len(syncs) <= 2 and all(s.startswith("_ext.py:") for s in syncs), syncs
    assert all(math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in ms)


@pytest.mark.timeout(400)  # the first run in a process compiles every kernel for the demo's shapes
def test_cuda_demo_quick(tmp_path, capsys):
    """``llava-fast demo --quick`` on the GPU (the README's first command runs the full one there): stage 1 and 2 with
    packing through the trainer, the exported folder, generation. It learns: held-out accuracy >= 45% (chance is ~25%;
    the same run on the CPU, fp32, gets 71%). The exported folder holds what was trained: loaded on the CPU (fp32,
    reference kernels) it answers the held-out questions about as well (within 15 points: bf16 autocast on the GPU
    against fp32 may flip near ties of this short run's answers, not its accuracy)."""
    import llava_fast
    from llava_fast.data import load_tokenizer
    from llava_fast.demo import answer_questions, run_demo

    out = tmp_path / "demo"
    assert run_demo(out_dir=str(out), seed=0, device="cuda", quick=True) == 0
    text = capsys.readouterr().out
    for s in ("stage 1 done", "stage 2 done", "held-out accuracy", "Q: ", "A: "):
        assert s in text
    acc = float(re.search(r"held-out accuracy: ([0-9.]+)%", text).group(1))
    final = out / "stage2" / "final"
    assert (final / "config.json").exists() and any(p.suffix == ".safetensors" for p in final.iterdir())

    held = json.loads((out / "data" / "eval.json").read_text())
    model = llava_fast.from_pretrained(str(final), dtype=torch.float32, device="cpu").eval()
    answers = answer_questions(model, load_tokenizer(str(final)), held, os.path.join(out, "data", "images"),
                               torch.device("cpu"))
    acc_cpu = 100 * sum(a == it["answer"] for a, it in zip(answers, held)) / len(held)
    print(f"quick demo on {torch.cuda.get_device_name()}: held-out accuracy {acc}% (exported model on the CPU: "
          f"{acc_cpu}%)")
    record("test_cuda_demo_quick", accuracy=acc, exported_on_cpu=acc_cpu)
    assert acc >= 45.0, text[-2000:]
    assert abs(acc_cpu - acc) <= 15.0, (acc, acc_cpu)


def test_cuda_predict_answers_a_file(assets, tmp_path):
    """``llava-fast predict`` on the GPU (session 25, written without one): batches through the packed generation path
    with the Triton kernels; every sample answered once; the same ids as on the CPU, and a rerun skips them all."""
    from test_predict import _records

    from llava_fast.predict import predict

    data = tmp_path / "q.json"
    data.write_text(json.dumps(_records(assets, 6)))
    kw = dict(max_new_tokens=4, batch=4, progress=False, log=lambda *_: None)
    gpu = predict(str(assets / "model"), str(data), str(assets / "data" / "images"), str(tmp_path / "gpu.jsonl"),
                  device="cuda", **kw)
    cpu = predict(str(assets / "model"), str(data), str(assets / "data" / "images"), str(tmp_path / "cpu.jsonl"),
                  device="cpu", **kw)
    assert gpu["answered"] == cpu["answered"] == 6 and gpu["errors"] == 0
    ids = lambda p: [json.loads(x)["id"] for x in (tmp_path / p).read_text().splitlines()]  # noqa: E731
    assert sorted(ids("gpu.jsonl")) == sorted(ids("cpu.jsonl"))
    again = predict(str(assets / "model"), str(data), str(assets / "data" / "images"), str(tmp_path / "gpu.jsonl"),
                    device="cuda", **kw)
    assert again["skipped"] == 6 and again["answered"] == 0
