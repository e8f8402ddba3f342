"""How busy the causal dK/dV kernel's grid can keep the GPU: a list-scheduling count, no GPU needed.

Each program of ``attention._flash_attn_bwd_dkdv_kernel`` owns one key block of one document for one kv head (or,
with ``LLAVA_FAST_ATTN_GQA_SPLIT``, one query head or one part of the group) and, causal, loops over every query
block at or after its key block for each of its query heads: its work is (query heads) x (query blocks it visits),
plus a fixed cost (loading K/V, storing dK/dV). Programs go to the first free SM in launch order (one program per SM:
the 8-warp configs use ~200-255 registers), either in grid order or longest first (``GQA_SPLIT=kN`` launches
key-block-major, which for causal documents of one length is longest first). ``busy`` = total work / (SMs x the
last SM's finish): the kernel's best share of the machine if every block iteration cost the same.

Usage: python benchmarks/dkdv_schedule.py [--seqlen 5453 --docs 2 --hkv 2 --group 7 --sms 132]
(also the causal forward / dQ grid: fwd_busy, the count behind LLAVA_FAST_ATTN_HEAVY_FIRST)
(the defaults are the OneVision-0.5B step's Qwen2 attention: two causal documents of 5453 tokens, 14 / 2 heads).
Session 15's counts are in docs/perf-notes.md, "GQA split of the dK/dV kernel".
"""
from __future__ import annotations

import argparse
import heapq
import math


def _list_schedule(work: list[float], slots: int, longest_first: bool) -> tuple[float, float, int]:
    """(busy share, last finish, programs): each program, in launch order (or longest first), to the first free
    slot."""
    if longest_first:
        work = sorted(work, reverse=True)
    free = [0.0] * slots
    for w in work:
        heapq.heappush(free, heapq.heappop(free) + w)
    finish = max(free)
    return sum(work) / slots / finish, finish, len(work)


def busy(seqlen: int, docs: int, hkv: int, group: int, block_n: int = 128, block_m: int = 64, parts: int = 1,
         sms: int = 132, fixed: float = 2.0, longest_first: bool = False) -> tuple[float, float, int]:
    """(busy share, the last SM's finish in block iterations, programs) of the causal dK/dV grid. ``parts``: query
    heads of a kv head split over that many programs (rounded as ``attention._gqa_split`` does: no empty part);
    ``parts = group`` is one program per query head."""
    n_kb, n_qb = math.ceil(seqlen / block_n), math.ceil(seqlen / block_m)
    per = math.ceil(group / parts)
    parts = math.ceil(group / per)
    work = []
    for hp in range(hkv * parts):
        heads = min(per, group - (hp % parts) * per)
        for _ in range(docs):
            for kb in range(n_kb):
                work.append(heads * (n_qb - (kb * block_n) // block_m) * block_n / 128 + fixed)
    return _list_schedule(work, sms, longest_first)


def fwd_busy(seqlen: int, docs: int, heads: int, block_m: int = 128, block_n: int = 64, slots: int = 132,
             longest_first: bool = False, fixed: float = 1.0) -> tuple[float, float, int]:
    """The same count for the causal forward (and dQ) grid: a program per (query block, document, query head),
    working over the key blocks at or before its query block; ``slots`` programs at once (SMs x CTAs per SM: the
    D64 forward fits two per SM). Grid order as launched by default: query blocks heaviest first within each
    (document, head), one (document, head) after another; ``longest_first``: all heaviest blocks first
    (LLAVA_FAST_ATTN_HEAVY_FIRST=1, attention._heavy_first)."""
    n_qb = math.ceil(seqlen / block_m)
    work = [(q + 1) * block_m / block_n + fixed for _ in range(heads) for _ in range(docs) for q in reversed(range(n_qb))]
    return _list_schedule(work, slots, longest_first)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=5453)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--hkv", type=int, default=2)
    p.add_argument("--group", type=int, default=7)
    p.add_argument("--sms", type=int, default=132)
    a = p.parse_args(argv)
    print("| BLOCK_N | split | programs | busy (grid order) | busy (longest first) |\n|---:|---|---:|---:|---:|")
    for bn in (128, 64):
        for parts in sorted({1, 2, 4, a.group}):
            g = busy(a.seqlen, a.docs, a.hkv, a.group, bn, parts=parts, sms=a.sms)
            lf = busy(a.seqlen, a.docs, a.hkv, a.group, bn, parts=parts, sms=a.sms, longest_first=True)
            name = "off" if parts == 1 else f"k{parts}"
            print(f"| {bn} | {name} | {g[2]} | {g[0]:.2f} | {lf[0]:.2f} |")
    heads = a.hkv * a.group
    print(f"\ncausal forward (and dQ) grid, {heads} query heads:\n\n| CTAs per SM | programs | busy (grid order) | "
          f"busy (longest first) |\n|---:|---:|---:|---:|")
    for per_sm in (1, 2):
        g = fwd_busy(a.seqlen, a.docs, heads, slots=a.sms * per_sm)
        lf = fwd_busy(a.seqlen, a.docs, heads, slots=a.sms * per_sm, longest_first=True)
        print(f"| {per_sm} | {g[2]} | {g[0]:.2f} | {lf[0]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
