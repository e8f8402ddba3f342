"""Packing fill, sampler sharding/resume, group_by_modality_length."""
import numpy as np
import pytest

from llava_fast.data import (PackedBatchSampler, PaddedBatchSampler, modality_length_grouped_indices,
                             pack_fill, pack_lengths)
import torch


def realistic_lengths(n=3000, seed=0):
    """LLaVA-NeXT-like mix: anyres image samples (1.2k-3k image tokens + 50-600 text), LLaVA-1.5-like (576 + text),
    and text-only conversations (30-2000 tokens)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            out.append(int(rng.integers(1200, 2930) + rng.lognormal(5, 0.8)))
        elif r < 0.8:
            out.append(int(576 + rng.lognormal(4.5, 0.9)))
        else:
            out.append(int(min(2000, 30 + rng.lognormal(5.5, 1.0))))
    return [min(x, 8192) for x in out]


def test_fill_at_least_97_percent():
    L = realistic_lengths()
    for max_tokens in (8192, 16384):
        packs = pack_lengths(L, max_tokens)
        assert sorted(i for p in packs for i in p) == list(range(len(L)))
        assert all(sum(L[i] for i in p) <= max_tokens for p in packs)
        assert pack_fill(packs, L, max_tokens) >= 0.97, pack_fill(packs, L, max_tokens)


def test_sampler_sharding_matches_single_process():
    L = realistic_lengths(400, seed=1)
    one = PackedBatchSampler(L, 8192, seed=3, world_size=1, accum=4, drop_last=True)
    ranks = [PackedBatchSampler(L, 8192, seed=3, rank=r, world_size=2, accum=2) for r in range(2)]
    assert one.num_steps() == ranks[0].num_steps()
    for s1, s2a, s2b in zip(one.steps(), ranks[0].steps(), ranks[1].steps()):
        assert s1 == s2a == s2b
    flat = [sorted(sum(list(r.rank_micro_batches(s)), [])) for r in ranks for s in r.steps()]
    assert sorted(i for f in flat for i in f) == sorted(i for s in one.steps() for mb in s for i in mb)
    # resume: starting at step k yields exactly the tail
    full = list(iter(ranks[1]))
    ranks[1].set_epoch(0, start_step=3)
    assert list(iter(ranks[1])) == full[3 * 2:]
    # a new epoch gives a different plan
    assert one.micro_batches(1) != one.micro_batches(0)


def test_group_by_modality_packs():
    L = realistic_lengths(500, seed=2)
    mm = [i % 3 != 0 for i in range(len(L))]
    s = PackedBatchSampler(L, 8192, modality=mm, group_by_modality=True, seed=0)
    for p in s.micro_batches(0):
        assert len({mm[i] for i in p}) == 1


def test_modality_length_grouped_padded():
    lengths = [(100 + i) * (1 if i % 4 else -1) for i in range(200)]
    g = torch.Generator().manual_seed(0)
    idx = modality_length_grouped_indices(lengths, batch_size=4, world=2, generator=g)
    assert sorted(idx) == list(range(200))
    mb = 8
    for k in range(0, len(idx) - 2 * mb, mb):  # every global batch but the last is single-modality
        assert len({lengths[i] > 0 for i in idx[k:k + mb]}) == 1
    s = PaddedBatchSampler(200, 4, modality_lengths=lengths, group_by_modality_length=True, world_size=2, accum=1)
    assert sum(len(b) for st in s.steps() for b in st) == 200


def test_every_sample_in_exactly_one_micro_batch_per_epoch():
    """Every sample lands in exactly one pack (or padded batch) per epoch, the partial last step included; with
    drop_last (several ranks) the left-out micro-batches are named, so that the trainer counts them."""
    L = realistic_lengths(301, seed=4)
    mm = [i % 3 != 0 for i in range(len(L))]
    samplers = [PackedBatchSampler(L, 8192, seed=1, accum=3),
                PackedBatchSampler(L, 8192, modality=mm, group_by_modality=True, seed=1, accum=3),
                PaddedBatchSampler(len(L), 4, seed=1, accum=3),
                PaddedBatchSampler(len(L), 4, modality_lengths=[l if m else -l for l, m in zip(L, mm)],
                                   group_by_modality_length=True, seed=1, accum=3)]
    for s in samplers:
        for epoch in (0, 1):
            assert sorted(i for st in s.steps(epoch) for mb in st for i in mb) == list(range(len(L)))
            assert s.left_out(epoch) == []
    for s in (PackedBatchSampler(L, 8192, seed=1, rank=1, world_size=2, accum=2),
              PaddedBatchSampler(len(L), 3, seed=1, rank=1, world_size=2, accum=2)):
        n_mb = len(s.micro_batches(0))
        assert n_mb % 4 != 0 and len(s.left_out(0)) == n_mb % 4
        kept = sorted(i for st in s.steps(0) for mb in st for i in mb)
        left = sorted(i for mb in s.left_out(0) for i in mb)
        assert sorted(kept + left) == list(range(len(L)))


def test_sampler_settings_not_silently_ignored():
    L = realistic_lengths(50, seed=5)
    with pytest.raises(ValueError, match="group_by_modality needs modality"):
        PackedBatchSampler(L, 8192, group_by_modality=True)
    with pytest.raises(ValueError, match="data.shuffle=true or data.group_by_modality_length=false"):
        PaddedBatchSampler(len(L), 4, modality_lengths=L, group_by_modality_length=True, shuffle=False)
