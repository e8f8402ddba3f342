"""Resume exactness and checkpoint safety: a crash after the last checkpoint, a checkpoint saved again at the same
step, rotation next to checkpoints numbered after the one written, and resuming under another rank layout.
Tiny model and data from the demo's generators (CPU, fp32)."""
import json
import os

import pytest
import torch

from llava_fast.train import Trainer
from llava_fast.train import checkpoint as ckpt
from test_trainer import make_cfg


def _log_steps(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_crash_after_checkpoint_resumes_exactly_and_logs_each_step_once(assets, tmp_path):
    """A run killed after its last periodic checkpoint (here the one at the epoch boundary) and resumed ends with
    the uninterrupted run's weights, bit for bit, and its train_log.jsonl holds every step once, with the
    uninterrupted run's values: the steps the crashed run logged after the checkpoint (and a line the crash cut
    short) are not kept next to the ones the resumed run logs again."""
    over = {"schedule.max_steps": 6, "train.accum": 2, "checkpoint.every_steps": 4, "checkpoint.keep": 1}
    a = Trainer(make_cfg(assets, tmp_path / "a", **over), quiet=True)
    a.train()
    assert a.steps_per_epoch == 4  # the checkpoint at step 4 is at the end of epoch 0

    out = tmp_path / "b"
    b = Trainer(make_cfg(assets, out, **over), quiet=True)
    calls, step = [0], b.train_step

    def killed_at_sixth(mbs):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt  # the process dies during step 6; step 5 was logged, not checkpointed
        return step(mbs)

    b.train_step = killed_at_sixth
    with pytest.raises(KeyboardInterrupt):
        b.train()
    assert ckpt.latest_checkpoint(str(out / "checkpoints")).endswith("step_00000004")
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.')  # a record the crash cut short
    b2 = Trainer(make_cfg(assets, out, **over), quiet=True)
    b2.train()
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.history == b2.history
    la, lb = _log_steps(tmp_path / "a"), _log_steps(out)
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["epoch"]) for r in la] == \
           [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["epoch"]) for r in lb]


def test_saving_a_step_again_never_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A checkpoint saved again at its step (train(stop_at_step=N) when N is a save step writes step N twice; a
    finished run started again saves its last step again) must not delete the complete copy before the new one is
    in place: a crash in between would leave no checkpoint (keep=1: the next run silently starts from step 0)."""
    root = str(tmp_path / "ck")
    w = torch.arange(6.0).view(2, 3)
    ckpt.save_checkpoint(root, 2, {"w": w}, {"step": 2}, ckpt.rng_state(), keep=1)
    real_replace = os.replace

    def crash_on_rename_into_place(src, dst, *a, **k):
        if os.path.basename(src).startswith(".tmp-step_"):
            raise KeyboardInterrupt("killed before the new checkpoint folder was renamed into place")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", crash_on_rename_into_place)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, {"w": w + 1}, {"step": 2}, ckpt.rng_state(), keep=1)
    monkeypatch.setattr(os, "replace", real_replace)
    last = ckpt.latest_checkpoint(root)
    assert last is not None, "no checkpoint left after a crash while saving step 2 again"
    ms, ts, rng = ckpt.load_checkpoint(last)
    assert torch.equal(ms["w"], w) and ts["step"] == 2 and rng is not None
    # the next save at that step completes and leaves one clean folder
    ckpt.save_checkpoint(root, 2, {"w": w + 1}, {"step": 2}, None, keep=1)
    assert ckpt.latest_checkpoint(root).endswith("step_00000002")
    assert torch.equal(ckpt.load_checkpoint(ckpt.latest_checkpoint(root))[0]["w"], w + 1)
    assert sorted(os.listdir(root)) == ["LATEST", "step_00000002"]


def test_rotation_keeps_the_checkpoint_just_written(tmp_path):
    """A run resumed from an older checkpoint (checkpoint.resume=PATH), or started anew in a folder that holds
    another run's checkpoints, writes step folders numbered below existing ones. Rotation sorted them all by name
    and, with keep=1, deleted the checkpoint just written: LATEST named nothing and the next resume took the
    abandoned run's newer checkpoint."""
    root = str(tmp_path / "ck")
    for s in (4, 6):
        ckpt.save_checkpoint(root, s, {"w": torch.full((2,), float(s))}, {"step": s}, None, keep=2)
    ckpt.save_checkpoint(root, 5, {"w": torch.full((2,), 5.0)}, {"step": 5}, None, keep=1)
    last = ckpt.latest_checkpoint(root)
    assert last is not None and last.endswith("step_00000005")
    assert ckpt.load_checkpoint(last)[1]["step"] == 5
    assert not os.path.exists(os.path.join(root, "step_00000004"))  # older ones still rotate


