"""`llava-fast chat`: prompt building, image tokens, and answers equal to model.generate on the same inputs."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tiny import IMAGE_TOKEN, VOCAB, save_tiny


def add_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2, "USER:": 3, "ASSISTANT:": 4, "<image>": IMAGE_TOKEN})
    vocab = {k: v for k, v in vocab.items() if not (k.startswith("w") and v in (0, 1, 2, 3, 4, IMAGE_TOKEN))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", additional_special_tokens=["<image>"])
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
    out = s.model.generate(ids, pixel_values=s.image["pixel_values"], image_sizes=s.image["image_sizes"],
                           max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    expect = s.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("</s>")[0].strip()
    assert answer == expect
    assert s.turns == [("w10 w11", answer)]
    assert run_chat(str(path), str(img), device="cpu", max_new_tokens=3, stream=io.StringIO("w12\n\n")) == 0


def test_bad_image_file(tmp_path):
    from llava_fast.chat import load_image

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))


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
