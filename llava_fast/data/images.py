"""Image loading (robust) and the minimal preprocessing the data pipeline needs.

Decoding: every image goes through :func:`load_image`, which names the file in every error and handles grayscale,
palette, CMYK, 16-bit and transparent images (alpha composited over white, as transformers' ``convert_to_rgb`` does).
Images larger than ``max_pixels`` are refused before decoding (PIL reads only the header for the size).

Preprocessing (:func:`preprocess_images`) follows transformers' PIL backend (reference-spec.md section 2):
LLaVA-1.5 resizes the short side to the tile and center-crops (or pads to square with the mean colour when
``square="pad"``); AnyRes (NeXT / OneVision) resizes to the best grid resolution keeping the aspect ratio, pads with
black, cuts row-major tiles and puts the whole image resized to tile x tile first; OneVision samples with several
images use one padded-to-square tile each. It is a small adapter: ``llava_fast.ops.anyres`` holds the geometry.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llava_fast.data.templates import SampleError
from llava_fast.ops import anyres

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


def _get(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


@dataclass
class ImageSpec:
    """What the data pipeline needs to know about a model's image path."""
    model_type: str = "llava_next"        # llava | llava_next | llava_onevision
    tile: int = 336                       # vision_config.image_size
    patch: int = 14
    pinpoints: list | None = None         # (height, width) pairs; None for LLaVA-1.5
    max_tiles: int | None = None          # OneVision anyres_max_N
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    square: str = "crop"                  # LLaVA-1.5: "crop" (HF default) or "pad" (original finetune)
    cls_token: bool = False               # LLaVA-1.5 with vision_feature_select_strategy="full" keeps the CLS token
    max_pixels: int = DEFAULT_MAX_PIXELS
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_side(self) -> int:
        return self.tile // self.patch

    @classmethod
    def from_model_config(cls, cfg, **overrides) -> "ImageSpec":
        """From a LlavaConfig / transformers config / config dict (``vision_config`` may be a dict)."""
        mt = _get(cfg, "model_type", "llava_next")
        vc = _get(cfg, "vision_config", {}) or {}
        vtype = _get(vc, "model_type", "clip_vision_model")
        siglip = "siglip" in str(vtype)
        mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else (CLIP_MEAN, CLIP_STD)
        pins = _get(cfg, "image_grid_pinpoints", None) if mt != "llava" else None
        max_tiles = None
        if mt == "llava_onevision":
            ar = str(_get(cfg, "vision_aspect_ratio", "anyres_max_9") or "")
            max_tiles = int(ar.replace("anyres_max_", "")) if ar.startswith("anyres_max_") else None
        strategy = _get(cfg, "vision_feature_select_strategy", "default")
        kw = dict(model_type=mt, tile=int(_get(vc, "image_size", 336)), patch=int(_get(vc, "patch_size", 14)),
                  pinpoints=[list(p) for p in pins] if pins else None, max_tiles=max_tiles, image_mean=mean,
                  image_std=std, cls_token=(mt == "llava" and strategy == "full" and not siglip))
        kw.update(overrides)
        return cls(**kw)

    def image_tokens(self, size_hw, multi_image: bool = False) -> int:
        """LLM tokens of one image of (height, width) in a sample with ``multi_image`` images or not."""
        t = self.tokens_per_side
        if self.pinpoints is None:
            return t * t + (1 if self.cls_token else 0)
        single = multi_image and self.model_type == "llava_onevision"
        return anyres.num_image_tokens(tuple(size_hw), self.pinpoints, self.tile, t, max_tiles=self.max_tiles,
                                       single_tile=single)

    def image_tiles(self, size_hw, multi_image: bool = False) -> int:
        if self.pinpoints is None or (multi_image and self.model_type == "llava_onevision"):
            return 1
        return anyres.num_tiles(tuple(size_hw), self.pinpoints, self.tile)

    def video_tokens(self, num_frames: int) -> int:
        return anyres.num_video_tokens(num_frames, self.tokens_per_side)


# ----------------------------------------------------------------------------------------------------------------
# decoding

