"""Starting points for training: a llava-hf checkpoint folder, or a new LLaVA assembled from a language model folder
(Llama / Qwen2 in HF format) and a vision tower (an HF CLIP/SigLIP folder, or an open_clip architecture name with a
local weights file, see :mod:`llava_fast.train.open_clip_tower`). Local files only; nothing is downloaded.

Assembling adds ``<image>`` (and ``<video>`` for OneVision) to the tokenizer, grows the embeddings to a multiple of
64 rows (the language model's rows plus the tokens added, rounded up, as the llava-hf conversion's
``resize_token_embeddings(vocab_size + 2, pad_to_multiple_of=64)``: never fewer rows than the model had; new rows drawn
from N(mean, 1e-5 * cov) of the old ones), initialises the projector with ``nn.Linear`` defaults and
``image_newline`` with randn / sqrt(D). The image features are taken as the original towers take them, whatever the
model type: a CLIP tower's penultimate layer without its CLS token (``vision_feature_layer=-2``, ``"default"``); a
SigLIP tower's penultimate layer, every token (the original deletes the last layer and keeps all 729 tokens; llava-hf
writes that as ``-1`` on the 26-layer tower it converted, here it is ``-2`` on the tower given, ``"full"``).

``model.projector`` (:func:`load_projector`) starts the projector from trained weights instead: the original LLaVA /
LLaVA-NeXT stage-1 output ``mm_projector.bin`` (what their ``--pretrain_mm_mlp_adapter`` takes), so stage 2 can start
from a released stage-1 projector.
"""
from __future__ import annotations

import json
import os

