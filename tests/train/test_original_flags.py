"""``llava-fast train-original``: the original LLaVA code's train_mem.py flags (scripts/v1_5/finetune.sh,
pretrain.sh, NXT's finetune_ov.sh) -> the TrainConfig of the same run; a flag that cannot be followed is named."""
from __future__ import annotations

import json
import shlex

import pytest
import torch

from llava_fast.cli import main
from llava_fast.train.original_flags import config_from_flags, parse_flags
from tests.train.test_original import _word_tokenizer, original_checkpoint


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A language model folder, a CLIP and a SigLIP tower folder, an original checkpoint and a stage-1
    mm_projector.bin (the tiny models of test_original)."""
    root = tmp_path_factory.mktemp("parts")
    clip = root / "clip"
    clip.mkdir()
    src, tower, lm, *_ = original_checkpoint(clip)
    (root / "lm").mkdir()
    lm.save_pretrained(root / "lm")
    _word_tokenizer(root / "lm")
    sig = root / "sig"
    sig.mkdir()
    original_checkpoint(sig, text="qwen2", tower="siglip", aspect="anyres_max_9")
    proj = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, root / "mm_projector.bin")
    return {"lm": root / "lm", "clip": tower, "siglip": sig / "tower", "original": src,
            "projector": root / "mm_projector.bin", "root": root}


FINETUNE_15 = """--model_name_or_path {lm} --version v1 --data_path {data} --image_folder {images} --vision_tower {clip}
    --pretrain_mm_mlp_adapter {projector} --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
    --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad --group_by_modality_length True
    --bf16 True --output_dir {out} --num_train_epochs 1 --per_device_train_batch_size 16
    --per_device_eval_batch_size 4 --gradient_accumulation_steps 1 --evaluation_strategy "no" --save_strategy "steps"
    --save_steps 50000 --save_total_limit 1 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03
    --lr_scheduler_type "cosine" --logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True
    --dataloader_num_workers 4 --lazy_preprocess True --report_to none"""

PRETRAIN_15 = """--model_name_or_path {lm} --version plain --data_path {data} --image_folder {images}
    --vision_tower {clip} --mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter True --mm_vision_select_layer -2
    --mm_use_im_start_end False
    --mm_use_im_patch_token False --bf16 True --output_dir {out} --num_train_epochs 1
    --per_device_train_batch_size 32 --gradient_accumulation_steps 1 --save_strategy "no" --learning_rate 1e-3
    --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --tf32 True
    --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True"""

FINETUNE_OV = """--deepspeed scripts/zero3.json --model_name_or_path {lm} --version qwen_1_5 --data_path {data}
    --image_folder {images} --video_folder {images}
    --mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model" --mm_vision_tower_lr=2e-6
    --vision_tower {siglip} --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
    --mm_use_im_start_end False --mm_use_im_patch_token False --group_by_modality_length True
    --image_aspect_ratio anyres_max_9 --image_grid_pinpoints "(1x1),...,(6x6)" --mm_patch_merge_type spatial_unpad
    --bf16 True --run_name ov --output_dir {out} --num_train_epochs 1 --per_device_train_batch_size 1
    --gradient_accumulation_steps 2 --learning_rate 1e-5 --weight_decay 0. --warmup_ratio 0.03
    --lr_scheduler_type "cosine" --logging_steps 1 --tf32 True --model_max_length 32768 --gradient_checkpointing True
    --dataloader_num_workers 4 --lazy_preprocess True --torch_compile True --torch_compile_backend "inductor"
    --dataloader_drop_last True --frames_upbound 32 --attn_implementation sdpa"""


def _argv(script, parts, **kw):
    vals = {k: str(v) for k, v in parts.items()}
    vals.update({"data": "d.json", "images": "imgs", "out": "runs/x"})
    vals.update({k: str(v) for k, v in kw.items()})
    return shlex.split(" ".join(script.split()).format(**vals))


def test_llava15_finetune_script_becomes_the_same_run(parts):
    cfg, notes = config_from_flags(_argv(FINETUNE_15, parts))
    m, d, o, s, t, c = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.train, cfg.checkpoint
    assert cfg.recipe == "stage2:llava"
    assert (m.language_model, m.vision_tower, m.projector, m.model_type, m.path) == (
        str(parts["lm"]), str(parts["clip"]), str(parts["projector"]), "llava", None)
    assert (d.data, d.images, d.template, d.pad_to_square, d.max_len, d.batch_size, d.num_workers,
            d.group_by_modality_length) == ("d.json", "imgs", "vicuna_v1", True, 2048, 16, 4, True)
    assert (o.lr, o.weight_decay, s.epochs, s.warmup_ratio, t.accum, t.activation_checkpointing, t.precision) == (
        2e-5, 0.0, 1.0, 0.03, 1, True, "auto")
    assert t.trainable == ["projector", "newline", "llm"]
    assert (c.out, c.every_steps, c.keep, cfg.log.every_steps, cfg.log.tensorboard) == ("runs/x", 50000, 1, 1, False)
    text = "\n".join(notes)
    for flag in ("--tf32 True: ignored", "--lazy_preprocess True: ignored", "--mm_use_im_start_end False: as llava-hf",
                 "--per_device_train_batch_size 16 -> data.batch_size", "--image_aspect_ratio pad -> "
                 "data.pad_to_square"):
        assert flag in text, (flag, text)


def test_llava15_lora_finetune_script(parts):
    """scripts/v1_5/finetune_lora.sh: finetune.sh with LoRA adapters at 2e-4 and the projector at 2e-5."""
    script = "--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 " + FINETUNE_15.replace(
        "--learning_rate 2e-5", "--learning_rate 2e-4")
    cfg, notes = config_from_flags(_argv(script, parts))
    t, o = cfg.train, cfg.optim
    assert (t.lora, t.lora_r, t.lora_alpha, o.lr, o.projector_lr, o.vision_lr) == (True, 128, 256, 2e-4, 2e-5, None)
    assert "--mm_projector_lr 2e-5 -> optim.projector_lr" in notes
    cfg, _ = config_from_flags(_argv("--mm_projector_lr None --mm_vision_tower_lr None " + FINETUNE_15, parts))
    assert (cfg.optim.projector_lr, cfg.optim.vision_lr) == (None, None)
    cfg, _ = config_from_flags(_argv(FINETUNE_15.replace("--version v1", "--version llava_llama_3"), parts))
    assert cfg.data.template == "llama3"  # LLaVA-NeXT's Llama-3-8B scripts


def test_llava15_pretrain_script_is_stage1_on_cropped_images(parts):
    cfg, _ = config_from_flags(_argv(PRETRAIN_15, parts))
    assert cfg.recipe == "stage1:llava" and cfg.train.trainable == ["projector", "newline"]
    assert (cfg.data.template, cfg.data.pad_to_square, cfg.optim.lr, cfg.checkpoint.every_steps) == (
        "plain", False, 1e-3, 0)


def test_onevision_finetune_script(parts):
    cfg, notes = config_from_flags(_argv(FINETUNE_OV, parts))
    assert cfg.recipe == "stage2:llava_onevision" and cfg.model.model_type == "llava_onevision"
    assert cfg.train.trainable == ["projector", "newline", "llm", "vision"]
    assert (cfg.optim.lr, cfg.optim.vision_lr, cfg.train.accum, cfg.train.compile) == (1e-5, 2e-6, 2, True)
    assert (cfg.data.template, cfg.data.max_len, cfg.data.max_tokens, cfg.data.frames_upbound,
            cfg.data.pad_to_square, cfg.data.video_fps) == ("qwen", 32768, 32768, 32, None, None)
    assert any("NXT's --force_sample True" in n for n in notes)
    assert any("--deepspeed scripts/zero3.json: ignored" in n for n in notes)


def test_from_an_original_or_llava_hf_checkpoint(parts, tmp_path):
    """NXT's later stages start from an original checkpoint (assembled with its projector), a llava-hf folder is
    loaded as it is (its model type decides)."""
    argv = ["--model_name_or_path", str(parts["original"]), "--vision_tower", str(parts["clip"]),
            "--image_aspect_ratio", "pad", "--version", "v1"]
    cfg, _ = config_from_flags(argv)
    assert cfg.model.language_model == str(parts["original"]) and cfg.model.model_type == "llava"
    from llava_fast.train.original import convert

    hf = tmp_path / "hf"
    convert(str(parts["original"]), str(parts["clip"]), str(hf), log=lambda *_: None)
    cfg, notes = config_from_flags(["--model_name_or_path", str(hf), "--version", "v1", "--vision_tower", "x"])
    assert cfg.model.path == str(hf) and cfg.model.language_model is None and cfg.recipe == "stage2:llava"
    assert any("--vision_tower x: ignored" in n for n in notes)
    with pytest.raises(ValueError, match="--image_aspect_ratio anyres is a llava_next setting, but"):
        config_from_flags(["--model_name_or_path", str(hf), "--image_aspect_ratio", "anyres"])


@pytest.mark.parametrize("extra, match", [
    (["--mm_projector_type", "linear"], "mm_projector_type='linear'"),
    (["--mm_use_im_start_end", "True"], "--mm_use_im_start_end True"),
    (["--bits", "4"], "--bits 4: QLoRA"),
    (["--fp16", "True"], "--fp16 True"),
    (["--lr_scheduler_type", "linear"], "--lr_scheduler_type linear"),
    (["--version", "llava_llama_2"], "--version llava_llama_2"),
    (["--no_such_flag", "1", "--other"], "flags llava_fast does not know: --no_such_flag, --other"),
    (["--learning_rate", "1e-3", "--learning_rate", "2e-5"], "--learning_rate is given twice"),
    (["--video_folder", "/elsewhere"], "--video_folder /elsewhere differs from --image_folder"),
])
def test_what_cannot_be_followed_is_refused_naming_the_flag(parts, extra, match):
    base = ["--model_name_or_path", str(parts["lm"]), "--vision_tower", str(parts["clip"]),
            "--mm_projector_type", "mlp2x_gelu", "--image_folder", "imgs"]
    if extra[0] == "--mm_projector_type":
        base = base[:4] + base[6:]
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config_from_flags(base + extra)


def test_hub_names_are_not_downloaded(parts):
    with pytest.raises(ValueError, match="--model_name_or_path lmsys/vicuna-7b-v1.5: not a local folder; llava_fast "
                                         "downloads nothing"):
        config_from_flags(["--model_name_or_path", "lmsys/vicuna-7b-v1.5"])
    with pytest.raises(ValueError, match="--vision_tower openai/clip-vit-large-patch14-336: not a local folder"):
        config_from_flags(["--model_name_or_path", str(parts["lm"]), "--vision_tower",
                           "openai/clip-vit-large-patch14-336", "--mm_projector_type", "mlp2x_gelu"])


def test_flag_forms():
    flags, over = parse_flags(["--a", "1", "--b=x", "--gradient-checkpointing", "--c", "-2", "optim.lr=1e-4",
                               "--d", "data.max_tokens=512"])
    assert flags == {"a": "1", "b": "x", "gradient_checkpointing": True, "c": "-2", "d": True}
    assert over == ["optim.lr=1e-4", "data.max_tokens=512"]
    with pytest.raises(ValueError, match="'stray': expected a --flag"):
        parse_flags(["stray"])


def test_cli_dry_run_and_a_run(parts, tmp_path, capsys):
    """--dry-run prints the config and writes nothing; the script's run trains and exports a llava-hf folder that
    pads its images (the LLaVA-1.5 fine-tune)."""
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    recs = []
    for i in range(4):
        Image.new("RGB", (30 + 4 * i, 20), (40 * i, 90, 200)).save(tmp_path / "imgs" / f"{i}.png")
        recs.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nw5 w6"}, {"from": "gpt", "value": f"w{i} w{i + 1}"}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    argv = _argv(FINETUNE_15, parts, data=tmp_path / "d.json", images=tmp_path / "imgs", out=tmp_path / "run")
    over = ["train.device=cpu", "schedule.max_steps=2", "data.num_workers=0", "log.progress=false",
            "data.max_len=256", "data.max_tokens=512"]
    assert main(["train-original", "--dry-run", *argv, *over]) == 0
    out = capsys.readouterr().out
    cfg = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert cfg["data"]["pad_to_square"] is True and cfg["schedule"]["max_steps"] == 2
    assert not (tmp_path / "run").exists()
    assert main(["train-original", *argv, *over]) == 0
    pp = json.loads((tmp_path / "run" / "final" / "preprocessor_config.json").read_text())
    assert pp["do_pad"] is True and pp["image_processor_type"] == "LlavaImageProcessor"
    assert main(["train-original", "--model_name_or_path", "nowhere"]) == 2
    assert "--model_name_or_path nowhere: not a local folder" in capsys.readouterr().err
    assert main(["train-original", "--help"]) == 0 and "finetune.sh" in capsys.readouterr().out


@pytest.mark.parametrize("pins, want", [("[(28, 56), (56, 28)]", [[28, 56], [56, 28]]),
                                        ("(1x1),...,(2x2)", [[28, 28], [28, 56], [56, 28], [56, 56]]),
                                        ("[(28, 50)]", "28x50 is not a multiple of the tower's 28-pixel tile")])
def test_pinpoints_flag_assembles_with_them(parts, pins, want):
    from llava_fast.train.build import build_model

    cfg, _ = config_from_flags(["--model_name_or_path", str(parts["lm"]), "--vision_tower", str(parts["clip"]),
                                "--mm_projector_type", "mlp2x_gelu", "--image_aspect_ratio", "anyres",
                                "--image_grid_pinpoints", pins])
    assert cfg.model.model_type == "llava_next"
    if isinstance(want, str):
        with pytest.raises(ValueError, match=f"model.image_grid_pinpoints=.*{want}"):
            build_model(cfg.model, log=lambda *_: None)
    else:
        model, _ = build_model(cfg.model, log=lambda *_: None)
        assert model.config.image_grid_pinpoints == want


def test_pinpoints_key_is_checked(assets):
    from llava_fast.train import apply_overrides, get_recipe
    from llava_fast.train.build import build_model

    cfg = get_recipe("stage2", "llava_next")
    with pytest.raises(ValueError, match="model.image_grid_pinpoints='big': expected tile counts"):
        apply_overrides(cfg, ["model.image_grid_pinpoints=big"])
    cfg.model.path, cfg.model.image_grid_pinpoints = str(assets / "model"), "(1x1),...,(2x2)"
    with pytest.raises(ValueError, match="is for assembling a new model"):
        build_model(cfg.model, log=lambda *_: None)


@pytest.mark.parametrize("extra, want", [
    (["--mm_vision_select_layer", "-2"], (-2, None)),
    (["--mm_vision_select_layer", "-1", "--mm_vision_select_feature", "cls_patch"], (-1, "full")),
    ([], (-1, None)),  # the original's default, -1 (every released script passes -2)
])
def test_feature_layer_flags(parts, extra, want):
    """--mm_vision_select_layer / --mm_vision_select_feature give the tower layer and tokens the assembled model's
    projector reads; absent, the original's default layer -1; a SigLIP tower ignores both, as the original."""
    from llava_fast.train.build import build_model

    base = ["--model_name_or_path", str(parts["lm"]), "--vision_tower", str(parts["clip"]),
            "--mm_projector_type", "mlp2x_gelu"]
    cfg, notes = config_from_flags(base + extra)
    assert (cfg.model.vision_feature_layer, cfg.model.vision_feature_select_strategy) == want
    if not extra:
        assert any("no --mm_vision_select_layer: -1 (the last layer), the original's default" in n for n in notes)
    model, _ = build_model(cfg.model, log=lambda *_: None)
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (
        want[0], want[1] or "default")
    sig = ["--model_name_or_path", str(parts["lm"]), "--vision_tower", str(parts["siglip"]),
           "--mm_projector_type", "mlp2x_gelu", "--image_aspect_ratio", "anyres_max_9"]
    cfg, notes = config_from_flags(sig + extra)
    assert (cfg.model.vision_feature_layer, cfg.model.vision_feature_select_strategy) == (None, None)
    assert all(any(f"--{k} " in n and "ignored (a SigLIP tower" in n for n in notes)
               for k in ("mm_vision_select_layer", "mm_vision_select_feature") if f"--{k}" in extra)


