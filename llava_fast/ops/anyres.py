"""AnyRes: geometry (which grid an image gets, how many tokens it becomes) and image preprocessing.

Geometry follows transformers 5.x exactly (reference-spec.md sections 2-3): pinpoints and image sizes are
(height, width); ``select_best_resolution`` uses IEEE doubles with int() truncation and lets the first candidate win
ties; ``unpad`` rounds with ``int(round(x, 7))`` and removes the same ``pad`` on both sides.
"""
from __future__ import annotations

import math
from typing import Sequence

from llava_fast import _ext

Size = tuple[int, int]


def _pins(pinpoints) -> list[Size]:
    try:
        pins = [(int(p[0]), int(p[1])) for p in pinpoints]
    except Exception as e:
        raise ValueError(f"image_grid_pinpoints must be a list of (height, width) pairs, got {pinpoints!r}") from e
    if not pins:
        raise ValueError("image_grid_pinpoints is empty")
    return pins


def select_best_resolution_ref(original_size: Size, pinpoints) -> Size | None:
    """transformers' select_best_resolution in Python. ``original_size`` and the result are (height, width).
    Returns None when no candidate keeps a single pixel (1-pixel strips), as transformers does."""
    oh, ow = original_size
    best, max_eff, min_waste = None, 0, float("inf")
    for h, w in _pins(pinpoints):
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (h, w), eff, waste
    return best


def select_best_resolution(original_size: Size, pinpoints) -> Size:
    """Best (height, width) among ``pinpoints`` for an image of ``original_size`` = (height, width).

    Uses the C++ function from ``llava_fast._C`` when built (same result bit for bit), else the Python reference.
    Raises ValueError for empty images and for strips so thin that every candidate keeps zero pixels.
    """
    oh, ow = int(original_size[0]), int(original_size[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"image size must be positive (height, width), got {tuple(original_size)}")
    pins = _pins(pinpoints)
    best = _ext._C.select_best_resolution(oh, ow, pins) if _ext.HAS_EXT else select_best_resolution_ref((oh, ow), pins)
    if best is None:
        raise ValueError(f"image of size (height={oh}, width={ow}) is too thin for AnyRes: every grid in "
                         f"image_grid_pinpoints scales one side below 1 pixel; crop or pad it first")
    return tuple(best)


def grid_shape(image_size: Size, pinpoints, tile: int) -> Size:
    """(rows, cols) of the AnyRes tile grid for an image of (height, width)."""
    h, w = select_best_resolution(image_size, pinpoints)
    return h // tile, w // tile


def num_tiles(image_size: Size, pinpoints, tile: int) -> int:
    """Tiles encoded for one AnyRes image: the grid plus the base image."""
    gh, gw = grid_shape(image_size, pinpoints, tile)
    return gh * gw + 1


def patch_output_size(image_size: Size, target: Size) -> Size:
    """Aspect-preserving resize inside ``target`` (transformers get_patch_output_size): ceil, clamped."""
    oh, ow = image_size
    th, tw = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(math.ceil(oh * sw), th), tw
    return th, min(math.ceil(ow * sh), tw)


def unpad_bounds(current: Size, original_size: Size) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and cols [c0, c1) kept by transformers' unpad_image on a (C, Hc, Wc) feature map."""
    hc, wc = current
    oh, ow = original_size
    if ow / oh > wc / hc:
        new_h = int(round(oh * (wc / ow), 7))
        pad = (hc - new_h) // 2
        return pad, hc - pad, 0, wc
    new_w = int(round(ow * (hc / oh), 7))
    pad = (wc - new_w) // 2
    return 0, hc, pad, wc - pad


def anyres_max_size(h: int, w: int, max_tiles: int, unit: int) -> Size:
    """OneVision anyres_max_N: the feature map size after bilinear downsampling (unchanged when times <= 1.1)."""
    times = math.sqrt(h * w / (max_tiles * unit**2))
    if times > 1.1:
        return int(h // times), int(w // times)
    return h, w


def packed_feature_shape(image_size: Size, pinpoints, tile: int, tokens_per_side: int,
                         max_tiles: int | None = None) -> Size:
    """(H', W') of the unpadded (and, for OneVision, downsampled) grid features of one multi-tile image."""
    gh, gw = grid_shape(image_size, pinpoints, tile)
    r0, r1, c0, c1 = unpad_bounds((gh * tokens_per_side, gw * tokens_per_side), image_size)
    h, w = r1 - r0, c1 - c0
    if max_tiles is not None:
        h, w = anyres_max_size(h, w, max_tiles, tokens_per_side)
    return h, w


def num_image_tokens(image_size: Size, pinpoints: Sequence | None, tile: int, tokens_per_side: int,
                     max_tiles: int | None = None, single_tile: bool = False) -> int:
    """LLM tokens one image becomes.

    ``pinpoints=None``: LLaVA-1.5 (one tile, t*t tokens). ``single_tile``: OneVision multi-image (t*t + newline).
    Otherwise AnyRes: t*t base tokens + H' * (W' + 1) (one newline per row).
    """
    base = tokens_per_side * tokens_per_side
    if pinpoints is None:
        return base
    if single_tile:
        return base + 1
    h, w = packed_feature_shape(image_size, pinpoints, tile, tokens_per_side, max_tiles)
    return base + h * (w + 1)


def num_video_tokens(num_frames: int, tokens_per_side: int = 27) -> int:
    """OneVision video: each frame pooled bilinearly to ceil(t/2)^2 tokens, one newline after the whole video."""
    pooled = math.ceil(tokens_per_side / 2)
    return num_frames * pooled * pooled + 1
