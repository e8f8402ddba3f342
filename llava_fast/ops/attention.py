"""FlashAttention (FA2 algorithm) in Triton over packed variable-length sequences, forward and backward.

Layout (flash-attn's varlen convention): the documents of a batch are concatenated along the token axis.

* ``q``: ``(total_q, Hq, D)``, ``k`` and ``v``: ``(total_k, Hkv, D)``, ``Hq % Hkv == 0`` (GQA/MQA: query head ``h``
  reads kv head ``h // (Hq // Hkv)``; k/v are never repeated in memory).
* ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 ``(batch + 1,)`` prefix sums of the document lengths; document ``b`` owns
  tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``. Documents never attend to each other. Rows outside every document
  and documents longer than ``max_seqlen`` are not computed (see :func:`flash_attn_varlen_func`).
* causal: query ``i`` of a document with ``Sq`` queries and ``Sk`` keys sees keys ``j <= i + Sk - Sq``
  (bottom-right aligned, as flash-attn >= 2.1). A query that sees no key (``Sq > Sk``) gets output 0 and
  ``lse = +inf`` (flash-attn's convention), and contributes nothing to the gradients.
* head dims: any multiple of 8 up to 128 (64, 72, 80, 96, 128 are tested). The head dim is held in registers as one
  or two power-of-two chunks (72 and 80 -> 64 + 16, 96 -> 64 + 32, 64 and 128 -> one chunk) with lanes past D masked:
  D = 72 costs 80 lanes of tensor-core work, not 128, and no padded copy of q/k/v is ever made in memory.
* ``seqused_k`` (optional, int32 ``(batch,)``, flash-attn's name and meaning, forward only): document ``b``'s keys are
  ``cu_seqlens_k[b] : cu_seqlens_k[b] + seqused_k[b]`` instead of up to ``cu_seqlens_k[b + 1]`` (only the starts
  ``cu_seqlens_k[:-1]`` are read), causal alignment bottom-right against ``seqused_k[b]`` keys. A preallocated KV cache
  ``(B, Lmax, Hkv, D)`` viewed as ``(B * Lmax, Hkv, D)`` with ``cu_seqlens_k = arange(B + 1) * Lmax`` then serves every
  prefill and decode step without copies (``llava_fast.models.language.VarlenKVCache``).
* strides: the last dimension must be contiguous (``stride(-1) == 1``); token and head strides are free, so views
  such as ``linear(x).view(T, H, D)`` or ``qkv.view(T, 3, H, D)[:, 0]`` are used in place.

Kernels: the forward grid is (query blocks of ``max_seqlen_q``, batch, Hq); each program reads its document bounds
from ``cu_seqlens`` on the device (no host synchronisation) and loops only over the key blocks of its own document,
and in causal mode only up to the diagonal; blocks wholly inside the mask run without any masking arithmetic.
The backward is the FA2/Triton-tutorial split: a preprocess kernel (``delta = rowsum(dO * O)``), a dK/dV kernel over
key blocks that loops over every query head of its kv head (GQA gradients summed in registers), and a separate dQ
kernel over query blocks. No atomics, so this backward is bitwise deterministic; it costs 7 GEMMs per (query block,
key block) pair. (Variants measured on H100/H200 and removed for not being faster, session 21: an FA2-style 5-GEMM
backward with fp32 dQ atomics, TMA descriptor loads, lse/delta through TMA, a one-loop causal dK/dV, the GQA split on
repeated K/V; docs/perf-notes.md has their numbers.)
"""

import math
from typing import Optional

import torch

from llava_fast import _ext, backend

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - non-Linux installs: the reference path only

    class _NoTriton:  # enough of triton/tl for the decorators and annotations below to evaluate
        constexpr = None

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    HAS_TRITON = False

