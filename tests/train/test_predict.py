"""``llava-fast predict``: batched answers for a LLaVA JSON file, equal to one-at-a-time generation, resumable."""
from __future__ import annotations

import json
import os

import pytest
import torch

from llava_fast.cli import main
from llava_fast.data.templates import VICUNA_SYSTEM, SampleError, generation_prompt
from llava_fast.predict import predict


def test_exact_match_ignores_case_spaces_and_a_final_period(tmp_path):
    from llava_fast.predict import exact_match

    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "answer": "Two  cats.", "reference": "two cats"}, {"id": 2, "answer": "red", "reference": "blue"},
        {"id": 3, "answer": "x"}, {"id": 4, "error": "missing_image: ..."}]) + '\n{"id": 5, "ans')
    assert exact_match(str(f)) == (1, 2)


def test_generation_prompt_is_the_training_prompt_up_to_the_answer():
    conv = [{"from": "human", "value": "<image>\nWhat colour ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many ?"}, {"from": "gpt", "value": "two"}]
    prompt, ref = generation_prompt(conv, "vicuna_v1", 1)
    # the original's conv.get_prompt() with an empty last message: no space after the last "ASSISTANT:"
    assert ref == "two" and prompt == (f"{VICUNA_SYSTEM} USER: <image>\nWhat colour ? ASSISTANT: red</s>"
                                       f"USER: How many ? ASSISTANT:")
    assert generation_prompt(conv[:3], "vicuna_v1", 1) == (prompt, None)
    q, _ = generation_prompt(conv[:1], "qwen", 1)
    assert q.endswith("<|im_start|>user\n<image>\nWhat colour ?<|im_end|>\n<|im_start|>assistant\n")
    assert generation_prompt(conv[:2], "plain", 1) == ("<image>", "red")
    with pytest.raises(SampleError, match="1 <image> tags for 2 images"):
        generation_prompt(conv, "vicuna_v1", 2)


