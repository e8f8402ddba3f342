"""The ``llava-fast`` command: ``env``, ``demo``, ``train``, ``train-original``, ``export``, ``chat``, ``predict``,
``convert`` and ``bench``."""
from __future__ import annotations

import argparse
import os
import sys


def _cmd_env(args) -> int:
    from llava_fast.envinfo import env, format_env

    print(format_env(env()))
    return 0


def _cmd_demo(args) -> int:
    from llava_fast.demo import run_demo

    return run_demo(out_dir=args.out, seed=args.seed, device=args.device, quick=args.quick)


def _cmd_chat(args) -> int:
    from llava_fast.chat import run_chat

    return run_chat(args.model, args.image, device=args.device, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, video=args.video,
                    frames=args.frames)


def _cmd_predict(args) -> int:
    from llava_fast.predict import predict

    counts = predict(args.model, args.data, args.images, args.out, template=args.template,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k, batch=args.batch, frames=args.frames, device=args.device)
    if counts["errors"] and not counts["answered"]:
        # every sample of this run failed (a wrong file, a wrong --images): a script must not go on to score nothing
        print(f"llava-fast predict: none of the {counts['errors']} samples could be answered (the reasons above, one "
              f"\"error\" line each in {args.out}): --data must be a LLaVA JSON/JSONL file of samples with "
              f"'conversations', their images under --images", file=sys.stderr)
        return 1
    return 0


def _cmd_convert(args) -> int:
    from llava_fast.train.original import convert

    convert(args.original, args.vision_tower, args.out, model_type=args.model_type, model_base=args.model_base)
    return 0


def _cmd_export(args) -> int:
    from llava_fast.train.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, adapter=args.adapter)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-fast", description="llava_fast: fast LLaVA kernels, model and training")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("env", help="versions, GPU, and which backend each op uses")
    s.set_defaults(fn=_cmd_env)
    s = sub.add_parser("demo", help="end-to-end demo on generated data (CPU or GPU)")
    s.add_argument("--out", default="demo_out", help="folder for the demo's data, checkpoints and logs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--quick", action="store_true", help="a very short run (for smoke tests)")
    s.set_defaults(fn=_cmd_demo)
    from llava_fast.train.cli import add_train_parser

    add_train_parser(sub)
    s = sub.add_parser("chat", help="talk about an image or a video with a local llava-hf checkpoint")
    s.add_argument("--model", required=True, help="llava-hf checkpoint folder (config.json, safetensors, tokenizer)")
    s.add_argument("--image", default=None, help="image file (JPEG/PNG/...)")
    s.add_argument("--video", default=None, help="video file (mp4/webm/mkv/...; LLaVA-OneVision; needs pip install av)")
    s.add_argument("--frames", type=int, default=32, help="frames sampled uniformly from --video (default 32)")
    s.add_argument("--device", default=None)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    s.set_defaults(fn=_cmd_chat)
    s = sub.add_parser("predict", help="answers for every sample of a LLaVA JSON/JSONL file, batched, to JSON lines")
    s.add_argument("--model", required=True, help="llava-hf checkpoint folder (config.json, safetensors, tokenizer)")
    s.add_argument("--data", required=True, help="LLaVA JSON/JSONL: conversations ending with the question (or with "
                   "a reference answer, written next to the prediction)")
    s.add_argument("--images", default=".", help="folder the image/video paths are relative to (default: .)")
    s.add_argument("--out", required=True, help="JSON lines to append to; samples already answered there are skipped")
    s.add_argument("--template", default=None, help="the prompt format the model was trained with: vicuna_v1 | qwen "
                   "| llama3 | plain | chat: the model's chat template (default: qwen for Qwen2, llama3 for Llama 3, "
                   "vicuna_v1 for other Llama models, else chat)")
    s.add_argument("--batch", type=int, default=16, help="samples per generate call (default 16)")
    s.add_argument("--frames", type=int, default=32, help="frames sampled from each video (default 32)")
    s.add_argument("--device", default=None)
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.set_defaults(fn=_cmd_predict)
    s = sub.add_parser("convert", help="an original LLaVA / LLaVA-NeXT / OneVision checkpoint -> a llava-hf folder")
    s.add_argument("--original", required=True, help="the original training code's output folder (config.json with "
                   "mm_vision_tower, weights, tokenizer)")
    s.add_argument("--vision-tower", required=True, help="a local copy of the tower its config names "
                   "(mm_vision_tower: an HF CLIP/SigLIP folder)")
    s.add_argument("--out", required=True, help="the llava-hf folder to write (new or empty)")
    s.add_argument("--model-base", default=None, help="a LoRA run (--lora_enable: adapter_model + "
                   "non_lora_trainables.bin): the language model folder it was trained on, merged with its adapters")
    s.add_argument("--model-type", default=None, choices=["llava", "llava_next", "llava_onevision"],
                   help="default: from image_aspect_ratio (pad: llava, anyres: llava_next, anyres_max_N: onevision)")
    s.set_defaults(fn=_cmd_convert)
    s = sub.add_parser("export", help="a llava-hf folder from a training checkpoint (a run's latest, or step_N)")
    s.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint OUT/checkpoints/step_N")
    s.add_argument("--out", required=True, help="the llava-hf folder to write (new or empty)")
    s.add_argument("--adapter", action="store_true", help="a LoRA run: keep the adapters unmerged, as a peft adapter "
                   "in OUT/adapter over the base model in OUT (default: merged into the weights)")
    s.set_defaults(fn=_cmd_export)
    s = sub.add_parser("bench", help="run a benchmark against its baselines (no NAME: list them)", add_help=False)
    s.set_defaults(fn=None)
    s = sub.add_parser("train-original", help="train with the original LLaVA code's train_mem.py flags (finetune.sh)",
                       add_help=False)
    s.set_defaults(fn=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-original"]:
        from llava_fast.train.cli import ORIGINAL_HELP, run_train_original

        if len(argv) == 1 or argv[1] in ("-h", "--help"):
            print(ORIGINAL_HELP)
            return 0
        return _guarded("train-original", lambda: run_train_original(argv[1:]))
    if argv[:1] == ["bench"]:
        from llava_fast import bench

        if len(argv) == 1 or argv[1] in ("-h", "--help", "--list"):
            print(bench.format_list())
            return 0 if bench.bench_dir() is not None else 2
        return _guarded("bench", lambda: bench.run(argv[1], argv[2:]))
    args = p.parse_args(argv)
    return _guarded(args.cmd, lambda: args.fn(args))


def _guarded(cmd: str, fn) -> int:
    try:
        return fn()
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: a training run has saved its checkpoint and said so; a traceback would add nothing
        if os.environ.get("LLAVA_FAST_TRACEBACK") == "1":
            raise
        print(f"llava-fast {cmd}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:
        # bad input (a missing folder, a corrupt image, a malformed config, an optional package not installed, ...):
        # its message names the argument and the fix; a traceback through the library would only bury it
        if os.environ.get("LLAVA_FAST_TRACEBACK") == "1":
            raise
        print(f"llava-fast {cmd}: error: {e}\n(set LLAVA_FAST_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
