"""Packing samples into fixed-size token budgets, and the batch samplers for packed and padded training.

Because every sample's token count is known before loading (text + image tokens from the image header), the packs
are planned up front: best-fit decreasing puts each sample (longest first) into the fullest pack that still has
room for it. On realistic LLaVA length mixes this fills 8k/16k packs to 99%+ (tested >= 97%).

Distribution: the packs of an epoch are grouped into *global steps* of ``world_size * accum`` packs; inside a step
the packs are sorted by size and dealt round-robin, so rank ``r`` gets micro-batches ``r, r + world, ...``. A
single process with ``accum * world_size`` accumulation steps sees exactly the same global batch. With
``drop_last`` (the default when ``world_size > 1``) a partial last step is left out of the epoch; :meth:`left_out`
names its micro-batches so the trainer can count and log them.
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the samples packed into one row whose ``position_ids`` restart at 0 at each
    sample (transformers' padding-free format, e.g. ``DataCollatorWithFlattening``): int32 cumulative lengths on the
    positions' device, and the longest sample, for the model's packed form
    ``model(input_ids, position_ids=..., cu_seqlens=..., max_seqlen=...)``. Reads the positions on the host (one wait
    for a GPU tensor)."""
    pos = position_ids.reshape(-1) if position_ids.dim() == 2 and position_ids.shape[0] == 1 else position_ids
    if pos.dim() != 1:
        raise ValueError(f"position_ids must be one packed row, (1, T) or (T,), got {tuple(position_ids.shape)}")
    host = pos.to("cpu")
    starts = (host == 0).nonzero().reshape(-1).tolist()
    if not starts or starts[0] != 0:
        raise ValueError("position_ids must start at 0 and restart at 0 at each packed sample")
    cu = starts + [host.numel()]
    return (torch.tensor(cu, dtype=torch.int32, device=pos.device),
            max(b - a for a, b in zip(cu, cu[1:])))


def pack_lengths(lengths: Sequence[int], max_tokens: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Best-fit-decreasing bin packing. Returns packs as lists of sample indices (each sums to <= max_tokens).

    ``order`` breaks ties between equal lengths (pass a shuffled index list for a different plan per epoch).
    """
    n = len(lengths)
    order = list(range(n)) if order is None else list(order)
    too_long = [i for i in order if lengths[i] > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sample {i} has {lengths[i]} tokens > max_tokens={max_tokens}; set max_len <= max_tokens")
    rank = {i: r for r, i in enumerate(order)}
    seq = sorted(order, key=lambda i: (-lengths[i], rank[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in seq:
        L = lengths[i]
        k = bisect.bisect_left(free, (L, -1))
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            if cap - L > 0:
                bisect.insort(free, (cap - L, b))
        else:
            bins.append([i])
            if max_tokens - L > 0:
                bisect.insort(free, (max_tokens - L, len(bins) - 1))
    return bins


def pack_fill(packs: list[list[int]], lengths: Sequence[int], max_tokens: int) -> float:
    """Fraction of the packs' token budget holding real tokens."""
    return sum(lengths[i] for p in packs for i in p) / (len(packs) * max_tokens) if packs else 0.0


# ----------------------------------------------------------------------------------------------------------------
# group_by_modality_length (reference-spec.md 5.5), with a seeded generator

def _split_to_even_chunks(indices, lengths, num_chunks):
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    tot = [0] * num_chunks
    for i in indices:
        c = tot.index(min(tot))
        chunks[c].append(i)
        tot[c] += lengths[i]
        if len(chunks[c]) == per:
            tot[c] = float("inf")
    return chunks


def _length_grouped(lengths, batch_size, world, g):
    idx = torch.randperm(len(lengths), generator=g).tolist()
    mb = world * batch_size
    megas = [sorted(idx[i:i + mb], key=lambda j: lengths[j], reverse=True) for i in range(0, len(idx), mb)]
    return [i for m in megas for chunk in _split_to_even_chunks(m, lengths, world) for i in chunk]


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world: int,
                                    generator: torch.Generator) -> list[int]:
    """LLaVA's ``get_modality_length_grouped_indices``: lengths > 0 multimodal, < 0 text-only; every global batch
    is single-modality except the last. ``world`` is world_size * gradient accumulation steps."""
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return _length_grouped([abs(l) for l in lengths], batch_size, world, generator)
    mm = [(i, l) for i, l in enumerate(lengths) if l > 0]
    la = [(i, -l) for i, l in enumerate(lengths) if l < 0]
    mm_s = [mm[i][0] for i in _length_grouped([l for _, l in mm], batch_size, world, generator)]
    la_s = [la[i][0] for i in _length_grouped([l for _, l in la], batch_size, world, generator)]
    mb = world * batch_size
    mm_m = [mm_s[i:i + mb] for i in range(0, len(mm_s), mb)]
    la_m = [la_s[i:i + mb] for i in range(0, len(la_s), mb)]
    extra = mm_m[-1] + la_m[-1]
    megas = mm_m[:-1] + la_m[:-1]
    megas = [megas[i] for i in torch.randperm(len(megas), generator=generator).tolist()]
    if extra:
        megas.append(sorted(extra))
    return [i for m in megas for i in m]


