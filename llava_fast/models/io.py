"""Checkpoint IO in the llava-hf folder layout: config.json + safetensors (sharded with an index), never pickle.

Loading accepts the three key layouts found in the wild (reference-spec.md 4.1-4.2): the llava-hf files on the Hub
(``language_model.model.*``, ``vision_tower.vision_model.*``), transformers 4.52-4.x runtime names
(``model.vision_tower.vision_model.*``) and transformers 5.x runtime names (``model.vision_tower.*``). Saving writes the
llava-hf file layout (what transformers 5.x itself writes) into a temporary folder that replaces the target only once
complete, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llava_fast.models.config import LlavaConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IGNORED_SUFFIXES = ("position_ids",)  # derivable buffers some old checkpoints hold


def to_runtime_key(key: str) -> str:
    """Any of the three layouts -> ours (transformers 5.x runtime names)."""
    if key.startswith("language_model.lm_head."):
        key = "lm_head." + key[len("language_model.lm_head."):]
    elif key.startswith("language_model.model."):
        key = "model.language_model." + key[len("language_model.model."):]
    elif key.startswith(("vision_tower.", "multi_modal_projector.", "image_newline", "language_model.")):
        key = "model." + key
    if key.startswith("model.vision_tower.vision_model."):
        key = "model.vision_tower." + key[len("model.vision_tower.vision_model."):]
    return key


def to_file_key(key: str) -> str:
    """Ours -> the llava-hf file layout."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + key[len("model.vision_tower."):]
    if key.startswith("model."):
        return key[len("model."):]
    return key


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({path / v for v in weight_map.values()})
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"{path} holds only pickle weights (*.bin/*.pt); llava_fast loads safetensors only (pickle "
                         f"can run code). Convert once with transformers: model.save_pretrained(dir) writes safetensors")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_state_dict(path, device="cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint folder, keys converted to our runtime names."""
    out = {}
    for f in _weight_files(Path(path)):
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for k in sf.keys():
                if k.endswith(_IGNORED_SUFFIXES):
                    continue
                rk = to_runtime_key(k)
                if rk in out:
                    raise ValueError(f"checkpoint {path} holds tensor {rk!r} twice (as {k!r} in {f.name})")
                out[rk] = sf.get_tensor(k)
    return out


def _materialize_buffers(model, device):
    from llava_fast.models.layers import RotaryEmbedding

    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            head_dim = m.inv_freq.shape[0] * 2
            theta = model.config.text_config.rope_theta
            fresh = RotaryEmbedding(head_dim, theta)
            m.inv_freq = fresh.inv_freq.to(device)


def _untie_config(config) -> None:
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    config.hf_dict["tie_word_embeddings"] = False
    if isinstance(config.hf_dict.get("text_config"), dict):
        config.hf_dict["text_config"]["tie_word_embeddings"] = False


def from_pretrained(path, dtype=None, device=None):
    """Load a llava-hf checkpoint folder; the class is picked by config.json's model_type.

    dtype: torch dtype or name; None keeps the checkpoint's ``dtype`` (float32 when it names none).
    device: where the weights go (default cpu). No network access, ever.
    """
    from llava_fast.models.llava import CLASSES

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a folder; from_pretrained takes a local llava-hf checkpoint "
                                f"folder (config.json + safetensors) and never downloads")
    config = LlavaConfig.from_pretrained(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is None:
        dtype = _DTYPES[config.dtype] if config.dtype else torch.float32  # config.json's, checked when parsed
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = CLASSES[config.model_type](config)
    state = load_state_dict(path)
    expected = model.state_dict()
    tied = config.tie_word_embeddings
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = ("; the file has no lm_head: if the model shares it with embed_tokens, set tie_word_embeddings to "
                "true in config.json" if missing == ["lm_head.weight"] else "")
        raise ValueError(f"checkpoint {path} does not match its config ({config.model_type}): missing tensors "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; unexpected tensors "
                         f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}{hint}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"tensor {k!r} in {path} has shape {tuple(v.shape)} but the config needs "
                             f"{tuple(expected[k].shape)}")
    embed = "model.language_model.embed_tokens.weight"
    if tied and "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state[embed]):
        # as transformers: a file holding its own lm_head is not tied to the embeddings (never dropped)
        warnings.warn(f"{path}: config.json ties the word embeddings but the checkpoint holds an lm_head.weight "
                      f"that differs from embed_tokens; it is loaded untied (as transformers does). Set "
                      f"tie_word_embeddings to false in config.json to silence this warning.", stacklevel=2)
        tied = False
        _untie_config(config)
    for k, v in state.items():
        w = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        if w.dtype == torch.float16 and v.dtype != torch.float16 and not bool(w.isfinite().all()) \
                and bool((v.isfinite() & ~w.isfinite().to(v.device)).any()):
            raise ValueError(f"tensor {k!r} of {path} ({v.dtype}) holds values outside the float16 range "
                             f"(|x| > 65504) that would become inf; load it with dtype=torch.bfloat16 or float32")
        state[k] = w
    if tied:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not tied, assign=True)
    model.tie_weights()
    _materialize_buffers(model, device)
    model.config.dtype = str(dtype).replace("torch.", "")
    return model.eval()


_WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")  # what save_pretrained writes


def _link_or_copy(src, dst):
    """Hard link (the old folder is deleted right after: no second copy of large files), else copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def save_pretrained(model, path, max_shard_size="5GB"):
    """Write config.json and safetensors (sharded above ``max_shard_size``, with an index) atomically."""
    path = Path(path)
    limit = _parse_size(max_shard_size)
    state = {}
    sd = model.state_dict()
    for k, v in sd.items():
        if model.config.tie_word_embeddings and k == "lm_head.weight":
            e = sd.get("model.language_model.embed_tokens.weight")
            if e is None or v.data_ptr() == e.data_ptr() or (not v.is_meta and torch.equal(v, e.to(v.device))):
                continue   # saved once, as embed_tokens (as transformers)
            raise ValueError("save_pretrained: the config ties lm_head to embed_tokens (tie_word_embeddings) but the "
                             "model's lm_head.weight differs from them and would be lost; call model.tie_weights(), "
                             "or set model.config.tie_word_embeddings = False to save it untied")
        if v.is_meta:
            raise ValueError(f"save_pretrained: {k} is on the meta device (no data); load or materialize the weights "
                             f"(llava_fast.from_pretrained, model.to_empty(device=...) + init) before saving")
        state[to_file_key(k)] = v.detach().to("cpu").contiguous()
    shards, cur, cur_size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and cur_size + nbytes > limit:
            shards.append(cur)
            cur, cur_size = {}, 0
        cur[k] = state[k]
        cur_size += nbytes
    shards.append(cur)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        cfg = model.config.to_hf_dict()
        tc = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        if not model.config.tie_word_embeddings and (cfg.get("tie_word_embeddings") or tc.get("tie_word_embeddings")):
            cfg["tie_word_embeddings"] = False    # lm_head is saved: the written config must not tie it
            tc["tie_word_embeddings"] = False
        cfg["dtype"] = str(model.dtype).replace("torch.", "")
        if "torch_dtype" in cfg:  # the legacy key of an older config.json: kept, but never stale
            cfg["torch_dtype"] = cfg["dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        # keep everything else of an existing folder (tokenizer, processor config, sub-folders) but its old weights
        if path.is_dir():
            for f in path.iterdir():
                if (tmp / f.name).exists() or _WEIGHT_FILE.fullmatch(f.name):
                    continue
                if f.is_dir() and not f.is_symlink():
                    shutil.copytree(f, tmp / f.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(f, tmp / f.name)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)   # the old checkpoint back in place
        shutil.rmtree(tmp, ignore_errors=True)
        raise