backend.register_fast("attention", "triton")
backend.register_fast("vision_attention", "triton")  # the vision towers' tiles (auto: SDPA, see backend.py)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# 1. Reference (also the CPU path)
# ----------------------------------------------------------------------------------------------------------------
def attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None, upcast=True,
                  return_lse=False, seqused_k=None):
    """Naive attention, one document at a time.

    Args:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)``; ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` integer prefix sums (read on the host: this is the slow path).
        causal: bottom-right aligned causal mask per document (see the module docstring).
        softmax_scale: defaults to ``D ** -0.5``.
        upcast: compute in fp32 and return ``q.dtype`` (the accuracy reference); ``False`` computes the matmuls in the
            input dtype like flash-attn's ``attention_ref(upcast=False)``, the baseline of the tolerance rule.
        return_lse: also return the log-sum-exp of the scaled scores, ``(Hq, total_q)`` fp32 (``+inf`` for queries
            that see no key).
        seqused_k: optional ``(batch,)`` integer: document ``b``'s keys are ``cu_seqlens_k[b]`` onwards, this many.

    Returns:
        ``out`` of shape ``(total_q, Hq, D)`` in ``q.dtype``, or ``(out, lse)``; document ``b``'s rows are q's rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` (as in the kernels), rows outside every document get 0 (lse +inf).
    """
    dtype = q.dtype
    D, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    g = hq // hkv
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    ke = ck[1:] if seqused_k is None else [s + int(u) for s, u in zip(ck, seqused_k.tolist())]  # key ends
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)                                          # (Hq, Sq, D)
        kb = k[ck[b]:ke[b]].transpose(0, 1).repeat_interleave(g, dim=0)                 # (Hq, Sk, D)
        vb = v[ck[b]:ke[b]].transpose(0, 1).repeat_interleave(g, dim=0)
        sq, sk = qb.shape[1], kb.shape[1]
        s = torch.matmul(qb, kb.transpose(1, 2)) * scale                                  # (Hq, Sq, Sk)
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        allowed = (j <= i + sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        empty = ~allowed.any(dim=-1)                                                       # (Sq,) rows seeing no key
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(empty[:, None], 0.0)       # 0: no NaN in softmax
        lse = torch.logsumexp(s.float(), dim=-1).masked_fill(empty, float("inf"))
        p = torch.softmax(s, dim=-1).masked_fill(empty[:, None], 0.0).to(vb.dtype)
        outs.append(torch.matmul(p, vb).transpose(0, 1))
        lses.append(lse)
    # Document b's rows are q's rows cq[b]:cq[b + 1], as in the kernels: rows of q outside every document (before
    # cq[0], from cq[-1] on) get out 0 and lse +inf, so that out and lse always have q's rows (a cu_seqlens_q that
    # does not start at 0, a q longer than cu_seqlens_q[-1]).
    lead, tail = max(cq[0], 0), max(q.shape[0] - max(cq[-1], cq[0]), 0)
    if lead or tail:
        outs = [q.new_zeros((lead, hq, D))] + outs + [q.new_zeros((tail, hq, D))]
        lses = [q.new_full((hq, lead), float("inf"), dtype=torch.float32)] + [x.float() for x in lses] + \
            [q.new_full((hq, tail), float("inf"), dtype=torch.float32)]
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    out = out.to(dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, 1) if lses else q.new_zeros((hq, 0), dtype=torch.float32)
    return out, lse.float()


# ----------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# The head dim D is covered by one or two power-of-two column chunks, both kept in registers:
#   chunk 0 = columns [0, BLOCK_D0), chunk 1 = columns [BLOCK_D0, BLOCK_D0 + BLOCK_D1) when HAS_D1,
# with columns >= D masked on load/store. D = 72 and 80 run as 64 + 16 (80 lanes, not 128), D = 96 as 64 + 32;
# 64 and 128 are one chunk. Every GEMM that reduces over D is two chained tl.dot calls (acc = dot(a1, b1, dot(a0, b0)));
# every GEMM that produces D columns is one dot per chunk. See _split_head_dim.
@triton.jit
def _load_tile(ptr, offs_r, stride_r, offs_d, n_rows, HEAD_DIM: tl.constexpr, MASK_R: tl.constexpr,
               MASK_D: tl.constexpr):
    """(rows, cols) tile at ptr + r * stride_r + d, zero outside rows < n_rows (MASK_R) and cols < HEAD_DIM
    (MASK_D). Unmasked axes cost no compare."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_d[None, :]
    if MASK_R:
        if MASK_D:
            return tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            return tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    else:
        if MASK_D:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _zero_overlap(x, offs_d, LO: tl.constexpr, OVERLAP: tl.constexpr):
    """Columns < LO of a chunk-1 tile set to 0 (OVERLAP): chunk 0 already holds them, so a GEMM reducing over D
    counts them once. Applied to the tiles a program loads once (q in the forward, k/v or q/dO in the backward)."""
    if OVERLAP:
        return tl.where(offs_d[None, :] >= LO, x, tl.zeros_like(x))
    else:
        return x


@triton.jit
def _store_tile_lo(ptr, x, offs_r, stride_r, offs_d, n_rows, HEAD_DIM: tl.constexpr, LO: tl.constexpr,
                   OVERLAP: tl.constexpr):
    """_store_tile of a chunk-1 tile; with OVERLAP only its columns >= LO (the others belong to chunk 0)."""
    if OVERLAP:
        tl.store(ptr + offs_r[:, None] * stride_r + offs_d[None, :], x.to(ptr.dtype.element_ty),
                 mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] >= LO) & (offs_d[None, :] < HEAD_DIM))
    else:
        _store_tile(ptr, x, offs_r, stride_r, offs_d, n_rows, HEAD_DIM)


@triton.jit
def _store_tile(ptr, x, offs_r, stride_r, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    tl.store(ptr + offs_r[:, None] * stride_r + offs_d[None, :], x.to(ptr.dtype.element_ty),
             mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _unalign(stride_t, stride_h, ALIGN: tl.constexpr):
    """A (token, head) stride pair passed divided by ALIGN, multiplied back: the compiler can then prove every row
    start 16-byte aligned (a tl.multiple_of hint on a scalar argument did not reach triton 3.6's pipeliner: at D = 72
    no load was vectorized or pipelined; see _stride_align and benchmarks/aot_check.py)."""
    return stride_t * ALIGN, stride_h * ALIGN


@triton.jit
def _query_block_pid(n_q_heads, CAUSAL: tl.constexpr, QB_MAJOR: tl.constexpr):
    """(query block, document, query head) of a forward or dQ program. Grid (query blocks, documents, Hq), causal
    heaviest query blocks (most keys) first within each (document, head); QB_MAJOR (:func:`_heavy_first`): grid
    (documents x Hq, query blocks), every (document, head)'s heaviest block before any second-heaviest one."""
    if QB_MAJOR:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        b = tl.program_id(0) // n_q_heads
        h = tl.program_id(0) % n_q_heads
    else:
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
    return pid_m, b, h


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range of query block [start_m, start_m + BLOCK_M): returns (full, end): keys [0, full) are visible to every
    row (no mask), [full, end) need the causal/length mask, keys >= end are invisible to every row."""
    diag = seqlen_k - seqlen_q
    full_k = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        end = tl.minimum(seqlen_k, tl.maximum(start_m + BLOCK_M + diag, 0))
        full = (tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N
        full = tl.minimum(full, full_k)
    else:
        end = seqlen_k
        full = full_k
    return full, end


@triton.jit
def _scores(q0, q1, K, stride_kt, offs_n, offs_d0, offs_d1, seqlen_k, HEAD_DIM: tl.constexpr,
            MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, HAS_D1: tl.constexpr, MASKED: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """(q . k, k0, k1): raw scores of the key block at start_n (rows offs_n), fp32 (BLOCK_M, BLOCK_N), and the
    key tiles loaded for them (k1 = k0 when there is no second chunk). The forward's scores, and the dQ kernel's
    q . k and dO . v (its dS . K product reuses the key tiles)."""
    k0 = _load_tile(K, offs_n, stride_kt, offs_d0, seqlen_k, HEAD_DIM, MASKED, MASK_D0)
    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    k1 = k0
    if HAS_D1:
        k1 = _load_tile(K, offs_n, stride_kt, offs_d1, seqlen_k, HEAD_DIM, MASKED, MASK_D1)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
    return qk, k0, k1


@triton.jit
def _fwd_softmax_pv(qk, acc0, acc1, l_i, m_i, V, stride_vt, offs_m, offs_n, offs_d0, offs_d1, seqlen_k, diag,
                    qk_scale, HEAD_DIM: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                    HAS_D1: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                    SCALE_FIRST: tl.constexpr):
    """One online-softmax step: fold the raw scores qk of the key block at start_n into (m_i, l_i, acc).
    SCALE_FIRST (``LLAVA_FAST_ATTN_FOLD=0``, for timing against the default): the session-4 arithmetic, every score
    multiplied by the scale before the max, then the max subtracted (FMUL + FADD per score instead of one FFMA)."""
    # The scale (> 0, log2 units) is applied to the row max and inside the exponent's argument, one FFMA per
    # score, instead of a multiply of every score before the max and a subtract after it (FMUL + FADD): 64
    # fewer instructions per thread and key block at 128 x 128 (SASS counts in docs/perf-notes.md).
    if SCALE_FIRST:
        qk = qk * qk_scale
        scale = 1.0
    else:
        scale = qk_scale
    if MASKED:
        allowed = offs_n[None, :] < seqlen_k
        if CAUSAL:
            allowed = allowed & (offs_m[:, None] + diag >= offs_n[None, :])
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    if MASKED:  # a row with no visible key so far keeps m = -inf; subtract 0 instead (no -inf - -inf = NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc0 = acc0 * alpha[:, None]
    v0 = _load_tile(V, offs_n, stride_vt, offs_d0, seqlen_k, HEAD_DIM, MASKED, MASK_D0)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0, input_precision=DOT_PREC)
    if HAS_D1:
        acc1 = acc1 * alpha[:, None]
        v1 = _load_tile(V, offs_n, stride_vt, offs_d1, seqlen_k, HEAD_DIM, MASKED, MASK_D1)
        acc1 = tl.dot(p, v1, acc1, input_precision=DOT_PREC)
    return acc0, acc1, l_i, m_new


@triton.jit
def _attn_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, stride_kt, stride_vt, offs_m, offs_d0, offs_d1, lo, hi,
                    seqlen_k, diag, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_D0: tl.constexpr,
                    MASK_D1: tl.constexpr, HAS_D1: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    DOT_PREC: tl.constexpr, SCALE_FIRST: tl.constexpr = False):
    """Online softmax over key blocks [lo, hi). MASKED=False: every (row, key) pair is valid, no mask math."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        qk, _, _ = _scores(q0, q1, K, stride_kt, offs_n, offs_d0, offs_d1, seqlen_k, HEAD_DIM, MASK_D0, MASK_D1,
                           HAS_D1, MASKED, DOT_PREC)
        acc0, acc1, l_i, m_i = _fwd_softmax_pv(qk, acc0, acc1, l_i, m_i, V, stride_vt, offs_m, offs_n, offs_d0,
                                               offs_d1, seqlen_k, diag, qk_scale, HEAD_DIM, MASK_D0, MASK_D1, HAS_D1,
                                               MASKED, CAUSAL, DOT_PREC, SCALE_FIRST)
    return acc0, acc1, l_i, m_i


@triton.jit
def _flash_attn_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, SEQUSED_K,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                           stride_lse_h, qk_scale, group, seq_bucket,
                           HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                           HAS_D1: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
                           D1_LO: tl.constexpr, HAS_SEQUSED: tl.constexpr, SCALE_FIRST: tl.constexpr = False,
                           n_q_heads=1, QB_MAJOR: tl.constexpr = False):
    """Grid (query blocks, documents, Hq); QB_MAJOR (see :func:`_heavy_first`): (documents x Hq, query blocks)."""
    stride_qt, stride_qh = _unalign(stride_qt, stride_qh, ALIGN)
    stride_kt, stride_kh = _unalign(stride_kt, stride_kh, ALIGN)
    stride_vt, stride_vh = _unalign(stride_vt, stride_vh, ALIGN)
    stride_ot, stride_oh = _unalign(stride_ot, stride_oh, ALIGN)
    pid_m, b, h = _query_block_pid(n_q_heads, CAUSAL, QB_MAJOR)
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    k_start = tl.load(CU_K + b)
    if HAS_SEQUSED:  # keys [k_start, k_start + seqused_k[b]) of a preallocated cache
        seqlen_k = tl.load(SEQUSED_K + b)
    else:
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    hk = h // group
    MASK_D0: tl.constexpr = HEAD_DIM < BLOCK_D0
    MASK_D1: tl.constexpr = HEAD_DIM < D1_LO + BLOCK_D1
    OVERLAP: tl.constexpr = D1_LO < BLOCK_D0  # chunk 1 = columns [D - BLOCK_D1, D), see _chunk1_start

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = D1_LO + tl.arange(0, BLOCK_D1)
    rows_left = seqlen_q - start_m
    Qb = Q + (q_start + start_m).to(tl.int64) * stride_qt + h * stride_qh
    q0 = _load_tile(Qb, offs_mb, stride_qt, offs_d0, rows_left, HEAD_DIM, True, MASK_D0)
    if HAS_D1:
        q1 = _load_tile(Qb, offs_mb, stride_qt, offs_d1, rows_left, HEAD_DIM, True, MASK_D1)
        q1 = _zero_overlap(q1, offs_d1, BLOCK_D0, OVERLAP)
    else:
        q1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=q0.dtype)  # unused
    Kb = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    Vb = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    full, end = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, Kb, Vb, stride_kt, stride_vt, offs_m,
                                           offs_d0, offs_d1, 0, full, seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_N,
                                           MASK_D0, MASK_D1, HAS_D1, False, CAUSAL, DOT_PREC, SCALE_FIRST)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, Kb, Vb, stride_kt, stride_vt, offs_m,
                                           offs_d0, offs_d1, full, end, seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_N,
                                           MASK_D0, MASK_D1, HAS_D1, True, CAUSAL, DOT_PREC, SCALE_FIRST)
    empty = l_i == 0.0  # rows that see no key: out 0, lse +inf
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = 1.0 / l_safe
    Ob = O + (q_start + start_m).to(tl.int64) * stride_ot + h * stride_oh
    _store_tile(Ob, acc0 * inv_l[:, None], offs_mb, stride_ot, offs_d0, rows_left, HEAD_DIM)
    if HAS_D1:
        _store_tile_lo(Ob, acc1 * inv_l[:, None], offs_mb, stride_ot, offs_d1, rows_left, HEAD_DIM, BLOCK_D0, OVERLAP)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    tl.store(LSE + h.to(tl.int64) * stride_lse_h + q_start + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _flash_attn_bwd_preprocess_kernel(O, DO, DELTA, total_q, stride_ot, stride_oh, stride_dot, stride_doh,
                                      stride_delta_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                      BLOCK_T: tl.constexpr, DLSE=None, HAS_DLSE: tl.constexpr = False):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d] (fp32). Memory-bound: one power-of-two tile, D masked.
    HAS_DLSE (the lse output was used downstream): minus DLSE[h, t], its gradient, laid out as DELTA (see
    _bwd_preprocess). Without it the kernel and its arguments are those of before (DLSE None is a constexpr)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    offs_t64 = offs_t.to(tl.int64)
    o = tl.load(O + offs_t64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_t64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h.to(tl.int64) * stride_delta_h + offs_t, mask=offs_t < total_q, other=0.0)
    tl.store(DELTA + h.to(tl.int64) * stride_delta_h + offs_t, delta, mask=offs_t < total_q)


