"""Audit of `llava-fast train` and the training config as a user meets them: overrides, recipes x model types,
input checks before the model loads, the progress bar, the metrics log, the final summary and Ctrl-C.
Tiny model and data from the demo's generators (CPU, a few seconds each)."""
import json
import os

import pytest

from llava_fast.cli import main
from llava_fast.train import Trainer, apply_overrides, get_recipe


FAST = ["train.device=cpu", "data.max_tokens=512", "data.max_len=400", "data.num_workers=0",
        "data.group_by_modality_length=false", "train.activation_checkpointing=false", "log.tensorboard=false",
        "log.progress=false"]


def _cli(assets, out, *extra):
    return ["train", "--recipe", "stage2", "--model", str(assets / "model"), "--data",
            str(assets / "data" / "stage2.json"), "--images", str(assets / "data" / "images"), "--out", str(out),
            *FAST, *extra]


def _cfg(assets, out, *extra):
    cfg = get_recipe("stage2", "llava_next")
    cfg.model.path = str(assets / "model")
    cfg.data.data, cfg.data.images = str(assets / "data" / "stage2.json"), str(assets / "data" / "images")
    cfg.checkpoint.out = str(out)
    return apply_overrides(cfg, FAST + ["checkpoint.export=false", *extra])


# ---------------------------------------------------------------------------------------------------------- config
def test_override_order_does_not_matter():
    """`data.max_tokens=1024 data.max_len=1000` is valid whatever the order; each override used to be validated
    against the recipe's other values (max_len 4096 > max_tokens 1024: refused)."""
    for ov in (["data.max_tokens=1024", "data.max_len=1000"], ["data.max_len=1000", "data.max_tokens=1024"]):
        cfg = apply_overrides(get_recipe("next-stage2"), ov)
        assert (cfg.data.max_len, cfg.data.max_tokens) == (1000, 1024)
    with pytest.raises(ValueError, match=r"data.max_len \(2000\) must be <= data.max_tokens \(1024\)"):
        apply_overrides(get_recipe("next-stage2"), ["data.max_tokens=1024", "data.max_len=2000"])


@pytest.mark.parametrize("bad, key", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"), ("optim.vision_lr=nan", "optim.vision_lr"),
    ("schedule.epochs=nan", "schedule.epochs"), ("schedule.epochs=inf", "schedule.epochs"),
    ("optim.eps=-1", "optim.eps"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.betas=1.5,0.9", "optim.betas"), ("optim.max_grad_norm=nan", "optim.max_grad_norm"),
    ("data.batch_size=0", "data.batch_size"), ("data.num_workers=-1", "data.num_workers"),
    ("train.lora_r=0", "train.lora_r"), ("train.lora_alpha=0", "train.lora_alpha"),
    ("train.lora_dropout=1.5", "train.lora_dropout"), ("train.device=cpux", "train.device"),
    ("checkpoint.out=", "checkpoint.out"), ("log.every_steps=0", "log.every_steps")])
def test_out_of_range_values_raise_naming_the_key(bad, key):
    """docs/training.md: out-of-range settings raise naming the key. These were accepted, then failed after the
    model had loaded with torch's or peft's message (`Invalid epsilon value`), or trained silently (lr=nan: NaN
    weights, exit code 0; max_grad_norm=nan: no clipping; log.every_steps=0: every step)."""
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        apply_overrides(get_recipe("next-stage2"), [bad])


def test_recipe_family_must_match_the_model_type():
    assert get_recipe("next-stage2", "llava_next").data.template == "vicuna_v1"
    with pytest.raises(ValueError, match="'onevision-stage2' is for llava_onevision models, but the model is "
                                         "llava_next: use --recipe stage2 .* or next-stage2"):
        get_recipe("onevision-stage2", "llava_next")
    with pytest.raises(ValueError, match="model type 'llava_llama' is not supported"):
        get_recipe("stage2", "llava_llama")


# ----------------------------------------------------------------------------------------- CLI, before any training
_SEEN_CFGS = []


class _NoTrainer:
    """Stands in for Trainer: records the config; fails if training (loading the model) is reached."""

    def __init__(self, cfg, *a, **k):
        _SEEN_CFGS.append(cfg)

    def train(self):
        raise AssertionError("the model would be loaded now")


def _folder(path, config):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    return str(path)


