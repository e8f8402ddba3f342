"""``llava-fast train --recipe NAME --model DIR --data FILE --images DIR --out DIR [section.key=value ...]``.

Registered in ``llava_fast/cli.py`` by ``add_train_parser(sub)``. Multi-GPU: ``torchrun --nproc-per-node 8
-m llava_fast.cli train ...`` (FSDP2 is used whenever torchrun starts several processes).
"""
from __future__ import annotations


ALLOC_CONF = "expandable_segments:True"


def default_allocator_conf() -> str:
    """Training's default CUDA allocator setting: expandable segments (variable image-token counts fragment the
    caching allocator's fixed segments; packing narrows the spread but does not remove it). Set before any CUDA
    allocation and only when the user has not chosen one; returns the setting in force."""
    import os

    return os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


_NO_RESUME = (None, "", "none", "no")
_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


def _last_override(overrides, key: str):
    """The value the last ``key=value`` of ``overrides`` gives ``key`` (they apply in order), or None."""
    val = None
    for o in overrides:
        k, sep, v = o.partition("=")
        if sep and k.strip() == key:
            val = v.strip()
    return val


def _model_type(args) -> str | None:
    """The model type the recipe is chosen for: that of the checkpoint (``--model`` or ``model.path=``), else of the
    model to assemble (``model.model_type=``); None: the recipe's default."""
    import json
    import os

    ov = _last_override(args.overrides, "model.path")
    path, what = (args.model, "--model") if ov is None else \
        (None if ov.lower() in ("none", "null") else ov, "model.path")
    if path:
        try:
            with open(os.path.join(path, "config.json")) as f:
                return json.load(f).get("model_type")
        except OSError:
            raise SystemExit(f"{what} {path}: no config.json (expected a llava-hf checkpoint folder)")
        except (ValueError, AttributeError) as e:
            raise SystemExit(f"{what} {path}: config.json is not a valid JSON object ({e})")
    mt = _last_override(args.overrides, "model.model_type")
    return mt if mt in _MODEL_TYPES else None  # anything else: model.model_type's own error, from the overrides


def _check_paths(cfg) -> None:
    """Input paths, checked before the model is loaded (minutes for a 7B checkpoint): one error naming each."""
    import os

    bad = []
    if not os.path.isfile(cfg.data.data):
        bad.append(f"--data {cfg.data.data}: no such file (a LLaVA JSON/JSONL file, or a LLaVA-NeXT YAML mixture)")
    else:
        from llava_fast.data.dataset import data_files

        try:
            data_files(cfg.data.data)  # a YAML mixture: every file it lists, and its sampling strategies
        except (ValueError, OSError) as e:
            bad.append(f"--data {e}")
    if not os.path.isdir(cfg.data.images):
        bad.append(f"--images {cfg.data.images}: no such folder (the folder image paths are relative to)")
    if not cfg.model.path:
        if not os.path.isfile(os.path.join(cfg.model.language_model, "config.json")):
            bad.append(f"model.language_model {cfg.model.language_model}: no config.json (an HF Llama/Qwen2 folder)")
        if cfg.model.vision_weights and not os.path.isfile(cfg.model.vision_weights):
            bad.append(f"model.vision_weights {cfg.model.vision_weights}: no such file")
    if cfg.model.projector and not os.path.exists(cfg.model.projector):
        bad.append(f"model.projector {cfg.model.projector}: no such file or folder (the original LLaVA's stage-1 "
                   f"mm_projector.bin, a .safetensors file or a llava-hf folder)")
    r = cfg.checkpoint.resume
    if r not in _NO_RESUME and r != "auto" and not os.path.isdir(r):
        bad.append(f"checkpoint.resume={r}: no such checkpoint folder (auto: the latest one in "
                   f"{os.path.join(cfg.checkpoint.out, 'checkpoints')}, if any; none: start a new run)")
    if bad:
        raise ValueError("; ".join(bad))