@triton.jit
def _attn_bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, offs_n,
                         offs_d0, offs_d1, lo, hi, seqlen_q, diag, qk_scale, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, HAS_D1: tl.constexpr,
                         MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head. Query rows past the
    document load lse = +inf, so p = 0 for them without a mask; MASKED adds the causal mask."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q0 = _load_tile(Qh, offs_m, stride_qt, offs_d0, seqlen_q, HEAD_DIM, True, MASK_D0)
        qkT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)                      # (BLOCK_N, BLOCK_M)
        if HAS_D1:
            q1 = _load_tile(Qh, offs_m, stride_qt, offs_d1, seqlen_q, HEAD_DIM, True, MASK_D1)
            qkT = tl.dot(k1, tl.trans(q1), qkT, input_precision=DOT_PREC)
        lse = tl.load(LSEh + offs_m, mask=offs_m < seqlen_q, other=float("inf")) * 1.4426950408889634
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(offs_m[None, :] + diag >= offs_n[:, None], pT, 0.0)
        do0 = _load_tile(DOh, offs_m, stride_dot, offs_d0, seqlen_q, HEAD_DIM, True, MASK_D0)
        dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if HAS_D1:
            do1 = _load_tile(DOh, offs_m, stride_dot, offs_d1, seqlen_q, HEAD_DIM, True, MASK_D1)
            dv1 = tl.dot(pT.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
        delta = tl.load(DELTAh + offs_m, mask=offs_m < seqlen_q, other=0.0)
        dsT = (pT * (dpT - delta[None, :])).to(q0.dtype)
        dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PREC)
        if HAS_D1:
            dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _flash_attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                                stride_lse_h, qk_scale, sm_scale, group, seq_bucket,
                                HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                                HAS_D1: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
                                D1_LO: tl.constexpr, n_kv=1, n_parts=1, heads_per_part=1, stride_dkp=0,
                                stride_dvp=0, PARTS: tl.constexpr = False, KB_MAJOR: tl.constexpr = False):
    """dK, dV of one key block of one document for one kv head, summed over its ``group`` query heads in registers.
    Grid (key blocks, documents, Hkv) by default. PARTS, the kernel-side GQA split (see :func:`_gqa_split`): ``n_parts``
    programs per kv head, part p summing query heads [p * heads_per_part, (p + 1) * heads_per_part) of the group into
    its own fp32 partial (DK/DV + p * stride_dkp/stride_dvp, reduced by the launcher); KB_MAJOR: grid (documents *
    Hkv * n_parts, key blocks), so every (document, head, part)'s first key block (causal: the heaviest) launches
    before any second one (a longest-first order)."""
    stride_qt, stride_qh = _unalign(stride_qt, stride_qh, ALIGN)
    stride_kt, stride_kh = _unalign(stride_kt, stride_kh, ALIGN)
    stride_vt, stride_vh = _unalign(stride_vt, stride_vh, ALIGN)
    stride_dot, stride_doh = _unalign(stride_dot, stride_doh, ALIGN)
    stride_dkt, stride_dkh = _unalign(stride_dkt, stride_dkh, ALIGN)
    stride_dvt, stride_dvh = _unalign(stride_dvt, stride_dvh, ALIGN)
    if KB_MAJOR:
        pid_n = tl.program_id(1)
        b = tl.program_id(0) // (n_kv * n_parts)
        hp = tl.program_id(0) % (n_kv * n_parts)
    else:
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        hp = tl.program_id(2)
    if PARTS:
        hk = hp // n_parts
        part = hp % n_parts
        g_lo = part * heads_per_part
        g_hi = tl.minimum(g_lo + heads_per_part, group)
    else:  # the code (and PTX) of the default path as before the split existed
        hk = hp
        g_lo = 0
        g_hi = group
    k_start = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k_start
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    MASK_D0: tl.constexpr = HEAD_DIM < BLOCK_D0
    MASK_D1: tl.constexpr = HEAD_DIM < D1_LO + BLOCK_D1
    OVERLAP: tl.constexpr = D1_LO < BLOCK_D0  # chunk 1 = columns [D - BLOCK_D1, D), see _chunk1_start

    offs_nb = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_nb
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = D1_LO + tl.arange(0, BLOCK_D1)
    keys_left = seqlen_k - start_n
    Kb = K + (k_start + start_n).to(tl.int64) * stride_kt + hk * stride_kh
    Vb = V + (k_start + start_n).to(tl.int64) * stride_vt + hk * stride_vh
    k0 = _load_tile(Kb, offs_nb, stride_kt, offs_d0, keys_left, HEAD_DIM, True, MASK_D0)
    v0 = _load_tile(Vb, offs_nb, stride_vt, offs_d0, keys_left, HEAD_DIM, True, MASK_D0)
    if HAS_D1:
        k1 = _load_tile(Kb, offs_nb, stride_kt, offs_d1, keys_left, HEAD_DIM, True, MASK_D1)
        v1 = _load_tile(Vb, offs_nb, stride_vt, offs_d1, keys_left, HEAD_DIM, True, MASK_D1)
        k1 = _zero_overlap(k1, offs_d1, BLOCK_D0, OVERLAP)
        v1 = _zero_overlap(v1, offs_d1, BLOCK_D0, OVERLAP)
    else:  # unused
        k1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=k0.dtype)
        v1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=v0.dtype)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)

    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # query i sees key j iff i >= j - diag. lo: first query block that sees this key block at all;
        # mid: first query block whose every row sees every key of this block (no mask from there on).
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, seqlen_q)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0
    q_off = q_start.to(tl.int64)
    for g in range(g_lo, g_hi):  # every query head of this kv head (PARTS: of its part), summed in registers
        h = hk * group + g
        Qh = Q + q_off * stride_qt + h * stride_qh
        DOh = DO + q_off * stride_dot + h * stride_doh
        LSEh = LSE + h.to(tl.int64) * stride_lse_h + q_start
        DELTAh = DELTA + h.to(tl.int64) * stride_lse_h + q_start
        dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, LSEh, DELTAh,
                                                  stride_qt, stride_dot, offs_n, offs_d0, offs_d1, lo, mid, seqlen_q,
                                                  diag, qk_scale, HEAD_DIM, BLOCK_M, MASK_D0, MASK_D1, HAS_D1, True,
                                                  DOT_PREC)
        dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, LSEh, DELTAh,
                                                  stride_qt, stride_dot, offs_n, offs_d0, offs_d1, mid, seqlen_q,
                                                  seqlen_q, diag, qk_scale, HEAD_DIM, BLOCK_M, MASK_D0, MASK_D1,
                                                  HAS_D1, False, DOT_PREC)
    DKb = DK + (k_start + start_n).to(tl.int64) * stride_dkt + hk * stride_dkh
    DVb = DV + (k_start + start_n).to(tl.int64) * stride_dvt + hk * stride_dvh
    if PARTS:
        DKb += part.to(tl.int64) * stride_dkp
        DVb += part.to(tl.int64) * stride_dvp
    _store_tile(DKb, dk0 * sm_scale, offs_nb, stride_dkt, offs_d0, keys_left, HEAD_DIM)
    _store_tile(DVb, dv0, offs_nb, stride_dvt, offs_d0, keys_left, HEAD_DIM)
    if HAS_D1:
        _store_tile_lo(DKb, dk1 * sm_scale, offs_nb, stride_dkt, offs_d1, keys_left, HEAD_DIM, BLOCK_D0, OVERLAP)
        _store_tile_lo(DVb, dv1, offs_nb, stride_dvt, offs_d1, keys_left, HEAD_DIM, BLOCK_D0, OVERLAP)