# ----------------------------------------------------------------------------------------------------------------
# samplers

class _StepSampler:
    """Shared logic: an epoch is a list of micro-batches, grouped into global steps of world*accum micro-batches."""

    def __init__(self, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, accum: int = 1,
                 drop_last: bool | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if accum < 1:
            raise ValueError(f"accum must be >= 1, got {accum}")
        self.seed, self.shuffle, self.rank, self.world_size, self.accum = seed, shuffle, rank, world_size, accum
        # A partial last step would give ranks different numbers of micro-batches (a hang under FSDP).
        self.drop_last = (world_size > 1) if drop_last is None else drop_last
        self.epoch = 0
        self.start_step = 0
        self._cache: tuple[int, list] | None = None

    def micro_batches(self, epoch: int) -> list[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _mb_size(self, mb) -> int:
        return len(mb)

    def _plan(self, epoch: int) -> tuple[list, list]:
        """(global steps, micro-batches left out by drop_last) of the epoch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        mbs = self.micro_batches(epoch)
        per = self.world_size * self.accum
        out, left = [], []
        for i in range(0, len(mbs), per):
            step = mbs[i:i + per]
            if len(step) < per and self.drop_last:
                left = step
                break
            out.append(sorted(step, key=self._mb_size, reverse=True))
        self._cache = (epoch, (out, left))
        return out, left

    def steps(self, epoch: int | None = None) -> list[list[list[int]]]:
        """Global steps of the epoch: each a list of world*accum micro-batches (the last may be partial)."""
        return self._plan(self.epoch if epoch is None else epoch)[0]

    def left_out(self, epoch: int | None = None) -> list[list[int]]:
        """The micro-batches of the partial last step that ``drop_last`` leaves out of the epoch (else [])."""
        return self._plan(self.epoch if epoch is None else epoch)[1]

    def num_steps(self, epoch: int | None = None) -> int:
        return len(self.steps(epoch))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Start ``epoch`` at global step ``start_step`` (resume)."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def rank_micro_batches(self, step) -> list[list[int]]:
        return step[self.rank::self.world_size]

    def __iter__(self):
        for step in self.steps()[self.start_step:]:
            yield from self.rank_micro_batches(step)

    def __len__(self) -> int:
        return sum(len(self.rank_micro_batches(s)) for s in self.steps()[self.start_step:])


class PackedBatchSampler(_StepSampler):
    """Yields, for this rank, lists of sample indices that together hold at most ``max_tokens`` tokens.

    Each epoch shuffles the tie order before packing and then the order of the packs (seeded, deterministic).
    ``group_by_modality``: packs hold only multimodal or only text samples (``modality`` gives True per sample).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, modality: Sequence[bool] | None = None,
                 group_by_modality: bool = False, **kw):
        super().__init__(**kw)
        self.lengths = list(lengths)
        self.max_tokens = int(max_tokens)
        self.modality = list(modality) if modality is not None else None
        self.group_by_modality = group_by_modality
        if group_by_modality and self.modality is None:
            raise ValueError("group_by_modality needs modality (True per multimodal sample)")

    def _mb_size(self, mb) -> int:
        return sum(self.lengths[i] for i in mb)

    def micro_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_modality and self.modality is not None:
            packs = []
            for flag in (True, False):
                sub = [i for i in order if bool(self.modality[i]) == flag]
                if sub:
                    packs += _pack_subset(self.lengths, self.max_tokens, sub)
        else:
            packs = pack_lengths(self.lengths, self.max_tokens, order)
        if self.shuffle:
            rng.shuffle(packs)
        return packs

    def fill(self, epoch: int | None = None) -> float:
        return pack_fill(self.micro_batches(self.epoch if epoch is None else epoch), self.lengths, self.max_tokens)


def _pack_subset(lengths, max_tokens, subset):
    sub_lengths = [lengths[i] for i in subset]
    return [[subset[j] for j in p] for p in pack_lengths(sub_lengths, max_tokens)]


class PaddedBatchSampler(_StepSampler):
    """Fixed-size micro-batches of ``batch_size`` samples (padded mode, as transformers' Trainer batches).

    ``group_by_modality_length``: LLaVA's modality- and length-grouped order (needs signed ``modality_lengths``).
    """

    def __init__(self, n: int, batch_size: int, *, modality_lengths: Sequence[int] | None = None,
                 group_by_modality_length: bool = False, **kw):
        super().__init__(**kw)
        self.n, self.batch_size = int(n), int(batch_size)
        self.modality_lengths = list(modality_lengths) if modality_lengths is not None else None
        self.group = group_by_modality_length
        if self.group and self.modality_lengths is None:
            raise ValueError("group_by_modality_length needs modality_lengths")
        if self.group and not self.shuffle:
            raise ValueError("group_by_modality_length orders the samples in random megabatches (LLaVA's grouped "
                             "order), so it cannot keep shuffle=False: set data.shuffle=true or "
                             "data.group_by_modality_length=false")

    def _mb_size(self, mb) -> int:
        return 0  # keep the order the grouping produced

    def micro_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.group:
            idx = modality_length_grouped_indices(self.modality_lengths, self.batch_size,
                                                  self.world_size * self.accum, g)
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
