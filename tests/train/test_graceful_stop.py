"""SIGTERM (a scheduler's preemption notice) stops like Ctrl-C: the step finishes and is saved. Under torchrun (2 gloo
ranks here) a signal that reaches one rank stops every rank after the same step with one collective checkpoint, and
the resumed run continues with the uninterrupted run's losses. (Ctrl-C in one process: test_audit_resume.py.)"""
import json
import os
import signal

import pytest
import torch

from llava_fast import demo
from llava_fast.train import Trainer
from llava_fast.train import checkpoint as ckpt

from test_fsdp import _cfg, _finish_rank, _run_two_ranks, pytestmark  # noqa: F401  (the same skip rule)
from test_trainer import make_cfg


def _signal_at(monkeypatch, call, sig, rank=None):
    """Trainer.train_step sends this process ``sig`` during its ``call``-th call (on ``rank`` only, when given)."""
    calls, real = [0], Trainer.train_step

    def step(self, mbs):
        calls[0] += 1
        if calls[0] == call and (rank is None or self.dist.rank == rank):
            os.kill(os.getpid(), sig)
        return real(self, mbs)
    monkeypatch.setattr(Trainer, "train_step", step)


def test_sigterm_finishes_the_step_and_saves(assets, tmp_path, monkeypatch):
    _signal_at(monkeypatch, call=2, sig=signal.SIGTERM)
    lines = []
    a = Trainer(make_cfg(assets, tmp_path / "a", **{"schedule.max_steps": 4, "checkpoint.every_steps": 0}),
                log=lines.append)
    with pytest.raises(KeyboardInterrupt):
        a.train()
    assert a.global_step == 2
    assert ckpt.latest_checkpoint(str(tmp_path / "a" / "checkpoints")).endswith("step_00000002")
    assert any(line.startswith("SIGTERM: finishing this step") for line in lines), lines
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after train()
    assert any(line.endswith("saved; the same command resumes from it") for line in lines), lines


def test_interrupt_note_names_the_resume_setting_when_resume_is_off(assets, tmp_path, monkeypatch):
    """checkpoint.resume=none (the demo's): the same command would start over, so the note says how to resume."""
    _signal_at(monkeypatch, call=1, sig=signal.SIGTERM)
    lines = []
    a = Trainer(make_cfg(assets, tmp_path / "a", **{"schedule.max_steps": 3, "checkpoint.every_steps": 0,
                                                    "checkpoint.resume": "none"}), log=lines.append)
    with pytest.raises(KeyboardInterrupt):
        a.train()
    assert any(line.endswith("saved; checkpoint.resume=auto (or this folder) resumes from it") for line in lines), \
        lines
    assert not any("the same command resumes" in line for line in lines), lines


def test_cli_interrupt_exits_130_without_a_traceback(monkeypatch, capsys):
    """A KeyboardInterrupt out of any command (the demo's trainer after its checkpoint): exit status 130 and one
    line, no traceback (LLAVA_FAST_TRACEBACK=1 re-raises it)."""
    from llava_fast import cli

    def interrupted(**kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "run_demo", interrupted)
    monkeypatch.delenv("LLAVA_FAST_TRACEBACK", raising=False)
    assert cli.main(["demo", "--quick"]) == 130
    assert capsys.readouterr().err.strip() == "llava-fast demo: interrupted"
    monkeypatch.setenv("LLAVA_FAST_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.main(["demo", "--quick"])


def _worker(rank, world, port, root, out, extra=()):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import pytest as _pytest

    interrupt_rank = int(extra[0]) if extra else None
    mp = _pytest.MonkeyPatch()
    if interrupt_rank is not None:
        _signal_at(mp, call=2, sig=signal.SIGINT, rank=interrupt_rank)
    tr = Trainer(_cfg(root, out, accum=1, extra=("schedule.max_steps=3", "checkpoint.every_steps=0")), quiet=True)
    stopped = False
    try:
        tr.train()
    except KeyboardInterrupt:
        stopped = True
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"stopped": stopped, "step": tr.global_step}, f)
    _finish_rank(rank, out, tr)


def test_torchrun_ranks_stop_together_and_resume(tmp_path):
    root = str(tmp_path)
    demo.make_data(os.path.join(root, "data"), seed=2, n_caption=0, n_qa=24, n_eval=0)
    demo.build_tiny_model(os.path.join(root, "model"), seed=0, quick=True)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "run")
    os.makedirs(ref_out)
    os.makedirs(out)
    ref = _run_two_ranks(root, ref_out, worker=_worker)          # uninterrupted, 3 steps
    _run_two_ranks(root, out, extra=("1",), worker=_worker)      # Ctrl-C reaches rank 1 only, in step 2
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            assert json.load(f) == {"stopped": True, "step": 2}, rank
    assert ckpt.latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step_00000002")
    resumed = _run_two_ranks(root, out, worker=_worker)          # the same command: resumes at step 2
    assert len(ref) == len(resumed) == 3
    for r, g in zip(ref, resumed):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-7)
