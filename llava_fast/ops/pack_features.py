"""AnyRes feature packing: from the projected features of every tile to the image tokens of the language sequence.

Reference (plain PyTorch, equal to transformers' ``pack_image_features``; reference-spec.md 2.4-2.7): per image, the
base tile's tokens first, then the grid features arranged as one (rows, cols) map, unpadded, (OneVision) bilinearly
downsampled when larger than ``anyres_max_N`` tiles, with one ``image_newline`` after every row. Single-tile images
(OneVision multi-image) get their tokens plus one newline; videos are pooled 2x2 bilinearly with one newline at the end.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llava_fast.ops import anyres


def pack_image_features_ref(features: list[torch.Tensor], image_sizes, image_newline: torch.Tensor | None,
                            pinpoints, tile: int, max_tiles: int | None = None) -> list[torch.Tensor]:
    """features: per image (n_tiles, t*t, D); image_sizes: (N, 2) (height, width). Returns per image (tokens, D)."""
    out = []
    sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else [list(s) for s in image_sizes]
    for f, size in zip(features, sizes):
        if f.shape[0] > 1:
            t = int(math.isqrt(f.shape[1]))
            if t * t != f.shape[1]:
                raise ValueError(f"image features have {f.shape[1]} tokens per tile, not a square number; "
                                 f"use vision_feature_select_strategy='default' for CLIP towers (drops CLS)")
            base, grid = f[0], f[1:]
            gh, gw = anyres.grid_shape(size, pinpoints, tile)
            if gh * gw != grid.shape[0]:
                raise ValueError(f"image of size {tuple(size)} needs {gh * gw + 1} tiles (grid {gh}x{gw} + base) but "
                                 f"its features have {f.shape[0]}; pixel_values and image_sizes do not match")
            grid = grid.view(gh, gw, t, t, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            r0, r1, c0, c1 = anyres.unpad_bounds(tuple(grid.shape[1:]), size)
            grid = grid[:, r0:r1, c0:c1]
            if max_tiles is not None:
                h2, w2 = anyres.anyres_max_size(grid.shape[1], grid.shape[2], max_tiles, t)
                if (h2, w2) != tuple(grid.shape[1:]):
                    grid = F.interpolate(grid[None], [h2, w2], mode="bilinear")[0]
            if image_newline is not None:
                nl = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
                grid = torch.cat((grid, nl), dim=-1)
            out.append(torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0))
        else:
            g = f[0]
            if image_newline is not None:
                g = torch.cat((g, image_newline[None].to(g)), dim=0)
            out.append(g)
    return out


def pool_video_features_ref(features: torch.Tensor, tokens_per_side: int) -> torch.Tensor:
    """(frames, t*t, D) -> (frames, ceil(t/2)^2, D): bilinear interpolation (not average pooling), as OneVision."""
    fr, n, d = features.shape
    x = features.view(fr, tokens_per_side, tokens_per_side, d).permute(0, 3, 1, 2).contiguous()
    s = math.ceil(tokens_per_side / 2)
    x = F.interpolate(x, size=[s, s], mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(fr, -1, d)


def scatter_features_ref(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int,
                         features: torch.Tensor, what: str = "Image") -> torch.Tensor:
    """Write ``features`` (n, D) into the positions of ``token_id`` in ``input_ids`` (batch-major order)."""
    mask = input_ids == token_id
    n_tokens = int(mask.sum())
    if n_tokens != features.shape[0]:
        raise ValueError(
            f"{what} features and {what.lower()} tokens do not match: input_ids holds {n_tokens} {what.lower()} "
            f"tokens (id {token_id}) but the {what.lower()}s give {features.shape[0]} features. Each <{what.lower()}> "
            f"placeholder must be expanded to exactly the number of tokens its {what.lower()} produces "
            f"(llava_fast.ops.anyres.num_image_tokens), and truncation must not cut them.")
    return inputs_embeds.masked_scatter(mask[..., None], features.to(inputs_embeds.dtype))
