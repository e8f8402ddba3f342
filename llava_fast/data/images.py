"""Image files for the data pipeline: robust decoding, header-size checks, and the model's preprocessing config.

Decoding: every image goes through :func:`load_image`, which names the file in every error and handles grayscale,
palette, CMYK, 16-bit and transparent images (alpha composited over white, as transformers' ``convert_to_rgb`` does).
Images larger than ``max_pixels`` are refused before decoding (:func:`probe_size` reads only the header), so a
sample's token count is known, and bad files are dropped, before any pixel is decoded.

Preprocessing (AnyRes tiles, LLaVA-1.5 crop, OneVision multi-image and video) and token counts are not done here:
they are ``llava_fast.ops.anyres`` (:class:`~llava_fast.ops.anyres.ImageProcessorConfig`,
:func:`~llava_fast.ops.anyres.preprocess_images`, ``ImageProcessorConfig.num_image_tokens``), the library's
reference, bit-identical to transformers' torchvision backend. :func:`image_config` derives that config from a model
config, and :func:`image_tokens` adds the one thing a model config decides beyond it (LLaVA-1.5 keeping the CLS token).
"""
from __future__ import annotations

import warnings

import numpy as np

from llava_fast.data.templates import SampleError
from llava_fast.ops import anyres
from llava_fast.ops.anyres import ImageProcessorConfig

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


