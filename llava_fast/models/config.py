"""Configs read from a llava-hf ``config.json`` (model_type ``llava``, ``llava_next``, ``llava_onevision``).

Typed dataclasses for the fields the model uses; the original dict is kept so that ``save_pretrained`` writes back a
config transformers reads unchanged.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("llava", "llava_next", "llava_onevision")
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
TEXT_TYPES = ("llama", "qwen2", "mistral")

# transformers' defaults per model_type for fields a config.json may omit
_VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
                              hidden_act="quick_gelu"),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                                hidden_act="gelu_pytorch_tanh", vision_use_head=True),
}
# what llava-hf's configuration classes fill in when vision_config / text_config are missing
_DEFAULT_VISION = {
    "llava": dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                  image_size=336, num_hidden_layers=24, num_attention_heads=16, vocab_size=32000,
                  projection_dim=768),
    "llava_next": dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                       image_size=336, num_hidden_layers=24, num_attention_heads=16, vocab_size=32000,
                       projection_dim=768),
    "llava_onevision": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                            patch_size=14, image_size=384, num_hidden_layers=26, num_attention_heads=14,
                            vision_use_head=False),
}
_DEFAULT_TEXT = {"llava": "llama", "llava_next": "llama", "llava_onevision": "qwen2"}
# config.json's dtype names -> ours: transformers takes any torch attribute name (torch.half is float16), older
# writers put "torch.float16"; the short forms are what training scripts write
DTYPE_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32",
               "float16": "float16", "half": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class VisionConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    vision_use_head: bool = False     # SigLIP attention-pooling head: loaded and saved, never used by LLaVA

    @property
    def is_clip(self) -> bool:
        return self.model_type == "clip_vision_model"

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        mt = d.get("model_type", "clip_vision_model")
        if mt not in VISION_TYPES:
            raise ValueError(f"vision_config.model_type {mt!r} is not supported; supported: {VISION_TYPES}")
        merged = {**_VISION_DEFAULTS[mt], **{k: v for k, v in d.items() if v is not None}}
        return cls(model_type=mt, **{k: merged[k] for k in cls.__dataclass_fields__ if k != "model_type" and k in merged})


@dataclass
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool          # q/k/v/o bias (Llama); Qwen2 has q/k/v bias and no o bias, see qkv_bias/o_bias
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict, tie_word_embeddings: bool | None = None) -> "TextConfig":
        mt = d.get("model_type", "llama")
        if mt not in TEXT_TYPES:
            raise ValueError(f"text_config.model_type {mt!r} is not supported; supported: {TEXT_TYPES}")
        defaults = {"llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                                  rope_theta=10000.0),
                    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, rope_theta=10000.0),
                    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                                  max_position_embeddings=32768, rope_theta=10000.0)}[mt]
        g = {**defaults, **{k: v for k, v in d.items() if v is not None}}
        # transformers: the legacy ``rope_scaling`` takes precedence over ``rope_parameters`` (its theta falling back to
        # ``rope_theta``); a scaled RoPE in either is refused, never ignored
        rope = g.get("rope_scaling") or g.get("rope_parameters") or {}
        for key in ("rope_scaling", "rope_parameters"):
            r = g.get(key) or {}
            rope_type = r.get("rope_type", r.get("type", "default"))
            if rope_type not in ("default", None):
                raise ValueError(f"text_config.{key} has rope_type {rope_type!r}, which is not supported yet (only "
                                 f"'default' RoPE)")
        theta = float(rope.get("rope_theta", g.get("rope_theta", 10000.0)))
        heads = int(g["num_attention_heads"])
        kv = int(g.get("num_key_value_heads") or heads)
        if heads % kv:
            raise ValueError(f"text_config: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        head_dim = int(g.get("head_dim") or g["hidden_size"] // heads)
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(g.get("attention_bias", False))
        window = g.get("sliding_window")
        if window and (mt == "mistral" or g.get("use_sliding_window")) and window < int(g["max_position_embeddings"]):
            raise ValueError(f"text_config: sliding-window attention (sliding_window={window}) is not supported; "
                             f"set sliding_window to null in config.json if the model was trained without it")
        tie = g.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
        return cls(model_type=mt, vocab_size=int(g["vocab_size"]), hidden_size=int(g["hidden_size"]),
                   intermediate_size=int(g["intermediate_size"]), num_hidden_layers=int(g["num_hidden_layers"]),
                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                   rms_norm_eps=float(g["rms_norm_eps"]), rope_theta=theta,
                   max_position_embeddings=int(g["max_position_embeddings"]), attention_bias=qkv_bias and o_bias,
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(g.get("mlp_bias", False)),
                   hidden_act=g.get("hidden_act", "silu"), tie_word_embeddings=bool(tie),
                   pad_token_id=g.get("pad_token_id"))


def _parse_dtype(d: dict) -> str | None:
    """config.json's ``dtype`` (or the legacy ``torch_dtype``; ``dtype`` wins unless null, as in transformers) as
    one of our names; None when missing or "auto" (the loader then uses float32)."""
    key = "dtype" if d.get("dtype") is not None else "torch_dtype"
    value = d.get(key)
    if value is None or value == "auto":
        return None
    name = DTYPE_NAMES.get(str(value).removeprefix("torch."))  # str(): a torch.dtype in a dict made in memory
    if name is None:  # never load an unknown dtype silently as float32
        raise ValueError(f"config.json's {key!r} is {value!r}, which llava_fast does not know; set it to one of "
                         f"{sorted(DTYPE_NAMES)} (a 'torch.' prefix is fine), 'auto' or remove it (float32)")
    return name


def _warn_dropout(vd: dict, td: dict) -> None:
    """The models have no dropout (the LLaVA checkpoints set every rate to 0). A config asking for some gets a
    warning naming the field, rather than being trained without it in silence."""
    fields = [f"vision_config.{k}={vd[k]}" for k in ("attention_dropout", "dropout", "hidden_dropout")
              if float(vd.get(k) or 0) > 0]
    fields += [f"text_config.{k}={td[k]}" for k in ("attention_dropout", "hidden_dropout", "dropout")
               if float(td.get(k) or 0) > 0]
    if fields:
        warnings.warn(f"config.json asks for dropout ({', '.join(fields)}), which llava_fast does not implement: "
                      f"the model runs and trains without it. Set these to 0.0 to silence this warning.",
                      stacklevel=3)


@dataclass
class LlavaConfig:
    model_type: str
    vision_config: VisionConfig
    text_config: TextConfig
    image_token_id: int
    video_token_id: int | None = None
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    image_grid_pinpoints: list[list[int]] | None = None
    vision_aspect_ratio: str | None = None
    tie_word_embeddings: bool = False
    dtype: str | None = None
    hf_dict: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def max_tiles(self) -> int | None:
        """N of OneVision's ``anyres_max_N`` (None when not set)."""
        if self.model_type != "llava_onevision" or not self.vision_aspect_ratio:
            return None
        return int(self.vision_aspect_ratio.removeprefix("anyres_max_"))  # (str.strip removes a character set)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlavaConfig":
        d = copy.deepcopy(d)
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"config model_type {mt!r} is not supported; llava_fast supports {MODEL_TYPES} "
                             f"(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision)")
        vd = d.get("vision_config") or dict(_DEFAULT_VISION[mt])
        td = d.get("text_config") or {"model_type": _DEFAULT_TEXT[mt]}
        _warn_dropout(vd, td)
        tie = d.get("tie_word_embeddings", td.get("tie_word_embeddings", False))
        if mt != "llava_next":  # transformers' LlavaConfig / LlavaOnevisionConfig: tied when either config says so
            tie = bool(tie) or bool(td.get("tie_word_embeddings", False))
        vfl = d.get("vision_feature_layer", -1 if mt == "llava_onevision" else -2)
        strategy = d.get("vision_feature_select_strategy", "full" if mt == "llava_onevision" else "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        pins = d.get("image_grid_pinpoints")
        if mt == "llava":
            pins = None
        elif pins is None:
            pins = ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] if mt == "llava_next"
                    else [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)])
        image_token = d.get("image_token_id", d.get("image_token_index"))
        if image_token is None:
            image_token = {"llava": 32000, "llava_next": 32000, "llava_onevision": 151646}[mt]
        video_token = d.get("video_token_id", d.get("video_token_index"))
        if mt == "llava_onevision" and video_token is None:
            video_token = 151647
        return cls(model_type=mt, vision_config=VisionConfig.from_dict(vd),
                   text_config=TextConfig.from_dict(td, tie_word_embeddings=tie), image_token_id=int(image_token),
                   video_token_id=None if video_token is None else int(video_token),
                   projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                   multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
                   vision_feature_layer=vfl, vision_feature_select_strategy=strategy,
                   image_grid_pinpoints=pins,
                   vision_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9" if mt == "llava_onevision" else None),
                   tie_word_embeddings=bool(tie), dtype=_parse_dtype(d), hf_dict=d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LlavaConfig":
        p = os.path.join(path, "config.json")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no config.json in {path!r}: expected a llava-hf checkpoint folder "
                                    f"(config.json + *.safetensors); llava_fast never downloads models")
        with open(p) as f:
            d = json.load(f)
        if isinstance(d, dict) and "mm_vision_tower" in d and "text_config" not in d:
            raise ValueError(f"{path!r} is a checkpoint of the original LLaVA training code ({d.get('architectures')}, "
                             f"mm_vision_tower {d['mm_vision_tower']!r}), not a llava-hf folder: convert it once with "
                             f"llava-fast convert --original {path} --vision-tower <local copy of that tower> --out "
                             f"<new folder>")
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        d = copy.deepcopy(self.hf_dict)
        d.setdefault("model_type", self.model_type)
        d.setdefault("architectures", [{"llava": "LlavaForConditionalGeneration",
                                        "llava_next": "LlavaNextForConditionalGeneration",
                                        "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[self.model_type]])
        if self.dtype:
            d["dtype"] = self.dtype
        return d
