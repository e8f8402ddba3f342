"""Trainer: checkpoint atomicity, bit-for-bit resume on CPU, loss normalisation, export loadable by transformers,
recipes and overrides. Tiny model and data from the demo's generators (CPU, a few seconds each)."""
import json
import math
import os

import pytest
import torch

from llava_fast.train import Trainer, apply_overrides, get_recipe
from llava_fast.train import checkpoint as ckpt
from llava_fast.train import trainer as trainer_module


def make_cfg(assets, out, recipe="stage2", **over):
    cfg = get_recipe(recipe, "llava_next")
    cfg.model.path = str(assets / "model")
    cfg.data.data = str(assets / "data" / ("stage2.json" if recipe == "stage2" else "stage1.json"))
    cfg.data.images = str(assets / "data" / "images")
    cfg.data.max_len, cfg.data.max_tokens, cfg.data.num_workers = 400, 512, 0
    cfg.data.group_by_modality_length = False
    cfg.train.trainable = ["projector", "newline", "llm", "vision"]
    cfg.train.activation_checkpointing = False
    cfg.train.device = "cpu"
    cfg.optim.lr = 1e-3
    cfg.checkpoint.out = str(out)
    cfg.checkpoint.export = False
    cfg.log.tensorboard = False
    cfg.log.progress = False
    apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])
    return cfg


def test_checkpoint_atomic(tmp_path):
    root = str(tmp_path / "ck")
    st = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    ckpt.save_checkpoint(root, 1, st, {"step": 1}, ckpt.rng_state())
    for where in ("model.safetensors", "trainer_state.pt"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            ckpt.save_checkpoint(root, 2, {"w": torch.zeros(2, 3)}, {"step": 2}, ckpt.rng_state(), _fail_after=where)
        last = ckpt.latest_checkpoint(root)
        assert last.endswith("step_00000001")
        ms, ts, rng = ckpt.load_checkpoint(last)
        assert torch.equal(ms["w"], st["w"]) and ts["step"] == 1 and rng is not None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(os.path.join(root, ".tmp-step_00000002"))
    # crash after the rename but before the pointer: the pointer still names a complete checkpoint
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(root, 2, {"w": torch.zeros(2, 3)}, {"step": 2}, None, _fail_after="rename")
    assert ckpt.is_complete(ckpt.latest_checkpoint(root))
    ckpt.save_checkpoint(root, 3, {"w": torch.zeros(2, 3)}, {"step": 3}, None, keep=2)
    assert ckpt.latest_checkpoint(root).endswith("step_00000003")
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_00000002", "step_00000003"]


def _record_rng(tr):
    """Wrap tr.train_step to record the global torch RNG state each step starts with."""
    states, step = [], tr.train_step
    tr.train_step = lambda mbs: (states.append(torch.get_rng_state()), step(mbs))[1]
    return states


@pytest.mark.parametrize("lora", [False, True])
def test_resume_bit_for_bit(assets, tmp_path, lora):
    """A run stopped at step 3 and resumed ends bit for bit where the uninterrupted run does; a LoRA run too (with
    adapter dropout drawing from the RNG, the projector at its own lr: the original's LoRA resume was broken,
    users.md 1.11)."""
    over = {"schedule.max_steps": 6, "train.accum": 2}
    if lora:
        pytest.importorskip("peft")
        over.update({"train.lora": True, "train.lora_dropout": 0.1, "optim.projector_lr": 3e-4})
    a = Trainer(make_cfg(assets, tmp_path / "a", **over), quiet=True)
    rng_a = _record_rng(a)
    a.train()
    b1 = Trainer(make_cfg(assets, tmp_path / "b", **over), quiet=True)
    r = b1.train(stop_at_step=3)
    assert r["steps"] == 3 and os.path.isdir(r["checkpoint"])
    b2 = Trainer(make_cfg(assets, tmp_path / "b", **over), quiet=True)
    rng_b = _record_rng(b2)
    b2.train()
    assert b2.global_step == 6
    # the RNG streams continue where they stopped (dropout, LoRA dropout): the DataLoader made for the resumed
    # epoch must not draw from them
    assert len(rng_b) == 3 and all(torch.equal(x, y) for x, y in zip(rng_a[3:], rng_b))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b2.history]
    assert [h["grad_norm"] for h in a.history] == [h["grad_norm"] for h in b2.history]
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    losses = [h["loss"] for h in a.history]
    assert losses[-1] < losses[0]