def test_default_template_follows_the_language_model():
    """qwen for Qwen2, llama3 for a Llama 3 tokenizer (llama3-llava-next-8b), vicuna_v1 for other Llama models."""
    from types import SimpleNamespace

    from llava_fast.data.word_tokenizer import build_word_tokenizer
    from llava_fast.predict import default_template

    def cfg(text):
        return SimpleNamespace(text_config=SimpleNamespace(model_type=text))

    l3 = build_word_tokenizer(["a"], bos="<|begin_of_text|>",
                              specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert (default_template(cfg("qwen2")), default_template(cfg("llama"), l3),
            default_template(cfg("llama"), build_word_tokenizer(["a"]))) == ("qwen", "llama3", "vicuna_v1")
    with pytest.raises(ValueError, match="no default prompt template for a mistral language model"):
        default_template(cfg("mistral"))


def _records(assets, n=5):
    recs = json.load(open(assets / "data" / "stage2.json"))[:n]
    return [dict(r, conversations=r["conversations"][:4]) for r in recs]  # question 2 of each, its answer the reference


def test_predict_answers_equal_one_at_a_time_generation(assets, tmp_path):
    """Batched through the packed path, the answers are those of greedy generation of each sample alone on the
    padded path; a sample that cannot be answered is an error line, not a stopped run."""
    import llava_fast
    from llava_fast.chat import stop_token_ids
    from llava_fast.data import load_tokenizer

    recs = _records(assets)
    recs.insert(2, {"id": "gone", "image": "nope.png", "conversations": recs[0]["conversations"]})
    data = tmp_path / "q.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "answers.jsonl"
    counts = predict(str(assets / "model"), str(data), str(assets / "data" / "images"), str(out), max_new_tokens=4,
                     batch=2, progress=False, log=lambda *_: None)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    from llava_fast.predict import exact_match

    assert exact_match(str(out))[1] == 5  # the five answers have their references
    assert counts == {"answered": 5, "skipped": 0, "errors": 1, "exact_match": exact_match(str(out))[0] / 5}
    assert sorted(x["id"] for x in lines) == sorted(r["id"] for r in recs)  # each sample once
    got = {x["id"]: x for x in lines}
    assert got["gone"]["error"].startswith("missing_image")
    model = llava_fast.from_pretrained(str(assets / "model"), dtype=torch.float32).eval()
    tok = load_tokenizer(str(assets / "model"))
    stops = stop_token_ids(tok, str(assets / "model"))
    for r in recs:
        if r["id"] == "gone":
            continue
        prompt, ref = generation_prompt(r["conversations"], "vicuna_v1", 1)
        answer = _greedy_alone(model, tok, prompt, os.path.join(assets, "data", "images", r["image"]), stops)
        assert got[r["id"]] == {"id": r["id"], "answer": answer, "reference": ref}


def _greedy_alone(model, tok, prompt, image, stops, max_new_tokens=4):
    """The answer of greedy generation for one prompt and image on the padded path, up to a stop token."""
    from llava_fast.data import image_config, load_image_u8
    from llava_fast.data.templates import expand_placeholders, tokenize_with_media
    from llava_fast.ops.anyres import encode_tiles

    pp = encode_tiles([load_image_u8(image)], image_config(model.config))
    ids, _ = tokenize_with_media(tok, prompt)
    ids, _ = expand_placeholders(ids, [0] * len(ids), pp["num_image_tokens"], model.config.image_token_id)
    ids = torch.tensor([ids])
    seq = model.generate(ids, pixel_values=pp["pixel_values"], image_sizes=pp["image_sizes"],
                         max_new_tokens=max_new_tokens, eos_token_id=sorted(stops), pad_token_id=tok.pad_token_id,
                         packed=False)[0]
    gen = seq[ids.shape[1]:].tolist()
    gen = gen[: next((i for i, t in enumerate(gen) if t in stops), len(gen))]
    return tok.decode(gen, skip_special_tokens=True).strip()


def test_predict_resumes_where_it_stopped(assets, tmp_path, capsys):
    recs = _records(assets, 6)
    data = tmp_path / "q.json"
    data.write_text(json.dumps(recs[:3]))
    out = tmp_path / "a.jsonl"
    args = ["predict", "--model", str(assets / "model"), "--data", str(data), "--images",
            str(assets / "data" / "images"), "--out", str(out), "--max-new-tokens", "2", "--batch", "4"]
    assert main(args) == 0
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"id": "qa9", "ans')  # a line cut by a crash: that sample is answered again
    data.write_text(json.dumps(recs))
    assert main(args) == 0
    lines = out.read_text().splitlines()
    assert out.read_text().startswith(first)
    assert lines[3] == '{"id": "qa9", "ans'  # left as it was, on a line of its own
    ids = [json.loads(x)["id"] for k, x in enumerate(lines) if k != 3]
    assert sorted(ids) == sorted(r["id"] for r in recs) and len(ids) == 6
    assert main(args[:-2] + ["--batch", "0"]) == 2
    assert "--batch must be an integer >= 1" in capsys.readouterr().err


def test_predict_onevision_images_and_videos(tmp_path):
    """OneVision: single images, several images in one sample and video files in one run; each answer is that of
    the sample generated alone (the model's multi-image path and video tokens included)."""
    pytest.importorskip("av")
    import numpy as np
    from PIL import Image

    import llava_fast
    from llava_fast.chat import stop_token_ids
    from llava_fast.data import image_config, load_image_u8, load_tokenizer
    from llava_fast.data.templates import expand_placeholders, tokenize_with_media
    from llava_fast.data.video import read_video
    from llava_fast.ops import anyres
    from utils import tiny_onevision, write_video

    model_dir = tiny_onevision(tmp_path / "ov")
    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(40, 70), (90, 30), (28, 28)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(media / f"i{k}.png")
    for k, n in enumerate([9, 14]):
        write_video(media / f"v{k}.mp4", n=n, w=40, h=30)
    q = "what happens in the clip ?"
    recs = [{"id": "img", "image": "i0.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"}]},
            {"id": "vid0", "video": "v0.mp4", "conversations": [{"from": "human", "value": f"<video>\n{q}"}]},
            {"id": "multi", "image": ["i1.png", "i2.png"],
             "conversations": [{"from": "human", "value": f"<image> <image>\n{q}"}]},
            {"id": "vid1", "video": "v1.mp4", "conversations": [{"from": "human", "value": f"<video>\n{q}"}]},
            {"id": "text", "conversations": [{"from": "human", "value": q}]}]
    data = tmp_path / "q.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "a.jsonl"
    counts = predict(str(model_dir), str(data), str(media), str(out), max_new_tokens=3, batch=8, frames=8,
                     progress=False, log=lambda *_: None)
    assert counts == {"answered": 5, "skipped": 0, "errors": 0}  # no references: no exact match
    got = {x["id"]: x["answer"] for x in map(json.loads, out.read_text().splitlines())}
    model = llava_fast.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(str(model_dir))
    stops = stop_token_ids(tok, str(model_dir))
    spec = image_config(model.config)
    cfg = model.config
    for r in recs:
        imgs = r.get("image", [])
        imgs = [imgs] if isinstance(imgs, str) else imgs
        prompt, _ = generation_prompt(r["conversations"], "qwen", len(imgs), 1 if "video" in r else 0)
        ids, _ = tokenize_with_media(tok, prompt)
        kw, counts_i, counts_v = {}, [], []
        if imgs:
            pp = anyres.encode_tiles([load_image_u8(str(media / p)) for p in imgs], spec, multi_image=len(imgs) > 1)
            kw = dict(pixel_values=pp["pixel_values"], image_sizes=pp["image_sizes"],
                      batch_num_images=torch.tensor([len(imgs)]))
            counts_i = pp["num_image_tokens"]
        if "video" in r:
            frames = anyres.preprocess_video(read_video(str(media / r["video"]), 8), spec)
            kw = dict(pixel_values_videos=frames[None])
            counts_v = [anyres.num_video_tokens(frames.shape[0], spec.tokens_per_side)]
        ids, _ = expand_placeholders(ids, [0] * len(ids), counts_i, cfg.image_token_id, counts_v, cfg.video_token_id)
        ids = torch.tensor([ids])
        seq = model.generate(ids, max_new_tokens=3, eos_token_id=sorted(stops), pad_token_id=tok.pad_token_id,
                             packed=False, **kw)[0]
        gen = seq[ids.shape[1]:].tolist()
        gen = gen[: next((i for i, t in enumerate(gen) if t in stops), len(gen))]
        assert got[r["id"]] == tok.decode(gen, skip_special_tokens=True).strip(), r["id"]


