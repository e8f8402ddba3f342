"""config.json's dtype / torch_dtype: the names transformers (and training scripts) write load in that dtype; "auto" or
no field loads float32; an unknown name is an error, never a silent float32 load."""
import json
import shutil

import pytest
import torch

import llava_fast
from llava_fast.models.config import LlavaConfig
from tiny import save_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("dtype"), "llava")[1]


def _with_config(src, dst, edit):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("name,expected", [
    ("float32", torch.float32), ("float", torch.float32), ("fp32", torch.float32),
    ("float16", torch.float16), ("half", torch.float16), ("fp16", torch.float16), ("torch.float16", torch.float16),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16)])
def test_known_dtype_names_load_in_that_dtype(ckpt, tmp_path, key, name, expected):
    d = _with_config(ckpt, tmp_path / "c", lambda c: c.update({key: name}))
    m = llava_fast.from_pretrained(d)
    assert m.dtype == expected and m.config.dtype == str(expected).removeprefix("torch.")


@pytest.mark.parametrize("edit", [lambda c: None, lambda c: c.update(dtype="auto"),
                                  lambda c: c.update(torch_dtype="auto"), lambda c: c.update(dtype=None)],
                         ids=["missing", "auto", "torch_dtype_auto", "null"])
def test_auto_or_missing_dtype_loads_float32(ckpt, tmp_path, edit):
    assert llava_fast.from_pretrained(_with_config(ckpt, tmp_path / "c", edit)).dtype == torch.float32


def test_null_dtype_falls_back_to_torch_dtype(ckpt, tmp_path):
    """As transformers: ``dtype`` wins over the legacy ``torch_dtype`` unless it is null."""
    d = _with_config(ckpt, tmp_path / "c", lambda c: c.update(dtype=None, torch_dtype="bfloat16"))
    assert llava_fast.from_pretrained(d).dtype == torch.bfloat16


@pytest.mark.parametrize("key,value", [("dtype", "bfloat"), ("torch_dtype", "float8"), ("dtype", "int8"),
                                       ("torch_dtype", "torch.fp64"), ("dtype", 16)])
def test_unknown_dtype_is_an_error(ckpt, tmp_path, key, value):
    d = _with_config(ckpt, tmp_path / "c", lambda c: c.update({key: value}))
    with pytest.raises(ValueError, match=rf"config.json's '{key}' is {value!r}.*'bfloat16'.*'fp16'"):
        llava_fast.from_pretrained(d)
    with pytest.raises(ValueError, match=rf"config.json's '{key}'"):  # also with a dtype asked for explicitly
        llava_fast.from_pretrained(d, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"config.json's '{key}'"):
        LlavaConfig.from_hf_dict(json.loads((d / "config.json").read_text()))
