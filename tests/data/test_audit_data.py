"""Audit of the training data pipeline (llava_fast/data): templates, dataset validation, video frames, collation.

Each test pins a defect found by adversarial testing against reference-spec.md and the documented behaviour; all of
them fail on the code before the fix."""
import numpy as np
import pytest
import torch
from PIL import Image

from llava_fast.data import (ImageProcessorConfig, LlavaDataset, SampleError, collate_packed, encode_conversation)
from llava_fast.data.templates import IMAGE_PLACEHOLDER as IMG, normalize_conversations
from llava_fast.data.word_tokenizer import build_word_tokenizer

NEXT = ImageProcessorConfig.for_variant("llava_next", tile=56, patch_size=14,
                                        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
L15 = ImageProcessorConfig.for_variant("llava", tile=56, patch_size=14)
OV = ImageProcessorConfig.for_variant("llava_onevision", tile=28, patch_size=14,
                                      image_grid_pinpoints=[[28 * i, 28 * j] for i in range(1, 4) for j in range(1, 4)],
                                      vision_aspect_ratio="anyres_max_2")
IMG_ID, VID_ID = 4, 5  # "<image>", "<video>" in the word tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer("what colour is it red blue a cat describe".split())


def conv(q="<image>\nwhat colour is it ?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit_imgs")
    Image.fromarray((np.random.default_rng(0).random((40, 70, 3)) * 255).astype(np.uint8)).save(d / "a.png")
    Image.new("RGB", (3000, 1)).save(d / "strip.png")  # 3000 pixels: under max_pixels, but a 1 x 3000 strip
    return d


def test_plain_media_tag_in_caption_is_a_counted_drop(tok, image_dir):
    """preprocess_plain asserts the <image> is in the human turn. A caption holding it gave the prompt a second
    placeholder for one image: building the dataset crashed with an IndexError (no sample named, whole run lost)."""
    bad = conv("describe", "<image> a cat")
    with pytest.raises(SampleError) as e:
        encode_conversation(tok, bad, "plain", n_images=1)
    assert e.value.reason == "placeholder_mismatch"
    recs = [{"id": "ok", "image": "a.png", "conversations": conv("<image>\ndescribe", "a cat")},
            {"id": "tag_in_caption", "image": "a.png", "conversations": bad}]
    logs = []
    ds = LlavaDataset(recs, str(image_dir), tok, NEXT, "plain", IMG_ID, max_len=512, log=logs.append)
    assert [it.sample_id for it in ds.items] == ["ok"]
    assert ds.drops.counts == {"placeholder_mismatch": 1}
    assert any("tag_in_caption" in m for m in logs)


@pytest.mark.parametrize("value", [" <image>", "\n<image>\n", "<image>\n", "  <image>  "])
def test_image_only_turn_is_the_bare_tag_as_the_originals(tok, value):
    """preprocess_multimodal (L15 and NXT) ends with .strip(): a turn holding only the tag (plus whitespace, tag not
    at the start) becomes "<image>", not "<image>\\n" (an extra "\\n" token in the prompt)."""
    want = "<image>" if not value.startswith("<image>") else value  # NXT leaves a turn starting with the tag alone
    assert normalize_conversations(conv(value))[0][1] == want
    if value == " <image>":
        e = encode_conversation(tok, conv(value), "vicuna_v1", n_images=1)
        k = e.input_ids.index(IMG)
        assert tok.convert_ids_to_tokens(e.input_ids[k + 1: k + 3]) == ["<unk>", ":"]  # "ASSISTANT :", no "\n"


def test_video_field_with_non_paths_is_a_counted_drop(tok, image_dir):
    """'video': [1, 2] crashed the dataset build with a TypeError from os.path.join; it is a bad_video drop. A missing
    frame folder says so (the message used to tell the user to decode the video to frames)."""
    recs = [{"id": "ok", "image": "a.png", "conversations": conv()},
            {"id": "ints", "video": [1, 2], "conversations": conv("<video>\nwhat")},
            {"id": "gone", "video": "no_such_folder", "conversations": conv("<video>\nwhat")}]
    logs = []
    ds = LlavaDataset(recs, str(image_dir), tok, OV, "vicuna_v1", IMG_ID, video_token_id=VID_ID, max_len=4096,
                      log=logs.append)
    assert [it.sample_id for it in ds.items] == ["ok"] and ds.drops.counts == {"bad_video": 2}
    assert any("'gone'" in m and "not found" in m for m in logs), logs


def test_frames_upbound_samples_frames_as_nxt(tok, image_dir):
    """NXT samples np.linspace(0, n - 1, frames_upbound, dtype=int) (truncation); rounding picked other frames
    (100 frames -> 32: index 10 instead of 9, ...)."""
    names = [f"f{k:03d}.jpg" for k in range(100)]  # frames are read by the workers, not at indexing
    recs = [{"id": "v", "video": names, "conversations": conv("<video>\nwhat")}]
    ds = LlavaDataset(recs, str(image_dir), tok, OV, "vicuna_v1", IMG_ID, video_token_id=VID_ID, max_len=4096,
                      frames_upbound=32)
    want = [str(image_dir / names[i]) for i in np.linspace(0, 99, 32, dtype=int)]
    assert ds.items[0].video == want


@pytest.mark.parametrize("cfg,images,q", [(L15, "strip.png", "<image>\nwhat"),
                                          (OV, ["strip.png", "a.png"], "<image> <image>\nwhat")])
def test_thin_strip_dropped_when_indexed(tok, image_dir, cfg, images, q):
    """The dataset runs the tile encoder without limits (they are the dataset's, checked from the header), but only
    checked w * h: a thin strip passed, and its LLaVA-1.5 resize (56 x 168000 here; 336 x 33.6M for a 1 x 100000
    strip at the real tile) or OneVision pad-to-square canvas (3000 x 3000) was allocated in a DataLoader worker.
    ops.anyres' strip guard (check_work) now runs at indexing with the dataset's max_pixels: a counted drop."""
    recs = [{"id": "strip", "image": images, "conversations": conv(q)},
            {"id": "ok", "image": "a.png", "conversations": conv()}]
    logs = []
    ds = LlavaDataset(recs, str(image_dir), tok, cfg, "vicuna_v1", IMG_ID, max_len=100000, max_pixels=4000,
                      log=logs.append)
    assert [it.sample_id for it in ds.items] == ["ok"] and ds.drops.counts == {"image_too_large": 1}
    assert any("strip.png" in m and "1x3000" in m for m in logs), logs


def test_videos_with_other_frame_counts_named(tok, image_dir):
    """Two videos with different frame counts in one pack cannot be collated (the model takes (videos, frames, ...)).
    The error named no sample; now it names them with their frame counts, and the dataset says so when it is built."""
    recs = [{"id": "v3", "video": [f"f{k}.jpg" for k in range(3)], "conversations": conv("<video>\nwhat")},
            {"id": "v5", "video": [f"f{k}.jpg" for k in range(5)], "conversations": conv("<video>\nwhat")}]
    logs = []
    LlavaDataset(recs, str(image_dir), tok, OV, "vicuna_v1", IMG_ID, video_token_id=VID_ID, max_len=4096,
                 log=logs.append)
    assert any("'v3': 3" in m and "'v5': 5" in m for m in logs), logs
    samples = [{"input_ids": torch.tensor([1, VID_ID]), "labels": torch.tensor([-100, -100]), "sample_id": sid,
                "pixel_values_videos": torch.zeros(n, 3, 28, 28)} for sid, n in (("v3", 3), ("v5", 5))]
    with pytest.raises(ValueError, match=r"'v3': 3, 'v5': 5.*frames_upbound"):
        collate_packed(samples)


def test_frames_upbound_is_a_train_setting():
    """The collator's advice (set frames_upbound) names a setting llava-fast train has: data.frames_upbound, checked."""
    from llava_fast.train.config import DataSection

    assert DataSection().frames_upbound == 32
    assert DataSection(frames_upbound=8).frames_upbound == 8
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="data.frames_upbound"):
            DataSection(frames_upbound=bad)