import torch

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def default_pinpoints(model_type: str, tile: int) -> list | None:
    """The AnyRes resolutions a new model of ``model_type`` gets for a ``tile``-pixel tower: LLaVA-NeXT's five (scaled
    from 336), OneVision's 1x1 to 6x6 tiles; None for LLaVA-1.5."""
    if model_type == "llava_next":
        return [[p[0] * tile // 336, p[1] * tile // 336] for p in NEXT_PINPOINTS]
    if model_type == "llava_onevision":
        return [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]
    return None


def build_model(ms, log=print, weights: bool = True):
    """(model, tokenizer) for a :class:`~llava_fast.train.config.ModelSection`. ``weights=False``: the model on the
    meta device, no weights read (its config and tokenizer only: ``llava-fast export`` fills it from a checkpoint)."""
    from llava_fast.data import load_tokenizer

    for key in ("image_grid_pinpoints", "vision_feature_layer", "vision_feature_select_strategy"):
        if ms.path and getattr(ms, key) is not None:
            raise ValueError(f"model.{key}={getattr(ms, key)!r} is for assembling a new model; the checkpoint "
                             f"{ms.path} has its own (its config.json's {key})")
    if ms.path and not weights:
        from llava_fast.models import LlavaConfig
        from llava_fast.models.llava import CLASSES

        config = LlavaConfig.from_pretrained(ms.path)
        with torch.device("meta"):
            return CLASSES[config.model_type](config), load_tokenizer(ms.path)
    if ms.path:
        import llava_fast

        model = llava_fast.from_pretrained(ms.path, dtype=torch.float32)
        log(f"loaded {model.config.model_type} model from {ms.path}")
        tok = load_tokenizer(ms.path)
    elif ms.language_model and ms.vision_tower:
        model, tok = assemble(ms.language_model, ms.vision_tower, ms.model_type, vision_weights=ms.vision_weights,
                              pinpoints=ms.image_grid_pinpoints, log=log, feature_layer=ms.vision_feature_layer,
                              feature_strategy=ms.vision_feature_select_strategy, meta=not weights)
        if not weights:
            return model, tok
    else:
        raise ValueError("model: give --model (a llava-hf folder) or model.language_model=DIR and "
                         "model.vision_tower=DIR (or an open_clip name with model.vision_weights=FILE)")
    if ms.projector:
        load_projector(model, ms.projector, log=log)
    return model, tok


def load_projector(model, path: str, log=print) -> None:
    """Loads trained projector weights into ``model`` (in place).

    ``path``: the original LLaVA / LLaVA-NeXT stage-1 output ``mm_projector.bin`` (keys ``model.mm_projector.0.*`` and
    ``.2.*``: the ``nn.Sequential(Linear, GELU, Linear)`` of ``mlp2x_gelu``; read with
    ``torch.load(weights_only=True)``, which runs no pickled code), a ``.safetensors`` file with those keys or
    llava-hf's (``multi_modal_projector.linear_{1,2}.*``, any prefix), or a folder of weights (a llava-hf checkpoint,
    an original LLaVA one).
    ``image_newline`` is taken too when the file has it. Every projector tensor of the model must be in the file with
    its shape: anything else is an error naming the tensor (a projector trained for another language model or tower).
    """
    got = _put_projector(model, _read_weights(path), f"model.projector {path}")
    log(f"projector from {path}: {len(got)} tensors ({', '.join(sorted(k.split('.', 1)[1] for k in got))})")


def _put_projector(model, state: dict, where: str) -> list[str]:
    """Copies the projector tensors of ``state`` (original ``mm_projector.{0,2}.*`` or llava-hf
    ``multi_modal_projector.*`` keys, any prefix) and its ``image_newline`` into ``model``; returns the keys filled.
    ValueError naming ``where`` unless every projector tensor of the model is there with its shape."""
    own = model.state_dict()
    proj = {k: v for k, v in own.items() if ".multi_modal_projector." in f".{k}"}
    got, unknown = {}, []
    for k, v in state.items():
        if "mm_projector." in k:
            tail = k.split("mm_projector.", 1)[1]
            idx, _, param = tail.partition(".")
            name = {"0": "linear_1", "2": "linear_2"}.get(idx)
            if name is None:
                unknown.append(k)
                continue
            tail = f"{name}.{param}"
        elif "multi_modal_projector." in k:
            tail = k.split("multi_modal_projector.", 1)[1]
        elif k.split(".")[-1] == "image_newline" and "model.image_newline" in own:
            got["model.image_newline"] = (k, v)
            continue
        else:
            continue
        got["model.multi_modal_projector." + tail] = (k, v)
    if unknown:
        raise ValueError(f"{where}: {unknown[:4]} are not an mlp2x_gelu projector (Linear, GELU, "
                         f"Linear: keys mm_projector.0.* and mm_projector.2.*); other projector types are not "
                         f"supported")
    missing = sorted(set(proj) - set(got))
    extra = sorted(k for k in got if k not in own)
    bad = [f"{src} {tuple(v.shape)} vs the model's {k} {tuple(own[k].shape)}" for k, (src, v) in got.items()
           if k in own and own[k].shape != v.shape]
    if missing or extra or bad:
        raise ValueError(f"{where} does not fit this model: missing {missing}; not in the model "
                         f"{extra}; shape mismatches {bad[:4]} (a projector trained for another language model or "
                         f"vision tower?)")
    with torch.no_grad():
        for k, (_, v) in got.items():
            own[k].copy_(v)
    return sorted(got)


def _read_weights(path: str) -> dict:
    """Tensors of a weights file (.bin/.pt through ``torch.load(weights_only=True)``, .safetensors) or folder."""
    if os.path.isdir(path):
        return _load_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.projector {path}: no such file or folder")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return _torch_load(path)


def _torch_load(path: str) -> dict:
    """A ``.bin`` tensor dict, read with ``weights_only=True``: a pickle holding code is refused, not run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for code in the pickle, others for a broken file
        raise ValueError(f"{path}: cannot read it as a tensor dict with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the file the original "
                         f"training code saved (tensors only) or a .safetensors file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _read_json(p):
    with open(p) as f:
        return json.load(f)


def _resize_embeddings(w: torch.Tensor, n: int) -> torch.Tensor:
    old, d = w.shape
    if n <= old:
        return w[:n].clone()
    w32 = w.float()
    mu = w32.mean(0)
    cov = (w32 - mu).T @ (w32 - mu) / max(1, old)
    try:
        dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=1e-5 * cov + 1e-12 * torch.eye(d))
        new = dist.sample((n - old,))
    except (ValueError, RuntimeError):  # singular covariance (tiny/random models): fall back to the mean
        new = mu.expand(n - old, d).clone()
    return torch.cat([w32, new]).to(w.dtype)


def assemble(language_model: str, vision_tower: str, model_type: str = "llava_next", vision_weights: str | None = None,
             pinpoints=None, log=print, weights: dict | None = None, tokenizer_dir: str | None = None,
             feature_layer: int | None = None, feature_strategy: str | None = None, meta: bool = False):
    """A new LLaVA (projector randomly initialised) from separate language-model and vision-tower weights.

    ``language_model`` may also be an original LLaVA checkpoint folder (:mod:`llava_fast.train.original`): its
    projector, ``image_newline`` and trained tower layers are kept, and its ``mm_*`` settings (feature layer,
    pinpoints, SigLIP's dropped last layer) apply; ``vision_tower`` then gives the tower's config and the weights the
    checkpoint lacks. ``weights`` / ``tokenizer_dir``: the language model's tensors and tokenizer when they are not
    in ``language_model`` (an original LoRA checkpoint merged into its base model). ``feature_layer`` /
    ``feature_strategy``: the tower layer and tokens the projector reads (``model.vision_feature_layer`` /
    ``model.vision_feature_select_strategy``), over the defaults and an original checkpoint's own. ``meta``: the model
    on the meta device and the tokenizer, no weights read (a tower folder's are not)."""
    from transformers import AutoTokenizer

    from llava_fast.models import LlavaConfig
    from llava_fast.models.io import load_state_dict  # noqa: F401 - same key conventions
    from llava_fast.models.llava import CLASSES
    from llava_fast.train import original

    tcfg = _read_json(os.path.join(language_model, "config.json"))
    orig = original.settings(tcfg, os.path.join(language_model, "config.json")) if original.is_original(tcfg) \
        else None
    if orig is not None:
        tcfg = orig.text_config
        if orig.model_type != model_type:
            log(f"note: {language_model} is an original {orig.model_type} checkpoint; assembling a {model_type}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or language_model, local_files_only=True)
    n_before = len(tok)
    new_tokens = ["<image>"] + (["<video>"] if model_type == "llava_onevision" else [])
    tok.add_tokens(new_tokens, special_tokens=True)
    if tok.pad_token is None:
        tok.add_tokens(["<pad>"], special_tokens=True)
        tok.pad_token = "<pad>"
    image_id = tok.convert_tokens_to_ids("<image>")
    video_id = tok.convert_tokens_to_ids("<video>") if model_type == "llava_onevision" else None
    # the model's rows + the tokens added, to a multiple of 64 (a tokenizer shorter than the embeddings, as Qwen2's,
    # keeps every row: Qwen2-0.5B 151936 + 2 -> 152000 rows, as llava-hf's OneVision)
    rows = int(tcfg.get("vocab_size") or n_before)
    vocab = ((max(len(tok), rows + len(tok) - n_before) + 63) // 64) * 64
    # vision tower
    if os.path.isdir(vision_tower):
        vcfg = _read_json(os.path.join(vision_tower, "config.json"))
        vcfg = vcfg.get("vision_config", vcfg) if vcfg.get("model_type") in ("clip", "siglip") else vcfg
        vstate = {} if meta else _load_folder(vision_tower)
        vstate = {_vision_key(k): v for k, v in vstate.items() if _vision_key(k) is not None}
    else:
        from llava_fast.train.open_clip_tower import open_clip_to_hf

        if not vision_weights:
            raise ValueError(f"vision_tower {vision_tower!r} is not a folder: as an open_clip architecture name it "
                             "needs model.vision_weights=FILE (local weights)")
        vcfg, vstate = open_clip_to_hf(vision_tower, vision_weights)
    vcfg = dict(vcfg)
    vcfg.setdefault("model_type", "siglip_vision_model" if "siglip" in str(vcfg.get("model_type", "")) else
                    "clip_vision_model")
    if vcfg["model_type"] in ("clip", "siglip"):
        vcfg["model_type"] += "_vision_model"
    siglip = vcfg["model_type"] == "siglip_vision_model"
    tcfg = dict(tcfg, vocab_size=vocab)
    tile = int(vcfg.get("image_size", 336))
    if isinstance(pinpoints, str):  # model.image_grid_pinpoints
        from llava_fast.train.config import parse_pinpoints

        if model_type == "llava":
            raise ValueError(f"model.image_grid_pinpoints={pinpoints!r}: LLaVA-1.5 (model type llava) has one tile per "
                             f"image; pinpoints are for llava_next / llava_onevision")
        pinpoints = parse_pinpoints(pinpoints, tile)
    if pinpoints is None and orig is not None and orig.pinpoints is not None:
        pinpoints = original.pinpoints_for(orig.pinpoints, tile)
    if pinpoints is None:
        pinpoints = default_pinpoints(model_type, tile)
    # the features by the tower's family, not the model type (see the module docstring): SigLIP has no CLS token to
    # drop ("default" would drop a patch), CLIP's CLS is dropped under OneVision too (mm_vision_select_feature "patch")
    hf = {"model_type": model_type, "vision_config": vcfg, "text_config": tcfg, "image_token_id": image_id,
          "tie_word_embeddings": bool(tcfg.get("tie_word_embeddings", False)),
          "vision_feature_layer": -2, "vision_feature_select_strategy": "full" if siglip else "default"}
    if pinpoints is not None:
        hf["image_grid_pinpoints"] = pinpoints
    if video_id is not None:
        hf["video_token_id"] = video_id
    if model_type == "llava_onevision":
        hf["vision_aspect_ratio"] = "anyres_max_9"
    if orig is not None:
        hf.update(orig.features(siglip))
        if siglip:  # the original deletes SigLIP's last layer and takes hidden_states[-1]
            vcfg["num_hidden_layers"] = int(vcfg.get("num_hidden_layers", 27)) - 1
    if feature_strategy == "default" and siglip:
        raise ValueError("model.vision_feature_select_strategy=default drops the first token as a CLS token; a SigLIP "
                         "tower has none (it would drop an image patch): use full")
    n_layers = int(vcfg.get("num_hidden_layers", 0))
    if feature_layer is not None and not -n_layers - 1 <= feature_layer <= n_layers:
        raise ValueError(f"model.vision_feature_layer={feature_layer} is out of range for the tower's {n_layers} "
                         f"layers (-{n_layers + 1}..{n_layers}; -2 is the penultimate layer)")
    hf.update({k: v for k, v in (("vision_feature_layer", feature_layer),
                                 ("vision_feature_select_strategy", feature_strategy)) if v is not None})
    cfg = LlavaConfig.from_hf_dict(hf)
    if meta:
        with torch.device("meta"):
            return CLASSES[model_type](cfg), tok
    model = CLASSES[model_type](cfg)
    # the stage-1 projector starts from nn.Linear's defaults (kaiming-uniform weights, uniform biases), as the
    # original's build_vision_projector; the model's own init (N(0, 0.02), zero biases) is transformers' for loading
    for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        lin.reset_parameters()
    # language model weights (every tensor of the language model and tower must come from the folders: nothing is
    # silently left at its random initialisation, and a shape mismatch is an error that names the tensor)
    lstate = _load_folder(language_model) if weights is None else weights
    own = model.state_dict()
    filled, mismatched = set(), []

    def put(nk, v, src):
        if nk not in own:
            return
        if own[nk].shape != v.shape:
            mismatched.append(f"{src} {tuple(v.shape)} -> {nk} {tuple(own[nk].shape)}")
            return
        own[nk].copy_(v)
        filled.add(nk)

    for k, v in lstate.items():
        if k.startswith("model."):
            nk = "model.language_model." + k[len("model."):]
        elif k == "lm_head.weight":
            nk = k
        else:
            continue
        if k.endswith("embed_tokens.weight") or k == "lm_head.weight":
            v = _resize_embeddings(v, vocab)
        put(nk, v, k)
    if "lm_head.weight" not in lstate:
        if not cfg.tie_word_embeddings:   # an untied model folder without lm_head: start it from the embeddings
            own["lm_head.weight"].copy_(own["model.language_model.embed_tokens.weight"])
        filled.add("lm_head.weight")
    model.tie_weights()
    for k, v in vstate.items():
        put("model.vision_tower." + k, v, k)
    # an original checkpoint: the tower layers it trained (after the tower folder's), its projector and newline
    for k, v in lstate.items():
        vk = _vision_key(k[len("model.vision_tower."):]) if k.startswith("model.vision_tower.") else None
        if vk is not None:
            put("model.vision_tower." + vk, v, k)
    if any("mm_projector." in k for k in lstate):
        projector = _put_projector(model, lstate, language_model)
        log(f"projector and image_newline from {language_model}: {len(projector)} tensors")
    needed = [k for k in own if k.startswith(("model.language_model.", "model.vision_tower.")) or k == "lm_head.weight"]
    missing = [k for k in needed if k not in filled and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if mismatched or missing:
        raise ValueError(f"cannot assemble from {language_model} and {vision_tower}: shape mismatches "
                         f"{mismatched[:5]}; tensors not found in the folders {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    loaded = len(filled)
    log(f"assembled a {model_type} model: {loaded} tensors from {language_model} and {vision_tower}; "
        f"vocab {len(tok)} -> {vocab} rows (image token id {image_id})")
    return model, tok


def _load_folder(path: str) -> dict:
    from safetensors.torch import load_file

    names = os.listdir(path)
    files = sorted(f for f in names if f.endswith(".safetensors"))
    # the original LLaVA code saves pytorch_model-0000k-of-0000n.bin shards (torch.save of tensors)
    bins = sorted(f for f in names if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not files and not bins:
        raise FileNotFoundError(f"no .safetensors (or pytorch_model*.bin) weights in {path}")
    out = {}
    for f in files or bins:
        p = os.path.join(path, f)
        out.update(load_file(p) if files else _torch_load(p))
    return out


def _vision_key(k: str) -> str | None:
    """HF CLIPVisionModel / CLIPModel / SigLIP keys -> our vision tower keys (without ``model.vision_tower.``)."""
    for pre in ("vision_model.", "vision_tower.vision_model.", "model.vision_model.", "model.vision_tower.",
                "vision_tower."):
        if k.startswith(pre):
            k = k[len(pre):]
            break
    # transformers 5.x saves a bare CLIPVisionModel / SiglipVisionModel without the vision_model. prefix
    if k.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")):
        return k
    return None