def test_feature_keys_are_checked(parts, assets):
    from llava_fast.train import apply_overrides, get_recipe
    from llava_fast.train.build import build_model

    cfg = get_recipe("stage2", "llava_next")
    with pytest.raises(ValueError, match="model.vision_feature_select_strategy must be default or full"):
        apply_overrides(cfg, ["model.vision_feature_select_strategy=cls"])
    cfg.model.path, cfg.model.vision_feature_layer = str(assets / "model"), -1
    with pytest.raises(ValueError, match="model.vision_feature_layer=-1 is for assembling a new model"):
        build_model(cfg.model, log=lambda *_: None)
    cfg.model.path, cfg.model.language_model, cfg.model.vision_tower = None, str(parts["lm"]), str(parts["clip"])
    cfg.model.vision_feature_layer = 9
    with pytest.raises(ValueError, match="model.vision_feature_layer=9 is out of range for the tower's 3 layers"):
        build_model(cfg.model, log=lambda *_: None)
    cfg.model.vision_feature_layer, cfg.model.vision_tower = None, str(parts["siglip"])
    cfg.model.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="a SigLIP tower has none"):
        build_model(cfg.model, log=lambda *_: None)


def test_llama3_script_trains_and_exports(parts, tmp_path, capsys):
    """LLaVA-NeXT's Llama-3 fine-tune (--version llava_llama_3) on a language model with a Llama 3 tokenizer trains
    with the llama3 template, and predict picks that template for the exported model; the same flags on a tokenizer
    without Llama 3's tokens stop before training, naming data.template."""
    import shutil

    from PIL import Image

    from transformers import AutoTokenizer

    from llava_fast.data.word_tokenizer import build_word_tokenizer
    from llava_fast.models.config import LlavaConfig
    from llava_fast.predict import default_template
    from tests.train.test_original import V

    lm3 = tmp_path / "lm3"
    shutil.copytree(parts["lm"], lm3)
    for f in lm3.glob("tokenizer*"):
        f.unlink()
    l3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    build_word_tokenizer([f"w{i}" for i in range(V)], bos=l3[0], specials=l3).save_pretrained(lm3)
    (tmp_path / "imgs").mkdir()
    recs = []
    for i in range(3):
        Image.new("RGB", (28, 28), (60 * i, 90, 200)).save(tmp_path / "imgs" / f"{i}.png")
        recs.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nw5 w6"}, {"from": "gpt", "value": f"w{i} w{i + 1}"}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    over = ["train.device=cpu", "schedule.max_steps=2", "data.num_workers=0", "log.progress=false",
            "data.max_len=256", "data.max_tokens=512"]
    script = FINETUNE_15.replace("--version v1", "--version llava_llama_3")
    argv = _argv(script, parts, lm=lm3, data=tmp_path / "d.json", images=tmp_path / "imgs", out=tmp_path / "run")
    assert main(["train-original", *argv, *over, "checkpoint.every_steps=2"]) == 0
    final = tmp_path / "run" / "final"
    # an assembled model (language model + tower + stage-1 projector) exports from its checkpoint as the run did
    from tests.train.test_export import _same_folder

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    _same_folder(final, tmp_path / "exported")
    cfg = LlavaConfig.from_hf_dict(json.loads((final / "config.json").read_text()))
    assert default_template(cfg, AutoTokenizer.from_pretrained(final, local_files_only=True)) == "llama3"
    capsys.readouterr()
    argv = _argv(FINETUNE_15, parts, lm=lm3, data=tmp_path / "d.json", images=tmp_path / "imgs", out=tmp_path / "v1")
    assert main(["train-original", *argv, *over, "schedule.max_steps=1"]) == 0  # vicuna_v1 trains, with a note
    assert "data.template=vicuna_v1 on a Llama 3 tokenizer" in capsys.readouterr().out
    argv = _argv(script, parts, data=tmp_path / "d.json", images=tmp_path / "imgs", out=tmp_path / "run2")
    assert main(["train-original", *argv, *over]) == 2
    assert "template (data.template) 'llama3' needs a Llama 3 tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "final").exists()
