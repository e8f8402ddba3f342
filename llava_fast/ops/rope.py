"""Rotary position embedding (RoPE) for q and k in one kernel, for packed (varlen) sequences.

Numerics are HF ``LlamaRotaryEmbedding`` (default rope_type) + ``apply_rotary_pos_emb``::

    inv_freq = 1 / theta ** (arange(0, D, 2).float() / D)          # fp32, on the host
    freqs = position_ids.float()[..., None] * inv_freq             # fp32
    cos, sin = cos(cat(freqs, freqs)).to(x.dtype), sin(...).to(x.dtype)
    out = x * cos + rotate_half(x) * sin                           # rotate_half(x) = cat(-x2, x1) (halves, not pairs)

q is ``(T, Hq, D)`` and k ``(T, Hkv, D)`` (or ``(B, S, H, D)``), ``position_ids`` one position per token (restarting
at every packed sample). The kernel recomputes cos/sin from ``position_ids`` (no table in HBM; each program computes
them once for its tokens and reuses them for every head), or gathers them from a precomputed fp32 cache.
The rotation is orthogonal: the backward is the same rotation with ``-sin``; nothing is saved but position_ids.

Traffic per token: reads and writes ``(Hq + Hkv) * D`` elements each (plus 8 bytes of position id): 2 x (Hq+Hkv) D b.
"""
from typing import Optional

import math

import torch

from llava_fast import _ext, backend

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

try:  # precise sin/cos (the CUDA math library, as torch uses); missing under the interpreter's patching
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover
    libdevice = None


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """HF's default ``inv_freq``: ``1 / theta ** (arange(0, D, 2).float() / D)``, shape ``(D/2,)`` fp32, computed on
    the CPU as transformers does (at model init) and then moved: CUDA's pow differs from the CPU's by an ulp for some
    frequencies, and at position 3000 one ulp of inv_freq moves the angle by ~2e-4 rad (seen on an H200: 3e-5 off
    HF's fp32 result where the CPU-computed inv_freq matches it)."""
    dev = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling():
        return _inv_freq_cpu(head_dim, theta).to(dev)
    key = (int(head_dim), float(theta), str(dev))
    if key not in _INV_FREQ:  # one (blocking) copy per (dim, theta, device), not one per call
        _INV_FREQ[key] = _inv_freq_cpu(head_dim, theta).to(dev)
    inv = _INV_FREQ[key]
    return inv.clone() if dev.type == "cpu" else inv  # device entries are shared: read-only


def _inv_freq_cpu(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))


_INV_FREQ: dict = {}  # (head_dim, theta, device) -> fp32 inv_freq, computed on the CPU