@triton.jit
def _attn_bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d0, offs_d1,
                       lo, hi, seqlen_k, diag, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, HAS_D1: tl.constexpr, MASKED: tl.constexpr,
                       CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ of one query block over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        qk, k0, k1 = _scores(q0, q1, K, stride_kt, offs_n, offs_d0, offs_d1, seqlen_k, HEAD_DIM, MASK_D0, MASK_D1,
                             HAS_D1, MASKED, DOT_PREC)
        dp, _, _ = _scores(do0, do1, V, stride_vt, offs_n, offs_d0, offs_d1, seqlen_k, HEAD_DIM, MASK_D0, MASK_D1,
                           HAS_D1, MASKED, DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            allowed = offs_n[None, :] < seqlen_k
            if CAUSAL:
                allowed = allowed & (offs_m[:, None] + diag >= offs_n[None, :])
            p = tl.where(allowed, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
        if HAS_D1:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _flash_attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lse_h,
                              qk_scale, sm_scale, group, seq_bucket,
                              HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                              HAS_D1: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
                              D1_LO: tl.constexpr, n_q_heads=1, QB_MAJOR: tl.constexpr = False):
    """Grid (query blocks, documents, Hq); QB_MAJOR (see :func:`_heavy_first`): (documents x Hq, query blocks)."""
    stride_qt, stride_qh = _unalign(stride_qt, stride_qh, ALIGN)
    stride_kt, stride_kh = _unalign(stride_kt, stride_kh, ALIGN)
    stride_vt, stride_vh = _unalign(stride_vt, stride_vh, ALIGN)
    stride_dot, stride_doh = _unalign(stride_dot, stride_doh, ALIGN)
    stride_dqt, stride_dqh = _unalign(stride_dqt, stride_dqh, ALIGN)
    pid_m, b, h = _query_block_pid(n_q_heads, CAUSAL, QB_MAJOR)
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    k_start = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k_start
    hk = h // group
    MASK_D0: tl.constexpr = HEAD_DIM < BLOCK_D0
    MASK_D1: tl.constexpr = HEAD_DIM < D1_LO + BLOCK_D1
    OVERLAP: tl.constexpr = D1_LO < BLOCK_D0  # chunk 1 = columns [D - BLOCK_D1, D), see _chunk1_start

    offs_mb = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_mb
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = D1_LO + tl.arange(0, BLOCK_D1)
    rows_left = seqlen_q - start_m
    row0 = (q_start + start_m).to(tl.int64)
    Qb = Q + row0 * stride_qt + h * stride_qh
    DOb = DO + row0 * stride_dot + h * stride_doh
    q0 = _load_tile(Qb, offs_mb, stride_qt, offs_d0, rows_left, HEAD_DIM, True, MASK_D0)
    do0 = _load_tile(DOb, offs_mb, stride_dot, offs_d0, rows_left, HEAD_DIM, True, MASK_D0)
    if HAS_D1:
        q1 = _load_tile(Qb, offs_mb, stride_qt, offs_d1, rows_left, HEAD_DIM, True, MASK_D1)
        do1 = _load_tile(DOb, offs_mb, stride_dot, offs_d1, rows_left, HEAD_DIM, True, MASK_D1)
        q1 = _zero_overlap(q1, offs_d1, BLOCK_D0, OVERLAP)
        do1 = _zero_overlap(do1, offs_d1, BLOCK_D0, OVERLAP)
    else:  # unused
        q1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=q0.dtype)
        do1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=do0.dtype)
    rmask = offs_m < seqlen_q
    lse = tl.load(LSE + h.to(tl.int64) * stride_lse_h + q_start + offs_m, mask=rmask, other=float("inf"))
    lse = lse * 1.4426950408889634
    delta = tl.load(DELTA + h.to(tl.int64) * stride_lse_h + q_start + offs_m, mask=rmask, other=0.0)
    Kb = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    Vb = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh

    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    full, end = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq0, dq1 = _attn_bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, Kb, Vb, stride_kt, stride_vt, offs_m,
                                  offs_d0, offs_d1, 0, full, seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_N, MASK_D0,
                                  MASK_D1, HAS_D1, False, CAUSAL, DOT_PREC)
    dq0, dq1 = _attn_bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, Kb, Vb, stride_kt, stride_vt, offs_m,
                                  offs_d0, offs_d1, full, end, seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_N, MASK_D0,
                                  MASK_D1, HAS_D1, True, CAUSAL, DOT_PREC)
    DQb = DQ + row0 * stride_dqt + h * stride_dqh
    _store_tile(DQb, dq0 * sm_scale, offs_mb, stride_dqt, offs_d0, rows_left, HEAD_DIM)
    if HAS_D1:
        _store_tile_lo(DQb, dq1 * sm_scale, offs_mb, stride_dqt, offs_d1, rows_left, HEAD_DIM, BLOCK_D0, OVERLAP)


@triton.jit
def _sum_parts_kernel(P, DK, DV, n, n_parts, BLOCK: tl.constexpr):
    """dK and dV from the GQA split's fp32 partials P = (parts, 2, n) (dK's then dV's per part): summed over the parts
    in order 0, 1, ... in fp32, rounded once to the outputs' dtype. Grid (blocks of n, 2): axis 1 picks dK or dV."""
    w = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(0, n_parts):
        acc += tl.load(P + (2 * p + w).to(tl.int64) * n + offs, mask=mask, other=0.0)
    if w == 0:
        tl.store(DK + offs, acc.to(DK.dtype.element_ty), mask=mask)
    else:
        tl.store(DV + offs, acc.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------------------------
def _autotune_enabled() -> bool:
    return _ext.getenv("LLAVA_FAST_ATTN_AUTOTUNE", "0") == "1" and not _ext.interpreting()


# Configs are (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from ptxas register/spill reports of the sm90 builds
# (triton 3.8, bf16; `ptxas -v` on the AOT-compiled kernels, no GPU needed): the tutorial's dK/dV 32x128 at 4 warps
# spills ~500 B/thread and its dQ 128x32 at BLOCK_D = 128 spills ~1 KB, so the defaults below are the spill-free
# (or < 100 B) neighbours. "width" is the register width of the head dim, BLOCK_D0 + BLOCK_D1 (64, 80, 96 or 128).
# Under the interpreter small, unequal blocks make the tiny test documents span several blocks of both kinds.
_INTERPRET_CFG = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1), "fwd_decode": (16, 32, 1, 1)}


# dK/dV: 64 queries per step x 128 keys per program, 2 stages, at every width. ptxas (triton 3.6, sm_90a, causal bf16)
# spills per thread, 64x64 s3 (the session-1 default for width > 64) -> 64x128 s2: D64 208 -> 36 B (64x128 s3, the
# old D64 default: 256 B), D72 656 -> 236, D80 408 -> 108, D96 468 -> 176, D128 600 -> 160; a 128-key block also
# halves the q/dO reloads per key. Measured on an H100 (benchmarks/results, sweep of 2026-11-26) at causal D128 4k:
# fwd+bwd 239.0 -> 335.1 TFLOP/s, errors unchanged; 64x64 s2 gave 241.8 (the stages alone do not do it). The other
# head dims follow the spill counts, not yet a measurement.
_DKDV_CFG = (64, 128, 8, 2)


_CFG_ENV = "LLAVA_FAST_ATTN_CFG"  # experiments on a GPU: "fwd=128,64,4,3;dq=64,32,4,2" overrides those kinds


def _cfg_override(kind: str):
    spec = _ext.getenv(_CFG_ENV, "")
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, vals = part.partition("=")
        if name.strip() == kind:
            try:
                bm, bn, w, st = (int(x) for x in vals.split(","))
            except ValueError:
                raise ValueError(f"{_CFG_ENV}={spec!r}: each entry is KIND=BLOCK_M,BLOCK_N,num_warps,num_stages "
                                 f"(KIND one of {sorted(_INTERPRET_CFG)})") from None
            return bm, bn, w, st
    return None


