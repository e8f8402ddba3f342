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
    if len(sizes) != len(features):
        raise ValueError(f"pack_image_features_ref: {len(features)} images in features but {len(sizes)} in "
                         f"image_sizes; give one (height, width) per image")
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


# ======================================================================================================================
# Fused path: unpad + image_newline + anyres_max / video bilinear + scatter into inputs_embeds, one Triton launch.
#
# Layout (docs/style.md): host plan (numpy, cached) -> Triton kernels -> launchers -> torch.library ops (+ fakes) ->
# PackScatterFunction(autograd.Function) -> functional ``pack_and_scatter`` (+ its reference ``pack_and_scatter_ref``).
#
# The plan. Concatenate every source row (image features (total_tiles * t*t, D) first, then video features
# (videos * frames * t*t, D)). Every output token k of the image (then video) stream is
#     newline                          idx = (-1, -1, -1, -1)
#     a copy of source row r           idx = (r, -1, -1, -1),  lam = (1, 0, 1, 0)
#     a bilinear sample                idx = (r00, r01, r10, r11), lam = (h0, h1, w0, w1)
# and the kernel evaluates   h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)   in fp32 (PyTorch's nesting;
# missing taps load 0, so a copy is exact), rounds it to the feature dtype (the reference interpolates in the model
# dtype) and then to the embedding dtype (masked_scatter's ``.to``). Tap indices and lambdas follow
# upsample_bilinear2d(align_corners=False, size given): scale = float(in) / out in fp32,
# src = max(scale * (dst + 0.5) - 0.5, 0) rounded ONCE (PyTorch's CPU kernels are built with FMA contraction: with this
# single rounding the tap weights equal PyTorch's bit for bit, see test_one_hot_bit_exact; two roundings differ in
# ~10% of the taps by 1 ulp of src), i0 = int(src), i1 = i0 + (i0 < in - 1), l1 = src - i0, l0 = 1 - l1.
# Output token k of the image stream goes to the k-th image-token position of input_ids in batch-major order (what
# masked_scatter does); the video stream likewise at the video-token positions.
# ======================================================================================================================
import functools  # noqa: E402
from collections import OrderedDict  # noqa: E402
from typing import List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from llava_fast import _ext, backend  # noqa: E402

try:  # Triton is optional: imports never fail, the reference is the fallback.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - no triton on this platform
    HAS_TRITON = False

_NO_TOKEN = -(2**62)  # stands for "no video token id" in the custom op schema (ints only)


# --------------------------------------------------------------------------------------------------------------------
# 1. host plan (numpy; per image cached, per batch cached with its device upload)
# --------------------------------------------------------------------------------------------------------------------
def _linear_taps(n_in: int, n_out: int):
    """PyTorch's 1-D linear taps (align_corners=False, output size given) as numpy fp32:
    (i0, i1, l0, l1) with out[j] = l0[j] * x[i0[j]] + l1[j] * x[i1[j]]."""
    if n_in == n_out:  # PyTorch's CPU kernel copies; on CUDA src == dst exactly and l1 == 0: the same values
        i = np.arange(n_out, dtype=np.int64)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    d = np.arange(n_out, dtype=np.float64) + 0.5
    # one rounding of scale * (dst + 0.5) - 0.5 (an fma): exact in float64 (24-bit scale x <=15-bit dst), then to fp32
    src = (np.float64(scale) * d - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1).astype(np.int64)
    l0 = (np.float32(1.0) - l1).astype(np.float32)
    return i0, i1, l0, l1


def _copy_plan(src: np.ndarray):
    n = src.size
    idx = np.full((n, 4), -1, dtype=np.int64)
    idx[:, 0] = src.reshape(-1)
    lam = np.zeros((n, 4), dtype=np.float32)
    lam[:, 0] = 1.0
    lam[:, 2] = 1.0
    return idx, lam


def _bilinear_plan(src_map: np.ndarray, oh: int, ow: int):
    """Taps of F.interpolate(bilinear) from the (H, W) map of source rows ``src_map`` to (oh, ow), row-major."""
    h, w = src_map.shape
    y0, y1, h0, h1 = _linear_taps(h, oh)
    x0, x1, w0, w1 = _linear_taps(w, ow)
    idx = np.stack([src_map[y0][:, x0], src_map[y0][:, x1], src_map[y1][:, x0], src_map[y1][:, x1]], axis=-1)
    lam = np.empty((oh, ow, 4), dtype=np.float32)
    lam[..., 0] = h0[:, None]
    lam[..., 1] = h1[:, None]
    lam[..., 2] = w0[None, :]
    lam[..., 3] = w1[None, :]
    return idx.reshape(-1, 4), lam.reshape(-1, 4)


def _with_newlines(idx: np.ndarray, lam: np.ndarray, rows: int, cols: int):
    """Append one newline entry after every row of a (rows, cols) map."""
    idx = np.concatenate([idx.reshape(rows, cols, 4), np.full((rows, 1, 4), -1, np.int64)], axis=1)
    lam = np.concatenate([lam.reshape(rows, cols, 4), np.zeros((rows, 1, 4), np.float32)], axis=1)
    return idx.reshape(-1, 4), lam.reshape(-1, 4)