def test_resume_refuses_another_partial_last_step_rule(assets, tmp_path, monkeypatch):
    """Several ranks leave out each epoch's partial last step (drop_last), one process trains it. A checkpoint of 2
    ranks x accum 3 resumed by 1 process x accum 6 (same 'accum x world size') would get other epochs, another
    total step count and another lr schedule: refused, naming the setting. Simulated here by forcing drop_last
    for the first run, as several ranks do. Checkpoints written before the key existed still resume."""
    from llava_fast.data import packing

    over = {"train.accum": 3}
    init = packing._StepSampler.__init__
    monkeypatch.setattr(packing._StepSampler, "__init__", lambda self, **kw: init(self, **{**kw, "drop_last": True}))
    first = Trainer(make_cfg(assets, tmp_path / "r", **over), quiet=True)
    first.train(stop_at_step=1)
    assert first.sampler.left_out(0), "the data must have a partial last step for this test"
    n_first = first.total_steps
    monkeypatch.setattr(packing._StepSampler, "__init__", init)
    with pytest.raises(ValueError, match="cannot resume from .*partial last step left out.*True in the checkpoint, "
                                         "False now"):
        second = Trainer(make_cfg(assets, tmp_path / "r", **over), quiet=True).setup()
        assert second.total_steps == n_first  # (it resumed: at least the schedule's length must be the same)
    # a checkpoint without the key (written before it was checked) is not refused for it
    path = ckpt.latest_checkpoint(str(tmp_path / "r" / "checkpoints"))
    sp = os.path.join(path, "trainer_state.pt")
    st = torch.load(sp, weights_only=True)
    key = json.loads(st["resume_key"])
    del key["partial last step left out (several ranks)"]
    st["resume_key"] = json.dumps(key)
    torch.save(st, sp)
    monkeypatch.setattr(packing._StepSampler, "__init__", lambda self, **kw: init(self, **{**kw, "drop_last": True}))
    assert Trainer(make_cfg(assets, tmp_path / "r", **over), quiet=True).setup().global_step == 1


