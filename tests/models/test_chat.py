"""`llava-fast chat`: prompt building, image tokens, and answers equal to model.generate on the same inputs."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import IMAGE_TOKEN, VIDEO_TOKEN, VOCAB, save_tiny
from utils import write_video


def add_tokenizer(path, extra=None, specials=()):
    """A word-level tokenizer (``w<id>`` words); ``extra`` maps more tokens to ids (replacing those ``w<id>``),
    ``specials`` are added as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2, "USER:": 3, "ASSISTANT:": 4, "<image>": IMAGE_TOKEN, **(extra or {})})
    used = set(vocab[k] for k in vocab if not k.startswith("w"))
    vocab = {k: v for k, v in vocab.items() if not (k.startswith("w") and v in used)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", additional_special_tokens=["<image>", *specials])
    fast.save_pretrained(path)


def test_chat_session_matches_generate(tmp_path):
    from llava_fast.chat import ChatSession, load_image, run_chat

    _, path = save_tiny(tmp_path, "llava_next")
    add_tokenizer(path)
    img = tmp_path / "pic.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 70, 3), dtype=np.uint8)).save(img)
    s = ChatSession(str(path), device="cpu")
    s.set_image(load_image(str(img)))
    ids = s._prompt_ids("w10 w11")
    assert int((ids == IMAGE_TOKEN).sum()) == s.image["num_image_tokens"][0]
    answer = s.ask("w10 w11", max_new_tokens=5)
    out = s.model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=s.image["pixel_values"],
                           image_sizes=s.image["image_sizes"], max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    expect = s.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("</s>")[0].strip()
    assert answer == expect
    assert s.turns == [("w10 w11", answer)]
    assert run_chat(str(path), str(img), device="cpu", max_new_tokens=3, stream=io.StringIO("w12\n\n")) == 0


MISTRAL_TEMPLATE = (  # the shape of llava-v1.6-mistral-7b-hf's chat_template.json
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% else %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}{% endif %}{% endfor %}")


def _image(tmp_path):
    img = tmp_path / "pic.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 70, 3), dtype=np.uint8)).save(img)
    return str(img)


def test_chat_uses_the_models_chat_template(tmp_path):
    """A Mistral LLaVA-NeXT with the processor's chat_template.json gets that template's prompt, over two turns (the
    Vicuna template was used for every non-Qwen2 model); without a chat template a Mistral model is refused."""
    from llava_fast.chat import ChatSession, load_image

    _, path = save_tiny(tmp_path, "llava_next", text="mistral")
    add_tokenizer(path, extra={"[INST]": 5, "[/INST]": 6})
    with pytest.raises(ValueError, match="no chat template that places the image"):
        ChatSession(str(path), device="cpu")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL_TEMPLATE}))
    s = ChatSession(str(path), device="cpu")
    s.set_image(load_image(_image(tmp_path)))
    # "what" is <unk> = the pad id: attended to, as the tokenizer's attention mask says (not masked as padding)
    ids = s._prompt_ids("w10 what w11")
    out = s.model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=s.image["pixel_values"],
                           image_sizes=s.image["image_sizes"], max_new_tokens=4, eos_token_id=2)
    a1 = s.ask("w10 what w11", max_new_tokens=4)
    assert a1 == s.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("</s>")[0].strip()
    assert s._prompt("w12") == f"[INST] <image>\nw10 what w11 [/INST] {a1}</s> [INST] w12 [/INST]"
    ids = s._prompt_ids("w12")[0].tolist()
    n = s.image["num_image_tokens"][0]
    answer_ids = s.tokenizer(a1, add_special_tokens=False).input_ids
    assert ids == [5] + [IMAGE_TOKEN] * n + [10, 0, 11, 6] + answer_ids + [2, 5, 12, 6]    # the image once
    with pytest.raises(ValueError, match="needs temperature > 0"):
        s.ask("w12", top_p=0.9)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        s.ask("w12", temperature=-1.0)


