"""Collators: packed (one row, cu_seqlens, per-sample position ids) and padded (as transformers does it).

Both drop the samples a worker could not decode (``{"dropped": reason, ...}``) and report them in
``batch["dropped"]`` (a dict reason -> count) so the trainer can count and log them.
``batch["num_items"]`` is the number of supervised tokens the loss will average over (labels[1:] != -100 per
sample, as the shifted causal loss counts them).
"""
from __future__ import annotations

from collections import Counter

import torch

from llava_fast.data.templates import IGNORE_INDEX


def _split(samples):
    good, dropped = [], Counter()
    for s in samples:
        if "dropped" in s:
            dropped[s["dropped"]] += 1
        else:
            good.append(s)
    return good, dict(dropped)


def _images(good, out):
    pv = [s["pixel_values"] for s in good if "pixel_values" in s]
    if pv:
        out["pixel_values"] = torch.cat(pv, 0)
        out["image_sizes"] = torch.tensor([hw for s in good for hw in s.get("image_sizes", [])], dtype=torch.long)
        out["num_tiles"] = [n for s in good for n in s.get("num_tiles", [])]
        bni = [n for s in good for n in s.get("batch_num_images", [])]
        if bni:  # OneVision: images per sample (samples with images only), as the model's batch_num_images
            out["batch_num_images"] = torch.tensor(bni, dtype=torch.long)
    vids = [s["pixel_values_videos"] for s in good if "pixel_values_videos" in s]
    if vids:
        if len({v.shape for v in vids}) != 1:
            named = ", ".join(f"{s['sample_id']!r}: {s['pixel_values_videos'].shape[0]}" for s in good
                              if "pixel_values_videos" in s)
            raise ValueError(f"videos of one batch must have the same number of frames, got frames per sample "
                             f"{{{named}}}: set frames_upbound (data.frames_upbound of llava-fast train, LlavaDataset's "
                             f"frames_upbound) to at most the fewest frames of any "
                             f"video, so that every video is sampled to frames_upbound frames")
        out["pixel_values_videos"] = torch.stack(vids)


def _n_sup(labels: torch.Tensor) -> int:
    return int((labels[1:] != IGNORE_INDEX).sum())


def collate_packed(samples: list[dict]) -> dict:
    """Samples back to back in one row: input_ids/labels/position_ids (1, T), cu_seqlens int32 (n+1,)."""
    good, dropped = _split(samples)
    out: dict = {"dropped": dropped, "sample_ids": [s["sample_id"] for s in good]}
    if not good:
        out.update(input_ids=None, num_items=0, num_tokens=0, num_samples=0)
        return out
    lens = [len(s["input_ids"]) for s in good]
    out["input_ids"] = torch.cat([s["input_ids"] for s in good])[None]
    out["labels"] = torch.cat([s["labels"] for s in good])[None]
    out["position_ids"] = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])[None]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    out["cu_seqlens"] = cu
    out["max_seqlen"] = max(lens)
    out["num_items"] = sum(_n_sup(s["labels"]) for s in good)
    out["num_tokens"] = sum(lens)
    out["num_samples"] = len(good)
    _images(good, out)
    return out


def collate_padded(samples: list[dict], pad_id: int = 0, hf_pixel_layout: bool = True) -> dict:
    """Right-padded (B, L) batch with attention_mask; pixel_values in transformers' padded 5-D layout
    (num_images, max_tiles, 3, T, T) when ``hf_pixel_layout`` (AnyRes), else flat tiles."""
    good, dropped = _split(samples)
    out: dict = {"dropped": dropped, "sample_ids": [s["sample_id"] for s in good]}
    if not good:
        out.update(input_ids=None, num_items=0, num_tokens=0, num_samples=0)
        return out
    L = max(len(s["input_ids"]) for s in good)
    B = len(good)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    am = torch.zeros((B, L), dtype=torch.long)
    for b, s in enumerate(good):
        n = len(s["input_ids"])
        ids[b, :n], lab[b, :n], am[b, :n] = s["input_ids"], s["labels"], 1
    out.update(input_ids=ids, labels=lab, attention_mask=am, num_items=sum(_n_sup(s["labels"]) for s in good),
               num_tokens=int(am.sum()), num_samples=B)
    _images(good, out)
    if hf_pixel_layout and "pixel_values" in out and out["num_tiles"] and max(out["num_tiles"]) > 1:
        tiles = out["pixel_values"].split(out["num_tiles"])
        m = max(out["num_tiles"])
        pv = out["pixel_values"].new_zeros((len(tiles), m) + tuple(out["pixel_values"].shape[1:]))
        for i, t in enumerate(tiles):
            pv[i, : t.shape[0]] = t
        out["pixel_values"] = pv
    return out