# The D128 forward for short documents (longest query document <= 1024): 64 queries x 64 keys, 4 warps, 3 stages
# (one warpgroup per CTA, two CTAs per SM by ptxas's registers and shared memory) instead of 128 x 128 at 8 warps (224
# KB, one CTA per SM). With 640-token documents the 128 x 128 program does ~3 key blocks, so its prologue and
# epilogue are not hidden. Measured on an H200 (session 17, `dkdv128` op, bf16 causal, paired in one run): the
# LLaVA-1.5-7B stage-1 attention (16 x 640, 32 heads) forward 0.2405 -> 0.2006 ms (223 -> 268 TFLOP/s, 1.20x),
# fwd+bwd 0.962 -> 0.926 ms; at causal 4k the same config is 0.96x the default (1.270 -> 1.319 ms), hence the bound.
_FWD_SHORT_CFG_D128 = (64, 64, 4, 3)
_FWD_SHORT_MAX_SEQLEN = 1024


def _default_cfg(kind: str, width: int, fp32: bool = False, max_seqlen_q: int | None = None
                 ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a launch. ``max_seqlen_q``: the longest query document (the
    forward's config for D128 depends on it)."""
    if _ext.interpreting():
        return _INTERPRET_CFG[kind]
    override = _cfg_override(kind)
    if override is not None:
        return override
    if fp32:  # fp32 inputs (tests, debugging): tiles twice as large in shared memory; small tiles, 2 stages
        return (64, 32, 4, 2)
    if kind == "fwd":
        if width == 128 and max_seqlen_q is not None and max_seqlen_q <= _FWD_SHORT_MAX_SEQLEN:
            return _FWD_SHORT_CFG_D128
        return (128, 64, 4, 3) if width <= 64 else (128, 128, 8, 3)
    if kind == "fwd_decode":  # seqused_k with <= 16 queries per document (KV-cache decode): the smallest tl.dot M
        return (16, 64, 4, 3)
    if kind == "dkdv":  # H100 sweep 2026-11-26, causal D128 4k: fwd+bwd 239 -> 335 TFLOP/s (64x64 s3 -> 64x128 s2)
        return _DKDV_CFG
    return (128, 64, 8, 3) if width <= 64 else (64, 32, 4, 3)


# Small autotune lists (LLAVA_FAST_ATTN_AUTOTUNE=1, GPU only): the defaults and a few neighbours from the Triton
# tutorial's sweep. Keyed on head dim, causal, dtype and the power-of-two bucket of max_seqlen (so that a new
# max_seqlen per packed batch does not re-tune). Configs that do not fit (shared memory) are skipped by the autotuner.
_TUNE = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
    "dq": [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    "fwd_decode": [(16, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 4), (16, 64, 8, 3)],
}
_TUNED: dict = {}


def _kernel(kind: str, fn, fp32: bool = False):
    """The jit kernel itself (fixed config) or its autotuned wrapper."""
    if not _autotune_enabled() or fp32:
        return fn, True
    if kind not in _TUNED:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in
                   _TUNE[kind]]
        _TUNED[kind] = triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "seq_bucket"])(fn)
    return _TUNED[kind], False