def test_cli_picks_the_recipe_for_the_model_of_the_overrides(tmp_path, monkeypatch, assets):
    """`--recipe stage2` picks the template from the model's type; for a model given as model.path=DIR or assembled
    with model.model_type=llava_onevision it used the LLaVA-NeXT recipe (vicuna_v1, frozen tower) instead."""
    import llava_fast.train

    monkeypatch.setattr(llava_fast.train, "Trainer", _NoTrainer)
    data, images = str(assets / "data" / "stage2.json"), str(assets / "data" / "images")
    ov = _folder(tmp_path / "ov", {"model_type": "llava_onevision"})
    lm = _folder(tmp_path / "lm", {"model_type": "qwen2"})
    for how in (["model.path=" + ov], ["model.language_model=" + lm, "model.vision_tower=siglip",
                                       "model.model_type=llava_onevision"]):
        _SEEN_CFGS.clear()
        with pytest.raises(AssertionError, match="would be loaded"):
            main(["train", "--recipe", "stage2", "--data", data, "--images", images, *how])
        cfg = _SEEN_CFGS[-1]
        assert cfg.data.template == "qwen" and "vision" in cfg.train.trainable and cfg.optim.vision_lr == 2e-6
        assert cfg.model.model_type == "llava_onevision"


def test_cli_stage2_picks_llama3_for_a_llama3_tokenizer(tmp_path, monkeypatch, assets, capsys):
    """`--recipe stage2` on a model with Llama 3's tokenizer trains LLaVA-NeXT's Llama 3 format (it trained Vicuna's,
    with a note); an explicit data.template or family recipe keeps what it names."""
    import llava_fast.train
    from llava_fast.data.word_tokenizer import build_word_tokenizer

    monkeypatch.setattr(llava_fast.train, "Trainer", _NoTrainer)
    data, images = str(assets / "data" / "stage2.json"), str(assets / "data" / "images")
    model = _folder(tmp_path / "l3", {"model_type": "llava_next"})
    l3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    build_word_tokenizer(["a"], bos=l3[0], specials=l3).save_pretrained(model)
    for extra, want in (([], "llama3"), (["data.template=vicuna_v1"], "vicuna_v1")):
        _SEEN_CFGS.clear()
        with pytest.raises(AssertionError, match="would be loaded"):
            main(["train", "--recipe", "stage2", "--model", model, "--data", data, "--images", images, *extra])
        assert _SEEN_CFGS[-1].data.template == want
    assert "data.template=llama3: the model's tokenizer is Llama 3's" in capsys.readouterr().out
    _SEEN_CFGS.clear()
    with pytest.raises(AssertionError, match="would be loaded"):
        main(["train", "--recipe", "stage2", "--model", str(assets / "model"), "--data", data, "--images", images])
    assert _SEEN_CFGS[-1].data.template == "vicuna_v1"


