"""Checkpoint layouts, atomic save, and the errors bad inputs get."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llava_fast
from llava_fast.models.io import to_file_key, to_runtime_key

from tiny import IMAGE_TOKEN, TILE, save_tiny


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
    hf, path = save_tiny(tmp_path_factory.mktemp("next"), "llava_next")
    return hf, path


def _rewrite(src, dst, keymap):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    save_file({keymap(k): v for k, v in sd.items()}, str(dst / "model.safetensors"))


@pytest.mark.parametrize("layout", ["hub", "runtime_4_52", "runtime_5"])
def test_three_key_layouts_load_the_same(next_ckpt, tmp_path, layout):
    _, path = next_ckpt
    ref = llava_fast.from_pretrained(path)
    if layout == "hub":
        keymap = lambda k: k  # noqa: E731  (transformers 5 writes the hub layout)
    elif layout == "runtime_5":
        keymap = to_runtime_key
    else:
        keymap = lambda k: to_runtime_key(k).replace("model.vision_tower.", "model.vision_tower.vision_model.")  # noqa
    _rewrite(path, tmp_path / layout, keymap)
    m = llava_fast.from_pretrained(tmp_path / layout)
    for (k, a), (_, b) in zip(ref.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), k


def test_key_maps_are_inverse():
    for k in ["lm_head.weight", "model.language_model.layers.0.mlp.up_proj.weight", "model.image_newline",
              "model.vision_tower.encoder.layers.1.self_attn.q_proj.bias", "model.multi_modal_projector.linear_1.bias"]:
        assert to_runtime_key(to_file_key(k)) == k


def test_missing_unexpected_misshaped(next_ckpt, tmp_path):
    _, path = next_ckpt
    sd = load_file(str(path / "model.safetensors"))
    cfg = (path / "config.json").read_text()
    cases = {
        "missing": ({k: v for k, v in sd.items() if "linear_2.weight" not in k}, "missing tensors"),
        "unexpected": ({**sd, "language_model.model.extra.weight": torch.zeros(2)}, "unexpected tensors"),
        "shape": ({**sd, "image_newline": torch.zeros(7)}, "has shape"),
    }
    for name, (tensors, msg) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        save_file(tensors, str(d / "model.safetensors"))
        with pytest.raises(ValueError, match=msg):
            llava_fast.from_pretrained(d)


def test_pickle_refused_and_no_download(tmp_path, next_ckpt):
    _, path = next_ckpt
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        llava_fast.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        llava_fast.from_pretrained("llava-hf/llava-1.5-7b-hf")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip2"}))
    with pytest.raises(ValueError, match="not supported"):
        llava_fast.from_pretrained(tmp_path)


def test_dropout_in_config_is_reported(next_ckpt):
    """The models implement no dropout: a config that asks for some is told so (naming the field), not ignored."""
    import warnings

    from llava_fast.models.config import LlavaConfig

    _, path = next_ckpt
    d = json.loads((path / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiny checkpoint's zero rates: no warning
        LlavaConfig.from_hf_dict(d)
    d["text_config"]["attention_dropout"] = 0.1
    d["vision_config"]["dropout"] = 0.05
    with pytest.warns(UserWarning, match=r"text_config.attention_dropout=0.1.*does not implement") as rec:
        LlavaConfig.from_hf_dict(d)
    assert "vision_config.dropout=0.05" in str(rec[0].message)


def test_save_is_atomic(next_ckpt, tmp_path, monkeypatch):
    _, path = next_ckpt
    m = llava_fast.from_pretrained(path)
    out = tmp_path / "ckpt"
    m.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import llava_fast.models.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError):
        m.save_pretrained(out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert before == after
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp")]


def test_bad_inputs(next_ckpt):
    _, path = next_ckpt
    m = llava_fast.from_pretrained(path)
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN] * 5 + [3]])
    pv = torch.randn(3, 3, TILE, TILE)
    sizes = torch.tensor([[28, 56]])   # 3 tiles, 2*2 base + 2*(4+1) = 14 tokens, not 5
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        m(input_ids=ids, pixel_values=pv, image_sizes=sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        m(input_ids=ids, pixel_values=pv)
    with pytest.raises(ValueError, match="floating point"):
        m(input_ids=ids, pixel_values=pv.to(torch.uint8), image_sizes=sizes)
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        m(input_ids=ids, pixel_values=torch.randn(3, 3, 30, 30), image_sizes=sizes)
    with pytest.raises(ValueError, match="tiles"):
        m(input_ids=ids, pixel_values=torch.randn(2, 3, TILE, TILE), image_sizes=sizes)
    with pytest.raises(ValueError, match="no pixel_values"):
        m(input_ids=ids)
    with pytest.raises(ValueError, match="integer tensor"):
        m(input_ids=ids.float())
    with pytest.raises(ValueError, match="outside"):
        m(input_ids=torch.tensor([[10_000]]))
    with pytest.raises(ValueError, match="context length"):
        m(input_ids=torch.zeros(1, 5000, dtype=torch.long))
    with pytest.raises(ValueError, match="int32"):
        m(input_ids=torch.tensor([[1, 2]]), cu_seqlens=torch.tensor([0, 2]), position_ids=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="batch_num_images is a llava_onevision"):
        m(input_ids=ids, pixel_values=pv, image_sizes=sizes, batch_num_images=torch.tensor([1]))