CHAT_TEMPLATE = (  # a llava-hf-style chat template of a made-up format: images first, then the text
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q :' }}"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + c['text'] }}{% endfor %}"
    "{{ ' A :' }}{% else %}{{ ' ' + m['content'][0]['text'] + '</s>' }}{% endif %}{% endfor %}")


def test_predict_uses_the_models_chat_template(assets, tmp_path):
    """A language model with no built-in format (Mistral: llava-v1.6-mistral-7b-hf) is prompted through its chat
    template (chat_template.json), over several turns; the answers are greedy generation from that prompt, which
    transformers' apply_chat_template writes for the same messages. Without a chat template the error says so."""
    import shutil

    import llava_fast
    from llava_fast.chat import stop_token_ids
    from llava_fast.data import load_tokenizer

    model_dir = tmp_path / "mistral"
    shutil.copytree(assets / "model", model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["text_config"]["model_type"] = "mistral"   # the same weights as a Mistral language model
    (model_dir / "config.json").write_text(json.dumps(cfg))
    for f in ("chat_template.json", "chat_template.jinja"):
        (model_dir / f).unlink(missing_ok=True)
    recs = _records(assets, n=3)
    data = tmp_path / "q.json"
    data.write_text(json.dumps(recs))
    imgs = str(assets / "data" / "images")
    with pytest.raises(ValueError, match="no default prompt template for a mistral language model"):
        predict(str(model_dir), str(data), imgs, str(tmp_path / "x.jsonl"), progress=False, log=lambda *_: None)
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    logs = []
    out = tmp_path / "answers.jsonl"
    counts = predict(str(model_dir), str(data), imgs, str(out), max_new_tokens=4, batch=2, progress=False,
                     log=logs.append)
    assert counts["answered"] == 3 and any("the model's chat template (--template chat)" in m for m in logs)
    got = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    model = llava_fast.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(str(model_dir))
    stops = stop_token_ids(tok, str(model_dir))
    for r in recs:
        c = r["conversations"]
        q1 = c[0]["value"].replace("<image>", "").strip()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
                    {"role": "assistant", "content": [{"type": "text", "text": c[1]["value"]}]},
                    {"role": "user", "content": [{"type": "text", "text": c[2]["value"]}]}]
        prompt = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
        assert prompt.startswith("Q :<image>\n ") and prompt.endswith(" A :")
        answer = _greedy_alone(model, tok, prompt, os.path.join(imgs, r["image"]), stops)
        assert got[r["id"]] == {"id": r["id"], "answer": answer, "reference": c[3]["value"]}


def test_predict_names_the_error_reasons_and_fails_when_nothing_is_answered(assets, tmp_path, capsys):
    """Errors never stop a run, but the run says how many of which reason and the first one; a run where no sample
    could be answered (a file in another format, a wrong --images) exits 1, every error line written."""
    recs = _records(assets, 2)
    bad = [{"id": "fmt", "image": recs[0]["image"], "question": "What colour ?"},  # not LLaVA's format
           {"id": "gone", "image": "nope.png", "conversations": recs[0]["conversations"]}]
    data = tmp_path / "q.json"
    out = tmp_path / "a.jsonl"
    args = ["predict", "--model", str(assets / "model"), "--data", str(data), "--images",
            str(assets / "data" / "images"), "--out", str(out), "--max-new-tokens", "2"]
    data.write_text(json.dumps(bad + recs))
    assert main(args) == 0
    text = capsys.readouterr()
    assert "2 samples could not be answered (bad_format 1, missing_image 1); the first: sample fmt: bad_format" \
        in text.out
    out.unlink()
    data.write_text(json.dumps(bad))
    assert main(args) == 1
    text = capsys.readouterr()
    assert "none of the 2 samples could be answered" in text.err and "--images" in text.err
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == ["fmt", "gone"]