def _smaller_cfg(cfg: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The next config to try when ``cfg`` needs more shared memory than the GPU has per block: the larger block
    (keys first) halved down to 16, then one stage fewer; 4 warps once both blocks are <= 64. None: nothing smaller.
    From the defaults this gives the spill-free neighbours ptxas reports (aot_check.py --arch 86): the forward's 128 x
    128 (160 KB at D128, 100-120 KB at D72-96) -> 128 x 64 (96 / 60-72 KB), fp32's 64 x 32 -> 32 x 32."""
    bm, bn, warps, stages = cfg
    if bn >= bm and bn > 16:
        bn //= 2
    elif bm > 16:
        bm //= 2
    elif stages > 1:
        stages -= 1
    else:
        return None
    return bm, bn, (min(warps, 4) if bm <= 64 and bn <= 64 else warps), stages


# (kind, width, default config, device index) -> the config that fits, for GPUs with less shared memory per block than
# a default needs (A10, L4, L40S, RTX 30xx / 40xx: 99 KB against the H100's 227 and the A100's 163). Filled by
# _launch when Triton refuses a config; empty on the GPUs the defaults were chosen on, where it costs one truth test.
_FITTED: dict = {}


def _launch(kind, fn, grid_of, args, constexprs, max_seqlen_q: int | None = None):
    kernel, fixed = _kernel(kind, fn, constexprs["DOT_PREC"] == "ieee")
    if not fixed:  # the autotuner skips configs that do not fit by itself
        kernel[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs,
                                                                         **_ext.fp_fusion_kwargs())
        return
    width = constexprs["BLOCK_D0"] + (constexprs["BLOCK_D1"] if constexprs["HAS_D1"] else 0)
    cfg = default = _default_cfg(kind, width, constexprs["DOT_PREC"] == "ieee", max_seqlen_q)
    if _FITTED:
        cfg = _FITTED.get((kind, width, default, args[0].device.index), default)
    while True:
        bm, bn, warps, stages = cfg
        try:
            _ext.launch(kernel, grid_of(bm, bn), *args, **constexprs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                        num_stages=stages)
            return
        except triton.runtime.OutOfResources as e:  # raised before anything runs: nothing to undo
            smaller = _smaller_cfg(cfg)
            if smaller is None:
                raise RuntimeError(f"flash attention ({kind}, head dim {constexprs['HEAD_DIM']}): no kernel "
                                   f"configuration fits this GPU ({e})") from e
            _FITTED[(kind, width, default, args[0].device.index)] = cfg = smaller


def _split_head_dim(d: int) -> tuple[int, int, bool]:
    """(BLOCK_D0, BLOCK_D1, HAS_D1): the head dim as one power-of-two chunk, or a power-of-two chunk plus a smaller
    power-of-two remainder chunk (>= 16, the tl.dot minimum): 64 -> 64, 128 -> 128, 80 -> 64 + 16, 96 -> 64 + 32
    (exact), and by default 72 -> 64 + 16 and 40 -> 32 + 16 with chunk 1 overlapping chunk 0 (the "overlap" policy,
    :func:`_chunk1_start`: chunk 1 = [D - 16, D), so that no column of it is out of bounds).

    A remainder chunk with masked columns (72 as 64 + 16 or 64 + 32, "masked") faulted on an H200 with triton 3.6
    (an out-of-range shared-memory address in the P @ V1 wgmma, compute-sanitizer, 2026-11-26) when the head stride
    (72 elements) was not known to be 16-byte aligned; "exact" (72 as one masked 128 chunk) was correct, and the
    session-2 default. "overlap" became the default after an H100 run (2026-11-26, SigLIP 32 x 729 D72, bf16):
    fwd 176.9 -> 191.5, fwd+bwd 108.2 -> 114.8 TFLOP/s against "exact", same errors. LLAVA_FAST_ATTN_SPLIT chooses
    (benchmarks/attention_variants.py): "overlap" (default), "exact", "masked" (a masked remainder, at least
    LLAVA_FAST_ATTN_MIN_D1 = 16 wide) or "none" (always one chunk)."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    if d <= d0:
        return d0, 16, False
    policy = _split_policy()
    d1 = max(int(_ext.getenv("LLAVA_FAST_ATTN_MIN_D1", "16")), _ext.next_power_of_2(d - d0))
    if policy == "none" or d1 >= d0 or (policy == "exact" and d0 + d1 != d):
        return _ext.next_power_of_2(d), 16, False
    return d0, d1, True


_SPLITS = ("exact", "masked", "overlap", "none")


def _split_policy() -> str:
    return _ext.env_choice("LLAVA_FAST_ATTN_SPLIT", _SPLITS, "overlap")


def _chunk1_start(d: int, d0: int, d1: int, has_d1: bool) -> int:
    """First column of chunk 1 (the kernels' D1_LO). BLOCK_D0 normally (chunk 1 = [d0, d0 + d1), columns >= D
    masked); with LLAVA_FAST_ATTN_SPLIT=overlap and d0 + d1 > D, D - d1: chunk 1 = [D - d1, D) overlaps chunk 0, so
    that no load inside the key/query loops needs a column mask (the faulting case on an H200) and no column is
    ever out of bounds; the overlap is zeroed in the tiles loaded once per program and not stored from chunk 1.
    D = 72: 64 + 16 as [0, 64) + [56, 72), 80 lanes of MMA instead of 128."""
    if has_d1 and d0 + d1 > d and _split_policy() == "overlap":
        return d - d1
    return d0


def _stride_align(*tensors: torch.Tensor) -> int:
    """8 when every token and head stride of these (T, H, D) tensors is a multiple of 8 elements (16 bytes in
    bf16/fp16) but not all of them of 16, else 1: the kernels' ALIGN. The launchers then pass those strides divided
    by 8 (:func:`_strides`) and the kernels multiply them back by the constexpr, so that the compiler can prove
    16-byte aligned rows and use 16-byte vector loads and cp.async pipelining for a head dim such as 72, whose head
    stride (72) triton's own argument specialization (divisibility by 16) does not cover (a tl.multiple_of hint on
    the scalar argument did not reach triton 3.6's pipeliner: benchmarks/aot_check.py). LLAVA_FAST_ATTN_ALIGN=0
    turns it off."""
    if _ext.getenv("LLAVA_FAST_ATTN_ALIGN", "1") == "0":
        return 1
    strides = [t.stride(i) for t in tensors for i in (0, 1)]
    if all(s % 16 == 0 for s in strides):  # triton's argument specialization already proves these (D = 64, 128)
        return 1
    return 8 if all(s % 8 == 0 for s in strides) else 1


def _gqa_split(group: int) -> tuple[str, int]:
    """How the dK/dV kernel covers the query heads of a kv head: ``(mode, parts)`` from LLAVA_FAST_ATTN_GQA_SPLIT
    (default ``"k4"`` since session 17: on an H200 the OneVision-0.5B attention (2 x 5453 tokens, 14/2 heads, D64)
    ran fwd+bwd at 1.818 -> 1.529 ms with k4, 1.457 ms with k4 and :func:`_heavy_first` (1.25x), and the 4-layer
    OneVision step 1.03x paired; docs/perf-notes.md, "GQA split of the dK/dV kernel"):

    - ``"0"``: ``("off", 1)``, one program per (key block, document, kv head) loops over its ``group`` query
      heads, the GQA gradients summed in registers (the default before session 17).
    - ``"kN"`` (session 15): ``("kernel", parts)``, N programs per kv head (``parts`` = N rounded so that no part is
      empty), part p summing query heads [p * ceil(group / N), ...) in registers into its own fp32 partial
      ``(parts, total_k, Hkv, D)`` (no K/V repeat), and the grid launched key-block-major: every (document, kv head,
      part)'s first key block, causal the heaviest, before any second one (longest first). ``"k1"``: the order
      alone, dK/dV written directly as by default.

    The split ends with the same fp32 sums as the registers', in another order, and one rounding to the input
    dtype; it stays deterministic. (Session 10's ``"1"``, one program per query head on K/V repeated per query
    head, measured below ``"k4"`` and was removed in session 21.)

    Why: a kv-head program loops over its ``group`` query heads and, causal, over every query block at or after its
    key block, so with few kv heads the first key blocks' programs are the critical path. Qwen2-0.5B (14 query heads,
    2 kv heads, D 64; the OneVision-0.5B step's language model, 2 documents of 5453 tokens): 172 programs whose
    heaviest does 602 block iterations against 401 on average per SM (132 SMs, one program each: 67% busy at best).
    ``"k4"``: 688 programs longest first, 98%, plus ~45 MB of partials (``benchmarks/dkdv_schedule.py``
    counts these). Predictions and results: docs/perf-notes.md, "GQA split of the dK/dV kernel"."""
    value = _ext.env_str("LLAVA_FAST_ATTN_GQA_SPLIT", "k4")
    parts = int(value[1:]) if value[:1] == "k" and value[1:].isdigit() else 0
    if value != "0" and parts < 1:
        raise ValueError(f"LLAVA_FAST_ATTN_GQA_SPLIT={value!r}: must be '0' (off) or 'kN' with N >= 1 (N programs "
                         f"per kv head, e.g. 'k4', the default)")
    if group == 1 or value == "0":
        return "off", 1
    per = _ext.cdiv(group, min(parts, group))
    return "kernel", _ext.cdiv(group, per)


_HEAVY_FIRST_KV_BYTES = 16 << 20


def _heavy_first(causal: bool, k: torch.Tensor, n_blocks: int) -> bool:
    """``LLAVA_FAST_ATTN_HEAVY_FIRST=1`` (session 15; the default since session 17, ``0`` turns it off: on an H200 the
    OneVision-0.5B attention forward ran 0.336 -> 0.291 ms, 1.16x, the ``gqa`` op of device_check): the causal
    forward and dQ kernels launched query-block-major, (documents x Hq, query blocks) with the heaviest block first,
    so that every (document, head)'s heaviest programs start before any lighter one, instead of one (document,
    head)'s blocks after another's (the other order keeps each one's K/V hot in L2 while its blocks run). A
    list-scheduling count (benchmarks/dkdv_schedule.py's method) puts the default order at 0.80 of the machine for
    the OneVision forward (two CTAs per SM, 1204 programs) against 0.96 longest first; 0.90 -> 0.99 at one CTA per
    SM (the dQ kernel); causal 4k D128 0.97 -> 1.00; prefill 0.97 -> 1.00. Only where all K/V fit in L2 many times
    over (<= 16 MB: GQA models such as Qwen2-0.5B, 5.6 MB for two 5453-token documents; MHA batches such as causal
    4k D128, 268 MB, would stream their K/V from DRAM once per query block), and for fewer than 65536 query blocks
    (grid axis 1)."""
    if not causal or _ext.env_choice("LLAVA_FAST_ATTN_HEAVY_FIRST", ("0", "1"), "1") == "0":
        return False
    return 2 * k.numel() * k.element_size() <= _HEAVY_FIRST_KV_BYTES and n_blocks <= 65535


def _query_block_grid(causal: bool, k: torch.Tensor, max_seqlen_q: int, batch: int, hq: int):
    """``(grid_of, constexprs)`` of a kernel with one program per (query block, document, query head), the forward
    and dQ: (query blocks, documents, Hq), or with :func:`_heavy_first` (documents x Hq, query blocks) and the
    kernel's ``QB_MAJOR`` (``_query_block_pid``)."""
    if _heavy_first(causal, k, _ext.cdiv(max_seqlen_q, 16)):
        return (lambda bm, bn: (batch * hq, _ext.cdiv(max_seqlen_q, bm))), dict(QB_MAJOR=True, n_q_heads=hq)
    return (lambda bm, bn: (_ext.cdiv(max_seqlen_q, bm), batch, hq)), {}


def _strides(align: int, *tensors: torch.Tensor) -> tuple[int, ...]:
    """(stride(0), stride(1)) of each tensor divided by ``align`` (see :func:`_stride_align`), flattened."""
    return tuple(t.stride(i) // align for t in tensors for i in (0, 1))


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _device_guard(t: torch.Tensor):
    return _ext.device_guard(t.device)


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 dots (no silent TF32); fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


# Opt-in dense forward on CUTLASS's Hopper FMHA (csrc/cutlass/attention_sm90*.cu): for calls whose documents all
# have one length, a multiple of 8, with Hq == Hkv, D in {64, 128} and the default scale; the backward stays on the
# Triton kernels.
_CUTLASS_ENV = "LLAVA_FAST_ATTN_CUTLASS"
_cutlass_runs = 0       # successful CUTLASS forwards (tests assert the kernel ran rather than the Triton one)


def cutlass_fwd_unusable(q, k, v, batch: int, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                         causal: bool, seqused_k=None) -> str | None:
    """Why the CUTLASS dense forward cannot take this call (None: it can). Every document must have the same
    length, which the shapes say without a host sync: ``total == batch * max_seqlen`` (each length is at most the
    max, so all equal it), for q and k alike, and Sq == Sk (CUTLASS's causal mask is top-left, ours bottom-right:
    the same then)."""
    total_q, hq, d = q.shape
    if _ext.cutlass_dtype_code(q.dtype) is None:
        return f"dtype {q.dtype} (bf16 and fp16 only)"
    if d not in (64, 128):
        return f"head dim {d} (64 and 128 are built)"
    if k.shape[1] != hq:
        return f"GQA/MQA ({hq} query heads, {k.shape[1]} key heads)"
    if seqused_k is not None:
        return "seqused_k (KV cache)"
    if max_seqlen_q != max_seqlen_k or total_q != batch * max_seqlen_q or k.shape[0] != batch * max_seqlen_k:
        return "documents of different lengths (or Sq != Sk)"
    if max_seqlen_q % 8:
        # the FMHA's can_implement (its TMA loads: 16-byte aligned rows) takes lengths that are multiples of 8 only;
        # CLIP's 577 and SigLIP's 729 tokens are not (the H200 run of session 10 fell back there)
        return f"document length {max_seqlen_q} (the CUTLASS FMHA needs a multiple of 8)"
    if abs(softmax_scale - d ** -0.5) > 1e-6 * d ** -0.5:
        return f"softmax_scale {softmax_scale} (the kernel's is fixed at 1/sqrt(D))"
    for t in (q, k, v):
        if not t.is_contiguous() or t.data_ptr() % 16:
            return "a non-contiguous or unaligned q, k or v"
    return _ext.cutlass_unavailable(q.device, need="attn_fwd")


def _cutlass_warn(msg: str) -> None:
    _ext.warn_once(f"attention: LLAVA_FAST_ATTN_CUTLASS=1: {msg}; using the Triton forward")


def _cutlass_fwd(q, k, v, out, lse, batch, max_seqlen_q, max_seqlen_k, softmax_scale, causal, seqused_k) -> bool:
    """The forward through CUTLASS when opted in and possible; False: the caller runs the Triton kernel."""
    global _cutlass_runs
    if _ext.env_choice(_CUTLASS_ENV, ("0", "1"), "0") != "1":
        return False
    why = cutlass_fwd_unusable(q, k, v, batch, max_seqlen_q, max_seqlen_k, softmax_scale, causal, seqused_k)
    if why is not None:
        _cutlass_warn(why)
        return False
    _, hq, d = q.shape
    rc, msg = _ext.cutlass_invoke("attn_fwd", q.device, _ext.cutlass_dtype_code(q.dtype), int(bool(causal)),
                                  batch, hq, max_seqlen_q, d, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                  out.data_ptr(), lse.data_ptr())
    if rc != 0:
        _cutlass_warn(f"attn_fwd returned {rc}: {msg}")
        return False
    _cutlass_runs += 1
    return True


def flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, seqused_k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher. Returns ``out (total_q, Hq, D)`` in q.dtype and ``lse (Hq, total_q)`` fp32.
    Inputs must already be validated (see :func:`_check_inputs`). ``seqused_k``: see the module docstring."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    if k.shape[0] == 0 or max_seqlen_k == 0:  # no keys anywhere
        return out.zero_(), lse.fill_(float("inf"))
    if _cutlass_fwd(q, k, v, out, lse, batch, max_seqlen_q, max_seqlen_k, softmax_scale, causal, seqused_k):
        return out, lse
    d0, d1, has_d1 = _split_head_dim(d)
    used = seqused_k is not None
    align = _stride_align(q, k, v, out)
    args = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k if used else cu_seqlens_k,
            *_strides(align, q, k, v, out), lse.stride(0), softmax_scale * _LOG2E, hq // hkv, _bucket(max_seqlen_q))
    constexprs = dict(HEAD_DIM=d, BLOCK_D0=d0, BLOCK_D1=d1, HAS_D1=has_d1, CAUSAL=bool(causal),
                      DOT_PREC=_dot_prec(q.dtype), HAS_SEQUSED=used, ALIGN=align,
                      D1_LO=_chunk1_start(d, d0, d1, has_d1),
                      SCALE_FIRST=_ext.env_choice("LLAVA_FAST_ATTN_FOLD", ("0", "1"), "1") == "0")
    kind = "fwd_decode" if used and max_seqlen_q <= 16 else "fwd"
    if kind == "fwd":
        grid_of, extra = _query_block_grid(causal, k, max_seqlen_q, batch, hq)
        constexprs.update(extra)
    else:
        grid_of = lambda bm, bn: (_ext.cdiv(max_seqlen_q, bm), batch, hq)  # noqa: E731
    with _device_guard(q):
        _launch(kind, _flash_attn_fwd_kernel, grid_of, args, constexprs, max_seqlen_q)
    return out, lse


def _bwd_preprocess(out, dout, delta, dlse=None) -> None:
    """delta = rowsum(dO * O) into ``delta`` (hq, total_q).

    ``dlse`` (hq, total_q), the gradient of the lse output when it was used downstream: since d lse_i / d s_ij =
    P_ij, it adds dlse_i * P_ij to dS_ij = P_ij * (dP_ij - delta_i), i.e. delta_i becomes delta_i - dlse_i. The
    backward kernels are unchanged (rows that see no key have P = 0 and stay 0)."""
    hq, total_q = delta.shape
    d = out.shape[-1]
    block_t = 16 if _ext.interpreting() else 64
    # dlse as delta is laid out, (hq, total_q) contiguous (a copy only if it is not: lse.sum() gives an expanded one)
    with_dlse = {} if dlse is None else dict(DLSE=dlse.float().contiguous(), HAS_DLSE=True)
    _ext.launch(
        _flash_attn_bwd_preprocess_kernel, (_ext.cdiv(total_q, block_t), hq), out, dout, delta, total_q,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HEAD_DIM=d, BLOCK_D=_ext.next_power_of_2(d), BLOCK_T=block_t, **with_dlse)


def flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, dlse=None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: ``(dq, dk, dv)``, contiguous, in the input dtypes. Deterministic (no atomics).
    ``dlse``: optional gradient of the lse output, ``(Hq, total_q)`` fp32 (see :func:`_bwd_preprocess`)."""
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    batch = cu_seqlens_q.shape[0] - 1
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if total_q == 0 or total_k == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    # every row is written by the kernels (keys of a document without queries get zeros): no memset
    dq = torch.empty((total_q, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_k, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((total_k, hkv, d), dtype=v.dtype, device=v.device)
    d0, d1, has_d1 = _split_head_dim(d)
    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    qk_scale = softmax_scale * _LOG2E
    group = hq // hkv
    with _device_guard(q):
        _bwd_preprocess(out, dout, delta, dlse)
        align = _stride_align(q, k, v, dout, dq, dk, dv)
        constexprs = dict(HEAD_DIM=d, BLOCK_D0=d0, BLOCK_D1=d1, HAS_D1=has_d1, CAUSAL=bool(causal),
                          DOT_PREC=_dot_prec(q.dtype), ALIGN=align, D1_LO=_chunk1_start(d, d0, d1, has_d1))
        split, parts = _gqa_split(group)
        extra = {}
        dk_args, dv_args, al, partials = dk, dv, align, None
        if split == "kernel":
            extra = dict(n_kv=hkv, n_parts=parts, heads_per_part=_ext.cdiv(group, parts))
            if parts > 1:  # `parts` programs per kv head, each into its own fp32 partial ("k1": the order alone)
                partials = torch.empty((parts, 2, total_k, hkv, d), dtype=torch.float32, device=k.device)
                dk_args, dv_args = partials[0, 0], partials[0, 1]
                al = _stride_align(q, k, v, dout, dk_args, dv_args)
                extra.update(stride_dkp=partials.stride(0), stride_dvp=partials.stride(0))
        args = (q, k, v, dout, lse, delta, dk_args, dv_args, cu_seqlens_q, cu_seqlens_k,
                *_strides(al, q, k, v, dout, dk_args, dv_args), lse.stride(0), qk_scale, softmax_scale, group,
                _bucket(max_seqlen_k))
        n_prog = hkv * parts
        kb_major = split == "kernel" and _ext.cdiv(max_seqlen_k, 16) <= 65535  # grid axis 1 holds the key blocks
        if kb_major:  # key-block-major: every first key block before any second one
            grid_of = lambda bm, bn: (batch * n_prog, _ext.cdiv(max_seqlen_k, bn))  # noqa: E731
        else:
            grid_of = lambda bm, bn: (_ext.cdiv(max_seqlen_k, bn), batch, n_prog)  # noqa: E731
        _launch("dkdv", _flash_attn_bwd_dkdv_kernel, grid_of, args,
                dict(constexprs, ALIGN=al, PARTS=split == "kernel", KB_MAJOR=kb_major, **extra))
        if partials is not None:  # the parts' fp32 partials summed, rounded once to the input dtype: one launch
            # (was two sums and two copies: four aten calls, ~30-50 us of host each on a slow box)
            n = total_k * hkv * d
            block = 1024 if _ext.interpreting() else 4096
            _ext.launch(_sum_parts_kernel, (_ext.cdiv(n, block), 2), partials, dk, dv, n, parts, BLOCK=block,
                        num_warps=4)
            del partials, dk_args, dv_args
        args = (q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *_strides(align, q, k, v, dout, dq),
                lse.stride(0), qk_scale, softmax_scale, group, _bucket(max_seqlen_q))
        grid_of, dq_extra = _query_block_grid(causal, k, max_seqlen_q, batch, hq)
        _launch("dq", _flash_attn_bwd_dq_kernel, grid_of, args, dict(constexprs, **dq_extra))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops (opaque to torch.compile, with fake implementations)
# ----------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::flash_attn_varlen_fwd", mutates_args=())
def _flash_attn_varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                              causal: bool, seqused_k: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                 causal, seqused_k)


@_flash_attn_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, seqused_k=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@_ext.custom_op("llava_fast::flash_attn_varlen_bwd", mutates_args=())
def _flash_attn_varlen_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                              causal: bool, dlse: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, causal, dlse)


@_flash_attn_varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      dlse=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


# ----------------------------------------------------------------------------------------------------------------
# 5. autograd.Function
# ----------------------------------------------------------------------------------------------------------------
class FlashAttnVarlenFunction(torch.autograd.Function):
    """Triton varlen attention with autograd. Inputs must be validated; see :func:`flash_attn_varlen_func`.

    Both outputs are differentiable: a gradient reaching ``lse`` (used downstream, e.g. to merge the outputs of
    attention over several key chunks) enters the backward as ``delta - dlse`` (see :func:`_bwd_preprocess`).
    ``lse_grad=False`` (:func:`flash_attn_varlen_func` without ``return_lse``, where the lse never leaves) marks it
    non-differentiable instead, so that a traced backward (torch.compile) gets no zero-filled lse gradient to read.
    The backward itself is not differentiable: with ``create_graph=True`` the gradients it returns raise when
    differentiated again (instead of silently acting as constants)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                deterministic=False, seqused_k=None, lse_grad=True):
        out, lse = _flash_attn_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                              max_seqlen_k, softmax_scale, causal, seqused_k)
        ctx.has_seqused_k = seqused_k is not None
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        ctx.set_materialize_grads(False)  # dlse None when lse is unused: the backward runs as without it
        ctx.lse_grad = bool(lse_grad)
        if not lse_grad:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if ctx.has_seqused_k:
            raise RuntimeError("flash_attn_varlen_func: the backward does not support seqused_k (forward only, for "
                               "KV-cache inference); call it under torch.no_grad() or without seqused_k")
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        if dout is None:  # only lse was used downstream
            dout = torch.zeros_like(out)
        if not ctx.lse_grad:  # non-differentiable: a traced backward may still hand in a zero-filled dlse
            dlse = None
        with torch.no_grad():  # no atomics: bitwise deterministic, whatever ``deterministic`` says
            dq, dk, dv = _flash_attn_varlen_bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                   ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal,
                                                   dlse)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: refuse a double backward loudly
            dq, dk, dv = _ext.not_differentiable_again((dq, dk, dv), (q, k, v, dout, dlse), "flash_attn_varlen_func")
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# 6. Functional API
# ----------------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seqused_k=None):
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (attention dropout is not implemented), got {dropout_p}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total_tokens, heads, head_dim), got {tuple(t.shape)}; "
                             f"for (batch, seqlen, heads, head_dim) inputs use flash_attn_func")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; use torch.float16, torch.bfloat16 or torch.float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all inputs to one device")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride(-1) == 1), got strides "
                             f"{tuple(t.stride())}; call {name}.contiguous() (token and head strides may be anything)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    d = q.shape[2]
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) must be a multiple of 8 between 8 and {MAX_HEAD_DIM}, got {d}")
    if k.shape[2] != d or v.shape[2] != d:
        raise ValueError(f"head_dim of k ({k.shape[2]}) and v ({v.shape[2]}) must equal q's ({d})")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same (total_k, heads) shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of kv heads ({hkv}) "
                         f"(GQA/MQA)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must have dtype torch.int32, got {cu.dtype}; use {name}.to(torch.int32)")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it to q's device")
        if cu.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous; call {name}.contiguous()")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} must "
                         f"have the same length (batch + 1)")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)):
            raise ValueError(f"{name} must be a Python int (the longest document), got {type(m).__name__}; pass it "
                             f"from the host, do not read it from a GPU tensor inside the step")
        if m < 0:
            raise ValueError(f"{name} must be >= 0, got {m}")
    if seqused_k is not None:
        batch = cu_seqlens_k.shape[0] - 1
        if not isinstance(seqused_k, torch.Tensor) or seqused_k.dtype != torch.int32:
            raise ValueError(f"seqused_k must be an int32 tensor of shape (batch,), got "
                             f"{seqused_k.dtype if isinstance(seqused_k, torch.Tensor) else type(seqused_k).__name__}"
                             f"; use seqused_k.to(torch.int32)")
        if seqused_k.shape != (batch,):
            raise ValueError(f"seqused_k must have shape (batch,) = ({batch},) (one key count per document), got "
                             f"{tuple(seqused_k.shape)}")
        if seqused_k.device != q.device:
            raise ValueError(f"seqused_k is on {seqused_k.device} but q is on {q.device}; move it to q's device")
        if seqused_k.stride(0) != 1:
            raise ValueError("seqused_k must be contiguous; call seqused_k.contiguous()")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("seqused_k is forward only (KV-cache inference): call flash_attn_varlen_func under "
                             "torch.no_grad() / torch.inference_mode(), or detach q, k and v")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                           return_lse: bool = False, deterministic: bool = False, seqused_k=None):
    """Attention over packed documents (flash-attn's ``flash_attn_varlen_func`` argument order).

    Args:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)`` with ``Hq % Hkv == 0``; fp16, bf16 or fp32; last dim
            contiguous (any token/head strides, e.g. ``qkv.view(T, 3, H, D)[:, 0]``).
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` on q's device, non-decreasing (``cu_seqlens_k``: see
            ``seqused_k``) and within q's and k's rows (not checked: that would need a host sync). Rows of q
            outside every document (before ``cu_seqlens_q[0]``, from ``cu_seqlens_q[-1]`` on) and rows of k outside
            every document are not computed by the kernels, as in flash-attn: their ``out``, ``lse`` and gradient
            rows are left uninitialized (the CPU reference gives out 0, lse +inf, gradients 0). To pad a pack to a
            fixed number of tokens, make the padding one more document.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest document (they size the grid; never read from
            the GPU); larger is fine. Smaller is not checked (that would need a host sync) and gives wrong results
            without an error, as in flash-attn: the query rows of a document past ``max_seqlen_q`` are not computed
            (their out, lse and dq left uninitialized, and the document's dk, dv wrong), and in the backward the key
            rows past ``max_seqlen_k`` neither (dk, dv uninitialized); ``max_seqlen_k = 0`` means no keys (out 0).
        dropout_p: must be 0.0.
        softmax_scale: defaults to ``D ** -0.5``.
        causal: bottom-right aligned causal mask per document.
        return_lse: also return the softmax log-sum-exp ``(Hq, total_q)`` fp32 (natural log of the scaled scores;
            ``+inf`` for queries that see no key). Differentiable: a gradient reaching it is included in dq and dk.
        deterministic: accepted for flash-attn compatibility; the backward (dK/dV kernel + dQ kernel, 7 GEMMs per
            block pair, no atomics) is bitwise deterministic either way.
        seqused_k: optional int32 ``(batch,)`` on q's device (forward only, no gradients): document ``b``'s keys are
            ``k[cu_seqlens_k[b] : cu_seqlens_k[b] + seqused_k[b]]`` (only the starts ``cu_seqlens_k[:-1]`` are read;
            they need not be increasing), causal bottom-right against ``seqused_k[b]`` keys. ``max_seqlen_k`` must
            bound ``seqused_k``. For a preallocated KV cache ``(B, Lmax, Hkv, D)``: ``k = cache.view(B * Lmax, Hkv,
            D)``, ``cu_seqlens_k = arange(B + 1) * Lmax``, ``max_seqlen_k = Lmax``.

    Returns:
        ``out (total_q, Hq, D)`` in q's dtype, or ``(out, lse)``.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seqused_k)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"flash_attn_varlen_func: softmax_scale must be a positive finite number (default "
                         f"head_dim ** -0.5), got {softmax_scale!r}")
    if backend.use_fast("attention", q.device.type):
        if cu_seqlens_k is cu_seqlens_q and torch.compiler.is_compiling():
            # dynamo refuses an autograd.Function given one tensor twice ("duplicate tensor input"), and self-attention
            # passes cu, cu (flash_attn_func too): an alias, free inside the compiled graph
            cu_seqlens_k = cu_seqlens_q.view(-1)
        out, lse = FlashAttnVarlenFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                 scale, bool(causal), bool(deterministic), seqused_k,
                                                 bool(return_lse))
    else:
        out, lse = attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=scale,
                                 return_lse=True, seqused_k=seqused_k)
    return (out, lse) if return_lse else out


def _dense_cu_seqlens(bsz: int, s: int, device) -> torch.Tensor:
    """cu_seqlens of ``bsz`` documents of ``s`` tokens; an empty batch (or ``s == 0``) as empty documents."""
    if bsz > 0 and s > 0:
        return torch.arange(0, (bsz + 1) * s, s, dtype=torch.int32, device=device)
    return torch.zeros(max(bsz, 1) + 1, dtype=torch.int32, device=device)


def flash_attn_func(q, k, v, causal: bool = False, softmax_scale: float | None = None):
    """Dense attention on ``(B, S, H, D)`` tensors (flash-attn layout): ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hkv, D)``.
    Returns ``(B, Sq, Hq, D)``. Runs the varlen kernel with equal-length documents (causal bottom-right aligned)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seqlen, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    bsz, sq, hq, d = q.shape
    sk = k.shape[1]
    if k.shape[0] != bsz or v.shape[0] != bsz:
        raise ValueError(f"q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if v.shape[1] != sk:
        raise ValueError(f"k and v must have the same sequence length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    cu_q = _dense_cu_seqlens(bsz, sq, q.device)
    cu_k = _dense_cu_seqlens(bsz, sk, q.device) if sk != sq else cu_q
    out = flash_attn_varlen_func(q.reshape(bsz * sq, hq, d), k.reshape(bsz * sk, k.shape[2], k.shape[3]),
                                 v.reshape(bsz * sk, v.shape[2], v.shape[3]), cu_q, cu_k, sq, sk,
                                 softmax_scale=softmax_scale, causal=causal)
    return out.view(bsz, sq, hq, d)
