"""``llava-fast export``: a llava-hf folder from a training checkpoint equals the run's own export at that step
(LoRA merged too); the folder appears whole or not at all; errors name what is wrong."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from llava_fast.cli import main
from llava_fast.models.io import to_file_key
from llava_fast.train import Trainer
from llava_fast.train import checkpoint as ckpt
from tests.train.test_trainer import make_cfg


def _weights(folder) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def _same_folder(a, b):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]
    for f in sorted(os.listdir(a)):
        if not f.endswith(".safetensors"):
            assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f


@pytest.mark.parametrize("lora", [False, True])
def test_export_of_the_last_checkpoint_equals_the_runs_export(assets, tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    cfg = make_cfg(assets, tmp_path / "run", **{"schedule.max_steps": 2, "checkpoint.every_steps": 1,
                                                "checkpoint.keep": 3, "checkpoint.export": True, "train.lora": lora})
    final = Trainer(cfg, quiet=True).train()["final"]
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e")]) == 0  # the run's latest: step 2
    _same_folder(final, tmp_path / "e")
    # an earlier step: the weights that checkpoint holds
    step1 = os.path.join(tmp_path / "run", "checkpoints", "step_00000001")
    assert main(["export", step1, "--out", str(tmp_path / "e1")]) == 0
    key = "model.language_model.layers.0.self_attn.q_proj.weight"  # the files hold to_file_key's names
    for step, folder in ((1, tmp_path / "e1"), (2, tmp_path / "e")):
        held, _, _ = ckpt.load_checkpoint(os.path.join(tmp_path / "run", "checkpoints", f"step_0000000{step}"))
        w = _weights(folder)[to_file_key(key)]
        if not lora:
            assert torch.equal(w, held[key])
            continue
        # the LoRA A and B of that checkpoint, folded in: W + B A * alpha / r
        base, a, b = (held[key.replace(".weight", f".{n}.weight")]
                      for n in ("base_layer", "lora_A.default", "lora_B.default"))
        assert torch.allclose(w, base + b @ a * (cfg.train.lora_alpha / cfg.train.lora_r), atol=1e-6)
        assert step == 1 or not torch.equal(w, base)  # (B starts at zero; the first step's lr is 0, warmup)
    assert not torch.equal(_weights(tmp_path / "e1")[to_file_key(key)], _weights(final)[to_file_key(key)])


def test_export_errors_name_the_problem(assets, tmp_path, capsys):
    cfg = make_cfg(assets, tmp_path / "run", **{"schedule.max_steps": 1, "checkpoint.every_steps": 1})
    Trainer(cfg, quiet=True).train()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, msg in (
            ([str(tmp_path / "nowhere")], "neither a complete checkpoint"),
            ([str(tmp_path / "run"), "--out", str(tmp_path / "full")], "exists and is not empty")):
        if "--out" not in argv:
            argv += ["--out", str(tmp_path / "o")]
        assert main(["export", *argv]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_needs_the_runs_sources(assets, tmp_path, capsys):
    """The model's config and tokenizer come from the run's model.path: gone, the error names it."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    cfg = make_cfg(assets, tmp_path / "run", **{"schedule.max_steps": 1, "checkpoint.every_steps": 1,
                                                "model.path": str(model)})
    Trainer(cfg, quiet=True).train()
    shutil.rmtree(model)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert f"was trained from model.path={model}, which is not there any more" in capsys.readouterr().err


def test_new_folder_is_written_whole_or_not_at_all(tmp_path):
    def fill(tmp):
        os.makedirs(tmp)
        open(os.path.join(tmp, "a"), "w").write("a")
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_new_folder(str(out), fill)
    assert os.listdir(tmp_path) == []
    out.mkdir()  # an empty folder is taken
    ckpt.write_new_folder(str(out), lambda tmp: (os.makedirs(tmp), open(os.path.join(tmp, "b"), "w").close()))
    assert os.listdir(out) == ["b"]
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        ckpt.write_new_folder(str(out), fill)


def test_adapter_export_loads_in_peft_as_the_merged_model(assets, tmp_path, capsys):
    """--adapter: OUT holds the base language model and the run's other trained parts, OUT/adapter a peft adapter;
    transformers + peft's PeftModel over them give the logits of the merged export."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    cfg = make_cfg(assets, tmp_path / "run", **{"schedule.max_steps": 3, "checkpoint.every_steps": 3,
                                                "checkpoint.export": True, "train.lora": True,
                                                "optim.projector_lr": 3e-4})
    final = Trainer(cfg, quiet=True).train()["final"]
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "a"), "--adapter"]) == 0
    cls = transformers.LlavaNextForConditionalGeneration
    merged = cls.from_pretrained(final, local_files_only=True).eval()
    base = cls.from_pretrained(tmp_path / "a", local_files_only=True)
    # the base keeps the language model's weights of the start (LoRA trains adapters only), the trained projector
    start = cls.from_pretrained(assets / "model", local_files_only=True)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    p = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(base.state_dict()[w], start.state_dict()[w])
    assert not torch.equal(merged.state_dict()[w], start.state_dict()[w])
    assert torch.equal(base.state_dict()[p], merged.state_dict()[p]) and not torch.equal(base.state_dict()[p],
                                                                                           start.state_dict()[p])
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "a" / "adapter").eval()
    wrapped = [n for n, _ in tuned.named_modules() if n.endswith("q_proj") and hasattr(_, "lora_A")]
    assert wrapped and all(".language_model." in n for n in wrapped)  # not the tower's q_proj
    ids = torch.randint(3, 60, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(tuned(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    Trainer(make_cfg(assets, tmp_path / "full", **{"schedule.max_steps": 1, "checkpoint.every_steps": 1}),
            quiet=True).train()
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "b"), "--adapter"]) == 2
    assert "is not a LoRA run" in capsys.readouterr().err