def test_trim_log_keeps_an_old_runs_log_on_a_fresh_start(tmp_path):
    """_trim_log: a resumed run drops the records after its step (and a cut line); a fresh run (step 0) in a folder
    holding another run's log renames that log instead of emptying it."""
    import json

    from llava_fast.train.trainer import _trim_log

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4')
    _trim_log(str(log), 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    _trim_log(str(log), 0)
    assert not log.exists()
    kept = list(tmp_path.glob("train_log.*.jsonl"))
    assert len(kept) == 1 and [json.loads(x)["step"] for x in kept[0].read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("first,then", [(False, True), (True, False)])
def test_resume_applies_the_configured_fused_flag(assets, tmp_path, first, then):
    """optim.fused may change on resume (not in the resume key), but load_state_dict restored the checkpoint's flag:
    a run resumed with fused=false kept running fused. The configured flag now wins, and training goes on."""
    over = {"schedule.max_steps": 2, "train.accum": 2, "checkpoint.every_steps": 1}
    Trainer(make_cfg(assets, tmp_path, **{**over, "optim.fused": first}), quiet=True).train(stop_at_step=1)
    b = Trainer(make_cfg(assets, tmp_path, **{**over, "optim.fused": then}), quiet=True)
    b.train()
    assert b.global_step == 2
    assert all(bool(g.get("fused")) == then for g in b.optimizer.param_groups)
    steps = [s["step"] for s in b.optimizer.state.values()]
    assert steps and all(float(t) == 2.0 and t.device.type == "cpu" for t in steps)


def test_resume_with_another_precision_says_so(assets, tmp_path):
    """model.dtype may change on resume (not in the resume key: the new setting is applied, nothing restored
    overrides it), but the log says so and the run goes on in the new dtype."""
    import torch

    over = {"schedule.max_steps": 2, "checkpoint.every_steps": 1}
    Trainer(make_cfg(assets, tmp_path, **{**over, "model.dtype": "float32"}), quiet=True).train(stop_at_step=1)
    b = Trainer(make_cfg(assets, tmp_path, **{**over, "model.dtype": "bfloat16"}), quiet=True)
    lines = []
    b.log = lambda msg, *a, **k: lines.append(msg)
    b.train()
    assert b.global_step == 2
    assert next(b.model.parameters()).dtype == torch.bfloat16
    notes = [x for x in lines if "another precision" in x]
    assert len(notes) == 1 and "model.dtype='float32' -> 'bfloat16'" in notes[0], lines


def _sigint_at(monkeypatch, call, times=1):
    """Trainer.train_step sends this process SIGINT (a terminal's Ctrl-C) ``times`` times during its ``call``-th call."""
    import os
    import signal

    calls, real = [0], Trainer.train_step

    def step(self, mbs):
        calls[0] += 1
        if calls[0] == call:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, mbs)
    monkeypatch.setattr(Trainer, "train_step", step)


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(assets, tmp_path, monkeypatch):
    """The first Ctrl-C lets the step finish and saves it (the periodic checkpoints would come much later): the
    resumed run continues with the uninterrupted run's losses; nothing is lost."""
    from llava_fast.train import checkpoint as ckpt

    over = {"schedule.max_steps": 4, "checkpoint.every_steps": 100}
    ref = Trainer(make_cfg(assets, tmp_path / "ref", **over), quiet=True)
    ref.train()
    _sigint_at(monkeypatch, call=2)
    a = Trainer(make_cfg(assets, tmp_path / "a", **over), quiet=True)
    with pytest.raises(KeyboardInterrupt):
        a.train()
    assert a.global_step == 2
    assert ckpt.latest_checkpoint(str(tmp_path / "a" / "checkpoints")).endswith("step_00000002")
    monkeypatch.undo()
    b = Trainer(make_cfg(assets, tmp_path / "a", **over), quiet=True)
    b.train()
    assert b.global_step == 4
    # (the history of the steps before the checkpoint is restored with it)
    assert [h["loss"] for h in b.history] == [h["loss"] for h in ref.history] and len(ref.history) == 4


def test_second_ctrl_c_stops_at_once(assets, tmp_path, monkeypatch):
    """Two Ctrl-C: stop inside the step, save nothing more (the step never finished)."""
    from llava_fast.train import checkpoint as ckpt

    _sigint_at(monkeypatch, call=2, times=2)
    a = Trainer(make_cfg(assets, tmp_path / "a", **{"schedule.max_steps": 4, "checkpoint.every_steps": 100}),
                quiet=True)
    with pytest.raises(KeyboardInterrupt):
        a.train()
    assert a.global_step == 1
    assert ckpt.latest_checkpoint(str(tmp_path / "a" / "checkpoints")) is None


def test_ctrl_c_saves_with_the_default_of_no_periodic_checkpoints(assets, tmp_path, monkeypatch):
    """checkpoint.every_steps=0 (the default) saves no periodic checkpoint, but a run stopped by Ctrl-C is saved."""
    from llava_fast.train import checkpoint as ckpt

    _sigint_at(monkeypatch, call=1)
    a = Trainer(make_cfg(assets, tmp_path / "a", **{"schedule.max_steps": 3, "checkpoint.every_steps": 0}),
                quiet=True)
    with pytest.raises(KeyboardInterrupt):
        a.train()
    assert a.global_step == 1
    assert ckpt.latest_checkpoint(str(tmp_path / "a" / "checkpoints")).endswith("step_00000001")


def test_resume_loads_optimizer_state_with_a_parameter_that_never_had_a_gradient(monkeypatch):
    """torch 2.7-2.9's set_optimizer_state_dict raises KeyError for a trainable parameter with no saved state even
    with strict=False (pytorch/pytorch#164257; every resume of a run training CLIP, whose post_layernorm LLaVA never
    uses, failed so on torch 2.7). load_full_states hides such parameters from the optimizer during the load: here a
    stand-in with torch 2.7's rule (any trainable parameter of the groups without saved state: KeyError) wraps the
    installed function. After the load the groups hold every parameter in its place, the unused one has no state,
    and the next step equals the uninterrupted run's."""
    import copy

    import torch.distributed.checkpoint.state_dict as dsd
    import torch.nn as nn

    from llava_fast.train import distributed

    def make():
        torch.manual_seed(0)
        m = nn.ModuleDict(dict(a=nn.Linear(4, 4), unused=nn.LayerNorm(4), b=nn.Linear(4, 2)))
        decay = [m["a"].weight, m["b"].weight]
        opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1),
                                 dict(params=[m["a"].bias, m["unused"].weight, m["unused"].bias, m["b"].bias],
                                      weight_decay=0.0)], lr=1e-2)
        return m, opt

    def step(m, opt, seed):
        torch.manual_seed(seed)
        m["b"](m["a"](torch.randn(3, 4))).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    m, opt = make()
    step(m, opt, 1)
    # copies, as a checkpoint on disk is (on the CPU the state dicts share the live tensors)
    model_state = copy.deepcopy(distributed.full_model_state(m, False))
    optim_state = copy.deepcopy(distributed.full_optim_state(m, opt, False))
    assert "unused.weight" not in optim_state["state"] and "a.weight" in optim_state["state"]

    real, seen = dsd.set_optimizer_state_dict, []

    def torch27(model, optimizers, optim_state_dict, *, options=None):
        names = {id(p): n for n, p in model.named_parameters()}
        for g in optimizers.param_groups:
            for p in g["params"]:
                if p.requires_grad and names[id(p)] not in optim_state_dict["state"]:
                    raise KeyError(names[id(p)])
        seen.append([[names[id(p)] for p in g["params"]] for g in optimizers.param_groups])
        return real(model, optimizers, optim_state_dict, options=options)
    monkeypatch.setattr(dsd, "set_optimizer_state_dict", torch27)

    m2, opt2 = make()
    groups = [list(g["params"]) for g in opt2.param_groups]
    distributed.load_full_states(m2, opt2, model_state, optim_state, False)
    assert seen == [[["a.weight", "b.weight"], ["a.bias", "b.bias"]]]
    assert [list(g["params"]) for g in opt2.param_groups] == groups and all(
        x is y for g, h in zip(opt2.param_groups, groups) for x, y in zip(g["params"], h))
    assert m2["unused"].weight not in opt2.state and len(opt2.state) == 4
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.1, 0.0]
    step(m, opt, 2)
    step(m2, opt2, 2)
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
