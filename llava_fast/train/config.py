"""Typed training configuration: a tree of ``@dataclass(kw_only=True)`` sections, validated in ``__post_init__``.

Overrides from the command line are dotted ``key=value`` strings (``optim.lr=1e-4``, ``data.max_tokens=16384``,
``train.trainable=projector,llm``); values are parsed to the field's type.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

TRAINABLE_PARTS = ("projector", "llm", "vision", "newline")


def parse_pinpoints(text: str, tile: int | None) -> list[list[int]]:
    """``model.image_grid_pinpoints`` -> [[h, w], ...]: LLaVA-NeXT's ``"(1x1),...,(3x3)"`` (every tile count between
    the first and the last, times ``tile``), or ``"336x672,672x336"`` pixel sizes (each a multiple of ``tile``; None:
    the format only)."""
    import re

    if re.fullmatch(r"\s*\(\d+x\d+\)\s*,\s*\.\.\.\s*,\s*\(\d+x\d+\)\s*", str(text)):
        from llava_fast.train.original import pinpoints_for

        return pinpoints_for(text, tile or 1)
    pins = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"model.image_grid_pinpoints={text!r}: expected tile counts '(1x1),...,(3x3)' or pixel "
                             f"sizes '336x672,672x336' (height x width)")
        h, w = int(m[1]), int(m[2])
        if h <= 0 or w <= 0 or (tile and (h % tile or w % tile)):
            raise ValueError(f"model.image_grid_pinpoints={text!r}: {h}x{w} is not a multiple of the tower's "
                             f"{tile}-pixel tile")
        pins.append([h, w])
    return pins


@dataclass(kw_only=True)
class ModelSection:
    path: str | None = None
    """A llava-hf checkpoint folder (config.json + safetensors + tokenizer) to start from."""
    language_model: str | None = None
    """To assemble a new model: an HF Llama/Qwen2 folder (config.json, safetensors, tokenizer)."""
    vision_tower: str | None = None
    """To assemble a new model: an HF CLIP/SigLIP folder, or an open_clip architecture name (then vision_weights)."""
    vision_weights: str | None = None
    """Local open_clip weights file (.safetensors/.bin) when vision_tower is an open_clip architecture name."""
    projector: str | None = None
    """Start the projector (and image_newline, when the file has it) from trained weights: the original LLaVA's stage-1
    mm_projector.bin (its --pretrain_mm_mlp_adapter), a .safetensors file, or a llava-hf folder."""
    model_type: str = "llava_next"
    """Model type of an assembled model: llava | llava_next | llava_onevision."""
    image_grid_pinpoints: str | None = None
    """AnyRes resolutions of an assembled NeXT / OneVision model, as LLaVA-NeXT's --image_grid_pinpoints: tile counts
    "(1x1),...,(3x3)" or pixel sizes "336x672,672x336" (height x width, multiples of the tower's tile). None: the
    released models' (NeXT's five, OneVision's 1x1 to 6x6; an original checkpoint's own)."""
    vision_feature_layer: int | None = None
    """The tower layer the projector reads when assembling a new model, transformers' index (-2: the penultimate, as
    every released LLaVA; -1: the last). None: -2, or an original checkpoint's own mm_vision_select_layer."""
    vision_feature_select_strategy: str | None = None
    """default (the CLS token dropped, CLIP) | full (every token); None: default for CLIP, full for SigLIP (which has
    no CLS token), or an original checkpoint's own mm_vision_select_feature. Assembling only."""
    dtype: str = "auto"
    """Parameter dtype: auto (fp32 master weights + bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16."""

    def __post_init__(self):
        if self.path is None and self.language_model is None:
            pass  # filled by the CLI / demo before building
        if self.model_type not in ("llava", "llava_next", "llava_onevision"):
            raise ValueError(f"model.model_type must be llava, llava_next or llava_onevision, got {self.model_type!r}")
        if self.image_grid_pinpoints is not None:
            parse_pinpoints(self.image_grid_pinpoints, None)  # the format (the tile is checked when assembling)
        if self.vision_feature_select_strategy not in (None, "default", "full"):
            raise ValueError(f"model.vision_feature_select_strategy must be default or full (or none), got "
                             f"{self.vision_feature_select_strategy!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"model.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


@dataclass(kw_only=True)
class DataSection:
    data: str | None = None
    """LLaVA JSON/JSONL file, or a LLaVA-NeXT YAML mixture of them (datasets: json_path, sampling_strategy)."""
    images: str = "."
    """Folder the image paths of the data file are relative to."""
    template: str = "plain"
    """plain | vicuna_v1 | qwen (reference-spec.md 5.2) | llama3 (LLaVA-NeXT's llava_llama_3, its Llama-3-8B)."""
    max_len: int = 4096
    """Longest sample in tokens (text + image tokens); longer ones are truncated at the end or dropped."""
    packing: bool = True
    """Pack samples into sequences of max_tokens (cu_seqlens); False: padded batches of batch_size."""
    max_tokens: int = 8192
    """Token budget of one packed micro-batch."""
    batch_size: int = 4
    """Samples per micro-batch in padded mode."""
    group_by_modality_length: bool = False
    pad_to_square: bool | None = None
    """LLaVA-1.5 only: pad each image to a square with the mean colour before the resize, as the original LLaVA-1.5
    fine-tune (its --image_aspect_ratio pad; the llava15-stage2 recipe sets it); false: resize the short side and crop
    the centre (the original stage 1's "square", transformers' CLIPImageProcessor). None: what the checkpoint folder's
    preprocessor_config.json says (do_pad), else false. The export's preprocessor_config.json records it."""
    num_workers: int = 2
    strict: bool = False
    """Stop at the first bad sample instead of dropping and counting it."""
    shuffle: bool = True
    index_workers: int | None = None
    """Processes that index the data file (tokenize, count tokens) the first time: None is one per core, up to 16, for
    files of 20,000 records or more (the index is the same either way)."""
    index_cache: bool = True
    """Keep the data file's index (token counts, image sizes, drops) in OUT/dataset_index and load it from there on
    later runs and resumes while the data file, tokenizer and settings are unchanged (minutes for millions of samples,
    seconds from the cache)."""
    frames_upbound: int = 32
    """Videos (OneVision): at most this many frames per video, sampled uniformly as LLaVA-NeXT does. Videos of one
    batch must have the same number of frames: set it to at most the fewest frames of any video."""
    video_fps: float | None = None
    """Video files: first take one frame every fps / video_fps frames (LLaVA-NeXT's --video_fps; its default is 1),
    then uniformly down to frames_upbound. None: frames_upbound frames uniformly (NXT --force_sample), so videos of
    different lengths give the same frame count and can share a batch. Frame folders have no rate: not used there."""

    def __post_init__(self):
        if not isinstance(self.frames_upbound, int) or self.frames_upbound < 1:
            raise ValueError(f"data.frames_upbound must be an integer >= 1, got {self.frames_upbound!r}")
        fps = self.video_fps
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
            raise ValueError(f"data.video_fps must be a positive number of frames per second or None, got "
                             f"{self.video_fps!r}")
        from llava_fast.data.templates import TEMPLATES

        if self.template not in TEMPLATES:
            raise ValueError(f"data.template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.max_len <= 0 or self.max_tokens <= 0:
            raise ValueError("data.max_len and data.max_tokens must be positive")
        if self.packing and self.max_len > self.max_tokens:
            raise ValueError(f"data.max_len ({self.max_len}) must be <= data.max_tokens ({self.max_tokens}) "
                             "when packing")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.index_workers is not None and (isinstance(self.index_workers, bool) or
                                               not isinstance(self.index_workers, int) or self.index_workers < 1):
            raise ValueError(f"data.index_workers must be an integer >= 1 or None (one per core), got "
                             f"{self.index_workers!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0: load in the main process), got {self.num_workers}")


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 1e-3
    vision_lr: float | None = None
    """Learning rate of the vision tower when it trains (OneVision stage 2: 2e-6); None: same as lr."""
    projector_lr: float | None = None
    """Learning rate of the projector (the original LLaVA's --mm_projector_lr, e.g. 2e-5 in its LoRA fine-tune while
    the adapters train at 2e-4); None: same as lr. image_newline trains at lr, as in the original."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global grad norm to this (0 disables clipping)."""
    fused: bool | None = None
    """Fused AdamW; None: on CUDA only."""
    max_nonfinite_steps: int = 10
    """A step whose loss or gradient norm is NaN/inf is skipped (no optimizer update, gradients dropped, the lr
    schedule still advances, counted as ``skipped_nonfinite``); this many in a row stop training with an error.
    0: never skip (the update runs whatever the gradients hold)."""

    def __post_init__(self):
        # written so that NaN fails every check (NaN compares false): a NaN/inf lr trains silently to NaN weights
        if not 0 < self.lr < math.inf:
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        for key in ("vision_lr", "projector_lr"):
            v = getattr(self, key)
            if v is not None and not 0 < v < math.inf:
                raise ValueError(f"optim.{key} must be a finite number > 0 (or none: same as optim.lr), got {v}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), e.g. optim.betas=0.9,0.999, got "
                             f"{self.betas}")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"optim.eps must be a finite number > 0, got {self.eps}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"optim.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"optim.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")


@dataclass(kw_only=True)
class ScheduleSection:
    epochs: float = 1.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if not 0 < self.epochs < math.inf:
            raise ValueError(f"schedule.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"schedule.max_steps must be >= 1 (or none: train for schedule.epochs), got "
                             f"{self.max_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"schedule.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0 (or none: use warmup_ratio), got "
                             f"{self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class TrainSection:
    trainable: list[str] = field(default_factory=lambda: ["projector"])
    """Parts that train: projector, llm, vision, newline (image_newline; trains with the projector by default)."""
    accum: int = 1
    """Micro-batches accumulated per optimizer step on each rank."""
    seed: int = 0
    precision: str = "auto"
    """auto (bf16 autocast on GPUs with native bf16, compute capability >= 8.0; fp32 on older GPUs and the CPU) |
    bf16 | fp32."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile every decoder and vision encoder layer (one graph per layer type; off by default: not yet
    measured against eager on a GPU through the trainer, bench_model's llava_fast_compiled rows measure it)."""
    device: str | None = None
    lora: bool = False
    """LoRA on the language model (needs peft); merged into the weights on export."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    fsdp: str = "auto"
    """auto (FSDP2 when torchrun starts several processes) | off."""
    deterministic: bool = False
    """Bitwise-repeatable steps: the same run twice gives the same weights (docs/training.md, "Deterministic runs").
    For the run: torch.use_deterministic_algorithms(True) (torch raises for an op without a deterministic
    implementation instead of running it), cuDNN deterministic and not benchmarking, CUBLAS_WORKSPACE_CONFIG=:4096:8
    when unset, and attention with a backward through our kernels (no atomics) or SDPA's math backend, never cuDNN's
    or SDPA's flash / efficient backwards. Slower where it moves work off cuDNN."""

    def __post_init__(self):
        bad = [p for p in self.trainable if p not in TRAINABLE_PARTS]
        if bad:
            raise ValueError(f"train.trainable: unknown parts {bad}; choose from {TRAINABLE_PARTS}")
        if self.accum < 1:
            raise ValueError(f"train.accum must be >= 1, got {self.accum}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.fsdp not in ("auto", "off"):
            raise ValueError(f"train.fsdp must be auto or off, got {self.fsdp!r}")
        if self.lora:
            import importlib.util

            if importlib.util.find_spec("peft") is None:  # checked before the model loads, as log.wandb is
                raise ValueError("train.lora=true needs peft, which is not installed: pip install 'llava_fast[peft]' "
                                 "(or pip install peft)")
        if self.lora_r < 1:
            raise ValueError(f"train.lora_r must be >= 1, got {self.lora_r}")
        if not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"train.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"train.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError, TypeError):
                raise ValueError(f"train.device must be a torch device such as cpu, cuda or cuda:1 (or none: cuda "
                                 f"when available), got {self.device!r}") from None


@dataclass(kw_only=True)
class CheckpointSection:
    out: str = "runs/llava"
    every_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps and at the end (0: none; the trained model is still
    exported to out/final)."""
    keep: int = 2
    """How many step checkpoints to keep (0: all)."""
    resume: str | None = "auto"
    """auto (latest complete checkpoint in out/, if any) | a checkpoint folder | none."""
    export: bool = True
    """Write a llava-hf folder (out/final) at the end."""

    def __post_init__(self):
        if self.every_steps < 0 or self.keep < 0:
            raise ValueError(f"checkpoint.every_steps and checkpoint.keep must be >= 0, got {self.every_steps} "
                             f"and {self.keep}")
        if not self.out:
            raise ValueError("checkpoint.out (--out) must name an output folder, got an empty string")


@dataclass(kw_only=True)
class LogSection:
    every_steps: int = 1
    tensorboard: bool = True
    """Also log to TensorBoard (OUT/tb) when it is installed; without it the run says so once and goes on."""
    wandb: str | None = None
    """Weights & Biases project to log the same scalars to (pip install wandb; WANDB_MODE=offline needs no network)."""
    progress: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"log.every_steps must be >= 1, got {self.every_steps}")
        if self.wandb is not None:
            import importlib.util

            if not isinstance(self.wandb, str) or not self.wandb.strip():
                raise ValueError(f"log.wandb must be a W&B project name, got {self.wandb!r}")
            if importlib.util.find_spec("wandb") is None:
                raise ValueError(f"log.wandb={self.wandb}: Weights & Biases is not installed: pip install wandb (or "
                                 f"leave log.wandb unset)")


@dataclass(kw_only=True)
class TrainConfig:
    recipe: str = "custom"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str) -> "TrainConfig":
        """A config file: JSON in ``to_dict``'s layout (a run's ``OUT/config.json``), or YAML (``.yaml`` / ``.yml``,
        needs PyYAML) of the same layout; sections and fields left out keep their defaults."""
        import os

        if not os.path.isfile(path):
            raise ValueError(f"--config {path}: no such file")
        with open(path) as f:
            text = f.read()
        try:
            if path.lower().endswith((".yaml", ".yml")):
                try:
                    import yaml
                except ImportError:
                    raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give the "
                                     f"config as JSON") from None
                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except ValueError as e:
            if str(e).startswith("--config"):
                raise
            kind = "YAML" if path.lower().endswith((".yaml", ".yml")) else "JSON"
            raise ValueError(f"--config {path}: not valid {kind} ({e})") from e
        except Exception as e:  # yaml.YAMLError
            raise ValueError(f"--config {path}: not valid YAML ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"--config {path}: expected a mapping of sections (model, data, optim, ...), got "
                             f"{type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--config {path}: {e}") from e

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of a dict (``to_dict``'s layout); an unknown section or field raises, naming it."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(d) - set(hints))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; a config has {sorted(hints)}")
        kw = {}
        for name, value in d.items():
            sub = hints[name]
            if dataclasses.is_dataclass(sub):
                if not isinstance(value, dict):
                    raise ValueError(f"config section {name!r} must be a dict, got {type(value).__name__}")
                fields = typing.get_type_hints(sub)
                bad = sorted(set(value) - set(fields))
                if bad:
                    raise ValueError(f"unknown fields {[f'{name}.{k}' for k in bad]}; {name} has {sorted(fields)}")
                value = sub(**value)
            kw[name] = value
        return cls(**kw)


def _parse(value: str, tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value.lower() in ("none", "null"):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(value, a)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"cannot parse {value!r} as {tp}")
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if tp is int:
        if "e" in value.lower():
            f = float(value)
            if not f.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(f)
        return int(value)
    if tp is float:
        return float(value)
    if tp is str:
        return value
    if origin is list:
        return [_parse(v, args[0]) for v in value.split(",") if v != ""]
    if origin is tuple:
        parts = value.split(",")
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {len(parts)} in {value!r}")
        return tuple(_parse(v, a) for v, a in zip(parts, args))
    raise ValueError(f"unsupported type {tp}")


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.field=value`` strings; raises ValueError naming a bad key and the valid ones.

    Sections are validated once every override is set, so that the order of related overrides does not matter
    (``data.max_tokens=1024 data.max_len=1000`` and ``data.max_len=1000 data.max_tokens=1024`` alike)."""
    touched = []
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like section.field=value (e.g. optim.lr=1e-4)")
        key, value = o.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ValueError(f"override key {key!r} must be section.field; sections: "
                             f"{[f.name for f in dataclasses.fields(cfg) if f.name != 'recipe']}")
        sec_name, fname = parts
        sec = getattr(cfg, sec_name, None)
        if sec is None or not dataclasses.is_dataclass(sec):
            raise ValueError(f"unknown config section {sec_name!r}; sections: "
                             f"{[f.name for f in dataclasses.fields(cfg) if f.name != 'recipe']}")
        hints = typing.get_type_hints(type(sec))
        if fname not in hints:
            raise ValueError(f"unknown field {key!r}; {sec_name} has {sorted(hints)}")
        try:
            parsed = _parse(value.strip(), hints[fname])
        except (ValueError, TypeError) as e:
            raise ValueError(f"override {o!r}: {e}") from None
        setattr(sec, fname, parsed)
        if not any(sec is t for t in touched):
            touched.append(sec)
    for sec in touched:
        if hasattr(sec, "__post_init__"):
            sec.__post_init__()
    return cfg