def test_chat_builtin_llama3_template(tmp_path):
    """A Llama model whose tokenizer is Llama 3's (no chat template that places the image) gets Llama 3's headers,
    as llama3-llava-next-8b-hf's chat template writes them, not Vicuna's USER:/ASSISTANT:."""
    from llava_fast.chat import ChatSession, load_image

    _, path = save_tiny(tmp_path, "llava_next")
    heads = {"<|start_header_id|>": 5, "<|end_header_id|>": 6, "<|eot_id|>": 7}
    add_tokenizer(path, extra=heads, specials=tuple(heads))
    s = ChatSession(str(path), device="cpu")
    s.set_image(load_image(_image(tmp_path)))
    a1 = s.ask("w10 w11", max_new_tokens=3)
    assert s._prompt("w12") == ("<|start_header_id|>user<|end_header_id|>\n\n<image>\nw10 w11<|eot_id|>"
                                f"<|start_header_id|>assistant<|end_header_id|>\n\n{a1}<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nw12<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert 7 in s.stop_ids


def test_chat_answer_ends_at_end_of_turn_token(tmp_path):
    """An answer ends at a special end-of-turn token (<|im_end|>) that is not the tokenizer's eos, and at an eos id
    of generation_config.json: generation stops there and the answer is the text before it (the stop string was
    decoded away, never matched, generation_config.json was not read, and the answer ran on)."""
    from llava_fast.chat import ChatSession

    _, path = save_tiny(tmp_path, "llava_next")
    add_tokenizer(path)
    s = ChatSession(str(path), device="cpu")
    ids = s._prompt_ids("w10 w11")
    gen = s.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8)[0, ids.shape[1]:].tolist()
    t = next(i for i in range(1, 8) if gen[i] not in gen[:i] and gen[i] not in ids[0].tolist() + [2])
    add_tokenizer(path, extra={"<|im_end|>": gen[t]}, specials=["<|im_end|>"])
    s = ChatSession(str(path), device="cpu")
    assert s._prompt_ids("w10 w11").tolist() == ids.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # greedy: no ignored sampling argument passed to generate
        answer = s.ask("w10 w11", max_new_tokens=8)
    assert answer == " ".join(f"w{i}" for i in gen[:t])
    add_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, gen[t]]}))
    assert ChatSession(str(path), device="cpu").ask("w10 w11", max_new_tokens=8) == answer


def test_bad_image_file(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from llava_fast.chat import load_image

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="over the 100 pixel limit; downscale"):
        load_image(_image(tmp_path), max_pixels=100)
    # over twice PIL's own limit PIL.Image.open raises first: its error names the file too
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="--image .*pic.png.*decompression-bomb"):
        load_image(_image(tmp_path))


def test_image_exif_orientation_applied_as_transformers_does(tmp_path):
    """A JPEG stored landscape with EXIF orientation 6 (a phone photo shot upright) is read upright, exactly as
    transformers' load_image (used by its chat pipelines) reads it."""
    import torch
    from transformers.image_utils import load_image as hf_load_image

    from llava_fast.chat import load_image

    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # 50 wide, 30 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    got = load_image(str(path))
    want = torch.from_numpy(np.asarray(hf_load_image(str(path)))).permute(2, 0, 1)
    assert got.shape == (3, 50, 30) and torch.equal(got, want)


def test_chat_about_a_video_matches_transformers(tmp_path):
    """`llava-fast chat --video`: a OneVision conversation about a video file; the prompt holds the video tokens its
    frames produce, and the answer is transformers' greedy generate on the same prompt and frames."""
    pytest.importorskip("av")
    from llava_fast.chat import ChatSession, load_video, run_chat
    from llava_fast.ops.anyres import num_video_tokens

    hf, path = save_tiny(tmp_path, "llava_onevision")
    add_tokenizer(path, extra={"<video>": VIDEO_TOKEN}, specials=("<video>",))
    clip = write_video(tmp_path / "clip.mp4", n=12)
    s = ChatSession(str(path), device="cpu")
    s.set_video(load_video(clip, frames=4))
    assert s.video.shape == (4, 3, 28, 28) and s.media == "video"
    ids = s._prompt_ids("w10 w11")
    assert int((ids == VIDEO_TOKEN).sum()) == num_video_tokens(4, s.image_config.tokens_per_side)
    answer = s.ask("w10 w11", max_new_tokens=6)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=s.video[None],
                          max_new_tokens=6, do_sample=False, eos_token_id=sorted(s.stop_ids), pad_token_id=0)
    gen = out[0, ids.shape[1]:].tolist()
    gen = gen[: next((i for i, t in enumerate(gen) if t in s.stop_ids), len(gen))]
    assert answer == s.tokenizer.decode(gen, skip_special_tokens=True).strip()
    assert run_chat(str(path), None, video=clip, frames=3, device="cpu", max_new_tokens=3,
                    stream=io.StringIO("w12\n\n")) == 0


def test_chat_video_errors_name_the_argument(tmp_path):
    pytest.importorskip("av")
    from llava_fast.chat import ChatSession, load_video, run_chat

    _, path = save_tiny(tmp_path, "llava_next")
    add_tokenizer(path)
    clip = write_video(tmp_path / "clip.mp4", n=5)
    with pytest.raises(ValueError, match="--image or --video, not both"):
        run_chat(str(path), _image(tmp_path), video=clip)
    with pytest.raises(ValueError, match="--frames must be an integer >= 1"):
        run_chat(str(path), None, video=clip, frames=0)
    with pytest.raises(ValueError, match="--video: a llava_next model takes images only"):
        ChatSession(str(path), device="cpu").set_video(load_video(clip))
    with pytest.raises(FileNotFoundError, match="--video .*nope.mp4.*no such file"):
        load_video(str(tmp_path / "nope.mp4"))
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="--video .*junk.mp4.*cannot read video"):
        load_video(str(tmp_path / "junk.mp4"))