def test_cli_checks_paths_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """A missing data file, image folder or resume checkpoint used to be found after the model had loaded (minutes
    for a 7B checkpoint); a corrupt config.json gave a JSON error naming no file."""
    import llava_fast.train

    monkeypatch.setattr(llava_fast.train, "Trainer", _NoTrainer)
    model = _folder(tmp_path / "m", {"model_type": "llava_next"})
    rc = main(["train", "--recipe", "stage2", "--model", model, "--data", str(tmp_path / "nope.json"),
               "--images", str(tmp_path / "noimg"), "checkpoint.resume=false",
               f"model.projector={tmp_path / 'mm_projector.bin'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--data" in err and "nope.json: no such file" in err
    assert "model.projector" in err and "mm_projector.bin: no such file or folder" in err
    assert "--images" in err and "noimg: no such folder" in err
    assert "checkpoint.resume=false: no such checkpoint folder" in err
    # transformers 5.0 asks for protobuf when a folder has no tokenizer: the template probe must not stop the run
    # there (it printed "requires the protobuf library" instead of the paths above)
    import transformers

    def no_protobuf(*a, **k):
        raise ImportError("requires the protobuf library but it was not found in your environment")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_protobuf)
    rc = main(["train", "--recipe", "stage2", "--model", model, "--data", str(tmp_path / "nope.json"),
               "--images", str(tmp_path / "noimg")])
    err = capsys.readouterr().err
    assert rc == 2 and "--data" in err and "nope.json: no such file" in err and "protobuf" not in err, err
    bad = _folder(tmp_path / "bad", "{oops")
    with pytest.raises(SystemExit, match="config.json is not a valid JSON object"):
        main(["train", "--recipe", "stage2", "--model", bad, "--data", str(tmp_path / "nope.json")])


def test_train_help_lists_the_override_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "add_train_parser" not in out  # was the module docstring, internals included
    for line in ("optim: lr, vision_lr", "data: data, images, template, max_len", "checkpoint: out, every_steps"):
        assert line in out


# --------------------------------------------------------------------------------------------- what a run prints
def test_summary_without_export_says_so(assets, tmp_path, capsys):
    assert main(_cli(assets, tmp_path / "s", "schedule.max_steps=1", "checkpoint.export=false")) == 0
    done = [l for l in capsys.readouterr().out.splitlines() if l.startswith("done:")]
    assert len(done) == 1 and "None" not in done[0], done  # was "model exported to None"
    assert "final loss" in done[0] and "dropped 0 samples" in done[0] and "no export" in done[0]


def test_ctrl_c_says_what_was_saved_and_the_same_command_resumes(assets, tmp_path, monkeypatch, capsys):
    """Ctrl-C used to end in a DataLoader traceback that said nothing of what was saved (by default: nothing)."""
    calls, step = [0], Trainer.train_step

    def interrupted_at_third(self, mbs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return step(self, mbs)

    def run(args):
        try:
            return main(args)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped `llava-fast train` as a traceback that says nothing of what was saved")

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_third)
    args = _cli(assets, tmp_path / "c", "schedule.max_steps=4", "checkpoint.export=false", "checkpoint.every_steps=1")
    assert run(args) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2 of 4" in err and "step_00000002" in err and "run the same command again" in err
    calls[0] = -100
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "done: 4 steps" in out

    calls[0] = 0
    assert run(_cli(assets, tmp_path / "d", "schedule.max_steps=4", "checkpoint.export=false")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2 of 4" in err and "no checkpoint was saved (checkpoint.every_steps=0 saves none)" in err


def test_progress_bar_shows_the_numbers_of_the_step_it_counts(assets, tmp_path, monkeypatch):
    """update() draws the bar: its postfix was set after it, so `2/3` showed step 1's loss and lr."""
    import tqdm.auto

    drawn = []

    class Bar:
        def __init__(self, *a, **k):
            self.postfix = {}

        def set_postfix(self, post, refresh=True):
            self.postfix = dict(post)

        def update(self, n=1):
            drawn.append(self.postfix.get("loss"))

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    tr = Trainer(_cfg(assets, tmp_path / "p", "schedule.max_steps=3", "log.progress=true"), log=lambda m: None)
    tr.train()
    assert drawn == [f"{h['loss']:.3f}" for h in tr.history]


def test_metrics_log_is_strict_json_lines(assets, tmp_path):
    """A step with a NaN gradient norm (skipped) was logged as `"grad_norm": NaN`, which is not JSON (jq, JS,
    Go, serde reject the line); non-finite numbers are written as null."""
    tr = Trainer(_cfg(assets, tmp_path / "j", "schedule.max_steps=2"), quiet=True).setup()
    p = next(p for p in tr.model.parameters() if p.requires_grad)
    first = [True]

    def nan_once(g):
        if first[0]:
            first[0] = False
            return g * float("nan")
        return g

    p.register_hook(nan_once)
    tr.train()
    assert tr.skipped_nonfinite == 1

    def no_constants(c):
        raise ValueError(f"not JSON: {c}")

    with open(tmp_path / "j" / "train_log.jsonl") as f:
        recs = [json.loads(line, parse_constant=no_constants) for line in f]
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["grad_norm"] is None and recs[0]["skipped_nonfinite"] == 1
    assert isinstance(recs[1]["grad_norm"], float)


def test_config_file_instead_of_a_recipe(assets, tmp_path, capsys):
    """--config takes a run's OUT/config.json (or YAML of the same layout) in place of --recipe: the same settings,
    options and overrides on top; --recipe and --config together, neither, or a bad file are errors."""
    import json

    args = _cli(assets, tmp_path / "a", "schedule.max_steps=1", "checkpoint.export=false", "optim.lr=3e-4")
    assert main(args) == 0
    saved = tmp_path / "a" / "config.json"
    first = json.loads(saved.read_text())
    again = ["train", "--config", str(saved), "--out", str(tmp_path / "b"), "schedule.max_steps=2"]
    assert main(again) == 0
    second = json.loads((tmp_path / "b" / "config.json").read_text())
    assert second["optim"]["lr"] == 3e-4 and second["schedule"]["max_steps"] == 2
    assert second["checkpoint"]["out"] == str(tmp_path / "b")
    for sec in ("model", "data", "train"):
        assert second[sec] == first[sec], sec
    yml = tmp_path / "c.yaml"
    yml.write_text("optim:\n  lr: 0.001\nschedule:\n  max_steps: 1\n")
    from llava_fast.train.config import TrainConfig

    assert TrainConfig.from_file(str(yml)).optim.lr == 1e-3
    with pytest.raises(SystemExit, match="not both"):
        main(again + ["--recipe", "stage2"])
    with pytest.raises(SystemExit, match="--recipe NAME .* or --config FILE"):
        main(["train", "--model", str(assets / "model")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, what in ((bad, "not valid JSON"), (tmp_path / "missing.json", "no such file")):
        assert main(["train", "--config", str(path)]) == 2
        assert what in capsys.readouterr().err
    bad.write_text(json.dumps({"optim": {"lrr": 1}}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "optim.lrr" in capsys.readouterr().err