def _get(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


# ----------------------------------------------------------------------------------------------------------------
# the model's image path

def image_config(model_config, **overrides) -> ImageProcessorConfig:
    """The :class:`ImageProcessorConfig` of a model: from a LlavaConfig / transformers config / config dict
    (``vision_config`` may be a dict). Tile and patch from the vision config, pinpoints and ``anyres_max_N`` from the
    model, CLIP or SigLIP normalization from the vision tower type. ``overrides`` (e.g. ``do_pad=True`` for the
    original LLaVA-1.5 pad-to-square) are passed on."""
    mt = _get(model_config, "model_type", "llava_next")
    vc = _get(model_config, "vision_config", {}) or {}
    siglip = "siglip" in str(_get(vc, "model_type", "clip_vision_model"))
    kw = dict(tile=int(_get(vc, "image_size", 336)), patch_size=int(_get(vc, "patch_size", 14)),
              image_mean=anyres.SIGLIP_MEAN if siglip else anyres.CLIP_MEAN,
              image_std=anyres.SIGLIP_STD if siglip else anyres.CLIP_STD)
    pins = _get(model_config, "image_grid_pinpoints", None)
    if mt != "llava" and pins:
        kw["image_grid_pinpoints"] = [list(p) for p in pins]
    if mt == "llava_onevision":
        ar = _get(model_config, "vision_aspect_ratio", "anyres_max_9")
        kw["vision_aspect_ratio"] = ar if str(ar or "").startswith("anyres_max_") else None
    kw.update(overrides)
    return ImageProcessorConfig.for_variant(mt, **kw)


def checkpoint_image_config(model_dir: str | None, model_config, **overrides) -> ImageProcessorConfig:
    """The :class:`ImageProcessorConfig` a llava-hf checkpoint folder was made for: what its
    ``preprocessor_config.json`` says (LLaVA-1.5's ``do_pad``: pad to a square before the resize, as the original
    LLaVA-1.5 fine-tune; normalization constants) with the tile, patch, pinpoints and ``anyres_max_N`` of the model
    config; :func:`image_config` when the folder has no such file (or ``model_dir`` is None). Chat, predict and
    training from the folder all preprocess with it, so a model sees its images as it was trained on them."""
    import json
    import os

    pp = os.path.join(model_dir, "preprocessor_config.json") if model_dir else None
    if pp is None or not os.path.isfile(pp):
        return image_config(model_config, **overrides)
    try:
        with open(pp) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{pp}: not a readable JSON file ({e}); fix or delete it (without it the model's defaults "
                         f"are used)") from None
    if not isinstance(d, dict):
        raise ValueError(f"{pp}: expected a JSON object, got {type(d).__name__}")
    spec = image_config(model_config)
    kw = dict(tile=spec.tile, patch_size=spec.patch_size)
    if spec.image_grid_pinpoints is not None:
        kw["image_grid_pinpoints"] = spec.image_grid_pinpoints
    if spec.vision_aspect_ratio is not None:
        kw["vision_aspect_ratio"] = spec.vision_aspect_ratio
    kw.update(overrides)
    return ImageProcessorConfig.from_dict(d, variant=spec.variant, **kw)


def cls_token_kept(model_config) -> bool:
    """LLaVA-1.5 with ``vision_feature_select_strategy="full"`` (CLIP) keeps the CLS token: 577 tokens per image."""
    vc = _get(model_config, "vision_config", {}) or {}
    siglip = "siglip" in str(_get(vc, "model_type", "clip_vision_model"))
    return (_get(model_config, "model_type", "llava_next") == "llava"
            and _get(model_config, "vision_feature_select_strategy", "default") == "full" and not siglip)


def image_tokens(config: ImageProcessorConfig, size_hw, multi_image: bool = False, cls_token: bool = False) -> int:
    """LLM tokens of one image of (height, width) in a sample with several images (``multi_image``) or one: the
    OneVision multi-image path is one tile per image; ``cls_token`` adds LLaVA-1.5's CLS token."""
    single = multi_image and config.variant == "llava_onevision"
    return config.num_image_tokens(tuple(size_hw), single_tile=single) + (1 if cls_token else 0)


def image_tiles(config: ImageProcessorConfig, size_hw, multi_image: bool = False) -> int:
    """Vision-tower tiles of one image (what the tower's batch will hold)."""
    return config.num_tiles(tuple(size_hw), single_tile=multi_image and config.variant == "llava_onevision")


# ----------------------------------------------------------------------------------------------------------------
# decoding

def probe_size(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    return _probe(path, max_pixels)[:2]


def _probe(path: str, max_pixels: int) -> tuple[int, int, str, str]:
    """(height, width, format, mode) from the file header; SampleError for missing, unreadable or oversized files."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt, mode = im.format, im.mode
    except FileNotFoundError:
        raise SampleError("missing_image", f"image not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad headers
        raise SampleError("unreadable_image", f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if w <= 0 or h <= 0:
        raise SampleError("unreadable_image", f"image {path} has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise SampleError("image_too_large", f"image {path} is {w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    return h, w, fmt, mode


def to_rgb(im):
    """RGB PIL image: transparency composited over white, 16-bit/float scaled to 8 bits, CMYK/P/L converted."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        if im.mode == "F":
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            a = a / hi * 255.0
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode ``path`` fully into an RGB PIL image; SampleError (naming the file) on any failure."""
    h, w = probe_size(path, max_pixels)
    return _decode_pil(path, h, w)


def _decode_pil(path: str, h: int, w: int):
    """The full PIL decode of a probed file, as an RGB image; SampleError naming the file on failure."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # forces the full decode: truncated/corrupt data fails here
            return to_rgb(im)
    except SampleError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SampleError("decode_error", f"cannot decode image {path} ({w}x{h}): {type(e).__name__}: {e}") from None


_tv_jpeg = None  # torchvision's CPU JPEG decoder once it passed the self-check; False when unusable


def _jpeg_decoder():
    """``torchvision.io.decode_jpeg`` (CPU) if it is present and decodes a 4:4:4 and a 4:2:0 test JPEG to exactly PIL's
    pixels on this machine (both wrap libjpeg-turbo, whose integer IDCT and fancy upsampling are deterministic; the
    check guards against a build that differs), else None. Checked once per process."""
    global _tv_jpeg
    if _tv_jpeg is None:
        _tv_jpeg = False
        try:
            import io

            import torch
            from PIL import Image
            from torchvision.io import ImageReadMode, decode_jpeg

            def _decode(data):
                with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as deprecated
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

            yy, xx = np.mgrid[0:45, 0:61]
            noise = np.random.default_rng(0).integers(-40, 40, (45, 61, 3))
            rgb = np.clip(np.stack([xx * 4, yy * 5, 255 - xx * 3], -1) + noise, 0, 255).astype(np.uint8)
            for sub in (0, 2):  # 4:4:4, 4:2:0
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="JPEG", quality=87, subsampling=sub)
                data = buf.getvalue()
                ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                if not np.array_equal(ref, _decode(data).permute(1, 2, 0).numpy()):
                    return None
            _tv_jpeg = _decode
        except Exception:  # noqa: BLE001 - no torchvision, or a build without JPEG: PIL decodes
            _tv_jpeg = False
    return _tv_jpeg or None


def load_image_u8(path: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode ``path`` into a uint8 ``(3, H, W)`` tensor, the pixels :func:`load_image` gives. Complete RGB and
    grayscale JPEG files go through torchvision's CPU decoder when it passed the self-check (no PIL -> numpy copy;
    decode + encode of a 1000x750 photo 1.13-1.15x the PIL path on the dev CPU); everything else, and any file that
    decoder refuses, through PIL as :func:`load_image`. SampleError (naming the file) on any failure."""
    import torch

    h, w, fmt, mode = _probe(path, max_pixels)
    dec = _jpeg_decoder()
    if dec is not None and fmt == "JPEG" and mode in ("RGB", "L"):
        try:
            with open(path, "rb") as f:
                data = f.read()
            if anyres._jpeg_complete(data):  # truncated files: PIL raises, below
                out = dec(data)
                if tuple(out.shape) == (3, h, w):
                    return out
        except Exception:  # noqa: BLE001 - PIL decides (and names the error)
            pass
    return torch.from_numpy(np.array(_decode_pil(path, h, w))).permute(2, 0, 1)


__all__ = ["ImageProcessorConfig", "image_config", "cls_token_kept", "image_tokens", "image_tiles", "probe_size",
           "load_image", "load_image_u8", "to_rgb", "DEFAULT_MAX_PIXELS"]
