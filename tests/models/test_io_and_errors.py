"""Checkpoint layouts, atomic save, and the errors bad inputs get."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llava_fast
from llava_fast.models.io import to_file_key, to_runtime_key

from tiny import IMAGE_TOKEN, TILE, VOCAB, save_tiny


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
    hf, path = save_tiny(tmp_path_factory.mktemp("next"), "llava_next")
    return hf, path


def _rewrite(src, dst, keymap):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    save_file({keymap(k): v for k, v in sd.items()}, str(dst / "model.safetensors"))


def _saved_by_transformers_5_4(key: str) -> str:
    """What save_pretrained of transformers 5.4.0-5.5.4 writes for a LLaVA / NeXT / OneVision key (read off files it
    saved, session 33; transformers 5.24 loads them): the runtime names with ``model.language_model.model.*``,
    ``model.vision_tower.vision_model.*`` and ``language_model.lm_head.*``."""
    k = to_runtime_key(key)
    if k.startswith("lm_head."):
        return "language_model." + k
    if k.startswith("model.language_model."):
        return "model.language_model.model." + k[len("model.language_model."):]
    if k.startswith("model.vision_tower."):
        return "model.vision_tower.vision_model." + k[len("model.vision_tower."):]
    return k


@pytest.mark.parametrize("layout", ["hub", "runtime_4_52", "runtime_5", "saved_by_5_4"])
def test_four_key_layouts_load_the_same(next_ckpt, tmp_path, layout):
    """Every key layout found in the wild loads to the same weights (a checkpoint saved by transformers 5.4-5.5 was
    refused until session 33: "missing tensors ... unexpected tensors model.language_model.model.*")."""
    _, path = next_ckpt
    ref = llava_fast.from_pretrained(path)
    if layout == "hub":
        keymap = lambda k: k  # noqa: E731  (transformers 5 writes the hub layout)
    elif layout == "runtime_5":
        keymap = to_runtime_key
    elif layout == "saved_by_5_4":
        keymap = _saved_by_transformers_5_4
    else:
        keymap = lambda k: to_runtime_key(k).replace("model.vision_tower.", "model.vision_tower.vision_model.")  # noqa
    _rewrite(path, tmp_path / layout, keymap)
    if layout == "saved_by_5_4":
        assert any(k.startswith("model.language_model.model.") for k in load_file(str(tmp_path / layout /
                                                                                       "model.safetensors")))
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
        "shape": ({**sd, _key(sd, "image_newline"): torch.zeros(7)}, "has shape"),
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


@pytest.fixture(scope="module")
def ov_ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ov"), "llava_onevision")


def _key(sd, suffix):
    """The file's key for a tensor: transformers 5.4-5.5's save_pretrained writes other key layouts than the Hub files
    (``model.image_newline``, ``model.language_model.model.*``; models/io.to_runtime_key reads them all)."""
    (key,) = [k for k in sd if k == suffix or k.endswith("." + suffix)]
    return key


def _copy_ckpt(src, dst, cfg_edit=None, tensors_edit=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "model.safetensors"))
    save_file(tensors_edit(sd) if tensors_edit else sd, str(dst / "model.safetensors"))
    return dst


def test_tied_config_with_own_lm_head_loads_it_untied(ov_ckpt, tmp_path):
    """A tied config (Qwen2-0.5B) whose file also holds lm_head.weight: equal to the embeddings, it stays tied;
    different, it is loaded untied with a warning (as transformers), never dropped in favour of the embeddings."""
    import warnings

    _, path = ov_ckpt
    emb = _key(load_file(str(path / "model.safetensors")), "embed_tokens.weight")
    head = "language_model.lm_head.weight"   # (what every layout calls it)
    same = _copy_ckpt(path, tmp_path / "same", tensors_edit=lambda sd: {**sd, head: sd[emb].clone()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = llava_fast.from_pretrained(same)
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    w = torch.randn(VOCAB, 64)
    own = _copy_ckpt(path, tmp_path / "own", tensors_edit=lambda sd: {**sd, head: w})
    with pytest.warns(UserWarning, match="loaded untied"):
        m = llava_fast.from_pretrained(own)
    assert torch.equal(m.lm_head.weight, w)
    assert not m.config.tie_word_embeddings
    import transformers as tf

    ref = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(own, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=0)
    m.save_pretrained(tmp_path / "resaved")   # saved untied, with a config that says so
    back = llava_fast.from_pretrained(tmp_path / "resaved")
    assert torch.equal(back.lm_head.weight, w) and not back.config.tie_word_embeddings


def test_tie_word_embeddings_from_text_config(ov_ckpt, tmp_path):
    """transformers' LlavaConfig / LlavaOnevisionConfig tie when either the top level or text_config says so."""
    import transformers as tf

    _, path = ov_ckpt
    d = _copy_ckpt(path, tmp_path / "c", cfg_edit=lambda c: c.update(tie_word_embeddings=False))
    assert json.loads((d / "config.json").read_text())["text_config"]["tie_word_embeddings"] is True
    m = llava_fast.from_pretrained(d)
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    ref = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_rope_scaling_beside_rope_parameters_refused(next_ckpt, tmp_path):
    """transformers lets a legacy rope_scaling override rope_parameters: a scaled RoPE there must not be ignored."""
    _, path = next_ckpt

    def edit(c):
        c["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
        c["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    d = _copy_ckpt(path, tmp_path / "c", cfg_edit=edit)
    with pytest.raises(ValueError, match=r"rope_scaling has rope_type 'linear'"):
        llava_fast.from_pretrained(d)


def test_bf16_checkpoint_dtypes(next_ckpt, tmp_path):
    """bf16 file: dtype=None keeps bf16 bit for bit, float32 is exact, float16 refuses values it cannot hold."""
    _, path = next_ckpt

    def to_bf16(sd):
        sd = {k: v.bfloat16() for k, v in sd.items()}
        sd[_key(sd, "image_newline")][0] = 1e6     # beyond float16's 65504
        return sd
    d = _copy_ckpt(path, tmp_path / "bf16", cfg_edit=lambda c: c.update(dtype="bfloat16"), tensors_edit=to_bf16)
    sd = load_file(str(d / "model.safetensors"))
    m = llava_fast.from_pretrained(d)
    newline = sd[_key(sd, "image_newline")]
    assert m.dtype == torch.bfloat16 and torch.equal(m.model.image_newline, newline)
    m = llava_fast.from_pretrained(d, dtype=torch.float32)
    assert torch.equal(m.model.image_newline, newline.float())
    with pytest.raises(ValueError, match=r"'model.image_newline'.*float16 range"):
        llava_fast.from_pretrained(d, dtype=torch.float16)


def test_save_refuses_meta_and_dropped_lm_head(next_ckpt, ov_ckpt, tmp_path):
    _, path = next_ckpt
    m = llava_fast.from_pretrained(path)
    with torch.device("meta"):
        empty = type(m)(m.config)
    with pytest.raises(ValueError, match="meta device"):
        empty.save_pretrained(tmp_path / "meta")
    assert not list(tmp_path.iterdir())
    _, path = ov_ckpt
    m = llava_fast.from_pretrained(path)
    m.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 64))   # untied by hand, config still tied
    with pytest.raises(ValueError, match="would be lost"):
        m.save_pretrained(tmp_path / "untied")
    m.config.tie_word_embeddings = False
    m.save_pretrained(tmp_path / "untied")
    cfg = json.loads((tmp_path / "untied" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    back = llava_fast.from_pretrained(tmp_path / "untied")
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)


def test_resave_keeps_other_files_and_restores_on_failure(next_ckpt, tmp_path, monkeypatch):
    """Saving over a folder keeps its sub-folders and other files (drops only its old weights); a failure of the final
    swap puts the old folder back."""
    _, path = next_ckpt
    m = llava_fast.from_pretrained(path)
    out = tmp_path / "ckpt"
    m.save_pretrained(out, max_shard_size="20KB")
    (out / "tokenizer.json").write_text("{}")
    (out / "model_card.md").write_text("card")
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "state.pt").write_text("x")
    m.save_pretrained(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-10", "config.json", "model.safetensors", "model_card.md", "tokenizer.json"], names
    assert (out / "checkpoint-10" / "state.pt").read_text() == "x"
    before = {p.name for p in out.iterdir()}
    import llava_fast.models.io as io

    real = io.os.replace

    def fail_swap(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real(src, dst)
    monkeypatch.setattr(io.os, "replace", fail_swap)
    with pytest.raises(OSError, match="rename failed"):
        m.save_pretrained(out)
    monkeypatch.undo()
    assert {p.name for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_saved_config_dtype_keys_agree(next_ckpt, tmp_path):
    """An older config.json with torch_dtype only: after a save in another dtype both keys name the saved dtype (a
    transformers 4.x reader takes torch_dtype)."""
    _, path = next_ckpt
    d = _copy_ckpt(path, tmp_path / "c", cfg_edit=lambda c: (c.pop("dtype", None), c.update(torch_dtype="bfloat16")))
    m = llava_fast.from_pretrained(d, dtype=torch.float32)
    m.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"


def test_exported_onevision_processor_expands_images(tmp_path):
    """The training export's processor files for OneVision (which needs a video processor too): AutoProcessor turns
    a prompt and a picture into inputs on which transformers' model and ours give the same logits."""
    import transformers as tf
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llava_fast.models.io import save_pretrained
    from llava_fast.train.trainer import _save_image_processor
    from tiny import VIDEO_TOKEN

    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path).eval()
    vocab = {f"w{i}": i for i in range(IMAGE_TOKEN)}
    vocab.update({"<image>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN, "<unk>": VIDEO_TOKEN + 1, "<pad>": VIDEO_TOKEN + 2})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                     extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    out = tmp_path / "export"
    save_pretrained(m, str(out))
    tok.save_pretrained(str(out))
    _save_image_processor(m.config, str(out), tok)
    proc = tf.AutoProcessor.from_pretrained(str(out), local_files_only=True)
    inputs = proc(text="w1 <image> w2", images=Image.new("RGB", (70, 45), (10, 200, 30)), return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) > 1
    hf = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = m(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"]).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_exported_image_processor_without_torchvision(tmp_path, monkeypatch, model_type):
    """torchvision is optional: without it the export takes transformers' ``<name>Pil`` image processor directly
    (transformers' own fallback printed a warning in the demo) and writes the same preprocessor_config.json."""
    import importlib.util
    import logging

    import transformers as tf

    from llava_fast.train import trainer as T

    _, path = save_tiny(tmp_path, model_type)
    cfg = llava_fast.from_pretrained(path).config
    T._save_image_processor(cfg, str(tmp_path / "with"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "torchvision" else real_find_spec(name, *a, **k))
    names = {"llava": "CLIPImageProcessor", "llava_next": "LlavaNextImageProcessor",
             "llava_onevision": "LlavaOnevisionImageProcessor"}
    # transformers before the ``<name>Pil`` classes (5.0: ``<name>`` is the PIL one, ``<name>Fast`` torchvision's)
    want = getattr(tf, names[model_type] + "Pil", None) or getattr(tf, names[model_type])
    assert T._image_processor_class(names[model_type]) is want
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        T._save_image_processor(cfg, str(tmp_path / "without"))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "torchvision" in r.getMessage()]
    a = json.loads((tmp_path / "with" / "preprocessor_config.json").read_text())
    b = json.loads((tmp_path / "without" / "preprocessor_config.json").read_text())
    assert a == b and a["image_processor_type"] == names[model_type]