def test_loss_normalised_over_accumulated_batch(assets, tmp_path):
    """Two packs accumulated with num_items_in_batch = N_total give the token-mean over both packs."""
    tr = Trainer(make_cfg(assets, tmp_path / "n"), quiet=True).setup()
    it = iter(tr._loader())
    b1, b2 = next(it), next(it)
    n = b1["num_items"] + b2["num_items"]
    m = tr.model
    with torch.no_grad():
        l1 = m(**tr._to_device(b1), num_items_in_batch=torch.tensor(float(n))).loss
        l2 = m(**tr._to_device(b2), num_items_in_batch=torch.tensor(float(n))).loss
        o1, o2 = m(**tr._to_device(b1)), m(**tr._to_device(b2))
    ref = (o1.loss * b1["num_items"] + o2.loss * b2["num_items"]) / n
    torch.testing.assert_close(l1 + l2, ref, rtol=1e-5, atol=1e-6)


def test_accumulated_step_equals_one_big_batch(assets, tmp_path):
    """train_step over accumulated packs gives the loss and gradients of one batch holding all their samples
    (mean over its supervised tokens), packed in one row or padded: every supervised token weighs the same."""
    tr = Trainer(make_cfg(assets, tmp_path / "g", **{"train.accum": 3, "optim.max_grad_norm": 0}),
                 quiet=True).setup()
    from llava_fast.data import collate_packed, collate_padded

    mbs_idx = tr.sampler.steps()[0]
    it = iter(tr._loader())
    mbs = [next(it) for _ in mbs_idx]
    assert len(mbs) == 3 and len({b["num_items"] for b in mbs}) > 1  # a mean of pack means would differ
    params = {k: p for k, p in tr.model.named_parameters() if p.requires_grad}
    grads = {}
    tr.optimizer.step = lambda: grads.update({k: p.grad.clone() for k, p in params.items()  # no update
                                              if p.grad is not None})
    m = tr.train_step(mbs)
    samples = [tr.dataset[i] for mb in mbs_idx for i in mb]
    for big in (collate_packed(samples), collate_padded(samples, pad_id=tr.tokenizer.pad_token_id)):
        tr.model.zero_grad(set_to_none=True)
        out = tr.model(**tr._to_device(big))  # mean over the batch's supervised tokens
        out.loss.backward()
        assert big["num_items"] == m["supervised"]
        assert m["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
        assert len(grads) > 0 and set(grads) == {k for k, p in params.items() if p.grad is not None}
        for k, g in grads.items():
            torch.testing.assert_close(g, params[k].grad, rtol=1e-4, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")


def test_export_loads_in_transformers(assets, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = make_cfg(assets, tmp_path / "e", **{"schedule.max_steps": 2, "checkpoint.export": True})
    tr = Trainer(cfg, quiet=True)
    res = tr.train()
    final = res["final"]
    assert os.path.isfile(os.path.join(final, "config.json"))
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(final, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert tok.convert_tokens_to_ids("<image>") == hf.config.image_token_id
    from llava_fast.data import collate_padded

    b = collate_padded([tr.dataset[0], tr.dataset[1]], pad_id=tok.pad_token_id)
    ours = tr.model.eval()
    with torch.no_grad():
        ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                 image_sizes=b["image_sizes"]).logits
        got = ours(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                   image_sizes=b["image_sizes"]).logits
    am = b["attention_mask"].bool()
    torch.testing.assert_close(got[am], ref[am], rtol=1e-4, atol=1e-4)


def test_recipes_and_overrides():
    s1 = get_recipe("stage1", "llava")
    assert s1.data.template == "plain" and s1.optim.lr == 1e-3 and s1.train.trainable == ["projector", "newline"]
    s2 = get_recipe("next-stage2")
    assert s2.data.template == "vicuna_v1" and s2.optim.lr == 2e-5 and "llm" in s2.train.trainable
    ov = get_recipe("onevision-stage2")
    assert ov.data.template == "qwen" and ov.optim.vision_lr == 2e-6 and "vision" in ov.train.trainable
    apply_overrides(s2, ["optim.lr=1e-4", "data.max_tokens=16384", "train.trainable=projector,llm",
                         "schedule.max_steps=none", "optim.betas=0.9,0.95"])
    assert s2.optim.lr == 1e-4 and s2.data.max_tokens == 16384 and s2.train.trainable == ["projector", "llm"]
    assert s2.optim.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown field"):
        apply_overrides(s2, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("stage3")
    with pytest.raises(ValueError, match="template"):
        apply_overrides(s2, ["data.template=chatml"])


def test_config_typos_and_bad_values_raise():
    """Nothing in a config is silently dropped, truncated or ignored: unknown keys raise naming them, values that
    do not fit the field raise naming the override."""
    from llava_fast.train import TrainConfig

    cfg = TrainConfig.from_dict({"optim": {"lr": 1e-4}, "train": {"accum": 2}})
    assert cfg.optim.lr == 1e-4 and cfg.train.accum == 2
    assert TrainConfig.from_dict(json.loads(cfg.to_json())).to_json() == cfg.to_json()
    with pytest.raises(ValueError, match=r"unknown config keys \['optimizer'\]"):
        TrainConfig.from_dict({"optimizer": {"lr": 1e-4}})
    with pytest.raises(ValueError, match=r"unknown fields \['optim.learning_rate'\]"):
        TrainConfig.from_dict({"optim": {"learning_rate": 1e-4}})
    s2 = get_recipe("next-stage2")
    for bad, match in [("optim.betas=0.9,0.95,0.99", "optim.betas.*expected 2 comma-separated values, got 3"),
                       ("optim.betas=0.9", "optim.betas.*expected 2 comma-separated values, got 1"),
                       ("train.accum=1.5e0", "train.accum.*expected an integer"),
                       ("train.accum=1.5", "train.accum=1.5"),
                       ("schedule.max_steps=0", "schedule.max_steps must be >= 1"),
                       ("schedule.epochs=0", "schedule.epochs must be > 0"),
                       ("schedule.warmup_ratio=3", "schedule.warmup_ratio must be in"),
                       ("train.fsdp=of", "train.fsdp must be auto or off"),
                       ("optim.max_grad_norm=-1", "optim.max_grad_norm must be >= 0"),
                       ("checkpoint.keep=-1", "checkpoint.keep must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            apply_overrides(get_recipe("next-stage2"), [bad])
    apply_overrides(s2, ["train.accum=4e0", "schedule.max_steps=none"])
    assert s2.train.accum == 4 and s2.schedule.max_steps is None


def test_resume_refuses_changed_order_or_restored_settings(assets, tmp_path):
    """A checkpoint's data position only means something for the same plan, and its optimizer/scheduler state
    overrides lr, betas, the schedule...: resuming with other settings raises naming them (no repeated/skipped
    samples, no silently ignored override); settings read at every step may change."""
    over = {"schedule.max_steps": 4, "train.accum": 2}
    Trainer(make_cfg(assets, tmp_path / "r", **over), quiet=True).train(stop_at_step=1)
    for change, name in [({"train.accum": 1}, "train.accum"), ({"optim.lr": 1e-4}, "optim.lr"),
                         ({"data.max_tokens": 1024}, "data.max_tokens"), ({"schedule.max_steps": 8}, "max_steps"),
                         ({"train.seed": 1}, "train.seed"), ({"data.max_len": 150}, "samples")]:
        with pytest.raises(ValueError, match=f"cannot resume from .*{name}.*start a new run"):
            Trainer(make_cfg(assets, tmp_path / "r", **{**over, **change}), quiet=True).setup()
    tr = Trainer(make_cfg(assets, tmp_path / "r", **{**over, "optim.max_grad_norm": 0.5}), quiet=True).setup()
    assert tr.global_step == 1
    # another model under the checkpoint's weights (here: other AnyRes resolutions) would train on other inputs
    import shutil

    other = tmp_path / "other"
    shutil.copytree(assets / "model", other)
    c = json.loads((other / "config.json").read_text())
    c["image_grid_pinpoints"] = c["image_grid_pinpoints"][:2]
    (other / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"cannot resume from .*model \(its config.json\): 'crc32"):
        Trainer(make_cfg(assets, tmp_path / "r", **{**over, "model.path": str(other)}), quiet=True).setup()


def test_step_without_supervised_tokens_skips_update(assets, tmp_path):
    """A step whose samples were all dropped (or, under FSDP, only filler samples with masked labels) has no mean
    to report and nothing to learn: the update is skipped (AdamW's moments alone would move the weights), the loss
    is reported as NaN (not 0.0, which would skew the logged mean), and it is not a non-finite step."""
    from llava_fast.data import IGNORE_INDEX, collate_packed

    logs = []
    tr = Trainer(make_cfg(assets, tmp_path / "e"), log=logs.append).setup()
    it = iter(tr._loader())
    tr.train_step([next(it)])                            # AdamW has moments now
    params = [p for p in tr.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    sched0 = tr.scheduler.last_epoch
    s = tr.dataset[0]
    masked = collate_packed([dict(s, labels=torch.full_like(s["labels"], IGNORE_INDEX)),
                             {"dropped": "decode_error", "sample_id": "x"}])
    assert masked["num_items"] == 0
    for mbs in ([masked], [collate_packed([{"dropped": "decode_error", "sample_id": "y"}])]):
        m = tr.train_step(mbs)
        assert math.isnan(m["loss"]) and m["skipped_nonfinite"] == 0
        assert all(torch.equal(a, p.detach()) for a, p in zip(before, params)), "an update without data"
    assert tr.scheduler.last_epoch == sched0 + 2 and tr.drops["decode_error"] == 2
    assert any("no supervised token" in m for m in logs)


@pytest.mark.parametrize("lora", [False, True])
def test_part_learning_rates(assets, tmp_path, lora):
    """optim.vision_lr / optim.projector_lr (the original's --mm_vision_tower_lr / --mm_projector_lr) give those
    parts their own rate, image_newline and the language model (or its LoRA adapters) train at optim.lr, the cosine
    schedule scales every rate, and the logged lr is optim.lr's (the first group is the vision tower's)."""
    from llava_fast.train.trainer import param_part

    tr = Trainer(make_cfg(assets, tmp_path / "p", **{"optim.vision_lr": 1e-5, "optim.projector_lr": 5e-4,
                                                     "train.lora": lora, "schedule.warmup_ratio": 0.5}),
                 quiet=True).setup()
    want = {"vision": 1e-5, "projector": 5e-4, "newline": 1e-3, "llm": 1e-3}
    of = {id(p): g for g in tr.optimizer.param_groups for p in g["params"]}
    seen = set()
    for name, p in tr.model.named_parameters():
        if p.requires_grad:
            part = param_part(name)
            seen.add(part + ("+lora" if "lora_" in name else ""))
            assert of[id(p)]["initial_lr"] == want[part], name
    assert seen == {"vision", "projector", "newline", "llm+lora" if lora else "llm"}, seen
    it = iter(tr._loader())
    for _ in range(2):
        tr.train_step([next(it)])
        f = tr.optimizer.param_groups[0]["lr"] / tr.optimizer.param_groups[0]["initial_lr"]
        assert 0 < f < 1 and all(math.isclose(g["lr"], f * g["initial_lr"]) for g in tr.optimizer.param_groups)
        m = tr.train_step([next(it)])  # logs the rate it stepped with
        assert math.isclose(m["lr"], f * 1e-3), (m["lr"], f)


@pytest.mark.parametrize("over, line", [
    ({"optim.vision_lr": 1e-5, "train.trainable": "projector,llm"},
     "optim.vision_lr=1e-05 is unused: the vision tower does not train (train.trainable=projector,llm)"),
    ({"optim.projector_lr": 2e-5, "train.trainable": "llm"},
     "optim.projector_lr=2e-05 is unused: the projector does not train (train.trainable=llm)")])
def test_unused_part_lr_is_logged(assets, tmp_path, over, line):
    logs = []
    Trainer(make_cfg(assets, tmp_path / "v", **over), log=logs.append).setup()
    assert any(line in m for m in logs), logs


def test_partial_last_step_counted(assets, tmp_path):
    """With drop_last (several ranks) the micro-batches of a partial last step are left out of the epoch: counted
    as dropped 'partial_last_step' once per epoch, not silently skipped."""
    from llava_fast.data import PackedBatchSampler

    tr = Trainer(make_cfg(assets, tmp_path / "p", **{"train.accum": 3, "schedule.epochs": 2}), quiet=True).setup()
    ds = tr.dataset
    tr.sampler = PackedBatchSampler(ds.lengths, 512, modality=[l > 0 for l in ds.modality_lengths], seed=0,
                                    accum=3, drop_last=True)
    tr.total_steps = tr.sampler.num_steps(0) + 1  # into the second epoch
    left = [sum(len(mb) for mb in tr.sampler.left_out(e)) for e in (0, 1)]
    assert min(left) > 0
    res = tr.train()
    assert res["dropped"].get("partial_last_step") == sum(left)


def test_train_cli_sets_expandable_segments_unless_chosen(monkeypatch):
    """`llava-fast train` turns on the CUDA allocator's expandable segments (variable image-token counts fragment
    fixed segments), but never overrides a PYTORCH_CUDA_ALLOC_CONF the user set."""
    from llava_fast.train.cli import ALLOC_CONF, default_allocator_conf

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert default_allocator_conf() == ALLOC_CONF
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert default_allocator_conf() == "max_split_size_mb:128"


def test_nonfinite_steps_are_skipped_then_stop(assets, tmp_path):
    """A NaN gradient skips the update (weights unchanged, lr schedule advances, counted and checkpointed); the next
    finite step updates again; max_nonfinite_steps in a row stop training with an error naming the setting."""
    tr = Trainer(make_cfg(assets, tmp_path / "nf", **{"optim.max_nonfinite_steps": 2}), quiet=True).setup()
    it = iter(tr._loader())
    params = [p for p in tr.model.parameters() if p.requires_grad]
    poison = params[0].register_hook(lambda g: g * float("nan"))
    before = [p.detach().clone() for p in params]
    sched0 = tr.scheduler.last_epoch
    m = tr.train_step([next(it)])
    assert m["skipped_nonfinite"] == 1 and not torch.isfinite(torch.tensor(m["grad_norm"]))
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params)), "a skipped step changed the weights"
    assert all(p.grad is None for p in params)
    assert tr.scheduler.last_epoch == sched0 + 1       # the lr schedule advanced
    assert tr.state()["skipped_nonfinite"] == 1
    poison.remove()
    m = tr.train_step([next(it)])                      # finite again: the update runs, the run of NaNs resets
    assert m["skipped_nonfinite"] == 1
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    poison = params[0].register_hook(lambda g: g * float("nan"))
    tr.train_step([next(it)])
    tr.global_step = 3
    tr.save()                                          # a resume continues the run of NaN steps, not from 0
    again = Trainer(make_cfg(assets, tmp_path / "nf", **{"optim.max_nonfinite_steps": 2}), quiet=True).setup()
    assert again.global_step == 3 and again.skipped_nonfinite == 2 and again._nonfinite_run == 1
    with pytest.raises(RuntimeError, match="2 steps in a row had a NaN/inf loss or gradient norm"):
        tr.train_step([next(it)])
    poison.remove()
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        make_cfg(assets, tmp_path / "bad", **{"optim.max_nonfinite_steps": -1})


def test_exported_processor_expands_images(assets, tmp_path):
    """The export's AutoProcessor turns a prompt with <image> and a picture into inputs transformers' model takes
    (processor_config.json: patch size, strategy, the CLIP class token; it used to load but fail on an image), and
    its chat template writes the run's training format (vicuna_v1 here), which `llava-fast chat` then uses too."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from llava_fast.chat import find_chat_template
    from llava_fast.data.templates import generation_prompt

    cfg = make_cfg(assets, tmp_path / "p", **{"schedule.max_steps": 1, "checkpoint.export": True})
    final = Trainer(cfg, quiet=True).train()["final"]
    proc = transformers.AutoProcessor.from_pretrained(final, local_files_only=True)
    img = Image.new("RGB", (70, 45), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}]
    assert prompt == generation_prompt(conv, "vicuna_v1", 1)[0] and prompt.endswith("USER: <image>\nWhat is it? "
                                                                                      "ASSISTANT:")
    assert find_chat_template(proc.tokenizer, final) == proc.chat_template
    inputs = proc(text=prompt, images=img, return_tensors="pt")
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(final, local_files_only=True).eval()
    with torch.no_grad():
        out = hf(**inputs)
    n_img = int((inputs["input_ids"] == hf.config.image_token_id).sum())
    assert n_img > 1 and out.logits.shape[1] == inputs["input_ids"].shape[1]


def test_export_with_lora_then_save_or_train_is_refused(assets, tmp_path):
    """export() merges the LoRA adapters into the model in place: a later save() or train() would checkpoint a model
    without the adapters the optimizer holds, or train weights that no longer exist. Both raise, saying why."""
    cfg = make_cfg(assets, tmp_path / "l", **{"schedule.max_steps": 1, "train.lora": True, "checkpoint.export": True,
                                              "train.trainable": "projector,llm"})
    tr = Trainer(cfg, quiet=True)
    tr.train()
    with pytest.raises(RuntimeError, match="merged the LoRA adapters"):
        tr.save()
    with pytest.raises(RuntimeError, match="merged the LoRA adapters"):
        tr.train()


def test_compiled_layers_train_like_eager(assets, tmp_path, monkeypatch):
    """train.compile: every decoder and vision encoder layer under torch.compile (here aot_eager: the CPU has no
    Inductor C++ compile in the tests; the GPU test set runs Inductor on the model), with packs of changing lengths
    from step to step and the vision tower trained: the same losses and weights as the eager run, to rounding."""
    over = {"schedule.max_steps": 3}
    eager = Trainer(make_cfg(assets, tmp_path / "eager", **over), quiet=True)
    eager.train()
    compile_ = torch.nn.Module.compile
    backends = []

    def aot_eager(self, *args, **kwargs):
        backends.append(kwargs.setdefault("backend", "aot_eager"))
        return compile_(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    torch._dynamo.reset()
    try:
        tr = Trainer(make_cfg(assets, tmp_path / "compiled", **over, **{"train.compile": True}), quiet=True)
        tr.train()
    finally:
        torch._dynamo.reset()
    layers = [*tr.model.model.language_model.layers, *tr.model.model.vision_tower.encoder.layers]
    assert backends == ["aot_eager"] * len(layers) and all(layer._compiled_call_impl is not None for layer in layers)
    for h_e, h_c in zip(eager.history, tr.history, strict=True):
        assert math.isclose(h_e["loss"], h_c["loss"], rel_tol=1e-5), (h_e, h_c)
    se, sc = eager.model.state_dict(), tr.model.state_dict()
    for k in se:
        torch.testing.assert_close(sc[k], se[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_precision_auto_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    """train.precision=auto: bf16 autocast on a GPU with native bf16, fp32 on an older one (V100 / T4: bf16 only
    emulated) and on the CPU; an explicit bf16 or fp32 is taken as given."""
    from llava_fast.train.trainer import bf16_autocast

    asked = []

    def native(including_emulation=True):
        asked.append(including_emulation)
        return native.value
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    native.value = True
    assert bf16_autocast("auto", cuda) and asked == [False]
    native.value = False
    assert not bf16_autocast("auto", cuda)
    assert not bf16_autocast("auto", cpu)
    assert bf16_autocast("bf16", cuda) and bf16_autocast("bf16", cpu)
    assert not bf16_autocast("fp32", cuda)
    assert asked == [False, False]


def test_out_of_memory_says_where_what_to_change_and_which_checkpoint(assets, tmp_path, monkeypatch):
    """A CUDA OOM inside a micro-batch: the error is still torch.OutOfMemoryError, with the step, the micro-batch's
    size, the settings that shrink it and the intact checkpoint to resume from, before torch's own message."""
    over = {"schedule.max_steps": 4, "train.accum": 2}
    tr = Trainer(make_cfg(assets, tmp_path / "oom", **over), quiet=True)
    tr.train(stop_at_step=2)
    real = type(tr.model).forward
    calls = []

    def forward(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **kw)
    monkeypatch.setattr(type(tr.model), "forward", forward)
    with pytest.raises(torch.OutOfMemoryError) as info:
        tr.train()
    msg = str(info.value)
    assert msg.startswith("out of GPU memory in step 3, micro-batch 2 of 2 (")
    assert "lower data.max_tokens (now 512) and raise train.accum to keep the global batch" in msg
    assert "set train.activation_checkpointing=true" in msg and "LLAVA_FAST_RECOMPUTE_ACT=1" in msg
    assert f"The last checkpoint, {ckpt.latest_checkpoint(tr.ckpt_root)}, is intact" in msg
    assert msg.endswith("(torch: CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


class _FakeWandb:
    """What the trainer calls of wandb: init(...) -> run with .id, .log(dict, step=), .finish()."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            id = kw["id"] or "run123"

            def log(self, d, step):
                fake.logged.append((step, d))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_logs_each_step_and_a_resumed_run_continues_it(assets, tmp_path, monkeypatch):
    """log.wandb=PROJECT: the scalars of each step go to W&B too; the run id is kept in OUT so that the resumed run
    continues the same W&B run. Without wandb installed the setting is refused before anything runs."""
    import importlib.machinery
    import sys
    import types

    from llava_fast.train.config import LogSection

    fake = _FakeWandb()
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.init = fake.init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    over = {"schedule.max_steps": 3, "log.wandb": "llava-runs"}
    Trainer(make_cfg(assets, tmp_path, **over), quiet=True).train(stop_at_step=2)
    Trainer(make_cfg(assets, tmp_path, **over), quiet=True).train()
    assert [k["id"] for k in fake.inits] == [None, "run123"] and fake.inits[0]["project"] == "llava-runs"
    assert all(k["resume"] == "allow" and k["dir"] == str(tmp_path) for k in fake.inits)
    assert fake.inits[0]["config"]["log"]["wandb"] == "llava-runs"
    assert [s for s, _ in fake.logged] == [1, 2, 3] and fake.finished == 2
    assert set(fake.logged[0][1]) >= {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s"}
    assert (tmp_path / "wandb_run_id").read_text() == "run123"
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="log.wandb=p: Weights & Biases is not installed: pip install wandb"):
        LogSection(wandb="p")


def test_missing_optional_packages_are_named(assets, tmp_path, monkeypatch, capsys):
    """Nothing an option asks for is dropped without a word: log.tensorboard (on by default) without TensorBoard
    says once that OUT/tb is not written (and nothing with log.tensorboard=false); train.lora=true without peft is
    refused before the model loads, and the CLI prints that as one error line, exit 2."""
    import builtins
    import importlib.util

    from llava_fast.cli import main
    from llava_fast.train.config import TrainSection

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ModuleNotFoundError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    for tb, n in ((True, 1), (False, 0)):
        lines = []
        Trainer(make_cfg(assets, tmp_path / str(tb), **{"schedule.max_steps": 1, "log.tensorboard": tb}),
                log=lines.append).train()
        said = [ln for ln in lines if ln.startswith("log.tensorboard:")]
        assert len(said) == n, lines
        if n:
            assert str(tmp_path / "True" / "tb") in said[0] and "pip install tensorboard" in said[0]
    monkeypatch.setattr(builtins, "__import__", real_import)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "peft" else real_find_spec(name, *a, **k))
    with pytest.raises(ValueError, match=r"train.lora=true needs peft, which is not installed: pip install"):
        TrainSection(lora=True)
    capsys.readouterr()
    rc = main(["train", "--recipe", "stage2", "--model", str(assets / "model"), "--data",
               str(assets / "data" / "stage2.json"), "--out", str(tmp_path / "lora"), "train.lora=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "llava-fast train: error: train.lora=true needs peft" in err and "Traceback" not in err


def test_a_second_run_loads_the_dataset_index_from_its_output_folder(assets, tmp_path):
    """data.index_cache (default on): the index is kept in OUT/dataset_index; a resumed run loads it from there."""
    over = {"schedule.max_steps": 2}
    a = Trainer(make_cfg(assets, tmp_path, **over), quiet=True)
    a.train(stop_at_step=1)
    assert not a.dataset.from_cache and any((tmp_path / "dataset_index").glob("index-*.npz"))
    b = Trainer(make_cfg(assets, tmp_path, **over), quiet=True).setup()
    assert b.dataset.from_cache and b.dataset.lengths == a.dataset.lengths
    c = Trainer(make_cfg(assets, tmp_path / "c", **{**over, "data.index_cache": False, "data.index_workers": 2}),
                quiet=True).setup()
    assert not c.dataset.from_cache and not (tmp_path / "c" / "dataset_index").exists()
    assert c.dataset.lengths == a.dataset.lengths
    from llava_fast.train.config import DataSection

    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="data.index_workers must be an integer >= 1"):
            DataSection(index_workers=bad)


def test_train_step_waits_for_the_device_once(assets, tmp_path, monkeypatch):
    """One optimizer step reads device data once (the loss and the gradient norm together, through
    ``_ext.host_copies``), copies no host value to the device, and does not wait for the optimizer's kernels: the
    host goes on to the next step while they run. Counted on the CPU by benchmarks/host_overhead.py's audit: the
    parameters and the batch's device copies are marked, marks follow every op, and each read of a marked tensor on
    the host (or a host-made tensor meeting one) is recorded. Before session 29 a step read the loss, then the norm
    (two waits, the GPU idle while the host queued the norm), copied the loss denominator from the host, and ended
    on ``torch.cuda.synchronize`` (that one the GPU test counts: test_trainer_cuda.py)."""
    import sys
    from collections import Counter
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from host_overhead import device_reads

    tr = Trainer(make_cfg(assets, tmp_path / "sync"), quiet=True).setup()
    it = iter(tr._loader())
    on_device = torch.ones((), dtype=torch.bool)   # marked: what an op makes from it counts as device data
    real_to_device = tr._to_device

    def to_device(b):  # on the CPU .to() returns the batch's own tensors: new (marked) ones, as a GPU copy would be
        return {k: torch.where(on_device, v, v) if torch.is_tensor(v) else v for k, v in real_to_device(b).items()}

    monkeypatch.setattr(tr, "_to_device", to_device)
    made, real_tensor = [], torch.tensor

    def tensor(*a, **k):  # the trainer's torch.tensor(host value, device=the GPU) is a blocking copy: none in a step
        caller = sys._getframe(1).f_code.co_filename
        if k.get("device") is not None and caller.endswith(os.path.join("train", "trainer.py")):
            made.append(sys._getframe(1).f_lineno)
        return real_tensor(*a, **k)

    monkeypatch.setattr(torch, "tensor", tensor)
    ms = []
    reads = Counter()
    for _ in range(2):  # the second step meets the optimizer's state
        mbs = [next(it)]
        reads += device_reads(lambda: ms.append(tr.train_step(mbs)), [on_device, *tr.model.parameters()])
    # the model's reference paths (the CPU's) read cu_seqlens and token counts where a GPU runs kernels that do not:
    # the model's own audit, with the kernels, is tests/models/test_host_syncs.py
    model_ref = {"pack_features.py", "layers.py"}
    ours = {k: n for k, n in reads.items()
            if k[0].startswith("h2d") or k[1].split(" <- ")[0].split(":")[0] not in model_ref}
    assert sum(ours.values()) == 2 and all(what == "host_copies" for what, _ in ours), dict(reads)
    assert not made, made
    assert all(math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in ms)


def test_training_freezes_what_setup_left_for_the_garbage_collector(assets, tmp_path):
    """During train() the objects that existed before it are frozen (``gc.freeze``): Python's own full collections,
    0.4-0.6 s each over the ~400k objects of a set-up trainer on the dev CPU, scan only what the run creates. They
    are unfrozen when train() returns (a caller's own frozen objects stay frozen)."""
    import gc

    tr = Trainer(make_cfg(assets, tmp_path / "gc", **{"schedule.max_steps": 2}), quiet=True).setup()
    frozen, step = [], tr.train_step
    tr.train_step = lambda mbs: (frozen.append(gc.get_freeze_count()), step(mbs))[1]
    before = gc.get_freeze_count()
    tr.train()
    assert len(frozen) == 2 and all(n > 100_000 for n in frozen), frozen
    assert gc.get_freeze_count() == 0 and before <= trainer_module._FROZEN_AT_IMPORT
    gc.freeze()   # a caller that froze its own objects
    try:
        tr.cfg.schedule.max_steps, tr.total_steps = 3, 3
        tr.train()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_training_unfreezes_with_objects_the_interpreter_froze_itself(assets, tmp_path, monkeypatch):
    """Python 3.12 starts with 375 objects in the permanent generation: a test against 0 never unfroze there, and
    every run's set-up objects stayed out of the collector's reach after train(). Simulated here: objects frozen
    before the module's import count as the interpreter's."""
    import gc

    tr = Trainer(make_cfg(assets, tmp_path / "gc312", **{"schedule.max_steps": 1}), quiet=True).setup()
    gc.freeze()
    try:
        monkeypatch.setattr(trainer_module, "_FROZEN_AT_IMPORT", gc.get_freeze_count())
        assert gc.get_freeze_count() > 0
        tr.train()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
