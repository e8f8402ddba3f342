"""The command line of the original LLaVA training code (``llava/train/train_mem.py`` of haotian-liu/LLaVA and
LLaVA-VL/LLaVA-NeXT: its ``ModelArguments``, ``DataArguments`` and HF ``TrainingArguments``) -> a
:class:`~llava_fast.train.config.TrainConfig` (``llava-fast train-original``).

A user's ``scripts/v1_5/finetune.sh`` runs once ``deepspeed llava/train/train_mem.py --deepspeed ./scripts/zero3.json``
is replaced by ``llava-fast train-original`` (or ``torchrun --nproc-per-node 8 -m llava_fast.cli train-original``):
every flag is translated, or ignored with the reason printed, or refused with the flag named (a setting this library
cannot reproduce, an unknown flag): nothing is dropped silently.

Rules (reference-spec.md 5.6 and the original ``train.py``):

* the recipe is ``stage1`` when only the projector trains (``--tune_mm_mlp_adapter True``, or NXT's
  ``--mm_tunable_parts mm_mlp_adapter``), else ``stage2``; the flags then override it;
* ``--image_aspect_ratio`` picks the model: ``pad`` / ``square`` (the default) LLaVA-1.5, ``anyres`` LLaVA-NeXT,
  ``anyres_max_9`` OneVision; ``pad`` pads LLaVA-1.5 images to a square (``data.pad_to_square``);
* the ``mm_*`` model settings are checked by the rules of ``llava-fast convert`` (:func:`original.settings`), and a
  feature layer or pinpoints other than the ones the library assembles with are refused;
* ``--model_name_or_path`` may be a language model (a new LLaVA is assembled with ``--vision_tower``), an original
  LLaVA checkpoint (NXT's later stages: its projector, newline and tower are kept) or a llava-hf folder; it must be a
  local folder (nothing is downloaded);
* batches are packed: ``--per_device_train_batch_size`` sets the padded batch (``data.packing=false``), while a packed
  micro-batch holds ``data.max_tokens`` tokens; the note printed says so.
"""
from __future__ import annotations

import ast
import json
import os
import re

from llava_fast.train.config import TrainConfig

# flags whose setting the library has no use for: flag -> why
_IGNORED = {
    "deepspeed": "FSDP2 shards the model when torchrun starts several processes",
    "lazy_preprocess": "samples are always tokenized lazily, their token counts up front",
    "tf32": "the matmuls run in bf16 under autocast",
    "per_device_eval_batch_size": "no evaluation during training (llava-fast predict answers a held-out file)",
    "evaluation_strategy": "no evaluation during training", "eval_strategy": "no evaluation during training",
    "save_strategy": "checkpoint.every_steps (from --save_steps) decides",
    "run_name": "the run is named by --output_dir",
    "attn_implementation": "the library's own attention kernels run", "torch_compile_backend": "inductor",
    "dataloader_drop_last": "packing uses every sample",
    "model_class_name": "the model type comes from --image_aspect_ratio",
    "ddp_find_unused_parameters": "FSDP2", "ddp_timeout": "FSDP2", "logging_dir": "TensorBoard logs go to OUT/tb",
    "overwrite_output_dir": "a run in an existing OUT resumes from its last checkpoint",
    "remove_unused_columns": "no HF Trainer", "mm_hidden_size": "from the tower's config",
}
# flags checked against what llava-hf's models are (a value they cannot hold is refused above): noted as checked
_CHECKED = ("mm_projector_type", "mm_patch_merge_type",
            "mm_spatial_pool_mode", "mm_newline_position", "mm_use_im_start_end", "mm_use_im_patch_token",
            "early_mix_text", "mm_resampler_type", "mm_spatial_pool_stride", "image_crop_resolution",
            "image_split_resolution", "lora_bias", "bits", "fp16", "lr_scheduler_type",
            "tune_mm_mlp_adapter", "freeze_backbone", "unfreeze_mm_vision_tower", "mm_tunable_parts",
            "freeze_mm_mlp_adapter")
