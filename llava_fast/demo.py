"""``llava-fast demo``: train a tiny LLaVA-NeXT from scratch on generated pictures, end to end, in a few minutes.

1. Generates (from ``seed``) pictures of coloured shapes -- 1 to 3 circles, squares or triangles of one colour, of
   varying size and position, on canvases of varying aspect ratio -- with captions (stage 1) and questions about
   colour, shape, count and position (stage 2), in the LLaVA JSON format, plus held-out questions on new pictures.
2. Builds a tiny LLaVA-NeXT (CLIP-like vision tower on 56 px tiles with AnyRes grids up to 2x2, a Llama language
   model) and a word-level tokenizer saved with it (loaded back from local files only).
3. Runs the stage-1 and stage-2 recipes with sequence packing (``llava_fast.train.Trainer``).
4. Reports held-out answer accuracy (greedy decoding) and answers a question about a fresh picture.

The demo's model starts from random weights, so unlike a real stage 1 (projector only) every part trains in both
stages here; the recipes, data pipeline, packing and checkpoints are the real ones.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
TILE, PATCH = 56, 14
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
# sizes of the full (non-quick) run; tuned so that 2 CPU cores finish in a few minutes
KNOBS = dict(n_caption=1500, n_qa=2500, n_eval=400, vision_hidden=64, vision_layers=2, text_hidden=128, text_layers=3,
             epochs1=3, epochs2=4, lr1=1e-3, lr2=1e-3, max_tokens=2048)
QUESTIONS = {
    "colour": "What colour are the shapes ?",
    "shape": "What shape are they ?",
    "count": "How many shapes are there ?",
    "position": "Is the shape on the left or on the right ?",
}


# ---------------------------------------------------------------------------------------------------------------
# data

def draw_picture(rng: random.Random):
    """A PIL picture and its facts: colour, shape, count (1-3), position (left/right, single shape only)."""
    from PIL import Image, ImageDraw

    w = rng.choice([48, 56, 64, 72, 84, 96, 112])
    h = rng.choice([48, 56, 64, 72, 84, 96, 112])
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    count = rng.randint(1, 3)
    side = rng.choice(["left", "right"])
    boxes = []
    for _ in range(count):
        for _attempt in range(200):
            r = rng.randint(max(5, min(w, h) // 9), max(6, min(w, h) // 5))
            if count == 1:
                if side == "left":
                    cx = rng.randint(r + 1, max(r + 1, w // 3))
                else:
                    cx = rng.randint(min(w - r - 1, 2 * w // 3), w - r - 1)
            else:
                cx = rng.randint(r + 1, w - r - 1)
            cy = rng.randint(r + 1, h - r - 1)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1] for b in boxes):
                boxes.append(box)
                break
    col = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    for box in boxes:
        if shape == "circle":
            d.ellipse(box, fill=col)
        elif shape == "square":
            d.rectangle(box, fill=col)
        else:
            x0, y0, x1, y1 = box
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=col)
    facts = {"colour": colour, "shape": shape, "count": COUNTS[len(boxes) - 1],
             "position": side if len(boxes) == 1 else None}
    return im, facts


def _plural(shape, n):
    return shape if n == "one" else shape + "s"


def caption(f) -> str:
    s = f"{f['count']} {f['colour']} {_plural(f['shape'], f['count'])}"
    if f["position"]:
        s += f" on the {f['position']}"
    return s + " ."


def qa_pairs(f) -> list[tuple[str, str, str]]:
    out = [("colour", QUESTIONS["colour"], f["colour"]), ("shape", QUESTIONS["shape"], f["shape"]),
           ("count", QUESTIONS["count"], f["count"])]
    if f["position"]:
        out.append(("position", QUESTIONS["position"], f["position"]))
    return out


def make_data(root: str, seed: int, n_caption: int, n_qa: int, n_eval: int) -> dict:
    """Writes images and stage1.json / stage2.json / eval.json under ``root``."""
    rng = random.Random(seed)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    stage1, stage2, held = [], [], []
    for i in range(n_caption + n_qa + n_eval):
        im, f = draw_picture(rng)
        name = f"{i:05d}.png"
        im.save(os.path.join(img_dir, name))
        if i < n_caption:
            stage1.append({"id": f"cap{i}", "image": name,
                           "conversations": [{"from": "human", "value": "<image>\nDescribe the picture ."},
                                             {"from": "gpt", "value": caption(f)}]})
        elif i < n_caption + n_qa:
            pairs = qa_pairs(f)
            rng.shuffle(pairs)
            conv = []
            for k, (_, q, a) in enumerate(pairs):
                conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
                conv.append({"from": "gpt", "value": a})
            stage2.append({"id": f"qa{i}", "image": name, "conversations": conv})
        else:
            kind, q, a = rng.choice(qa_pairs(f))
            held.append({"id": f"eval{i}", "image": name, "kind": kind, "question": q, "answer": a})
    for fname, data in (("stage1.json", stage1), ("stage2.json", stage2), ("eval.json", held)):
        with open(os.path.join(root, fname), "w") as fh:
            json.dump(data, fh)
    return {"stage1": len(stage1), "stage2": len(stage2), "eval": len(held)}


def vocabulary() -> list[str]:
    from llava_fast.data.templates import QWEN_SYSTEM, VICUNA_SYSTEM

    words = set()
    for text in [VICUNA_SYSTEM, QWEN_SYSTEM, "USER ASSISTANT system user assistant Describe the picture on",
                 *QUESTIONS.values(), *COLOURS, *SHAPES, *COUNTS, "left right",
                 *[s + "s" for s in SHAPES]]:
        for w in text.replace(".", " ").replace(",", " ").replace("?", " ").replace("'", " ").split():
            words.add(w)
    return sorted(words)


# ---------------------------------------------------------------------------------------------------------------
# model

def build_tiny_model(folder: str, seed: int, quick: bool):
    """A tiny LLaVA-NeXT saved as a llava-hf folder, with its word-level tokenizer."""
    import torch

    from llava_fast.data.word_tokenizer import build_word_tokenizer
    from llava_fast.models import LlavaConfig, LlavaNextForConditionalGeneration

    K = KNOBS
    tok = build_word_tokenizer(vocabulary(), bos=True)
    vocab = ((len(tok) + 63) // 64) * 64
    hf = {
        "model_type": "llava_next", "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "image_grid_pinpoints": PINPOINTS, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": K["vision_hidden"],
                          "intermediate_size": 2 * K["vision_hidden"], "num_hidden_layers": K["vision_layers"],
                          "num_attention_heads": 4, "image_size": TILE, "patch_size": PATCH,
                          "hidden_act": "quick_gelu"},
        "text_config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": K["text_hidden"],
                        "intermediate_size": 2 * K["text_hidden"],
                        "num_hidden_layers": 2 if quick else K["text_layers"], "num_attention_heads": 4,
                        "num_key_value_heads": 4,
                        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                        "eos_token_id": tok.eos_token_id},
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(LlavaConfig.from_hf_dict(hf))
    init_weights(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def init_weights(model, std: float = 0.02) -> None:
    """transformers-style initialisation for a model trained from scratch: N(0, 0.02) for linear, conv and
    embedding weights (position embeddings included), zero biases. (PyTorch's defaults give embeddings N(0, 1),
    which drowns the patch content under the position embeddings of the vision tower and slows learning a lot.)"""
    import torch
    from torch import nn

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
                mod.weight.normal_(0.0, std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
        for name, p in model.named_parameters():
            if name.endswith("class_embedding"):
                p.normal_(0.0, p.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------------------------
# evaluation (greedy decoding, packed prompts, no KV cache: the answers are one or two words)

def answer_questions(model, tok, items, image_root, device, max_new: int = 3, batch: int = 64) -> list[str]:
    import torch

    from llava_fast.data import ImageSpec, load_image, preprocess_images
    from llava_fast.data.templates import VICUNA_SYSTEM, expand_placeholders, tokenize_with_media

    spec = ImageSpec.from_model_config(model.config)
    eos = tok.eos_token_id
    img_id = model.config.image_token_id
    model.eval()
    answers = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        seqs, pix, sizes = [], [], []
        for it in chunk:
            im = it["pil"] if "pil" in it else load_image(os.path.join(image_root, it["image"]))
            pp = preprocess_images([im], spec)
            prompt = f"{VICUNA_SYSTEM} USER: <image>\n{it['question']} ASSISTANT:"
            ids, _ = tokenize_with_media(tok, prompt)
            n = spec.image_tokens(pp["image_sizes"][0])
            ids, _ = expand_placeholders(ids, [0] * len(ids), [n], img_id)
            seqs.append(ids)
            pix.append(pp["pixel_values"])
            sizes += pp["image_sizes"]
        out_tokens = [[] for _ in chunk]
        done = [False] * len(chunk)
        pv = torch.cat(pix).to(device)
        isz = torch.tensor(sizes, dtype=torch.long, device=device)
        for _ in range(max_new):
            lens = [len(x) for x in seqs]
            ids = torch.tensor([t for x in seqs for t in x], device=device)[None]
            cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(lens), 0)
            pos = torch.cat([torch.arange(n) for n in lens])[None].to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(ids, pixel_values=pv, image_sizes=isz, position_ids=pos, cu_seqlens=cu.to(device),
                               max_seqlen=max(lens)).logits
            nxt = logits[0, (cu[1:] - 1).long().to(device)].argmax(-1).tolist()
            for k, t in enumerate(nxt):
                if not done[k]:
                    if t == eos:
                        done[k] = True
                    else:
                        out_tokens[k].append(t)
                seqs[k] = seqs[k] + [t]
            if all(done):
                break
        answers += [tok.decode(t).strip() for t in out_tokens]
    return answers


# ---------------------------------------------------------------------------------------------------------------

def run_demo(out_dir: str = "demo_out", seed: int = 0, device: str | None = None, quick: bool = False) -> int:
    import torch

    from llava_fast.train import Trainer, get_recipe

    t0 = time.time()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        # The tiny matmuls here are overhead-bound: one thread is as fast on an idle machine and 5-10x faster on a
        # busy one (thread barriers under contention).
        torch.set_num_threads(1)
    try:
        return _run(out_dir, seed, device, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, seed, device, quick) -> int:
    import torch

    from llava_fast.train import Trainer, get_recipe

    t0 = time.time()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("llava-fast demo: --device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return 2
    K = KNOBS
    n_cap, n_qa, n_eval = (240, 240, 48) if quick else (K["n_caption"], K["n_qa"], K["n_eval"])
    print(f"llava-fast demo: train a tiny LLaVA-NeXT from scratch on generated pictures of shapes "
          f"(seed {seed}, device {device}{', quick' if quick else ''})")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    data_dir, model_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "model")
    print(f"[1/5] generating pictures: {n_cap} with captions (stage 1), {n_qa} with questions about colour, shape, "
          f"count and position (stage 2), {n_eval} held-out questions -> {data_dir}")
    make_data(data_dir, seed, n_cap, n_qa, n_eval)
    from llava_fast.data import load_tokenizer

    model, _ = build_tiny_model(model_dir, seed, quick)
    tok = load_tokenizer(model_dir)  # back from the folder, local files only
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[2/5] built a tiny LLaVA-NeXT ({n_params / 1e6:.2f}M parameters): CLIP-like vision tower on {TILE}px "
          f"tiles with AnyRes grids up to 2x2, a Llama language model, a {len(tok)}-word tokenizer -> {model_dir}")

    def recipe(name, data, template, epochs, lr, out):
        cfg = get_recipe(name, "llava_next")
        cfg.model.path = model_dir
        cfg.data.data, cfg.data.images, cfg.data.template = os.path.join(data_dir, data), os.path.join(
            data_dir, "images"), template
        cfg.data.max_len, cfg.data.max_tokens, cfg.data.num_workers = 512, K["max_tokens"], 0
        cfg.data.group_by_modality_length = False
        cfg.train.trainable = ["projector", "newline", "llm", "vision"]
        cfg.train.activation_checkpointing = False
        cfg.train.device = device
        cfg.train.seed = seed
        cfg.optim.lr, cfg.optim.vision_lr = lr, lr
        cfg.schedule.epochs = epochs
        cfg.checkpoint.out, cfg.checkpoint.resume = os.path.join(out_dir, out), "none"
        cfg.log.tensorboard = False
        return cfg

    print("[3/5] stage 1 (recipe stage1): captions, 'plain' template, packed into 2048-token sequences")
    cfg1 = recipe("stage1", "stage1.json", "plain", 1 if quick else K["epochs1"], K["lr1"], "stage1")
    cfg1.checkpoint.export = False
    tr1 = Trainer(cfg1, model=model, tokenizer=tok, log=lambda m: print("      " + m))
    s1 = tr1.train()
    print(f"      stage 1 done: {s1['steps']} steps in {s1['elapsed_s']:.0f}s, final loss {s1['loss']:.3f}")

    print("[4/5] stage 2 (recipe stage2): questions and answers, 'vicuna_v1' template, packed")
    cfg2 = recipe("stage2", "stage2.json", "vicuna_v1", 1 if quick else K["epochs2"], K["lr2"], "stage2")
    tr2 = Trainer(cfg2, model=tr1.model, tokenizer=tok, log=lambda m: print("      " + m))
    s2 = tr2.train()
    print(f"      stage 2 done: {s2['steps']} steps in {s2['elapsed_s']:.0f}s, final loss {s2['loss']:.3f}; "
          f"model exported to {s2['final']}")

    model = tr2.model
    with open(os.path.join(data_dir, "eval.json")) as f:
        held = json.load(f)
    preds = answer_questions(model, tok, held, os.path.join(data_dir, "images"), dev)
    per_kind: dict[str, list[int]] = {}
    for it, p in zip(held, preds):
        per_kind.setdefault(it["kind"], []).append(int(p == it["answer"]))
    acc = sum(sum(v) for v in per_kind.values()) / max(1, len(held))
    detail = ", ".join(f"{k} {100 * sum(v) / len(v):.0f}%" for k, v in sorted(per_kind.items()))
    print(f"[5/5] held-out accuracy: {100 * acc:.1f}% ({sum(sum(v) for v in per_kind.values())}/{len(held)} "
          f"questions on pictures never seen in training; {detail})")

    rng = random.Random(seed + 12345)
    im, facts = draw_picture(rng)
    path = os.path.join(out_dir, "fresh_picture.png")
    im.save(path)
    kind, q, truth = rng.choice(qa_pairs(facts))
    ans = answer_questions(model, tok, [{"pil": im, "question": q}], None, dev)[0]
    print(f"      a fresh picture ({im.size[0]}x{im.size[1]} px, saved to {path}): "
          f"{facts['count']} {facts['colour']} {_plural(facts['shape'], facts['count'])}")
    print(f"      Q: {q.replace(' ?', '?')}")
    print(f"      A: {ans}   (correct answer: {truth})")
    print(f"done in {time.time() - t0:.0f}s. The trained model is a llava-hf folder: {s2['final']}")
    if not quick and acc < 0.9:
        print("warning: accuracy below the 90% this demo aims for")
        return 1
    return 0
