"""LLaVA-1.5 images padded to a square with the mean colour (the original fine-tune's ``--image_aspect_ratio pad``):
converted, trained on, exported and read back by chat, predict and transformers with the same preprocessing."""
from __future__ import annotations

import json

import pytest
import torch

from llava_fast.data.images import checkpoint_image_config
from llava_fast.ops.anyres import ImageProcessorConfig, preprocess_images
from llava_fast.train import Trainer, apply_overrides, get_recipe
from llava_fast.train.original import convert
from tests.train.test_original import original_checkpoint


def _converted(tmp_path, aspect):
    src, tower, *_ = original_checkpoint(tmp_path, aspect=aspect)
    out = tmp_path / "hf"
    convert(str(src), str(tower), str(out), log=lambda *_: None)
    return out


def _image(h=40, w=18, seed=0):
    """A non-square photo-like uint8 CHW image: padding and centre-cropping it give different tiles."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx * 255, yy * 255, (1 - xx * yy) * 255])
    return (base + torch.randn(3, h, w, generator=gen) * 20).clamp(0, 255).to(torch.uint8)


def _grey_err(a, b, std):
    s = torch.tensor(std, dtype=torch.float64)[:, None, None] * 255
    return ((a.double() - b.double()) * s).abs().max().item()


def _pad_flag(folder) -> bool:
    return bool(json.loads((folder / "preprocessor_config.json").read_text()).get("do_pad", False))


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_converted_llava15_preprocesses_as_it_was_trained(tmp_path, aspect):
    """``pad`` is written as LlavaImageProcessor(do_pad=True), ``square`` as the centre crop; transformers' processor
    and ours (read from the folder) give the same pixels, and padding is not cropping."""
    pytest.importorskip("torchvision")
    import llava_fast
    import transformers as tf

    out = _converted(tmp_path, aspect)
    assert _pad_flag(out) is (aspect == "pad")
    spec = checkpoint_image_config(str(out), llava_fast.LlavaConfig.from_pretrained(str(out)))
    assert spec.do_pad is (aspect == "pad") and spec.tile == 28
    x = _image()
    ref = tf.AutoImageProcessor.from_pretrained(out)(x, return_tensors="pt")["pixel_values"]
    ours = preprocess_images([x], spec)["pixel_values"]
    assert ours.shape == ref.shape == (1, 3, 28, 28)
    assert _grey_err(ours, ref, spec.image_std) <= 1.0 + 1e-3
    other = preprocess_images([x], ImageProcessorConfig.for_variant(
        "llava", tile=28, do_pad=aspect != "pad"))["pixel_values"]
    assert _grey_err(other, ref, spec.image_std) > 20  # the two rules give different tiles: the check can fail


def _data(root, n=4):
    """Stage-2 samples (plain template: the tiny word tokenizer has no chat words) with non-square images."""
    from PIL import Image

    (root / "img").mkdir()
    recs = []
    for i in range(n):
        Image.fromarray(_image(40 + 3 * i, 18, seed=i).permute(1, 2, 0).numpy()).save(root / "img" / f"{i}.png")
        recs.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"w{i} w{i + 1} w{i + 2}"}]})
    (root / "d.json").write_text(json.dumps(recs))
    return root / "d.json", root / "img"


def _cfg(model, data, images, out, recipe="llava15-stage2", *over):
    cfg = get_recipe(recipe, "llava")
    cfg.model.path, cfg.data.data, cfg.data.images, cfg.checkpoint.out = str(model), str(data), str(images), str(out)
    apply_overrides(cfg, ["data.template=plain", "data.max_len=256", "data.max_tokens=512", "data.num_workers=0",
                          "train.device=cpu", "train.activation_checkpointing=false", "log.tensorboard=false",
                          "log.progress=false", "schedule.max_steps=2", *over])
    return cfg


def test_llava15_stage2_trains_on_padded_images_and_exports_the_rule(tmp_path):
    """The llava15-stage2 recipe pads (as the original fine-tune); the export records it, and a run from the export
    pads without being told; data.pad_to_square=false crops again; the recipe's stage 1 crops ("square")."""
    pytest.importorskip("torchvision")
    model = _converted(tmp_path, "square")        # a checkpoint whose processor crops
    data, images = _data(tmp_path)
    tr = Trainer(_cfg(model, data, images, tmp_path / "run"), quiet=True)
    final = tr.train()["final"]
    assert tr.dataset.image_config.do_pad is True
    x = tr.dataset[0]["pixel_values"]
    want = preprocess_images([_image(40, 18, seed=0)], tr.dataset.image_config)["pixel_values"]
    torch.testing.assert_close(x.float().reshape(want.shape), want, rtol=0, atol=0)
    assert _pad_flag(tmp_path / "run" / "final") and final == str(tmp_path / "run" / "final")

    def spec(*over, recipe="stage2"):
        t = Trainer(_cfg(tmp_path / "run" / "final", data, images, tmp_path / "x", recipe, *over), quiet=True)
        t.setup()
        return t.dataset.image_config.do_pad

    assert spec("data.pad_to_square=none", recipe="llava15-stage1") is True   # from the checkpoint
    assert spec("data.pad_to_square=false") is False
    assert spec(recipe="llava15-stage1") is False


def test_pad_to_square_is_refused_for_anyres_models(assets, tmp_path):
    cfg = get_recipe("stage2", "llava_next")
    cfg.model.path, cfg.checkpoint.out = str(assets / "model"), str(tmp_path / "o")
    cfg.data.data, cfg.data.images = str(assets / "data" / "stage2.json"), str(assets / "data" / "images")
    apply_overrides(cfg, ["data.pad_to_square=true", "train.device=cpu", "log.tensorboard=false",
                          "log.progress=false", "data.num_workers=0"])
    with pytest.raises(ValueError, match=r"data.pad_to_square=True is for LLaVA-1.5 .* llava_next"):
        Trainer(cfg, quiet=True).setup()


def test_chat_and_predict_preprocess_as_the_checkpoint_says(tmp_path, monkeypatch):
    """A folder whose preprocessor_config.json pads: chat and predict pad too (predict used the model config alone)."""
    from PIL import Image

    from llava_fast.chat import ChatSession
    from llava_fast.ops import anyres
    from llava_fast.predict import predict

    out = _converted(tmp_path, "pad")
    assert ChatSession(str(out), device="cpu").image_config.do_pad is True
    seen = []
    real = anyres.encode_tiles
    monkeypatch.setattr(anyres, "encode_tiles", lambda imgs, spec, **kw: seen.append(spec.do_pad) or
                        real(imgs, spec, **kw))
    Image.fromarray(_image().permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    (tmp_path / "q.json").write_text(json.dumps([{"id": "0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nw1"}]}]))
    counts = predict(str(out), str(tmp_path / "q.json"), str(tmp_path), str(tmp_path / "a.jsonl"), template="plain",
                     max_new_tokens=2, device="cpu", progress=False, log=lambda *_: None)
    assert counts["answered"] == 1 and seen == [True]


def test_a_corrupt_preprocessor_config_is_named(tmp_path):
    import llava_fast

    out = _converted(tmp_path, "pad")
    (out / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: not a readable JSON file"):
        checkpoint_image_config(str(out), llava_fast.LlavaConfig.from_pretrained(str(out)))