_VIDEO = ("frames_upbound", "video_folder", "force_sample", "video_fps", "mm_newline_position")
_TRUE = ("true", "1", "yes")
_OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_]+=")


def _bool(flag, v) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in _TRUE:
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"--{flag} {v}: expected True or False")


def parse_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """``--key value``, ``--key=value`` and a bare boolean ``--key`` (HfArgumentParser's forms; ``-`` in a key is
    ``_``) -> ({key: value}, the ``section.key=value`` overrides given after them). A flag given twice is an error."""
    flags, overrides, i = {}, [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--") and not _OVERRIDE.match(argv[i + 1]):
                    val, i = argv[i + 1], i + 1
                else:
                    val = True  # a bare boolean flag
            if key in flags:
                raise ValueError(f"--{key} is given twice ({flags[key]!r} and {val!r})")
            flags[key] = val
        elif "=" in tok:
            overrides.append(tok)
        else:
            raise ValueError(f"{tok!r}: expected a --flag of the original train_mem.py or a section.key=value "
                             f"override")
        i += 1
    return flags, overrides


def _local(flag: str, path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"--{flag} {path}: not a local folder; llava_fast downloads nothing: fetch it first "
                         f"(huggingface-cli download {path} --local-dir DIR) and pass DIR")
    return path


def _read_config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "config.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _is_siglip(tower: str | None) -> bool:
    cfg = _read_config(tower) if tower else {}
    return "siglip" in str(cfg.get("model_type", "")) or "siglip" in str(cfg.get("vision_config", {}).get("model_type"))


def _pinpoints(value):
    """``--image_grid_pinpoints``: NXT's ``"(1x1),...,(6x6)"`` or a Python list of (h, w) as the scripts write it."""
    if isinstance(value, str) and "x" in value:
        return value
    try:
        return [list(p) for p in ast.literal_eval(value)] if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        raise ValueError(f"--image_grid_pinpoints {value!r}: expected '[(336, 672), ...]' or '(1x1),...,(6x6)'") \
            from None


def config_from_flags(argv: list[str]) -> tuple[TrainConfig, list[str]]:
    """The :class:`TrainConfig` of an original ``train_mem.py`` command line, and one line per flag saying what became
    of it. ValueError naming the flag for one that cannot be followed or is not known."""
    from llava_fast.train.config import apply_overrides
    from llava_fast.train.recipes import get_recipe

    flags, overrides = parse_flags(argv)
    t = _Translation(flags)
    lm, hf_folder, model_type = t.model_type()
    trainable = _trainable(t.left)
    cfg = get_recipe("stage1" if trainable == ["projector", "newline"] else "stage2", model_type)
    t.notes.insert(0, f"recipe {cfg.recipe} (trains {', '.join(trainable)}), model type {model_type} from "
                      f"--image_aspect_ratio {flags.get('image_aspect_ratio', 'square')}")
    t.sets.append("train.trainable=" + ",".join(trainable))
    t.model(lm, hf_folder, model_type)
    t.data(cfg.data.max_len, cfg.data.max_tokens)
    t.training()
    t.rest()
    apply_overrides(cfg, t.sets + overrides)
    if overrides:
        t.notes.append(f"overrides: {' '.join(overrides)}")
    return cfg, t.notes


class _Translation:
    """One command line being translated: the flags not handled yet (``left``), the ``section.key=value`` settings
    they give (``sets``) and a note per flag (``notes``)."""

    def __init__(self, flags: dict):
        self.flags, self.left, self.sets, self.notes = flags, dict(flags), [], []

    def pop(self, flag, default=None):
        return self.left.pop(flag, default)

    def take(self, flag, setting, raw, value=None):
        """``--flag raw`` sets ``setting`` to ``value`` (default: ``raw``)."""
        value = raw if value is None else value
        self.sets.append(f"{setting}={str(value).lower() if isinstance(value, bool) else value}")
        shown = f"={value}" if isinstance(value, str) and value != raw else ""
        self.notes.append(f"--{flag} {raw} -> {setting}{shown}")

    def model_type(self) -> tuple[str, bool, str]:
        """(``--model_name_or_path``, whether it is a llava-hf folder, the model type); the ``mm_*`` flags checked by
        the rules of ``llava-fast convert``."""
        from llava_fast.train import original

        f = self.left
        if "model_name_or_path" not in f:
            raise ValueError("--model_name_or_path is required (the language model, an original LLaVA checkpoint or "
                             "a llava-hf folder)")
        lm = _local("model_name_or_path", f["model_name_or_path"])
        try:
            with open(os.path.join(lm, "config.json")) as fh:
                lm_cfg = json.load(fh)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model_name_or_path {lm}: no readable config.json ({e})") from None
        hf_folder = "text_config" in lm_cfg and str(lm_cfg.get("model_type", "")).startswith("llava")
        ar = str(f.get("image_aspect_ratio", "square"))
        # the mm_* settings: an original checkpoint's own, or the original's defaults (its mm_projector_type default
        # is "linear", refused: the released recipes name mlp2x_gelu), then the flags; a llava-hf folder has its own
        mm = {k: v for k, v in lm_cfg.items() if k.startswith("mm_")} if original.is_original(lm_cfg) else \
            {"mm_projector_type": "mlp2x_gelu" if hf_folder else "linear"}
        mm.update({"model_type": "llava_llama", "mm_vision_tower": "?", "image_aspect_ratio": ar})
        mm.update({k: f[k] for k in ("mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
                                     "mm_patch_merge_type", "mm_spatial_pool_mode", "mm_newline_position") if k in f})
        for k in ("mm_use_im_start_end", "mm_use_im_patch_token", "early_mix_text"):
            if k in f and _bool(k, f[k]):
                raise ValueError(f"--{k} True: not part of the llava-hf models (and llava_fast); drop it or pass False")
        for k, ok in (("mm_resampler_type", ("none", "None")), ("mm_spatial_pool_stride", ("2",)),
                      ("image_crop_resolution", ("none", "None")), ("image_split_resolution", ("none", "None")),
                      ("lora_bias", ("none",))):
            if k in f and str(f[k]) not in ok:
                raise ValueError(f"--{k} {f[k]}: only {ok[0]} is supported (as llava-hf's models)")
        model_type = original.settings(mm, "the original's flags").model_type  # refuses what llava-hf cannot hold
        if hf_folder:
            if "image_aspect_ratio" in f and lm_cfg.get("model_type") != model_type:
                raise ValueError(f"--image_aspect_ratio {ar} is a {model_type} setting, but --model_name_or_path {lm} "
                                 f"is a {lm_cfg.get('model_type')} model")
            model_type = lm_cfg.get("model_type")
        elif model_type == "llava_onevision" and ar != "anyres_max_9":
            raise ValueError(f"--image_aspect_ratio {ar}: llava-hf's OneVision is anyres_max_9")
        return lm, hf_folder, model_type

    def features(self, lm: str, hf_folder: bool, tower: str | None) -> None:
        """``--mm_vision_select_layer`` / ``--mm_vision_select_feature``: the tower layer and tokens the projector
        reads. The original's defaults when absent are -1 (the last layer; the released scripts all pass -2) and
        ``patch``; an original checkpoint keeps its own unless a flag is given; a SigLIP tower ignores both (the
        original drops its last layer and reads every token of the rest)."""
        from llava_fast.train import original

        layer, feature = self.pop("mm_vision_select_layer"), self.pop("mm_vision_select_feature")
        given = [(k, v) for k, v in (("mm_vision_select_layer", layer), ("mm_vision_select_feature", feature))
                 if v is not None]
        if hf_folder or _is_siglip(tower):
            why = "the llava-hf folder has its own" if hf_folder else \
                "a SigLIP tower: the original drops its last layer and reads every token of the rest"
            self.notes += [f"--{k} {v}: ignored ({why})" for k, v in given]
            return
        if layer is not None:
            self.take("mm_vision_select_layer", "model.vision_feature_layer", layer, int(layer))
        elif not original.is_original(_read_config(lm)):
            self.sets.append("model.vision_feature_layer=-1")
            self.notes.append("no --mm_vision_select_layer: -1 (the last layer), the original's default -> "
                              "model.vision_feature_layer=-1 (the released scripts pass -2)")
        if feature is not None:
            self.take("mm_vision_select_feature", "model.vision_feature_select_strategy", feature,
                      "default" if feature == "patch" else "full")

    def model(self, lm: str, hf_folder: bool, model_type: str) -> None:
        """The ``model.*`` settings and LLaVA-1.5's image rule."""
        self.pop("model_name_or_path")
        tower = self.pop("vision_tower") or self.pop("mm_vision_tower")
        ar = str(self.pop("image_aspect_ratio", "square"))
        if hf_folder:
            self.sets.append(f"model.path={lm}")
            self.notes.append(f"--model_name_or_path {lm} -> model.path (a llava-hf folder: its own tower and "
                              f"projector)")
            if tower:
                self.notes.append(f"--vision_tower {tower}: ignored, the llava-hf folder has its tower")
        else:
            if not tower:
                raise ValueError(f"--vision_tower is required: {lm} is a language model (or an original checkpoint), "
                                 f"and the tower's config is not in it")
            self.take("model_name_or_path", "model.language_model", lm)
            self.take("vision_tower", "model.vision_tower", _local("vision_tower", tower))
            self.sets.append(f"model.model_type={model_type}")
        self.features(lm, hf_folder, tower)
        if "image_grid_pinpoints" in self.left:
            pins = _pinpoints(self.pop("image_grid_pinpoints"))
            if hf_folder or model_type == "llava":
                self.notes.append("--image_grid_pinpoints: ignored (" + ("the folder's own" if hf_folder else
                                                                         "LLaVA-1.5 has one tile per image") + ")")
            else:
                text = pins if isinstance(pins, str) else ",".join(f"{h}x{w}" for h, w in pins)
                self.take("image_grid_pinpoints", "model.image_grid_pinpoints", text)
        if "pretrain_mm_mlp_adapter" in self.left:
            self.take("pretrain_mm_mlp_adapter", "model.projector", self.pop("pretrain_mm_mlp_adapter"))
        if model_type == "llava":
            self.sets.append(f"data.pad_to_square={ar == 'pad'}")
            self.notes.append(f"--image_aspect_ratio {ar} -> data.pad_to_square={ar == 'pad'}")

    def data(self, max_len: int, max_tokens: int) -> None:
        """The data files, template, lengths, batch and video sampling (``max_len`` / ``max_tokens``: the recipe's)."""
        f, pop = self.left, self.pop
        if "data_path" in f:
            self.take("data_path", "data.data", pop("data_path"))  # JSON, JSONL or NXT's YAML mixture
        if "image_folder" in f:
            self.take("image_folder", "data.images", pop("image_folder"))
        vf = pop("video_folder")
        if vf is not None and os.path.abspath(vf) != os.path.abspath(self.flags.get("image_folder", vf)):
            raise ValueError(f"--video_folder {vf} differs from --image_folder {self.flags.get('image_folder')}: "
                             f"llava_fast reads images and videos relative to one folder (data.images); give paths "
                             f"relative to it")
        if "version" in f:
            v = pop("version")
            tpl = {"plain": "plain", "v1": "vicuna_v1", "vicuna_v1": "vicuna_v1", "qwen_1_5": "qwen",
                   "qwen_2": "qwen", "llava_llama_3": "llama3"}.get(v)
            if tpl is None:
                raise ValueError(f"--version {v}: the templates are plain, v1 (vicuna_v1), qwen_1_5 / qwen_2 (qwen) "
                                 f"and llava_llama_3 (llama3)")
            self.take("version", "data.template", v, tpl)
        if "model_max_length" in f:
            max_len = int(f["model_max_length"])
            self.take("model_max_length", "data.max_len", pop("model_max_length"), max_len)
        if max_len > max_tokens:
            self.sets.append(f"data.max_tokens={max_len}")
        if "per_device_train_batch_size" in f:
            b = int(pop("per_device_train_batch_size"))
            self.sets.append(f"data.batch_size={b}")
            self.notes.append(f"--per_device_train_batch_size {b} -> data.batch_size (padded batches, "
                              f"data.packing=false); packed (the default) a micro-batch holds up to data.max_tokens="
                              f"{max(max_len, max_tokens)} tokens instead: set data.max_tokens to change it")
        if "force_sample" in f:
            if _bool("force_sample", pop("force_sample")):
                if "video_fps" in f:
                    self.notes.append(f"--video_fps {pop('video_fps')}: ignored under --force_sample True (as in NXT)")
            elif "video_fps" not in f:
                self.sets.append("data.video_fps=1")
                self.notes.append("--force_sample False -> data.video_fps=1 (NXT's default rate)")
        elif any(k in self.flags for k in _VIDEO) and "video_fps" not in f:
            self.notes.append("videos: frames_upbound frames sampled uniformly (NXT's --force_sample True); NXT's "
                              "default without it takes 1 frame per second first: --video_fps 1 for that")

    def training(self) -> None:
        """Optimizer, schedule, precision, LoRA, checkpoints and logging."""
        f, pop = self.left, self.pop
        for flag, key, how in _DIRECT:
            if flag in f:
                v = pop(flag)
                self.take(flag, key, v, _bool(flag, v) if how is None else how(v))
        if "adam_beta1" in f or "adam_beta2" in f:
            self.sets.append(f"optim.betas={float(pop('adam_beta1', 0.9))},{float(pop('adam_beta2', 0.999))}")
        for flag, key in (("max_steps", "schedule.max_steps"), ("warmup_steps", "schedule.warmup_steps")):
            n = int(pop(flag, 0))
            if n > 0:  # HF's -1 / 0: unset
                self.take(flag, key, n)
        if "save_steps" in f:
            n = int(float(pop("save_steps")))
            if str(self.flags.get("save_strategy", "steps")).lower() == "steps":
                self.take("save_steps", "checkpoint.every_steps", n)
        sched = str(f.get("lr_scheduler_type", "cosine"))
        if sched != "cosine":
            raise ValueError(f"--lr_scheduler_type {sched}: the schedule is cosine with linear warmup (as the LLaVA "
                             f"recipes); schedule.min_lr_ratio sets its floor")
        if _bool("fp16", f.get("fp16", False)):
            raise ValueError("--fp16 True: fp16 mixed precision is not supported; train in bf16 (A100, H100: --bf16 "
                             "True) or fp32 (train.precision=fp32)")
        if int(f.get("bits", 16)) != 16:
            raise ValueError(f"--bits {f['bits']}: QLoRA (4/8-bit base weights) is not supported; LoRA on bf16 "
                             f"weights is (--lora_enable True)")
        if "bf16" in f:
            bf16 = _bool("bf16", pop("bf16"))
            self.sets.append(f"train.precision={'auto' if bf16 else 'fp32'}")
            self.notes.append(f"--bf16 {bf16} -> train.precision=" + ("auto (bf16 autocast on GPUs that have it)"
                                                                      if bf16 else "fp32"))
        for flag, key in (("mm_projector_lr", "optim.projector_lr"), ("mm_vision_tower_lr", "optim.vision_lr")):
            if flag in f:  # the original's None: unset (the part trains at --learning_rate)
                v = pop(flag)
                if str(v) not in ("None", "none"):
                    self.take(flag, key, v, float(v))
        if "report_to" in f:
            sinks = [x.strip() for x in str(pop("report_to")).replace(",", " ").split()]
            if "wandb" in sinks:
                import importlib.util

                if importlib.util.find_spec("wandb") is None:
                    raise ValueError("--report_to wandb: Weights & Biases is not installed: pip install wandb, or "
                                     "--report_to none")
                self.take("report_to", "log.wandb", self.flags["report_to"],
                          os.environ.get("WANDB_PROJECT", "huggingface"))
            self.sets.append(f"log.tensorboard={'tensorboard' in sinks or 'all' in sinks}")

    def rest(self) -> None:
        """Flags ignored or checked are noted; any other is an error naming it."""
        for k in list(self.left):
            if k in _IGNORED:
                self.notes.append(f"--{k} {self.pop(k)}: ignored ({_IGNORED[k]})")
            elif k in _CHECKED:
                self.notes.append(f"--{k} {self.pop(k)}: as llava-hf's models (checked)")
        if self.left:
            raise ValueError(f"flags llava_fast does not know: {', '.join('--' + k for k in sorted(self.left))}; "
                             f"remove them, or give the setting as section.key=value (llava-fast train --help lists "
                             f"the keys)")


# flags that map to one setting: (flag, setting, parse; None: a boolean)
_DIRECT = (("group_by_modality_length", "data.group_by_modality_length", None),
           ("dataloader_num_workers", "data.num_workers", int), ("frames_upbound", "data.frames_upbound", int),
           ("video_fps", "data.video_fps", float), ("learning_rate", "optim.lr", float),
           ("weight_decay", "optim.weight_decay", float), ("adam_epsilon", "optim.eps", float),
           ("max_grad_norm", "optim.max_grad_norm", float),
           ("num_train_epochs", "schedule.epochs", float), ("warmup_ratio", "schedule.warmup_ratio", float),
           ("gradient_accumulation_steps", "train.accum", int), ("seed", "train.seed", int),
           ("gradient_checkpointing", "train.activation_checkpointing", None), ("torch_compile", "train.compile", None),
           ("lora_enable", "train.lora", None), ("lora_r", "train.lora_r", int),
           ("lora_alpha", "train.lora_alpha", int), ("lora_dropout", "train.lora_dropout", float),
           ("output_dir", "checkpoint.out", str), ("save_total_limit", "checkpoint.keep", int),
           ("logging_steps", "log.every_steps", int))


def _trainable(f: dict) -> list[str]:
    """The parts that train, as the original decides them: NXT's ``--mm_tunable_parts`` when given, else
    ``--tune_mm_mlp_adapter`` (projector only), ``--freeze_backbone`` (no LLM), ``--unfreeze_mm_vision_tower``."""
    if "mm_tunable_parts" in f:
        names = {"mm_mlp_adapter": ["projector", "newline"], "mm_language_model": ["llm"],
                 "mm_vision_tower": ["vision"], "mm_vision_resampler": []}
        parts = []
        for p in str(f["mm_tunable_parts"]).split(","):
            if p.strip() not in names:
                raise ValueError(f"--mm_tunable_parts {f['mm_tunable_parts']}: {p.strip()!r} is not one of "
                                 f"{sorted(names)}")
            parts += names[p.strip()]
    elif "tune_mm_mlp_adapter" in f and _bool("tune_mm_mlp_adapter", f["tune_mm_mlp_adapter"]):
        parts = ["projector", "newline"]
    else:
        parts = ["projector", "newline"] + ([] if _bool("freeze_backbone", f.get("freeze_backbone", False))
                                            else ["llm"])
        if _bool("unfreeze_mm_vision_tower", f.get("unfreeze_mm_vision_tower", False)):
            parts.append("vision")
    if "freeze_mm_mlp_adapter" in f and _bool("freeze_mm_mlp_adapter", f["freeze_mm_mlp_adapter"]):
        parts = [p for p in parts if p not in ("projector", "newline")]
    if not parts:
        raise ValueError("the flags train nothing (--freeze_mm_mlp_adapter and --freeze_backbone, or an empty "
                         "--mm_tunable_parts)")
    return [p for p in ("projector", "newline", "llm", "vision") if p in parts]