def _report_interrupt(trainer) -> None:
    """Ctrl-C: say which step was reached, what is saved and how to go on (a traceback says none of it)."""
    import os
    import sys

    from llava_fast.train import checkpoint as ckpt

    dist = getattr(trainer, "dist", None)
    if dist is not None and not dist.is_main:
        return
    cfg = trainer.cfg
    total = getattr(trainer, "total_steps", None)
    msg = f"interrupted at step {trainer.global_step}" + (f" of {total}" if total else "")
    last = ckpt.latest_checkpoint(os.path.join(cfg.checkpoint.out, "checkpoints"))
    if last is None:
        n = cfg.checkpoint.every_steps
        msg += (f"; no checkpoint was saved (checkpoint.every_steps={n}" + ("" if n else " saves none")
                + "), so the same command starts again from step 0"
                + ("" if n else "; checkpoint.every_steps=N saves one every N steps"))
    elif cfg.checkpoint.resume in _NO_RESUME:
        msg += f"; the last checkpoint is {last} (resume from it with checkpoint.resume=auto)"
    else:
        msg += f"; the last checkpoint is {last}: run the same command again to resume from it"
    if os.path.exists(os.path.join(cfg.checkpoint.out, "train_log.jsonl")):
        msg += f". Metrics of the steps run: {os.path.join(cfg.checkpoint.out, 'train_log.jsonl')}"
    print(f"llava-fast train: {msg}", file=sys.stderr, flush=True)


def _summary_line(trainer, summary: dict) -> str:
    loss = summary["loss"]
    parts = [f"done: {summary['steps']} steps in {summary['elapsed_s']:.1f} s",
             f"final loss {loss:.4f}" if isinstance(loss, float) else f"final loss {loss}"]
    dropped = summary.get("dropped") or {}
    detail = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()))
    parts.append(f"dropped {sum(dropped.values())} samples" + (f" ({detail})" if dropped else ""))
    truncated = getattr(getattr(trainer, "dataset", None), "truncated", 0)
    if truncated:
        parts.append(f"{truncated} truncated to data.max_len")
    if summary.get("skipped_nonfinite"):
        parts.append(f"{summary['skipped_nonfinite']} steps skipped (NaN/inf)")
    parts.append(f"model exported to {summary['final']}" if summary.get("final")
                 else "no export (checkpoint.export=false)")
    return ", ".join(parts)


def _cmd_train(args) -> int:
    conf = default_allocator_conf()  # before the model or any tensor reaches the GPU
    from llava_fast.train import apply_overrides, get_recipe

    print(f"PYTORCH_CUDA_ALLOC_CONF={conf}")

    if args.config:
        if args.recipe:
            raise SystemExit("give --recipe NAME or --config FILE, not both (a config file holds its recipe's "
                             "settings; change them with section.key=value overrides)")
        from llava_fast.train.config import TrainConfig

        cfg = TrainConfig.from_file(args.config)
    elif not args.recipe:
        raise SystemExit("--recipe NAME (stage1 | stage2 | {llava15,next,onevision}-stage{1,2}) or --config FILE (a "
                         "run's OUT/config.json, JSON or YAML) is required")
    else:
        cfg = get_recipe(args.recipe, _model_type(args))
    if args.model or not args.config:
        cfg.model.path = args.model
    if args.data:
        cfg.data.data = args.data
    if args.images:
        cfg.data.images = args.images
    if args.out:
        cfg.checkpoint.out = args.out
    if args.strict:
        cfg.data.strict = True
    apply_overrides(cfg, args.overrides)
    if args.recipe == "stage2" and _last_override(args.overrides, "data.template") is None and \
            cfg.data.template == "vicuna_v1" and _llama3_tokenizer(cfg.model.path or cfg.model.language_model):
        cfg.data.template = "llama3"
        print("data.template=llama3: the model's tokenizer is Llama 3's (LLaVA-NeXT's --version llava_llama_3, its "
              "Llama-3-8B models); data.template=vicuna_v1 trains the Vicuna format instead")
    return _run(cfg)


def _llama3_tokenizer(folder: str | None) -> bool:
    """Whether the tokenizer saved in ``folder`` is Llama 3's (False when it has none to read)."""
    from llava_fast.data.templates import is_llama3_tokenizer

    try:
        from transformers import AutoTokenizer

        return is_llama3_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    # no folder or tokenizer: the run's own checks name it; ImportError: transformers 5.0 tries a slow tokenizer's
    # conversion when the folder has none and asks for protobuf (or one needs sentencepiece): not a Llama 3 tokenizer,
    # and the run loads the tokenizer itself later, with its own error
    except (OSError, ValueError, TypeError, ImportError):
        return False


def _run(cfg) -> int:
    """Checks the inputs of a config, trains, prints the summary; 130 on Ctrl-C."""
    from llava_fast.train import Trainer

    if not cfg.data.data:
        raise SystemExit("--data FILE is required (LLaVA JSON/JSONL)")
    if not cfg.model.path and not (cfg.model.language_model and cfg.model.vision_tower):
        raise SystemExit("--model DIR (llava-hf folder) or model.language_model=DIR model.vision_tower=DIR is required")
    _check_paths(cfg)
    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        _report_interrupt(trainer)
        return 130
    if getattr(trainer, "dist", None) is None or trainer.dist.is_main:
        print(_summary_line(trainer, summary))
    return 0