def rope_cos_sin_cache(max_positions: int, head_dim: int, theta: float, device=None,
                       inv_freq: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` tables of shape ``(max_positions, D/2)`` computed by torch exactly as HF does (one half;
    HF's tables repeat it). Pass them as ``rope(..., cos_sin_cache=...)``; every position must be < max_positions."""
    inv = rope_inv_freq(head_dim, theta, device) if inv_freq is None else inv_freq.to(device=device)
    freqs = torch.arange(max_positions, device=device, dtype=torch.int64).float()[:, None] * inv.float()
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0,
             inv_freq: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF RoPE in plain PyTorch (bit-for-bit the same ops as ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``).

    Args:
        q: ``(T, Hq, D)`` or ``(B, S, Hq, D)``; k: ``(T, Hkv, D)`` or ``(B, S, Hkv, D)``.
        position_ids: one integer position per token, ``q.shape[:-2]`` (or anything with that many elements).
        theta: rope base (Llama 1e4, Qwen2 1e6); ignored when ``inv_freq`` is given.
    Returns:
        ``(q_embed, k_embed)`` in q's / k's dtype.
    """
    d = q.shape[-1]
    if inv_freq is None:
        inv_freq = rope_inv_freq(d, theta, q.device)
    pos = position_ids.reshape(q.shape[:-2])
    freqs = pos[..., None].float() * inv_freq.to(device=q.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().unsqueeze(-2)  # broadcast over heads
    sin = emb.sin().unsqueeze(-2)
    q_embed = (q * cos.to(q.dtype)) + (_rotate_half(q) * sin.to(q.dtype))
    k_embed = (k * cos.to(k.dtype)) + (_rotate_half(k) * sin.to(k.dtype))
    return q_embed, k_embed


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (the same ops: bit-for-bit its result and gradients): the
    reference of :func:`apply_rotary_pos_emb`, which takes transformers' cos / sin tables."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rope_rotate(X, XO, t64, tmask, d, dmask, cos, sin, H, stride_t, stride_h, stride_ot, stride_oh,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # x1 * cos - x2 * sin | x2 * cos + x1 * sin, over all heads of BLOCK_T tokens; cos/sin (BLOCK_T, 1, BLOCK_D)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = tmask[:, None, None] & (h < H)[None, :, None] & dmask[None, None, :]
            off = t64[:, None, None] * stride_t + h[None, :, None] * stride_h + d[None, None, :]
            ooff = t64[:, None, None] * stride_ot + h[None, :, None] * stride_oh + d[None, None, :]
            x1 = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(X + off + HALF, mask=mask, other=0.0).to(tl.float32)
            o1 = x1 * cos - x2 * sin
            o2 = x2 * cos + x1 * sin
            tl.store(XO + ooff, o1.to(XO.dtype.element_ty), mask=mask)
            tl.store(XO + ooff + HALF, o2.to(XO.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, POS, INV_FREQ, COS_CACHE, SIN_CACHE,
                     T, HQ, HKV, cache_len,
                     stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_qot, stride_qoh, stride_kot, stride_koh, stride_cache,
                     BACKWARD: tl.constexpr, HAS_CACHE: tl.constexpr, PRECISE: tl.constexpr,
                     ROUND_TABLE: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr):
        pid = tl.program_id(0)
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < T
        t64 = t.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        pos = tl.load(POS + t, mask=tmask, other=0)
        if HAS_CACHE:
            # positions must be < cache_len (documented); clamp so that a bad id cannot read out of bounds
            p = tl.minimum(tl.maximum(pos, 0), cache_len - 1).to(tl.int64)
            cmask = tmask[:, None] & dmask[None, :]
            cos = tl.load(COS_CACHE + p[:, None] * stride_cache + d[None, :], mask=cmask, other=0.0)
            sin = tl.load(SIN_CACHE + p[:, None] * stride_cache + d[None, :], mask=cmask, other=0.0)
        else:
            inv = tl.load(INV_FREQ + d, mask=dmask, other=0.0)
            freqs = pos.to(tl.float32)[:, None] * inv[None, :]  # one fp32 product, as HF
            if PRECISE:
                cos = libdevice.cos(freqs)
                sin = libdevice.sin(freqs)
            else:  # the CPU interpreter (numpy sin/cos)
                cos = tl.cos(freqs)
                sin = tl.sin(freqs)
        if ROUND_TABLE:  # HF casts cos/sin to the activation dtype before multiplying
            cos = cos.to(QO.dtype.element_ty).to(tl.float32)[:, None, :]
            sin = sin.to(QO.dtype.element_ty).to(tl.float32)[:, None, :]
        else:  # tables given in transformers' own dtype (apply_rotary_pos_emb): used as they are
            cos = cos.to(tl.float32)[:, None, :]
            sin = sin.to(tl.float32)[:, None, :]
        if BACKWARD:
            sin = -sin
        _rope_rotate(Q, QO, t64, tmask, d, dmask, cos, sin, HQ, stride_qt, stride_qh, stride_qot, stride_qoh,
                     HALF, BLOCK_HQ)
        _rope_rotate(K, KO, t64, tmask, d, dmask, cos, sin, HKV, stride_kt, stride_kh, stride_kot, stride_koh,
                     HALF, BLOCK_HKV)


# --------------------------------------------------------------------------------------------------------------------
# 3. launchers
# --------------------------------------------------------------------------------------------------------------------
def _as_thd(x: torch.Tensor) -> torch.Tensor:
    """(..., H, D) -> (T, H, D) with a unit last stride (a view when possible: q/k slices of a fused qkv stay views)."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _launch(q, k, qo, ko, pos, inv_freq, cos_cache, sin_cache, backward: bool, round_table: bool = True):
    t, hq, d = q.shape
    hkv = k.shape[1]
    if t == 0:
        return
    half = d // 2
    block_d = _ext.next_power_of_2(half)
    block_hq = min(_ext.next_power_of_2(hq), 16)
    block_hkv = min(_ext.next_power_of_2(hkv), 16)
    # about 4096 elements per half-tile: enough bytes in flight per program, cos/sin amortized over all heads
    block_t = max(1, min(32, 4096 // (max(block_hq, block_hkv) * block_d), _ext.next_power_of_2(t)))
    has_cache = cos_cache is not None
    grid = (_ext.cdiv(t, block_t),)
    dummy = inv_freq if inv_freq is not None else cos_cache
    with _ext.device_guard(q.device):
        _ext.launch(
            _rope_kernel, grid, q, k, qo, ko, pos, dummy, cos_cache if has_cache else dummy,
            sin_cache if has_cache else dummy,
            t, hq, hkv, cos_cache.shape[0] if has_cache else 1,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos_cache.stride(0) if has_cache else 0,
            BACKWARD=backward, HAS_CACHE=has_cache, PRECISE=(libdevice is not None and not _ext.interpreting()),
            ROUND_TABLE=round_table, HALF=half, BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_HQ=block_hq,
            BLOCK_HKV=block_hkv, num_warps=4)


def rope_fwd(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: Optional[torch.Tensor] = None,
             cos_cache: Optional[torch.Tensor] = None, sin_cache: Optional[torch.Tensor] = None,
             backward: bool = False, inplace: bool = False, round_table: bool = True,
             out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on ``q`` ``(..., Hq, D)`` and ``k`` ``(..., Hkv, D)``. ``backward=True`` rotates by -angle
    (the gradient). ``inplace=True`` writes into q and k (which must then be (T, H, D)-viewable with unit last
    stride) and returns them. Needs ``inv_freq`` (D/2 fp32) or both caches ``(P, D/2)`` (fp32; any float dtype with
    ``round_table=False``, which multiplies by the table values as they are instead of rounding them to the output
    dtype first). ``out_dtype``: the outputs' dtype (default q's and k's own; not with ``inplace``)."""
    q3, k3 = _as_thd(q), _as_thd(k)
    # the kernel indexes the tables as row * cos.stride(0) + col for both cos and sin, and inv_freq as a dense fp32
    # vector: a transposed table (or two tables with different row strides) would be read silently wrong. Rows of a
    # wider table (a slice with a unit last stride) are read in place
    if cos_cache is not None and (cos_cache.dim() != 2 or cos_cache.stride(-1) != 1
                                  or sin_cache.stride() != cos_cache.stride()):
        cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    if inv_freq is not None:
        if inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
            inv_freq = inv_freq.to(torch.float32).contiguous()
    pos = position_ids.reshape(-1)
    if not pos.is_contiguous():
        pos = pos.contiguous()
    if inplace:
        if q3.data_ptr() != q.data_ptr() or k3.data_ptr() != k.data_ptr() or q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("rope: inplace=True needs q and k with a unit last stride; pass inplace=False")
        qo, ko = q3, k3
    else:
        qo = torch.empty(q3.shape, dtype=out_dtype or q.dtype, device=q.device)
        ko = torch.empty(k3.shape, dtype=out_dtype or k.dtype, device=k.device)
    _launch(q3, k3, qo, ko, pos, inv_freq, cos_cache, sin_cache, backward, round_table)
    if inplace:
        return q, k
    return qo.view(q.shape), ko.view(k.shape)


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: Optional[torch.Tensor],
             cos_cache: Optional[torch.Tensor], sin_cache: Optional[torch.Tensor],
             backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_fwd(q, k, position_ids, inv_freq, cos_cache, sin_cache, backward, inplace=False)


@_rope_op.register_fake
def _(q, k, position_ids, inv_freq, cos_cache, sin_cache, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@_ext.custom_op("llava_fast::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: Optional[torch.Tensor],
                     cos_cache: Optional[torch.Tensor], sin_cache: Optional[torch.Tensor], backward: bool) -> None:
    rope_fwd(q, k, position_ids, inv_freq, cos_cache, sin_cache, backward, inplace=True)


@_rope_inplace_op.register_fake
def _(q, k, position_ids, inv_freq, cos_cache, sin_cache, backward):
    return None


@_ext.custom_op("llava_fast::rope_tables", mutates_args=())
def _rope_tables_op(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    out_dtype: torch.dtype, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_fwd(q, k, rows, None, cos, sin, backward, inplace=False, round_table=False, out_dtype=out_dtype)


@_rope_tables_op.register_fake
def _(q, k, rows, cos, sin, out_dtype, backward):
    return q.new_empty(q.shape, dtype=out_dtype), k.new_empty(k.shape, dtype=out_dtype)


# --------------------------------------------------------------------------------------------------------------------
# 5. autograd
# --------------------------------------------------------------------------------------------------------------------
class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq, cos_cache, sin_cache, inplace):
        ctx.save_for_backward(position_ids, inv_freq, cos_cache, sin_cache)
        if inplace:
            _rope_inplace_op(q, k, position_ids, inv_freq, cos_cache, sin_cache, False)
            ctx.mark_dirty(q, k)
            return q, k
        return _rope_op(q, k, position_ids, inv_freq, cos_cache, sin_cache, False)

    @staticmethod
    def backward(ctx, dq, dk):
        position_ids, inv_freq, cos_cache, sin_cache = ctx.saved_tensors
        g_in = (dq, dk)
        dq, dk = _rope_op(dq, dk, position_ids, inv_freq, cos_cache, sin_cache, True)
        if torch.is_grad_enabled() and not _ext._tracing():
            # create_graph=True: the rotation is linear, but its gradient through the incoming dq / dk would need
            # a differentiable backward; the kernel's result has no graph, so differentiating it again must raise
            dq, dk = _ext.not_differentiable_again((dq, dk), g_in, "rope")
        return dq, dk, None, None, None, None, None


class RoPETablesFunction(torch.autograd.Function):
    """q ``(..., Hq, D)``, k ``(..., Hkv, D)`` (token-major), ``rows`` one table row per token, ``cos`` / ``sin``
    ``(N, D/2)`` in transformers' dtype: outputs in the promoted dtype of q and the tables, as transformers'
    ``q * cos + rotate_half(q) * sin`` gives (fp32 under autocast, whose cos/sin stay fp32)."""

    @staticmethod
    def forward(ctx, q, k, rows, cos, sin):
        ctx.save_for_backward(rows, cos, sin)
        ctx.dtype = q.dtype
        out = torch.promote_types(q.dtype, cos.dtype)
        return _rope_tables_op(q, k, rows, cos, sin, out, False)

    @staticmethod
    def backward(ctx, dq, dk):
        rows, cos, sin = ctx.saved_tensors
        g_in = (dq, dk)
        dq, dk = _rope_tables_op(dq, dk, rows, cos, sin, ctx.dtype, True)   # (q and k have one dtype)
        if torch.is_grad_enabled() and not _ext._tracing():
            dq, dk = _ext.not_differentiable_again((dq, dk), g_in, "rope")
        return dq, dk, None, None, None


# --------------------------------------------------------------------------------------------------------------------
# 6. functional
# --------------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, k, position_ids, cos_sin_cache):
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
            raise ValueError(f"rope: {name} must be a float32/float16/bfloat16 tensor, got "
                             f"{getattr(x, 'dtype', type(x))}")
        if x.dim() < 3:
            raise ValueError(f"rope: {name} must be (T, heads, head_dim) or (B, S, heads, head_dim), got shape "
                             f"{tuple(x.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"rope: q ({q.dtype}) and k ({k.dtype}) must have the same dtype")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % 2:
        raise ValueError(f"rope: q and k need the same even head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"rope: q and k must have the same token dims, got {tuple(q.shape[:-2])} and "
                         f"{tuple(k.shape[:-2])}")
    if k.device != q.device or position_ids.device != q.device:
        raise ValueError(f"rope: q ({q.device}), k ({k.device}) and position_ids ({position_ids.device}) must be on "
                         f"one device")
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rope: position_ids must be int64 or int32, got {position_ids.dtype}")
    tokens = math.prod(q.shape[:-2])   # (not q[..., 0, 0].numel(): two aten selects per call)
    if position_ids.numel() != tokens:
        raise ValueError(f"rope: position_ids needs one position per token ({tokens} for q of shape "
                         f"{tuple(q.shape)}), got shape {tuple(position_ids.shape)}")
    if cos_sin_cache is not None:
        cos, sin = cos_sin_cache
        want = (cos.shape[0], q.shape[-1] // 2)
        if cos.shape != sin.shape or cos.dim() != 2 or tuple(cos.shape) != want or cos.dtype != torch.float32:
            raise ValueError(f"rope: cos_sin_cache must be two fp32 (max_positions, head_dim/2) tables "
                             f"(see rope_cos_sin_cache), got {tuple(cos.shape)} {cos.dtype} / {tuple(sin.shape)}")


def _may_overlap(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether q and k may share memory (False only when provably disjoint). The fused-qkv case, q and k slices of
    one ``(T, Hq + 2 Hkv, D)`` tensor, is disjoint: same token stride, per-token windows that do not intersect."""
    if q.numel() == 0 or k.numel() == 0 or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return False
    q3, k3 = q.reshape(-1, q.shape[-2], q.shape[-1]), k.reshape(-1, k.shape[-2], k.shape[-1])

    def span(x):  # [first, last + 1) element of x in its storage
        return x.storage_offset(), x.storage_offset() + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) + 1

    (q0, q1), (k0, k1) = span(q3), span(k3)
    if q1 <= k0 or k1 <= q0:
        return False
    st = q3.stride(0)
    if q3.shape[0] > 1 and k3.stride(0) == st and st > 0:
        wq = (q3.shape[1] - 1) * q3.stride(1) + q3.shape[2]  # one token's heads lie in [0, wq) past its start
        wk = (k3.shape[1] - 1) * k3.stride(1) + k3.shape[2]
        if wq <= st and wk <= st:
            diff = (k0 - q0) % st
            return diff < wq or diff + wk > st
    return True


def _inplace_by_copy(q: torch.Tensor, k: torch.Tensor) -> bool:
    """``inplace=True`` cases the in-place kernel cannot take, done as the reference does (rotate, then ``copy_``):
    q and k sharing memory (the kernel would rotate the shared elements twice), and q or k a view that autograd
    tracks (a Function that modifies a view in place cannot return two tensors)."""
    if _ext._tracing():  # fake tensors have no storage to compare; traced graphs keep the in-place op
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and (q._is_view() or k._is_view()):
        return True
    return _may_overlap(q, k)


def rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0,
         inv_freq: Optional[torch.Tensor] = None, cos_sin_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
         inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply HF-default RoPE to q and k in one kernel.

    Args:
        q: ``(T, Hq, D)`` (packed tokens) or ``(B, S, Hq, D)``; k: same with ``Hkv`` heads. A unit last stride is
            enough (slices of a fused qkv projection work without a copy).
        position_ids: int positions, one per token (``(T,)``, ``(1, T)`` or ``(B, S)``), restarting per sample.
        theta: rope base (Llama 1e4, Qwen2 1e6), used when ``inv_freq`` is None.
        inv_freq: optional precomputed ``(D/2,)`` fp32 inverse frequencies (see :func:`rope_inv_freq`).
        cos_sin_cache: optional fp32 ``(cos, sin)`` tables ``(P, D/2)`` from :func:`rope_cos_sin_cache`; every
            position must be < P (out-of-range ids are clamped, giving wrong angles).
        inplace: write the result into q and k (Triton path; safe in no-grad inference, and also under autograd,
            which only needs position_ids for the backward).
    Returns:
        ``(q_embed, k_embed)``, same shapes and dtypes as q and k (q and k themselves when ``inplace``).
    """
    _check(q, k, position_ids, cos_sin_cache)
    if inv_freq is None and cos_sin_cache is None:
        inv_freq = rope_inv_freq(q.shape[-1], theta, q.device)
    if not (HAS_TRITON and backend.use_fast("rope", q.device.type)):
        if cos_sin_cache is not None:
            cos, sin = cos_sin_cache
            pos = position_ids.reshape(q.shape[:-2])
            cos = torch.cat((cos[pos], cos[pos]), -1).unsqueeze(-2)
            sin = torch.cat((sin[pos], sin[pos]), -1).unsqueeze(-2)
            qe = q * cos.to(q.dtype) + _rotate_half(q) * sin.to(q.dtype)
            ke = k * cos.to(k.dtype) + _rotate_half(k) * sin.to(k.dtype)
        else:
            qe, ke = rope_ref(q, k, position_ids, theta, inv_freq)
        if inplace:
            q.copy_(qe)
            k.copy_(ke)
            return q, k
        return qe, ke
    cos_c, sin_c = cos_sin_cache if cos_sin_cache is not None else (None, None)
    if inv_freq is not None and (inv_freq.device != q.device or inv_freq.dtype != torch.float32
                                 or not inv_freq.is_contiguous()):
        inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    if inplace and _inplace_by_copy(q, k):
        qe, ke = RoPEFunction.apply(q, k, position_ids, inv_freq, cos_c, sin_c, False)
        q.copy_(qe)
        k.copy_(ke)
        return q, k
    return RoPEFunction.apply(q, k, position_ids, inv_freq, cos_c, sin_c, bool(inplace))


def rotary_rows(cos: torch.Tensor, batch: int) -> torch.Tensor:
    """Each of the ``batch * S`` tokens' row in transformers' ``(B or 1, S, D)`` cos / sin tables, flattened to
    ``(B or 1) * S`` rows (int32): the ``rows`` of :func:`apply_rotary_pos_emb`, which ``patch_hf`` makes once per
    forward and shares between the layers."""
    bc, s = cos.shape[0], cos.shape[1]
    rows = torch.arange(bc * s, device=cos.device, dtype=torch.int32)
    return rows.repeat(batch) if bc != batch else rows


def _check_tables(q, k, cos, sin):
    for name, x, n in (("q", q, 4), ("k", k, 4), ("cos", cos, 3), ("sin", sin, 3)):
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
            raise ValueError(f"apply_rotary_pos_emb: {name} must be a float32/float16/bfloat16 tensor, got "
                             f"{getattr(x, 'dtype', type(x))}")
        if x.dim() != n:
            raise ValueError(f"apply_rotary_pos_emb: {name} must have {n} dims (q, k: (batch, heads, seq, head_dim); "
                             f"cos, sin: (batch or 1, seq, head_dim)), got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"apply_rotary_pos_emb: {name} is on {x.device}, q on {q.device}: put them on one device")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:] or k.dtype != q.dtype:
        raise ValueError(f"apply_rotary_pos_emb: k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype} "
                         f"in batch, seq, head_dim and dtype")
    if cos.shape != sin.shape or cos.dtype != sin.dtype or cos.shape[0] not in (1, b) or cos.shape[1:] != (s, d):
        raise ValueError(f"apply_rotary_pos_emb: cos / sin must both be (batch or 1, seq, head_dim) = "
                         f"({b} or 1, {s}, {d}) of one dtype, got {tuple(cos.shape)} {cos.dtype} / "
                         f"{tuple(sin.shape)} {sin.dtype}")
    if d % 2:
        raise ValueError(f"apply_rotary_pos_emb: head_dim must be even, got {d}")


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1,
                         rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` on q and k in one kernel (``patch_hf(rope=True)``).

    Args:
        q: ``(B, Hq, S, D)``, k: ``(B, Hkv, S, D)`` (transformers' attention layout; any strides).
        cos, sin: ``(B or 1, S, D)`` as transformers' rotary embeddings return them: the two halves of the last dim
            equal (``cat((freqs, freqs))``, every rope_type of Llama / Qwen2 / Mistral), in their dtype (the
            activations', or fp32 under autocast). The kernel reads the first halves.
        unsqueeze_dim: 1 (transformers' layout); another value runs the reference.
        rows: ``rotary_rows(cos, B)``, when the caller keeps it for several layers (made here otherwise).
    Returns:
        ``(q_embed, k_embed)`` like transformers': the promoted dtype of q and cos, in q's layout. The kernel
        multiplies in fp32 and rounds once (transformers rounds each product in bf16/fp16); the backward is the
        rotation by the opposite angle. The reference (CPU path) is transformers' own computation.
    """
    if unsqueeze_dim != 1 or not (HAS_TRITON and backend.use_fast("rope", q.device.type)):
        return apply_rotary_ref(q, k, cos, sin, unsqueeze_dim)
    _check_tables(q, k, cos, sin)
    b, s, d = q.shape[0], q.shape[2], q.shape[3]
    if rows is None:
        rows = rotary_rows(cos, b)
    elif rows.numel() != b * s:
        raise ValueError(f"apply_rotary_pos_emb: rows needs one table row per token ({b * s}), got {rows.numel()}: "
                         f"pass rotary_rows(cos, q.shape[0])")
    # the first halves of the last dim, as (B or 1) * S table rows read in place (views: nothing is copied)
    half = d // 2
    cos_h, sin_h = cos.reshape(-1, d)[:, :half], sin.reshape(-1, d)[:, :half]
    qo, ko = RoPETablesFunction.apply(q.transpose(1, 2), k.transpose(1, 2), rows, cos_h, sin_h)
    return qo.transpose(1, 2), ko.transpose(1, 2)


if HAS_TRITON:
    backend.register_fast("rope", "triton")

__all__ = ["rope_inv_freq", "rope_cos_sin_cache", "rope_ref", "rope_fwd", "RoPEFunction", "rope", "apply_rotary_ref",
           "rotary_rows", "RoPETablesFunction", "apply_rotary_pos_emb"]
