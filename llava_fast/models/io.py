"""Checkpoint IO in the llava-hf folder layout: config.json + safetensors (sharded with an index), never pickle.

Loading accepts the four key layouts found in the wild (reference-spec.md 4.1-4.2): the llava-hf files on the Hub
(``language_model.model.*``, ``vision_tower.vision_model.*``), transformers 4.52-4.x runtime names
(``model.vision_tower.vision_model.*``), transformers 5.x runtime names (``model.vision_tower.*``), and what
``save_pretrained`` of transformers 5.4.0-5.5.4 writes (``model.language_model.model.*``,
``model.vision_tower.vision_model.*``, ``language_model.lm_head.*``; later transformers load it too). Saving writes the
llava-hf file layout of the Hub (``vision_tower.vision_model.*``, which transformers 4.x and 5.x load; transformers 5.24
itself writes ``vision_tower.encoder.*``) into a temporary folder that replaces the target only once
complete, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llava_fast.models.config import DTYPE_NAMES, LlavaConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IGNORED_SUFFIXES = ("position_ids",)  # derivable buffers some old checkpoints hold


def to_runtime_key(key: str) -> str:
    """Any of the four layouts -> ours (transformers 5.x runtime names)."""
    if key.startswith("language_model.lm_head."):
        key = "lm_head." + key[len("language_model.lm_head."):]
    elif key.startswith("language_model.model."):
        key = "model.language_model." + key[len("language_model.model."):]
    elif key.startswith(("vision_tower.", "multi_modal_projector.", "image_newline", "language_model.")):
        key = "model." + key
    if key.startswith("model.vision_tower.vision_model."):
        key = "model.vision_tower." + key[len("model.vision_tower.vision_model."):]
    elif key.startswith("model.language_model.model."):   # transformers 5.4-5.5's save_pretrained
        key = "model.language_model." + key[len("model.language_model.model."):]
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
    """``max_shard_size`` in bytes: an int or a string as transformers takes it ("5GB" = 5e9 bytes, "5GiB" = 5 * 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1), ("", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: len(s) - len(unit)]) * mult)
            except (ValueError, OverflowError):   # not a number, nan, inf
                break
    raise ValueError(f"save_pretrained: max_shard_size must be a number of bytes or a size such as '5GB', '500MB' or "
                     f"'2GiB', got {size!r}")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files to read, chosen as transformers does: model.safetensors when present (transformers 5.x
    leaves a stale model.safetensors.index.json behind when it saves unsharded over a sharded folder), else the index."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.is_file():
        if index.is_file():
            warnings.warn(f"{path} holds both model.safetensors and model.safetensors.index.json: loading "
                          f"model.safetensors, as transformers does (the index is ignored). Remove the stale one to "
                          f"silence this warning.", stacklevel=3)
        return [single]
    if index.is_file():
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); it must be JSON "
                             f"with a 'weight_map' from tensor names to shard files: save or download the checkpoint "
                             f"again") from e
        files = sorted({path / v for v in weight_map.values()})
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"{path} holds only pickle weights (*.bin/*.pt); llava_fast loads safetensors only (pickle "
                         f"can run code). Convert once with transformers: model.save_pretrained(dir) writes safetensors")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_state_dict(path, device="cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint folder, keys converted to our runtime names."""
    out = {}
    for f in _weight_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    if k.endswith(_IGNORED_SUFFIXES):
                        continue
                    rk = to_runtime_key(k)
                    if rk in out:
                        raise ValueError(f"checkpoint {path} holds tensor {rk!r} twice (as {k!r} in {f.name})")
                    out[rk] = sf.get_tensor(k)
        except SafetensorError as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}): it is corrupt or truncated (an "
                             f"interrupted download, copy or save?); download or save the checkpoint again") from e
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
    try:
        config = LlavaConfig.from_pretrained(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({e}); fix or replace it") from e
    if isinstance(dtype, str):   # the names config.json may hold ('bfloat16', 'bf16', 'torch.float16', ...); 'auto' = None
        name = None if dtype == "auto" else DTYPE_NAMES.get(dtype.removeprefix("torch."))
        if name is None and dtype != "auto":
            raise ValueError(f"from_pretrained: dtype must be one of {list(_DTYPES)} (or torch.float32, torch.float16, "
                             f"torch.bfloat16; None or 'auto' keeps the checkpoint's), got {dtype!r}")
        dtype = _DTYPES[name] if name else None
    elif dtype is not None and dtype not in _DTYPES.values():
        # (float64 would load, but save a config.json that no llava_fast load accepts; an integer dtype would fail deep
        # inside load_state_dict)
        raise ValueError(f"from_pretrained: dtype must be torch.float32, torch.float16 or torch.bfloat16 (or their "
                         f"names; None or 'auto' keeps the checkpoint's), got {dtype!r}")
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


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/prefix<random>``, made with the process's umask (tempfile.mkdtemp's are 0700)."""
    while True:
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_pretrained: {str(path)!r} is a file, not a folder; give the path of a checkpoint folder "
                         f"(the file is left alone)")
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return
    if cwd == path or path in cwd.parents:
        raise ValueError(f"save_pretrained: {str(path)!r} is (or holds) the current working directory; the save "
                         f"replaces the folder as a whole, which would leave this process in a deleted directory: "
                         f"os.chdir() out of it first or save elsewhere")


def save_pretrained(model, path, max_shard_size="5GB"):
    """Write config.json and safetensors (sharded above ``max_shard_size``, with an index) atomically."""
    # a symlinked folder is written through, as transformers does (the link is kept, pointing at the new weights);
    # "." and ".." get a name to swap
    path = Path(os.path.realpath(path))
    _check_target(path)
    limit = _parse_size(max_shard_size)
    state = {}
    storages = set()
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
        t = v.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()   # shares memory with a tensor already taken (lm_head untied in the config only, views)
        storages.add(t.untyped_storage().data_ptr())
        state[to_file_key(k)] = t
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
    tmp = _mkdir_unique(path.parent, f".{path.name}.tmp-")
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
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))   # the folder keeps its permissions
            # a fresh name each time: a leftover of an earlier save (its deletion cut short) never blocks this one
            old = _mkdir_unique(path.parent, f".{path.name}.old-")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists():
            if not path.exists():
                os.replace(old, path)   # the old checkpoint back in place
            else:
                try:
                    old.rmdir()   # still the empty placeholder: the old folder was never moved
                except OSError:
                    pass
        if tmp.exists():
            os.chmod(tmp, 0o700)   # writable again (it may have taken a read-only folder's mode)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
