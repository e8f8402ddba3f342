"""``llava-fast predict --model DIR --data FILE --images DIR --out FILE.jsonl``: answers for every sample of a LLaVA
JSON/JSONL file (evaluation sets, data generation), in batches through the packed generation path.

Each record is a training-format sample whose conversation ends with the question (a human turn) or with a
reference answer (a gpt turn: left out of the prompt and written next to the prediction). The prompt is the one the
model was trained with (``--template``; by default ``vicuna_v1`` for Llama models, ``llama3`` for Llama 3 ones,
``qwen`` for Qwen2 ones; ``chat``, the default for other language models such as Mistral's: the model's own chat
template, as ``llava-fast chat`` uses it), up to where the answer starts. One JSON line per sample is appended to
``--out`` and flushed as soon as its batch is done: ``{"id", "answer", "reference"?}``, or ``{"id", "error"}`` for a
sample that cannot be answered (missing or corrupt image, too long for the context), which is counted and never
stops the run. A run started again on the same ``--out`` skips the samples it already answered, so an interrupted
run loses at most one batch.
"""
from __future__ import annotations

import json
import os
import sys

import torch


def default_template(config, tokenizer=None) -> str:
    """The template a model was trained with, from its language model: ``qwen`` for Qwen2, ``llama3`` for Llama 3
    (its tokenizer has ``<|start_header_id|>``), ``vicuna_v1`` for other Llama models (Vicuna)."""
    text = config.text_config.model_type
    if text == "qwen2":
        return "qwen"
    if text == "llama":
        from llava_fast.data.templates import is_llama3_tokenizer

        return "llama3" if is_llama3_tokenizer(tokenizer) else "vicuna_v1"
    raise ValueError(f"--template: no default prompt template for a {text} language model; give the template the "
                     f"model was trained with (vicuna_v1, qwen, llama3 or plain), or add its chat template to the "
                     f"folder (chat_template.json: --template chat)")