def probe_size(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise SampleError("missing_image", f"image not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad headers
        raise SampleError("unreadable_image", f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if w <= 0 or h <= 0:
        raise SampleError("unreadable_image", f"image {path} has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise SampleError("image_too_large", f"image {path} is {w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    return h, w


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
    from PIL import Image

    h, w = probe_size(path, max_pixels)
    try:
        with Image.open(path) as im:
            im.load()  # forces the full decode: truncated/corrupt data fails here
            return to_rgb(im)
    except SampleError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SampleError("decode_error", f"cannot decode image {path} ({w}x{h}): {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# preprocessing

def _normalize(im, spec: ImageSpec) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) * (1.0 / 255.0)
    mean = torch.tensor(spec.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.image_std, dtype=torch.float32)[:, None, None]
    return (a - mean) / std


def _pad_square(im, colour):
    from PIL import Image

    w, h = im.size
    if w == h:
        return im
    s = max(w, h)
    out = Image.new("RGB", (s, s), colour)
    out.paste(im, ((s - w) // 2, (s - h) // 2))
    return out


def _resize_crop(im, t: int):
    from PIL import Image

    w, h = im.size
    if w <= h:
        nw, nh = t, max(1, int(t * h / w))
    else:
        nw, nh = max(1, int(t * w / h)), t
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - t) // 2, (nh - t) // 2
    return im.crop((left, top, left + t, top + t))


def _anyres_tiles(im, spec: ImageSpec) -> list:
    from PIL import Image

    w, h = im.size
    t = spec.tile
    bh, bw = anyres.select_best_resolution((h, w), spec.pinpoints)
    nh, nw = anyres.patch_output_size((h, w), (bh, bw))
    canvas = Image.new("RGB", (bw, bh), (0, 0, 0))
    canvas.paste(im.resize((nw, nh), Image.BICUBIC), ((bw - nw) // 2, (bh - nh) // 2))
    tiles = [im.resize((t, t), Image.BICUBIC)]
    for i in range(0, bh, t):
        for j in range(0, bw, t):
            tiles.append(canvas.crop((j, i, j + t, i + t)))
    return tiles


def preprocess_images(images, spec: ImageSpec, multi_image: bool | None = None) -> dict:
    """RGB PIL images of one sample -> dict(pixel_values (tiles, 3, T, T) fp32, image_sizes [(h, w)], num_tiles)."""
    from PIL import Image

    if multi_image is None:
        multi_image = len(images) > 1
    tiles, sizes, counts = [], [], []
    for im in images:
        w, h = im.size
        sizes.append((h, w))
        if spec.pinpoints is None:
            if spec.square == "pad":
                im2 = _pad_square(im, tuple(int(m * 255) for m in spec.image_mean)).resize((spec.tile, spec.tile),
                                                                                          Image.BICUBIC)
            else:
                im2 = _resize_crop(im, spec.tile)
            these = [im2]
        elif multi_image and spec.model_type == "llava_onevision":
            these = [_pad_square(im, tuple(int(m * 255) for m in spec.image_mean)).resize((spec.tile, spec.tile),
                                                                                         Image.BICUBIC)]
        else:
            these = _anyres_tiles(im, spec)
        tiles += [_normalize(x, spec) for x in these]
        counts.append(len(these))
    pv = torch.stack(tiles) if tiles else torch.zeros(0, 3, spec.tile, spec.tile)
    return {"pixel_values": pv, "image_sizes": sizes, "num_tiles": counts}


def preprocess_video(frames, spec: ImageSpec) -> torch.Tensor:
    """Video frames (RGB PIL) -> (F, 3, T, T), each frame resized to tile x tile (reference-spec.md 2.7)."""
    from PIL import Image

    return torch.stack([_normalize(f.resize((spec.tile, spec.tile), Image.BICUBIC), spec) for f in frames])


def tiles_and_tokens(size_hw, spec: ImageSpec, multi_image: bool = False) -> tuple[int, int]:
    return spec.image_tiles(size_hw, multi_image), spec.image_tokens(size_hw, multi_image)


__all__ = ["ImageSpec", "probe_size", "load_image", "to_rgb", "preprocess_images", "preprocess_video",
           "tiles_and_tokens", "CLIP_MEAN", "CLIP_STD"]