def run_train_original(argv: list[str]) -> int:
    """``llava-fast train-original [--dry-run] FLAGS... [section.key=value ...]``: the original LLaVA code's
    ``train_mem.py`` flags, translated (:mod:`llava_fast.train.original_flags`); ``--dry-run`` prints the config."""
    import os

    from llava_fast.train.original_flags import config_from_flags

    dry = "--dry-run" in argv
    if not dry:
        print(f"PYTORCH_CUDA_ALLOC_CONF={default_allocator_conf()}")  # before anything reaches the GPU
    cfg, notes = config_from_flags([a for a in argv if a != "--dry-run"])
    if os.environ.get("RANK", "0") == "0":
        print("\n".join(["the original's flags:"] + [f"  {n}" for n in notes]), flush=True)
    if dry:
        print(cfg.to_json())
        print("# this config as a file: llava-fast train --config FILE [section.key=value ...] runs it")
        return 0
    return _run(cfg)


ORIGINAL_HELP = """llava-fast train-original [--dry-run] FLAGS... [section.key=value ...]

Runs a training command line of the original LLaVA code (haotian-liu/LLaVA, LLaVA-NeXT: llava/train/train_mem.py):
replace `deepspeed llava/train/train_mem.py --deepspeed ./scripts/zero3.json` in finetune.sh / pretrain.sh /
finetune_ov.sh with `llava-fast train-original` (or `torchrun --nproc-per-node 8 -m llava_fast.cli train-original`).
Every flag is translated to a setting of `llava-fast train`, ignored with the reason printed (--deepspeed, --tf32,
--lazy_preprocess, ...) or refused naming it (what llava-hf's models cannot hold, QLoRA, fp16, unknown flags).
--model_name_or_path and --vision_tower must be local folders (nothing is downloaded).

  --dry-run   print what each flag became and the config, train nothing

docs/training.md ("The original LLaVA's command line") lists the translation."""


_DESCRIPTION = """Train a LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision model with a stage 1 or stage 2 recipe (packed
sequences; FSDP2 when torchrun starts several processes). Every setting of the recipe can be overridden as
section.key=value; the config in force is written to OUT/config.json.

examples:
  llava-fast train --recipe stage2 --model ckpt/llava-next-7b --data mix665k.json --images data/ --out runs/ft \\
      data.max_tokens=16384 train.accum=4
  torchrun --nproc-per-node 8 -m llava_fast.cli train --recipe stage2 ...     (one process per GPU)"""


def _overrides_epilog() -> str:
    import dataclasses
    import textwrap

    from llava_fast.train.config import TrainConfig

    lines = ["override keys, section.key=value (defaults come from the recipe; docs/training.md):"]
    for sec in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(sec.default_factory if sec.default_factory is not dataclasses.MISSING else None):
            names = ", ".join(f.name for f in dataclasses.fields(sec.default_factory))
            lines += textwrap.wrap(f"{sec.name}: {names}", 100, initial_indent="  ", subsequent_indent="      ")
    lines += ["", "Ctrl-C finishes the current step, saves a checkpoint and stops (a second Ctrl-C stops at once); the",
              "same command run again resumes from the last checkpoint in OUT (checkpoint.every_steps=N also saves",
              "one every N steps and at the end; the default 0 saves none but Ctrl-C's; torchrun runs save only",
              "the periodic ones)."]
    return "\n".join(lines)


def add_train_parser(subparsers) -> None:
    import argparse

    s = subparsers.add_parser("train", help="train a LLaVA model (stage 1 / stage 2 recipes, packing, FSDP2)",
                              description=_DESCRIPTION, epilog=_overrides_epilog(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--recipe", help="stage1 | stage2 (template from the model's type) | "
                                    "{llava15,next,onevision}-stage{1,2}")
    s.add_argument("--config", help="a config file instead of a recipe: a run's OUT/config.json (JSON, or YAML of the "
                                    "same layout); the options and overrides below apply on top of it")
    s.add_argument("--model", help="llava-hf checkpoint folder to start from (or model.language_model=DIR "
                                   "model.vision_tower=DIR to assemble a new model)")
    s.add_argument("--data", help="LLaVA JSON/JSONL file, or a LLaVA-NeXT YAML mixture of them")
    s.add_argument("--images", help="folder the image paths are relative to (default: .)")
    s.add_argument("--out", help="output folder: checkpoints, train_log.jsonl, final export (default: runs/llava)")
    s.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of dropping it")
    s.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4 data.max_tokens=16384")
    s.set_defaults(fn=_cmd_train)