def _answers(path: str):
    """The answered records of a predict output file (error lines and a line cut by a crash left out)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "answer" in rec:
                yield rec


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class _Prepared:
    """One sample ready to batch: prompt ids with media tokens expanded, and its pixels."""

    def __init__(self, sid, ids, reference, pixel_values=None, image_sizes=None, n_images=0, video=None):
        self.sid, self.ids, self.reference = sid, ids, reference
        self.pixel_values, self.image_sizes, self.n_images, self.video = pixel_values, image_sizes, n_images, video


def _prompt(rec, tok, template, chat_template, n_images: int, n_videos: int):
    """(prompt, reference) of a record: ``template``'s training format up to the answer, or the model's chat template
    (``template`` ``chat``)."""
    from llava_fast.data.templates import generation_prompt, prompt_turns

    if template != "chat":
        return generation_prompt(rec["conversations"], template, n_images, n_videos)
    from llava_fast.chat import render_chat

    turns, reference = prompt_turns(rec["conversations"], n_images, n_videos)
    pairs = [(turns[i][1], turns[i + 1][1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]
    return render_chat(tok, chat_template, pairs), reference


def _prepare(rec, k, model, spec, tok, template, image_root, frames, max_pixels, max_new_tokens, chat_template=None):
    from llava_fast.data.images import load_image_u8
    from llava_fast.data.templates import SampleError, expand_placeholders, tokenize_prompt
    from llava_fast.ops import anyres

    if not isinstance(rec, dict) or "conversations" not in rec:
        raise SampleError("bad_format", "a sample needs a 'conversations' list")
    sid = str(rec.get("id", k))
    imgs = rec.get("image") or []
    imgs = [imgs] if isinstance(imgs, str) else list(imgs)
    vid = rec.get("video")
    prompt, reference = _prompt(rec, tok, template, chat_template, len(imgs), 1 if vid else 0)
    ids, _ = tokenize_prompt(tok, prompt, template)
    cfg = model.config
    out = _Prepared(sid, None, reference)
    counts, vcounts = [], []
    if imgs:
        u8 = [load_image_u8(os.path.join(image_root, p), max_pixels) for p in imgs]
        pp = anyres.encode_tiles(u8, spec, multi_image=len(u8) > 1)
        out.pixel_values, out.image_sizes, out.n_images = pp["pixel_values"], pp["image_sizes"], len(u8)
        counts = [int(n) for n in pp["num_image_tokens"]]
    if vid:
        if getattr(cfg, "video_token_id", None) is None:
            raise SampleError("bad_video", f"a {cfg.model_type} model takes no videos")
        from llava_fast.data.video import read_video

        out.video = torch.stack(read_video(os.path.join(image_root, vid), frames, None, max_pixels,  # frame by frame
                                           each=lambda a: anyres.preprocess_video([a], spec)[0]))
        vcounts = [anyres.num_video_tokens(out.video.shape[0], spec.tokens_per_side)]
    ids, _ = expand_placeholders(ids, [0] * len(ids), counts, cfg.image_token_id, vcounts,
                                 getattr(cfg, "video_token_id", None))
    ctx = cfg.text_config.max_position_embeddings
    if len(ids) + max_new_tokens > ctx:
        raise SampleError("too_long", f"the prompt takes {len(ids)} tokens: with max_new_tokens={max_new_tokens} "
                          f"over the model's context ({ctx})")
    out.ids = torch.tensor(ids, dtype=torch.long)
    return out


def _batch_media(group: list, model_type: str, device) -> dict:
    """The model's media arguments for a batch: the tiles and sizes of every image in placeholder order, the images
    per sample (OneVision picks its multi-image path from them), the videos as one (videos, frames, ...) tensor."""
    imgs = [p for p in group if p.n_images]
    vids = [p.video for p in group if p.video is not None]
    media = {}
    if imgs:
        media["pixel_values"] = torch.cat([p.pixel_values for p in imgs]).to(device)
        if model_type != "llava":  # LLaVA-1.5 takes no image sizes
            media["image_sizes"] = torch.cat([p.image_sizes for p in imgs]).to(device)
        if model_type == "llava_onevision":
            media["batch_num_images"] = torch.tensor([p.n_images for p in imgs], device=device)
    if vids:
        media["pixel_values_videos"] = torch.stack(vids).to(device)
    return media


def predict(model_dir: str, data: str, image_root: str, out: str, template: str | None = None,
            max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, batch: int = 16,
            frames: int = 32, device: str | None = None, max_pixels: int = 64 * 1024 * 1024, progress: bool = True,
            log=print) -> dict:
    """Answers every sample of ``data`` into ``out`` (JSON lines, appended; samples already answered there are
    skipped). Returns counts: ``answered``, ``skipped`` (answered before), ``errors`` (each with its error line in
    ``out``; ``llava-fast predict`` exits 1 when there were samples to answer and none could be)."""
    import llava_fast
    from llava_fast.chat import END_OF_TURN, decode_answer, find_chat_template, stop_token_ids
    from llava_fast.data import load_tokenizer, read_records
    from llava_fast.data.images import checkpoint_image_config
    from llava_fast.data.templates import TEMPLATES, SampleError, check_template
    from llava_fast.generation import generate
    from llava_fast.train.trainer import bf16_autocast

    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be an integer >= 1, got {batch!r}")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"--frames must be an integer >= 1, got {frames!r}")
    if template is not None and template not in TEMPLATES + ("chat",):
        raise ValueError(f"--template must be one of {', '.join(TEMPLATES)} or chat (the model's chat template), got "
                         f"{template!r}")
    records = read_records(data)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"--images {image_root}: no such folder (the folder image paths are relative to)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the checkpoint's dtype (bf16 for the released models: half the memory of fp32 weights for inference); an fp32
    # checkpoint runs under bf16 autocast on GPUs that have bf16, as training does
    model = llava_fast.from_pretrained(model_dir, device=device).eval()
    tok = load_tokenizer(model_dir)
    spec = checkpoint_image_config(model_dir, model.config)  # its preprocessor_config.json: LLaVA-1.5's do_pad
    chat_template = find_chat_template(tok, model_dir)
    if template is None:
        try:
            template = default_template(model.config, tok)
        except ValueError:
            if chat_template is None:
                raise
            template = "chat"
            log(f"--template: no built-in format for a {model.config.text_config.model_type} language model: the "
                f"model's chat template (--template chat)")
    if template == "chat" and chat_template is None:
        raise ValueError(f"--template chat: {model_dir} has no chat template that places the image "
                         f"(chat_template.json, processor_config.json or the tokenizer's)")
    if template != "chat":
        check_template(tok, template, "--template")
    stops = stop_token_ids(tok, model_dir)
    done = {str(r.get("id")) for r in _answers(out)}  # a line cut by a crash is not one: answered again
    todo = [(k, r) for k, r in enumerate(records) if str(r.get("id", k) if isinstance(r, dict) else k) not in done]
    counts = {"answered": 0, "skipped": len(records) - len(todo), "errors": 0}
    if counts["skipped"]:
        log(f"{out}: {counts['skipped']} of {len(records)} samples already answered, skipped")
    mixed = model.dtype == torch.float32 and bf16_autocast("auto", device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="predict", unit="sample", dynamic_ncols=True, file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        if f.tell() and not _ends_with_newline(out):
            f.write("\n")  # a line cut by a crash stays a line of its own (ignored), the next record starts clean

        def write(rec):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()

        def run(group):
            if not group:
                return
            media = _batch_media(group, model.config.model_type, device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                seqs = generate(model, [p.ids.to(device) for p in group], max_new_tokens=max_new_tokens,
                                do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                                top_p=top_p, top_k=top_k, eos_token_id=sorted(stops),
                                pad_token_id=tok.pad_token_id or 0, stop_strings=list(END_OF_TURN), tokenizer=tok,
                                packed=True, **media)
            for p, seq in zip(group, seqs):
                rec = {"id": p.sid, "answer": decode_answer(tok, seq[len(p.ids):].tolist(), stops)}
                if p.reference is not None:
                    rec["reference"] = p.reference
                write(rec)
                counts["answered"] += 1
            if bar is not None:
                bar.update(len(group))

        group, reasons, first_error = [], {}, None
        try:
            for k, rec in todo:
                try:
                    p = _prepare(rec, k, model, spec, tok, template, image_root, frames, max_pixels, max_new_tokens,
                                 chat_template)
                except SampleError as e:
                    sid = str(rec.get("id", k)) if isinstance(rec, dict) else str(k)
                    write({"id": sid, "error": f"{e.reason}: {e}"})
                    counts["errors"] += 1
                    reasons[e.reason] = reasons.get(e.reason, 0) + 1
                    first_error = first_error or f"sample {sid}: {e.reason}: {e}"
                    if bar is not None:
                        bar.update(1)
                    continue
                # the videos of one batch are one (videos, frames, ...) tensor: a new frame count starts a batch
                frames_now = {q.video.shape[0] for q in group if q.video is not None}
                if len(group) == batch or (p.video is not None and frames_now and p.video.shape[0] not in frames_now):
                    run(group)
                    group = []
                group.append(p)
            run(group)
        finally:
            if bar is not None:
                bar.close()
    log(f"predict: {counts['answered']} answered, {counts['errors']} errors, {counts['skipped']} skipped -> {out}")
    if counts["errors"]:
        by_reason = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        log(f"predict: {counts['errors']} samples could not be answered ({by_reason}); the first: {first_error}. "
            f"Each has an \"error\" line in {out}, and a run started again tries them again")
    hits, n = exact_match(out)
    if n:
        counts["exact_match"] = hits / n
        log(f"exact match: {hits}/{n} ({100 * hits / n:.1f}%) of the answers in {out} that have a reference (case, "
            f"spaces and a final period ignored)")
    return counts


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def exact_match(path: str) -> tuple[int, int]:
    """(answers equal to their reference, answers with a reference) in a predict output file, comparing lowercased
    text with runs of spaces made one and a final period dropped (a quick check, not a benchmark's metric)."""
    pairs = [(_norm(r["answer"]), _norm(r["reference"])) for r in _answers(path) if r.get("reference") is not None]
    return sum(a == b for a, b in pairs), len(pairs)