@functools.lru_cache(maxsize=8192)
def _image_plan(h: int, w: int, single: bool, pins: tuple | None, tile: int, t: int, max_tiles: int | None,
                has_nl: bool):
    """Plan of one image in local coordinates (source rows counted from the image's first tile).
    Returns (idx (K, 4) int64, lam (K, 4) fp32, number of tiles); the arrays are read-only (cached)."""
    base = np.arange(t * t, dtype=np.int64)
    if single:
        idx, lam = _copy_plan(base)
        if has_nl:
            idx = np.concatenate([idx, np.full((1, 4), -1, np.int64)])
            lam = np.concatenate([lam, np.zeros((1, 4), np.float32)])
        n_tiles = 1
    else:
        gh, gw = anyres.grid_shape((h, w), pins, tile)
        r0, r1, c0, c1 = anyres.unpad_bounds((gh * t, gw * t), (h, w))
        yy = np.arange(r0, r1, dtype=np.int64)[:, None]
        xx = np.arange(c0, c1, dtype=np.int64)[None, :]
        src_map = t * t * (1 + (yy // t) * gw + xx // t) + (yy % t) * t + xx % t
        hh, ww = src_map.shape
        h2, w2 = (hh, ww) if max_tiles is None else anyres.anyres_max_size(hh, ww, max_tiles, t)
        if (h2, w2) != (hh, ww) and (h2 <= 0 or w2 <= 0):
            raise ValueError(f"image of size (height={h}, width={w}): anyres_max_{max_tiles} downsampling of its "
                             f"{hh}x{ww} feature map gives an empty {h2}x{w2} map")
        if (h2, w2) != (hh, ww):
            gidx, glam = _bilinear_plan(src_map, h2, w2)
        else:
            gidx, glam = _copy_plan(src_map)
        if has_nl:
            gidx, glam = _with_newlines(gidx, glam, h2, w2)
        bidx, blam = _copy_plan(base)
        idx, lam = np.concatenate([bidx, gidx]), np.concatenate([blam, glam])
        n_tiles = gh * gw + 1
    idx.setflags(write=False)
    lam.setflags(write=False)
    return idx, lam, n_tiles


@functools.lru_cache(maxsize=256)
def _video_plan(frames: int, t: int, has_nl: bool):
    """Plan of one video (frames x t*t source rows): each frame bilinear t -> ceil(t/2), one newline at the end."""
    s = math.ceil(t / 2)
    fidx, flam = _bilinear_plan(np.arange(t * t, dtype=np.int64).reshape(t, t), s, s)
    off = (np.arange(frames, dtype=np.int64) * t * t)[:, None, None]
    idx = (fidx[None] + off).reshape(-1, 4)
    lam = np.broadcast_to(flam[None], (frames,) + flam.shape).reshape(-1, 4)
    if has_nl:
        idx = np.concatenate([idx, np.full((1, 4), -1, np.int64)])
        lam = np.concatenate([lam, np.zeros((1, 4), np.float32)])
    idx.setflags(write=False)
    lam = np.ascontiguousarray(lam)
    lam.setflags(write=False)
    return idx, lam


def _all_copies(idx: np.ndarray, lam: np.ndarray) -> bool:
    """Every output token a plain copy of one source row (taps 1-3 absent, weights (1, 0, 1, 0)) or a newline: no
    bilinear tap anywhere (the forward kernel's COPY variant; the backward's scatter-built plan)."""
    if not idx.size:
        return True
    k = idx[:, 0] >= 0   # (newlines have all-zero weights)
    return bool(np.all(idx[:, 1:] < 0) and np.all((lam[k, 0] == 1) & (lam[k, 2] == 1)))


def _copy_only_ell(idx: np.ndarray, lam: np.ndarray, n_src: int):
    """The backward's transposed plan when every output token is a plain copy of one source row (or a newline):
    LLaVA-NeXT / 1.5 and unreduced OneVision maps. Then each source row feeds at most one token with weight 1, and
    the transposed plan is a scatter (no sort): ~10x faster than the general build (2.5 -> 0.3 ms for 8 NeXT images).
    None when the plan has bilinear taps or a source row feeds two tokens."""
    if not _all_copies(idx, lam):
        return None
    k = np.nonzero(idx[:, 0] >= 0)[0] if idx.size else np.zeros(0, np.int64)
    src = idx[k, 0] if k.size else np.zeros(0, np.int64)
    ell_k = np.full((n_src, 1), -1, dtype=np.int32)
    ell_w = np.zeros((n_src, 1), dtype=np.float32)
    if src.size:
        if np.bincount(src, minlength=n_src).max() > 1:
            return None
        ell_k[src, 0] = k
        ell_w[src, 0] = 1.0
    return ell_k, ell_w, 1 if src.size else 0


def _general_ell(idx: np.ndarray, lam: np.ndarray, n_src: int):
    """The backward's transposed plan: for each source row the output tokens it feeds and the tap weight (fp32
    product h * w), padded with k = -1; returns (ell_k (n_src, deg) int32, ell_w fp32, deg)."""
    k = idx.shape[0]
    src = idx.reshape(-1)
    wt = (lam[:, [0, 0, 1, 1]] * lam[:, [2, 3, 2, 3]]).astype(np.float32).reshape(-1)
    kk = np.repeat(np.arange(k, dtype=np.int64), 4)
    keep = (src >= 0) & (wt != 0)
    src, wt, kk = src[keep], wt[keep], kk[keep]
    order = np.argsort(src, kind="stable")
    src, wt, kk = src[order], wt[order], kk[order]
    counts = np.bincount(src, minlength=n_src) if src.size else np.zeros(n_src, np.int64)
    deg = int(counts.max()) if n_src and src.size else 0
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n_src else np.zeros(0, np.int64)
    ell_k = np.full((n_src, max(deg, 1)), -1, dtype=np.int32)
    ell_w = np.zeros((n_src, max(deg, 1)), dtype=np.float32)
    if src.size:
        slot = np.arange(src.size) - start[src]
        ell_k[src, slot] = kk
        ell_w[src, slot] = wt
    return ell_k, ell_w, deg


class Plan:
    """Host arrays and (lazily) device tensors of one batch's plan.

    idx (K, 4) int32 / lam (K, 4) fp32: forward taps per output token (image stream first, then video).
    ell_k / ell_w (n_src, deg): transposed plan for the backward: for each source row the output tokens it feeds and
    the weight (fp32 product h * w), padded with k = -1; each source row's gradient is written by one program.
    nl_k: output tokens that are newlines (for the newline gradient).
    """

    def __init__(self, idx, lam, k_img, k_vid, n_img_rows, n_vid_rows):
        self.k_img, self.k_vid = int(k_img), int(k_vid)
        self.k = self.k_img + self.k_vid
        self.n_img_rows, self.n_vid_rows = int(n_img_rows), int(n_vid_rows)
        n_src = self.n_img_rows + self.n_vid_rows
        # every output token a plain copy of one source row (or a newline): the forward kernel's COPY variant
        self.copy_only = _all_copies(idx, lam)
        ell = _copy_only_ell(idx, lam, n_src)
        if ell is not None:
            ell_k, ell_w, self.deg = ell
        else:
            ell_k, ell_w, self.deg = _general_ell(idx, lam, n_src)
        nl_k = np.nonzero(idx[:, 0] < 0)[0].astype(np.int32)
        self.n_nl = int(nl_k.size)
        parts = [idx.astype(np.int32).reshape(-1), lam.astype(np.float32).view(np.int32).reshape(-1),
                 ell_k.reshape(-1), ell_w.view(np.int32).reshape(-1), nl_k]
        self._sizes = [p.size for p in parts]
        self.host = np.ascontiguousarray(np.concatenate(parts))
        self.ell_cols = max(self.deg, 1)
        self._dev: dict = {}

    def tensors(self, device: torch.device):
        """(idx, lam, ell_k, ell_w, nl_k) on ``device``: one non-blocking host-to-device copy per (plan, device)."""
        key = str(device)
        if key not in self._dev:
            buf = torch.from_numpy(self.host)
            if device.type != "cpu":
                buf = buf.to(device, non_blocking=True)  # pageable source: staged, no stream synchronisation
            views, o = [], 0
            for n in self._sizes:
                views.append(buf[o:o + n])
                o += n
            idx, lam, ell_k, ell_w, nl_k = views
            self._dev[key] = (idx.view(-1, 4), lam.view(torch.float32).view(-1, 4),
                              ell_k.view(-1, self.ell_cols), ell_w.view(torch.float32).view(-1, self.ell_cols), nl_k)
        return self._dev[key]


_PLAN_CACHE: "OrderedDict[tuple, Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 64


def build_plan(image_meta: Optional[Sequence], pinpoints: Optional[Sequence], tile: int, t: int,
               max_tiles: Optional[int], has_newline: bool, n_videos: int = 0, frames: int = 0) -> Plan:
    """The plan of one batch from host data only. ``image_meta``: per image (height, width, single_tile).
    Cached per argument tuple (LRU of 64 batches; per-image pieces have their own cache)."""
    meta = tuple((int(a), int(b), bool(c)) for a, b, c in (image_meta or ()))
    pins = tuple((int(p[0]), int(p[1])) for p in pinpoints) if pinpoints is not None else None
    key = (meta, pins, int(tile), int(t), max_tiles, bool(has_newline), int(n_videos), int(frames))
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    idxs, lams, off = [], [], 0
    for h, w, single in meta:
        if not single and pins is None:
            raise ValueError("image_grid_pinpoints (pinpoints) is None but an image is not single-tile; pass the "
                             "model's image_grid_pinpoints for LLaVA-NeXT / OneVision AnyRes images")
        idx, lam, n = _image_plan(h, w, single, pins, tile, t, max_tiles, has_newline)
        idxs.append(np.where(idx >= 0, idx + off, -1))
        lams.append(lam)
        off += n * t * t
    n_img_rows, k_img = off, sum(i.shape[0] for i in idxs)
    if n_videos:
        vidx, vlam = _video_plan(frames, t, has_newline)
        for v in range(n_videos):
            idxs.append(np.where(vidx >= 0, vidx + off + v * frames * t * t, -1))
            lams.append(vlam)
    k_vid = sum(i.shape[0] for i in idxs) - k_img
    idx = np.concatenate(idxs) if idxs else np.zeros((0, 4), np.int64)
    lam = np.concatenate(lams) if lams else np.zeros((0, 4), np.float32)
    plan = Plan(idx, lam, k_img, k_vid, n_img_rows, n_videos * frames * t * t)
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _load_src(IMG, VID, r, n_img_rows, stride_img, stride_vid, offs_d, dmask, HAS_VID: tl.constexpr):
        """Rows ``r`` (concatenated source numbering; r < 0 -> 0) of the image / video features, in the features'
        dtype (image and video features have one dtype: ``_check``)."""
        ok = r >= 0
        in_img = ok & (r < n_img_rows)
        x = tl.load(IMG + r.to(tl.int64)[:, None] * stride_img + offs_d[None, :],
                    mask=in_img[:, None] & dmask[None, :], other=0.0)
        if HAS_VID:
            in_vid = ok & (r >= n_img_rows)
            xv = tl.load(VID + (r - n_img_rows).to(tl.int64)[:, None] * stride_vid + offs_d[None, :],
                         mask=in_vid[:, None] & dmask[None, :], other=0.0)
            x = tl.where(in_vid[:, None], xv.to(IMG.dtype.element_ty), x)
        return x

    @triton.jit
    def _token_index_kernel(IDS, KIDX, OK, n, img_id, vid_id, k_img, k_vid,
                            DO_IMG: tl.constexpr, DO_VID: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # k of every position (image stream, then video stream; -1 for text) in ONE launch: program p counts the
        # placeholders in [0, p*BLOCK) itself (re-reading at most n ids in CHUNK-wide vector loads: ids are small
        # and L2-resident), then a local cumsum. The last program writes OK = (counts == number of features).
        pid = tl.program_id(0)
        start = pid * BLOCK
        acc_i = tl.zeros((CHUNK,), dtype=tl.int32)
        acc_v = tl.zeros((CHUNK,), dtype=tl.int32)
        for s in range(0, start, CHUNK):
            offs = s + tl.arange(0, CHUNK)
            m = offs < start
            ids = tl.load(IDS + offs, mask=m, other=0)
            if DO_IMG:
                acc_i += ((ids == img_id) & m).to(tl.int32)
            if DO_VID:
                acc_v += ((ids == vid_id) & m).to(tl.int32)
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        ids = tl.load(IDS + offs, mask=m, other=0)
        k = tl.full((BLOCK,), -1, dtype=tl.int32)
        ok = True
        if DO_IMG:
            mi = ((ids == img_id) & m).to(tl.int32)
            before = tl.sum(acc_i, axis=0)
            k = tl.where(mi > 0, before + tl.cumsum(mi, 0) - 1, k)
            ok = ok & (before + tl.sum(mi, axis=0) == k_img)
        if DO_VID:
            mv = ((ids == vid_id) & m).to(tl.int32)
            before_v = tl.sum(acc_v, axis=0)
            k = tl.where(mv > 0, k_img + before_v + tl.cumsum(mv, 0) - 1, k)
            ok = ok & (before_v + tl.sum(mv, axis=0) == k_vid)
        tl.store(KIDX + offs, k, mask=m)
        if pid == tl.num_programs(0) - 1:
            tl.store(OK, ok.to(tl.int32))

    @triton.jit
    def _pack_scatter_fwd_kernel(EMB, OUT, KIDX, POS_OF_K, IMG, VID, NL, PIDX, PLAM,
                                 n_pos, D, K, n_img_rows, stride_emb, stride_out, stride_img, stride_vid,
                                 HAS_VID: tl.constexpr, HAS_NL: tl.constexpr, COPY: tl.constexpr,
                                 BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: BLOCK_P sequence positions x BLOCK_D channels. Text positions (k < 0) copy inputs_embeds;
        # image/video positions evaluate plan entry k; feature rows a position does not need are never loaded.
        # COPY (every plan entry a copy or a newline: NeXT, LLaVA-1.5, OneVision without anyres_max reduction): one
        # tap, no weights, the row moved in its own dtype (the general path's fp32 round trip of a copy is exact too:
        # the same bits, fewer loads and registers).
        pid_p = tl.program_id(0)
        pid_d = tl.program_id(1)
        pos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        pmask = pos < n_pos
        dmask = offs_d < D
        pos64 = pos.to(tl.int64)
        k = tl.load(KIDX + pos, mask=pmask, other=-1)
        feat = pmask & (k >= 0) & (k < K)
        text = pmask & (k < 0)
        emb = tl.load(EMB + pos64[:, None] * stride_emb + offs_d[None, :], mask=text[:, None] & dmask[None, :],
                      other=0.0)
        k4 = k.to(tl.int64) * 4
        i00 = tl.load(PIDX + k4 + 0, mask=feat, other=-1)
        if COPY:
            val = _load_src(IMG, VID, i00, n_img_rows, stride_img, stride_vid, offs_d, dmask, HAS_VID)
        else:
            i01 = tl.load(PIDX + k4 + 1, mask=feat, other=-1)
            i10 = tl.load(PIDX + k4 + 2, mask=feat, other=-1)
            i11 = tl.load(PIDX + k4 + 3, mask=feat, other=-1)
            h0 = tl.load(PLAM + k4 + 0, mask=feat, other=0.0)[:, None]
            h1 = tl.load(PLAM + k4 + 1, mask=feat, other=0.0)[:, None]
            w0 = tl.load(PLAM + k4 + 2, mask=feat, other=0.0)[:, None]
            w1 = tl.load(PLAM + k4 + 3, mask=feat, other=0.0)[:, None]
            x00 = _load_src(IMG, VID, i00, n_img_rows, stride_img, stride_vid, offs_d, dmask, HAS_VID).to(tl.float32)
            x01 = _load_src(IMG, VID, i01, n_img_rows, stride_img, stride_vid, offs_d, dmask, HAS_VID).to(tl.float32)
            x10 = _load_src(IMG, VID, i10, n_img_rows, stride_img, stride_vid, offs_d, dmask, HAS_VID).to(tl.float32)
            x11 = _load_src(IMG, VID, i11, n_img_rows, stride_img, stride_vid, offs_d, dmask, HAS_VID).to(tl.float32)
            # PyTorch's upsample_bilinear2d order; a copy (lam = 1, 0, 1, 0, missing taps = 0) returns x00 exactly
            acc = h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)
            val = acc.to(IMG.dtype.element_ty)  # the reference interpolates in the feature dtype
        if HAS_NL:
            nl = tl.load(NL + offs_d, mask=dmask, other=0.0).to(IMG.dtype.element_ty)
            is_nl = feat & (i00 < 0)
            val = tl.where(is_nl[:, None], nl[None, :], val)
        out = tl.where(feat[:, None], val.to(OUT.dtype.element_ty), emb.to(OUT.dtype.element_ty))
        tl.store(OUT + pos64[:, None] * stride_out + offs_d[None, :], out, mask=pmask[:, None] & dmask[None, :])
        if pid_d == 0:  # k -> sequence position, for the backward
            tl.store(POS_OF_K + k, pos, mask=feat)

    @triton.jit
    def _pack_scatter_bwd_kernel(DOUT, KIDX, POS_OF_K, ELL_K, ELL_W, NL_K, DIMG, DVID, DEMB, DNL,
                                 n_src, n_img_rows, D, n_pos, deg, n_nl, emb_start, nl_start,
                                 stride_dout, stride_dimg, stride_dvid, stride_demb,
                                 HAS_VID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # Every gradient of the op in ONE launch (session 23; before: this gather, then torch's masked_fill and a
        # five-op newline sum), by program ranges along axis 0:
        #   [0, emb_start)          source rows: d_image_features / d_video_features (the gather below);
        #   [emb_start, nl_start)   sequence positions: d_inputs_embeds = dout with image/video positions zeroed;
        #   nl_start                the newline gradient: sum of dout over the newline positions.
        # A range the caller does not need is empty (its start equals the next one's); axis 1 splits D.
        pid_r = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        if pid_r >= nl_start:
            # fixed order (row blocks, then a tree over the block's rows), fp32: deterministic
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            for i in range(0, n_nl, BLOCK_R):
                j = i + tl.arange(0, BLOCK_R)
                kk = tl.load(NL_K + j, mask=j < n_nl, other=-1)
                ok = (kk >= 0) & (kk < n_pos)
                p = tl.load(POS_OF_K + kk, mask=ok, other=-1)
                ok = ok & (p >= 0) & (p < n_pos)
                acc += tl.load(DOUT + p.to(tl.int64)[:, None] * stride_dout + offs_d[None, :],
                               mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            tl.store(DNL + offs_d, tl.sum(acc, axis=0).to(DNL.dtype.element_ty), mask=dmask)
        elif pid_r >= emb_start:
            # masked_scatter's backward (masked_fill(mask, 0)): the same bits, in dout's dtype
            pos = (pid_r - emb_start) * BLOCK_R + tl.arange(0, BLOCK_R)
            pmask = pos < n_pos
            pos64 = pos.to(tl.int64)
            k = tl.load(KIDX + pos, mask=pmask, other=0)
            g = tl.load(DOUT + pos64[:, None] * stride_dout + offs_d[None, :],
                        mask=(pmask & (k < 0))[:, None] & dmask[None, :], other=0.0)
            tl.store(DEMB + pos64[:, None] * stride_demb + offs_d[None, :], g.to(DEMB.dtype.element_ty),
                     mask=pmask[:, None] & dmask[None, :])
        else:
            # Gather form of the scatter-add: each source row sums weight * dout over the output tokens it feeds
            # (the transposed plan), in a fixed order, in fp32: deterministic, no atomics. Unused rows (unpadded
            # away) get 0.
            r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = r < n_src
            r64 = r.to(tl.int64)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            for j in range(0, deg):
                kk = tl.load(ELL_K + r64 * deg + j, mask=rmask, other=-1)
                w = tl.load(ELL_W + r64 * deg + j, mask=rmask, other=0.0)
                ok = (kk >= 0) & (kk < n_pos)
                p = tl.load(POS_OF_K + kk, mask=ok, other=0)
                ok = ok & (p >= 0) & (p < n_pos)
                g = tl.load(DOUT + p.to(tl.int64)[:, None] * stride_dout + offs_d[None, :],
                            mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                acc += w[:, None] * g
            in_img = rmask & (r < n_img_rows)
            tl.store(DIMG + r64[:, None] * stride_dimg + offs_d[None, :], acc.to(DIMG.dtype.element_ty),
                     mask=in_img[:, None] & dmask[None, :])
            if HAS_VID:
                in_vid = rmask & (r >= n_img_rows)
                tl.store(DVID + (r64 - n_img_rows)[:, None] * stride_dvid + offs_d[None, :],
                         acc.to(DVID.dtype.element_ty), mask=in_vid[:, None] & dmask[None, :])


# --------------------------------------------------------------------------------------------------------------------
# 3. launchers
# --------------------------------------------------------------------------------------------------------------------
def _guard(device: torch.device):
    return _ext.device_guard(device)


def _pins_from_flat(flat: Sequence[int]):
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)] if len(flat) else None


def _plan_for(image_meta: Optional[torch.Tensor], pinpoints_flat, tile, t, max_tiles, has_nl, n_videos, frames):
    """build_plan from the custom ops' arguments, through a first-level cache keyed by those arguments as they come
    (flat ints): build_plan's own key re-tuples every pinpoint pair (OneVision has 36), ~15 us per call on the dev
    CPU, twice per forward + backward."""
    flat = tuple(image_meta.reshape(-1).tolist()) if image_meta is not None else ()
    return _plan_cached(flat, tuple(pinpoints_flat), tile, t, max_tiles, has_nl, n_videos, frames)


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def _plan_cached(flat: tuple, pinpoints_flat: tuple, tile, t, max_tiles, has_nl, n_videos, frames) -> Plan:
    meta = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    return build_plan(meta, _pins_from_flat(pinpoints_flat), tile, t, max_tiles if max_tiles > 0 else None, has_nl,
                      n_videos, frames)


def _count_error(what: str, token_id: int, n_tokens, n_feats: int) -> str:
    return (f"{what} features and {what.lower()} tokens do not match: input_ids holds {n_tokens} {what.lower()} "
            f"tokens (id {token_id}) but the {what.lower()}s give {n_feats} features. Each <{what.lower()}> "
            f"placeholder must be expanded to exactly the number of tokens its {what.lower()} produces "
            f"(llava_fast.ops.anyres.num_image_tokens), and truncation must not cut them.")


def _device_count_error(streams) -> str:
    """The device-side assert's message: CUDA limits it to 254 characters, so the short form of _count_error."""
    msg = " / ".join(f"input_ids must hold {kn} {w.lower()} tokens (id {tok}), one per {w.lower()} feature"
                     for w, tok, kn in streams)
    msg += "; expand each placeholder with llava_fast.ops.anyres.num_image_tokens and do not truncate"
    return msg if len(msg) < 255 else msg[:251] + "..."


def token_index(input_ids: torch.Tensor, device: torch.device, image_token_id: int, k_img: int,
                video_token_id: Optional[int], k_vid: int, check_images: bool, check_videos: bool,
                on_device: Optional[bool] = None) -> torch.Tensor:
    """int32 (B*L,) on ``device``: for each position its output token k (image stream 0..k_img-1, video stream
    k_img..), -1 for text, in batch-major order (masked_scatter's). Token counts are checked here:

    * input_ids on the CPU (the data pipeline's copy): torch on the host, exact check with a ValueError, then one
      non-blocking host-to-device copy;
    * input_ids on the GPU (``on_device``; tests force it on CPU tensors): one Triton launch computes k and a flag,
      and ``torch._assert_async(flag)`` checks it without a host sync: a mismatch is a device-side assert reported at
      the next synchronisation (and, as every device assert, it ends the CUDA context). Whatever the counts, the
      packing kernel never reads or writes out of bounds (k >= number of features is treated as text)."""
    ids = input_ids.reshape(-1)
    if on_device is None:
        on_device = ids.device.type != "cpu"
    n = ids.numel()
    streams = []
    if check_images:
        streams.append(("Image", image_token_id, k_img))
    if check_videos:
        streams.append(("Video", video_token_id, k_vid))
    if not streams:
        return torch.full((n,), -1, dtype=torch.int32, device=device)
    if on_device and n > 0 and HAS_TRITON:
        kidx = torch.empty((n,), dtype=torch.int32, device=ids.device)
        ok = torch.empty((1,), dtype=torch.int32, device=ids.device)
        block = 1024
        with _guard(ids.device):
            _ext.launch(_token_index_kernel, (_ext.cdiv(n, block),),
                        ids, kidx, ok, n, image_token_id if check_images else 0,
                        video_token_id if check_videos else 0, k_img, k_vid,
                        DO_IMG=check_images, DO_VID=check_videos, BLOCK=block, CHUNK=4 * block, num_warps=4)
        torch._assert_async(ok, _device_count_error(streams))
        return kidx if kidx.device == device else kidx.to(device, non_blocking=True)
    ids = ids.cpu() if on_device else ids  # (n == 0 or no Triton)
    kidx = torch.full(ids.shape, -1, dtype=torch.int32, device=ids.device)
    base = 0
    for what, tok, kn in streams:
        m = ids == tok
        c = torch.cumsum(m, 0, dtype=torch.int32)
        total = int(c[-1]) if n else 0
        if total != kn:
            raise ValueError(_count_error(what, tok, total, kn))
        kidx = torch.where(m, c + (base - 1), kidx)
        base += kn
    if kidx.device != device:
        kidx = kidx.to(device, non_blocking=True)  # pageable source: staged by the driver, no stream sync
    return kidx


def _copy_variant(plan: Plan) -> bool:
    """The forward kernel's COPY variant for plans without bilinear taps (session 16; ``LLAVA_FAST_PACK_COPY=0``
    runs the general one, bench_pack_features' ``llava_fast_general`` row)."""
    return plan.copy_only and _ext.env_choice("LLAVA_FAST_PACK_COPY", ("0", "1"), "1") == "1"


def _fwd_config(d: int):
    block_d = min(512, _ext.next_power_of_2(max(d, 1)))
    block_p = max(1, 4096 // block_d)
    return block_p, block_d, 4


def _bwd_config(d: int):
    """(BLOCK_R, BLOCK_D) of the backward kernel: rows per program in each of its ranges, channels per program."""
    block_d = min(512, _ext.next_power_of_2(max(d, 1)))
    return max(1, 4096 // block_d), block_d


def pack_scatter_fwd(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: Optional[torch.Tensor],
                     image_meta: Optional[torch.Tensor], image_newline: Optional[torch.Tensor],
                     video_features: Optional[torch.Tensor], pinpoints_flat: Sequence[int], tile: int,
                     max_tiles: int, image_token_id: int, video_token_id: int):
    """Launch the forward kernel. Returns ``(out (B, L, D), kidx int32 (B*L,), pos_of_k int32 (B*L,))``.

    image_features (tiles, t*t, D); image_meta int64 CPU (N, 3) = (height, width, single_tile) per image;
    video_features (videos, frames, t*t, D); pinpoints_flat = [h0, w0, h1, w1, ...]; max_tiles 0 = no anyres_max;
    video_token_id ``_NO_TOKEN`` when there is no video."""
    b, l, d = inputs_embeds.shape
    dev = inputs_embeds.device
    src = image_features if image_features is not None else video_features
    t = int(math.isqrt(src.shape[-2]))
    has_img, has_vid = image_features is not None, video_features is not None
    n_videos, frames = (video_features.shape[0], video_features.shape[1]) if has_vid else (0, 0)
    plan = _plan_for(image_meta if has_img else None, pinpoints_flat, tile, t, max_tiles, image_newline is not None,
                     n_videos, frames)
    if has_img and plan.n_img_rows != image_features.shape[0] * t * t:
        raise ValueError(f"image_features holds {image_features.shape[0]} tiles but image_sizes need "
                         f"{plan.n_img_rows // (t * t)} (base + AnyRes grid per image, 1 per single-tile image); "
                         f"pixel_values, image_sizes and single_tile must describe the same images")
    kidx = token_index(input_ids, dev, image_token_id, plan.k_img, video_token_id if has_vid else None, plan.k_vid,
                       has_img, has_vid)
    emb = inputs_embeds.reshape(b * l, d)
    if emb.stride(-1) != 1:
        emb = emb.contiguous()
    out = torch.empty((b * l, d), dtype=inputs_embeds.dtype, device=dev)
    pos_of_k = torch.empty((b * l,), dtype=torch.int32, device=dev)
    img = image_features.reshape(-1, d).contiguous() if has_img else None
    vid = video_features.reshape(-1, d).contiguous() if has_vid else None
    # the kernel's first source pointer holds rows [0, n_first), the second the rest (video after images)
    first = img if has_img else vid
    second = vid if (has_img and has_vid) else first
    nl = image_newline.contiguous() if image_newline is not None else first
    if b * l > 0 and d > 0:
        pidx, plam, _, _, _ = plan.tensors(dev)
        block_p, block_d, warps = _fwd_config(d)
        grid = (_ext.cdiv(b * l, block_p), _ext.cdiv(d, block_d))
        with _guard(dev):
            _ext.launch(_pack_scatter_fwd_kernel, grid,
                        emb, out, kidx, pos_of_k, first, second, nl, pidx, plam, b * l, d, plan.k, first.shape[0],
                        emb.stride(0), out.stride(0), first.stride(0), second.stride(0),
                        HAS_VID=has_img and has_vid, HAS_NL=image_newline is not None, COPY=_copy_variant(plan),
                        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps)
    return out.view(b, l, d), kidx, pos_of_k


def pack_scatter_bwd(grad_out: torch.Tensor, kidx: torch.Tensor, pos_of_k: torch.Tensor,
                     image_meta: Optional[torch.Tensor], pinpoints_flat: Sequence[int], tile: int, t: int,
                     max_tiles: int, n_img_tiles: int, n_videos: int, frames: int, has_nl: bool,
                     img_dtype: torch.dtype, vid_dtype: torch.dtype, nl_dtype: torch.dtype,
                     need_img: bool, need_vid: bool, need_nl: bool, need_emb: bool):
    """Gradients ``(d_image_features, d_video_features, d_image_newline, d_inputs_embeds)``; an empty tensor for
    each one not asked for; all of them by one launch. Features: deterministic gather over the transposed plan (fp32
    sums, one program per source row block); newline: fp32 sum of the output gradient at newline tokens; embeddings:
    the output gradient with image/video positions zeroed (masked_scatter's backward, the same bits)."""
    b, l, d = grad_out.shape
    dev = grad_out.device
    n_pos = b * l
    plan = _plan_for(image_meta, pinpoints_flat, tile, t, max_tiles, has_nl, n_videos, frames)
    g2 = grad_out.reshape(n_pos, d)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()

    def empty():  # a distinct tensor per output (custom op outputs must not alias each other)
        return grad_out.new_empty(0)

    need_feat = need_img or need_vid
    # both feature streams are computed when either is asked for (one program range; the other is small or absent)
    d_img = torch.empty((plan.n_img_rows, d), dtype=img_dtype, device=dev) if need_feat else None
    d_vid = torch.empty((plan.n_vid_rows, d), dtype=vid_dtype, device=dev) if need_feat else None
    d_emb = torch.empty((n_pos, d), dtype=grad_out.dtype, device=dev) if need_emb else None
    d_nl = torch.empty((d,), dtype=nl_dtype, device=dev) if need_nl else None
    if d > 0 and ((need_feat and plan.n_img_rows + plan.n_vid_rows) or (need_emb and n_pos) or need_nl):
        _, _, ell_k, ell_w, nl_k = plan.tensors(dev)
        block_r, block_d = _bwd_config(d)
        n_src = plan.n_img_rows + plan.n_vid_rows if need_feat else 0
        emb_start = _ext.cdiv(n_src, block_r)
        nl_start = emb_start + (_ext.cdiv(n_pos, block_r) if need_emb else 0)
        grid = (nl_start + (1 if need_nl else 0), _ext.cdiv(d, block_d))
        # the kernel's first feature pointer holds rows [0, n_img_rows), the second the rest (video after images);
        # pointers of ranges not launched are never read: g2 stands in for them
        first, second = (g2, g2) if not need_feat else (d_img, d_vid) if plan.n_img_rows else (d_vid, d_vid)
        with _guard(dev):
            _ext.launch(_pack_scatter_bwd_kernel, grid,
                        g2, kidx, pos_of_k, ell_k, ell_w, nl_k, first, second,
                        g2 if d_emb is None else d_emb, g2 if d_nl is None else d_nl,
                        n_src, first.shape[0], d, n_pos, plan.ell_cols, plan.n_nl, emb_start, nl_start,
                        g2.stride(0), first.stride(0), second.stride(0), d,
                        HAS_VID=need_feat and plan.n_img_rows > 0 and plan.n_vid_rows > 0, BLOCK_R=block_r,
                        BLOCK_D=block_d, num_warps=4)
    return (d_img.view(n_img_tiles, t * t, d) if need_img else empty(),
            d_vid.view(n_videos, frames, t * t, d) if need_vid else empty(),
            d_nl if need_nl else empty(),
            d_emb.view(b, l, d) if need_emb else empty())


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops (opaque to torch.compile; the plan is built inside from the CPU image_meta tensor, so
#    new image sizes do not recompile a compiled caller that passes image_sizes as a CPU tensor)
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::pack_scatter_fwd", mutates_args=())
def _pack_scatter_fwd_op(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: Optional[torch.Tensor],
                         image_meta: Optional[torch.Tensor], image_newline: Optional[torch.Tensor],
                         video_features: Optional[torch.Tensor], pinpoints_flat: List[int], tile: int, max_tiles: int,
                         image_token_id: int, video_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pack_scatter_fwd(inputs_embeds, input_ids, image_features, image_meta, image_newline, video_features,
                            pinpoints_flat, tile, max_tiles, image_token_id, video_token_id)


@_pack_scatter_fwd_op.register_fake
def _(inputs_embeds, input_ids, image_features, image_meta, image_newline, video_features, pinpoints_flat, tile,
      max_tiles, image_token_id, video_token_id):
    n = inputs_embeds.shape[0] * inputs_embeds.shape[1]
    return (torch.empty_like(inputs_embeds, memory_format=torch.contiguous_format),
            inputs_embeds.new_empty((n,), dtype=torch.int32), inputs_embeds.new_empty((n,), dtype=torch.int32))


@_ext.custom_op("llava_fast::pack_scatter_bwd", mutates_args=())
def _pack_scatter_bwd_op(grad_out: torch.Tensor, kidx: torch.Tensor, pos_of_k: torch.Tensor,
                         image_meta: Optional[torch.Tensor], pinpoints_flat: List[int], tile: int, t: int,
                         max_tiles: int, n_img_tiles: int, n_videos: int, frames: int, has_nl: bool,
                         img_dtype: torch.dtype, vid_dtype: torch.dtype, nl_dtype: torch.dtype, need_img: bool,
                         need_vid: bool, need_nl: bool,
                         need_emb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return pack_scatter_bwd(grad_out, kidx, pos_of_k, image_meta, pinpoints_flat, tile, t, max_tiles, n_img_tiles,
                            n_videos, frames, has_nl, img_dtype, vid_dtype, nl_dtype, need_img, need_vid, need_nl,
                            need_emb)


@_pack_scatter_bwd_op.register_fake
def _(grad_out, kidx, pos_of_k, image_meta, pinpoints_flat, tile, t, max_tiles, n_img_tiles, n_videos, frames, has_nl,
      img_dtype, vid_dtype, nl_dtype, need_img, need_vid, need_nl, need_emb):
    d = grad_out.shape[-1]

    def e():   # a distinct tensor per output, as the real op returns (one shared empty made the outputs alias)
        return grad_out.new_empty(0)
    return (grad_out.new_empty((n_img_tiles, t * t, d), dtype=img_dtype) if need_img else e(),
            grad_out.new_empty((n_videos, frames, t * t, d), dtype=vid_dtype) if need_vid else e(),
            grad_out.new_empty((d,), dtype=nl_dtype) if need_nl else e(),
            torch.empty_like(grad_out, memory_format=torch.contiguous_format) if need_emb else e())


# --------------------------------------------------------------------------------------------------------------------
# 5. autograd
# --------------------------------------------------------------------------------------------------------------------
class PackScatterFunction(torch.autograd.Function):
    """out = pack_and_scatter(...) on the Triton path. Differentiable in inputs_embeds, image_features,
    image_newline and video_features (4-D). Non-tensor configuration is passed through unchanged."""

    @staticmethod
    def forward(ctx, inputs_embeds, image_features, image_newline, video_features, input_ids, image_meta,
                pinpoints_flat, tile, max_tiles, image_token_id, video_token_id):
        out, kidx, pos_of_k = _pack_scatter_fwd_op(
            inputs_embeds, input_ids, image_features, image_meta, image_newline, video_features, pinpoints_flat,
            tile, max_tiles, image_token_id, video_token_id)
        ctx.save_for_backward(kidx, pos_of_k, image_meta)
        src = image_features if image_features is not None else video_features
        ctx.cfg = dict(pinpoints_flat=list(pinpoints_flat), tile=tile, t=int(math.isqrt(src.shape[-2])),
                       max_tiles=max_tiles,
                       n_img_tiles=image_features.shape[0] if image_features is not None else 0,
                       n_videos=video_features.shape[0] if video_features is not None else 0,
                       frames=video_features.shape[1] if video_features is not None else 0,
                       has_nl=image_newline is not None,
                       img_dtype=src.dtype if image_features is None else image_features.dtype,
                       vid_dtype=src.dtype if video_features is None else video_features.dtype,
                       nl_dtype=image_newline.dtype if image_newline is not None else src.dtype)
        ctx.has = (image_features is not None, image_newline is not None, video_features is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kidx, pos_of_k, image_meta = ctx.saved_tensors
        need_emb, need_img, need_nl, need_vid = ctx.needs_input_grad[:4]
        has_img, has_nl, has_vid = ctx.has
        c = ctx.cfg
        d_img, d_vid, d_nl, d_emb = _pack_scatter_bwd_op(
            grad_out, kidx, pos_of_k, image_meta if has_img else None, c["pinpoints_flat"], c["tile"], c["t"],
            c["max_tiles"], c["n_img_tiles"], c["n_videos"], c["frames"], c["has_nl"], c["img_dtype"],
            c["vid_dtype"], c["nl_dtype"], bool(need_img and has_img), bool(need_vid and has_vid),
            bool(need_nl and has_nl), bool(need_emb))
        grads = ((d_emb if need_emb else None), (d_img if need_img and has_img else None),
                 (d_nl if need_nl and has_nl else None), (d_vid if need_vid and has_vid else None),
                 None, None, None, None, None, None, None)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: the kernel's results have no graph
            grads = _ext.not_differentiable_again(grads, (grad_out,), "pack_and_scatter")
        return grads


# --------------------------------------------------------------------------------------------------------------------
# 6. functional
# --------------------------------------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _as_meta(image_sizes, single_tile, n_images: Optional[int], pinpoints) -> torch.Tensor:
    """(N, 3) int64 CPU tensor (height, width, single_tile). image_sizes: list of (h, w) or an (N, 2) tensor (a GPU
    tensor is copied to the host: that synchronises; pass the CPU copy from the data pipeline)."""
    if image_sizes is None:
        if pinpoints is not None:
            raise ValueError("pack_and_scatter: image_sizes (N, 2) as (height, width) is required for AnyRes "
                             "(pinpoints given)")
        if n_images is None:
            raise ValueError("pack_and_scatter: image_sizes is None and the number of images is unknown")
        sizes = torch.zeros((n_images, 2), dtype=torch.int64)
    elif torch.is_tensor(image_sizes):
        if image_sizes.dim() > 2 or (image_sizes.numel() and image_sizes.shape[-1] != 2):
            raise ValueError(f"pack_and_scatter: image_sizes must be an (N, 2) (height, width) tensor, got shape "
                             f"{tuple(image_sizes.shape)}")
        sizes = image_sizes.detach().to("cpu", torch.int64)
    else:
        try:
            pairs = [(int(s[0]), int(s[1])) for s in image_sizes]
        except Exception as e:
            raise ValueError(f"pack_and_scatter: image_sizes must be (N, 2) (height, width) pairs, got "
                             f"{image_sizes!r}") from e
        # Python flags too (the common case): the (N, 3) tensor in one host op, part of every call's host time
        flags = None
        if pinpoints is None or single_tile is None:
            flags = [int(pinpoints is None)] * len(pairs)
        elif isinstance(single_tile, (list, tuple)) and all(isinstance(f, (bool, int)) for f in single_tile):
            flags = [int(bool(f)) for f in single_tile]
        if flags is not None and len(flags) == len(pairs):
            return torch.tensor([(h, w, f) for (h, w), f in zip(pairs, flags)], dtype=torch.int64).reshape(-1, 3)
        sizes = torch.tensor(pairs, dtype=torch.int64)
    sizes = sizes.reshape(-1, 2) if sizes.numel() else sizes.reshape(0, 2)
    n = sizes.shape[0]
    if pinpoints is None:
        single = torch.ones((n,), dtype=torch.int64)
    elif single_tile is None:
        single = torch.zeros((n,), dtype=torch.int64)
    else:
        single = torch.as_tensor(single_tile).detach().to("cpu", torch.int64).reshape(-1)
        if single.numel() != n:
            raise ValueError(f"pack_and_scatter: single_tile has {single.numel()} entries but image_sizes "
                             f"{n} images; give one flag per image")
    # values (positive sizes, tile counts) are checked where the plan is built, inside the op: no data-dependent
    # Python here, so a torch.compile'd caller with a CPU image_sizes tensor traces without graph breaks
    return torch.cat([sizes, single[:, None]], dim=1).contiguous()


def _tile_counts(meta: torch.Tensor, pinpoints, tile) -> list[int]:
    return [1 if s else anyres.num_tiles((h, w), pinpoints, tile) for h, w, s in meta.tolist()]


def _check(inputs_embeds, input_ids, image_features, image_newline, video_features, image_token_id,
           video_token_id, pinpoints, tile, max_tiles=None):
    if not torch.is_tensor(inputs_embeds) or inputs_embeds.dim() != 3 or inputs_embeds.dtype not in _FLOATS:
        raise ValueError(f"pack_and_scatter: inputs_embeds must be a float32/float16/bfloat16 (batch, seq, hidden) "
                         f"tensor (packed sequences: (1, total, hidden)), got "
                         f"{getattr(inputs_embeds, 'dtype', type(inputs_embeds))} "
                         f"{tuple(getattr(inputs_embeds, 'shape', ()))}")
    b, l, d = inputs_embeds.shape
    if (not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.int64, torch.int32)
            or tuple(input_ids.shape) != (b, l)):
        raise ValueError(f"pack_and_scatter: input_ids must be an int64/int32 tensor of shape (batch, seq) = "
                         f"{(b, l)} matching inputs_embeds, got {getattr(input_ids, 'dtype', type(input_ids))} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.device != inputs_embeds.device and input_ids.device.type != "cpu":
        raise ValueError(f"pack_and_scatter: input_ids is on {input_ids.device} but inputs_embeds on "
                         f"{inputs_embeds.device}; pass them on one device (or input_ids on the CPU)")
    t = None
    for name, f, dims in (("image_features", image_features, (3,)), ("video_features", video_features, (3, 4))):
        if f is None:
            continue
        if not torch.is_tensor(f) or f.dim() not in dims or f.dtype not in _FLOATS:
            shape = "(tiles, t*t, hidden)" if name == "image_features" else "(videos, frames, t*t, hidden)"
            raise ValueError(f"pack_and_scatter: {name} must be a float {shape} tensor, got "
                             f"{getattr(f, 'dtype', type(f))} {tuple(getattr(f, 'shape', ()))}")
        if f.shape[-1] != d:
            raise ValueError(f"pack_and_scatter: {name} hidden size {f.shape[-1]} != inputs_embeds hidden size {d}; "
                             f"project the vision features first (multi_modal_projector)")
        if f.device != inputs_embeds.device:
            raise ValueError(f"pack_and_scatter: {name} is on {f.device} but inputs_embeds on {inputs_embeds.device}")
        tt = int(math.isqrt(f.shape[-2]))
        if tt * tt != f.shape[-2] or tt == 0:
            raise ValueError(f"pack_and_scatter: {name} has {f.shape[-2]} tokens per tile, not a square number; "
                             f"use vision_feature_select_strategy='default' for CLIP towers (drops CLS)")
        if t is not None and tt != t:
            raise ValueError(f"pack_and_scatter: video_features have {tt}x{tt} tokens per frame but image_features "
                             f"{t}x{t}; both come from the same vision tower")
        t = tt
    if image_features is not None and video_features is not None and image_features.dtype != video_features.dtype:
        raise ValueError(f"pack_and_scatter: image_features ({image_features.dtype}) and video_features "
                         f"({video_features.dtype}) must have one dtype")
    if image_newline is not None:
        if not torch.is_tensor(image_newline) or tuple(image_newline.shape) != (d,):
            raise ValueError(f"pack_and_scatter: image_newline must have shape (hidden,) = ({d},), got "
                             f"{tuple(getattr(image_newline, 'shape', ()))}")
        if image_newline.device != inputs_embeds.device:
            raise ValueError(f"pack_and_scatter: image_newline is on {image_newline.device} but inputs_embeds on "
                             f"{inputs_embeds.device}")
        if image_newline.dtype not in _FLOATS:
            raise ValueError(f"pack_and_scatter: image_newline must be a float tensor, got {image_newline.dtype}")
    if image_features is not None and not isinstance(image_token_id, int):
        raise ValueError(f"pack_and_scatter: image_token_id must be an int, got {image_token_id!r}")
    if video_features is not None and not isinstance(video_token_id, int):
        raise ValueError("pack_and_scatter: video_token_id (an int, 151647 for OneVision) is required with "
                         "video_features")
    if image_features is not None and pinpoints is not None and not isinstance(tile, int):
        raise ValueError(f"pack_and_scatter: tile (tile side in pixels, vision_config.image_size) must be an int "
                         f"with AnyRes pinpoints, got {tile!r}")
    if max_tiles is not None and (not isinstance(max_tiles, int) or max_tiles <= 0):
        raise ValueError(f"pack_and_scatter: max_tiles (N of OneVision's anyres_max_N, 9) must be a positive int or "
                         f"None (no downsampling, NeXT), got {max_tiles!r}")
    return t


def pack_and_scatter_ref(inputs_embeds: torch.Tensor, input_ids: torch.Tensor,
                         image_features: Optional[torch.Tensor] = None, image_sizes=None,
                         image_newline: Optional[torch.Tensor] = None, *, image_token_id: int = -1,
                         pinpoints=None, tile: Optional[int] = None, max_tiles: Optional[int] = None,
                         single_tile=None, video_features: Optional[torch.Tensor] = None,
                         video_token_id: Optional[int] = None) -> torch.Tensor:
    """The reference of :func:`pack_and_scatter`: the three reference functions above, composed as the model does
    (HF-style Python loop over images, then masked_scatter)."""
    t = _check(inputs_embeds, input_ids, image_features, image_newline, video_features, image_token_id,
               video_token_id, pinpoints, tile, max_tiles)
    ids = input_ids.to(inputs_embeds.device)
    out = inputs_embeds
    if image_features is not None:
        meta = _as_meta(image_sizes, single_tile, image_features.shape[0] if image_sizes is None else None, pinpoints)
        counts = _tile_counts(meta, pinpoints, tile)
        if sum(counts) != image_features.shape[0]:
            raise ValueError(f"image_features holds {image_features.shape[0]} tiles but image_sizes need "
                             f"{sum(counts)} (per image: {counts}); pixel_values, image_sizes and single_tile must "
                             f"describe the same images")
        feats = list(torch.split(image_features, counts, dim=0))
        packed = pack_image_features_ref(feats, meta[:, :2].tolist(), image_newline, pinpoints, tile, max_tiles)
        packed = torch.cat(packed, dim=0) if packed else image_features.new_empty((0, image_features.shape[-1]))
        out = scatter_features_ref(out, ids, image_token_id, packed, "Image")
    if video_features is not None:
        v = video_features if video_features.dim() == 4 else video_features[None]
        nv = v.shape[0]
        f = pool_video_features_ref(v.flatten(0, 1), t).reshape(nv, -1, v.shape[-1])
        if image_newline is not None:
            f = torch.cat((f, image_newline[None, None, :].expand(nv, 1, -1).to(f.dtype)), dim=1)
        out = scatter_features_ref(out, ids, video_token_id, f.flatten(0, 1), "Video")
    return out


def pack_and_scatter(inputs_embeds: torch.Tensor, input_ids: torch.Tensor,
                     image_features: Optional[torch.Tensor] = None, image_sizes=None,
                     image_newline: Optional[torch.Tensor] = None, *, image_token_id: int = -1,
                     pinpoints=None, tile: Optional[int] = None, max_tiles: Optional[int] = None,
                     single_tile=None, video_features: Optional[torch.Tensor] = None,
                     video_token_id: Optional[int] = None) -> torch.Tensor:
    """Pack the projected tile features of every image (and video) into LLM tokens and write them into the image
    (video) token positions of ``inputs_embeds``: unpad, one ``image_newline`` per row, OneVision anyres_max_N bilinear
    downsampling, multi-image single tiles (+1 newline), video 2x2 bilinear pooling (+1 newline per video) and the
    masked_scatter, all in one Triton launch with no host synchronisation (on CUDA; the reference elsewhere).

    Args:
        inputs_embeds: ``(B, L, D)`` text embeddings; padded batch or packed ``(1, T, D)``.
        input_ids: ``(B, L)`` int64/int32, placeholders already expanded; on the device or on the CPU (then the
            token counts are checked on the host with a ValueError; on the GPU with a device-side assert).
        image_features: ``(total_tiles, t*t, D)``, tiles of all images in pixel_values order ([base, grid...] per
            AnyRes image, 1 tile per single-tile image).
        image_sizes: ``(N, 2)`` original (height, width) per image: a list or a CPU tensor (a GPU tensor costs a sync).
            None for LLaVA-1.5 (``pinpoints=None``: every tile is one image, no packing).
        image_newline: ``(D,)`` or None (LLaVA-1.5).
        image_token_id, video_token_id: placeholder ids.
        pinpoints: image_grid_pinpoints as (height, width) pairs; None = LLaVA-1.5.
        tile: tile side in pixels (vision_config.image_size).
        max_tiles: OneVision's N of ``anyres_max_N`` (9); None for NeXT.
        single_tile: per-image flags (OneVision multi-image samples: one tile, t*t + 1 tokens); None = all AnyRes.
        video_features: ``(videos, frames, t*t, D)`` or ``(frames, t*t, D)`` (one video).
    Returns:
        ``(B, L, D)`` in inputs_embeds' dtype; gradients flow to inputs_embeds (text positions), image_features,
        image_newline and video_features.
    """
    t = _check(inputs_embeds, input_ids, image_features, image_newline, video_features, image_token_id,
               video_token_id, pinpoints, tile, max_tiles)
    if not (HAS_TRITON and backend.use_fast("pack_features", inputs_embeds.device.type)):
        return pack_and_scatter_ref(inputs_embeds, input_ids, image_features, image_sizes, image_newline,
                                    image_token_id=image_token_id, pinpoints=pinpoints, tile=tile,
                                    max_tiles=max_tiles, single_tile=single_tile, video_features=video_features,
                                    video_token_id=video_token_id)
    if t is None:  # nothing to pack
        return inputs_embeds
    meta = None
    if image_features is not None:
        meta = _as_meta(image_sizes, single_tile, image_features.shape[0] if image_sizes is None else None, pinpoints)
    if video_features is not None and video_features.dim() == 3:
        video_features = video_features[None]
    pins_flat = [int(v) for p in pinpoints for v in (p[0], p[1])] if pinpoints is not None else []
    return PackScatterFunction.apply(
        inputs_embeds, image_features, image_newline, video_features, input_ids, meta, pins_flat,
        int(tile) if tile is not None else 0, int(max_tiles) if max_tiles else 0, int(image_token_id),
        int(video_token_id) if video_token_id is not None else _NO_TOKEN)


if HAS_TRITON:
    backend.register_fast("pack_features", "triton")

__all__ = ["pack_image_features_ref", "pool_video_features_ref", "scatter_features_ref", "pack_and_scatter_ref",
           "build_plan", "token_index", "pack_scatter_fwd", "pack_scatter_bwd", "PackScatterFunction",
           "pack_and_scatter"]
