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


def _cmd_train(args) -> int:
    import json

    conf = default_allocator_conf()  # before the model or any tensor reaches the GPU
    from llava_fast.train import Trainer, apply_overrides, get_recipe

    print(f"PYTORCH_CUDA_ALLOC_CONF={conf}")

    model_type = None
    if args.model:
        try:
            with open(f"{args.model}/config.json") as f:
                model_type = json.load(f).get("model_type")
        except OSError:
            raise SystemExit(f"--model {args.model}: no config.json (expected a llava-hf checkpoint folder)")
    cfg = get_recipe(args.recipe, model_type)
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
    if not cfg.data.data:
        raise SystemExit("--data FILE is required (LLaVA JSON/JSONL)")
    if not cfg.model.path and not (cfg.model.language_model and cfg.model.vision_tower):
        raise SystemExit("--model DIR (llava-hf folder) or model.language_model=DIR model.vision_tower=DIR is required")
    summary = Trainer(cfg).train()
    print(f"done: {summary['steps']} steps, final loss {summary['loss']}, model exported to {summary['final']}")
    return 0


def add_train_parser(subparsers) -> None:
    s = subparsers.add_parser("train", help="train a LLaVA model (stage 1 / stage 2 recipes, packing, FSDP2)",
                              description=__doc__)
    s.add_argument("--recipe", required=True, help="stage1 | stage2 | {llava15,next,onevision}-stage{1,2}")
    s.add_argument("--model", help="llava-hf checkpoint folder to start from")
    s.add_argument("--data", help="LLaVA JSON/JSONL file")
    s.add_argument("--images", help="folder the image paths are relative to")
    s.add_argument("--out", help="output folder (checkpoints, logs, final export)")
    s.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of dropping it")
    s.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4 data.max_tokens=16384")
    s.set_defaults(fn=_cmd_train)
