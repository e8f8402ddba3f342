"""RMSNorm with Llama/Qwen2 numerics, optionally fused with the residual add that precedes it.

Numerics are exactly HF ``LlamaRMSNorm`` / ``Qwen2RMSNorm``::

    h = x.float(); h = h * rsqrt(mean(h**2, -1) + eps); out = weight * h.to(x.dtype)

i.e. the weight is applied AFTER the cast back to the input dtype, and the output dtype is
``promote(weight.dtype, x.dtype)``. With ``residual`` the op first computes ``s = x + residual`` in the input dtype
(HF's ``hidden_states = residual + hidden_states``) and returns ``(norm(s), s)``.

Layout of this file (docs/style.md): reference -> Triton kernels -> launchers -> torch.library ops (+ fakes) ->
autograd Function -> functional ``rms_norm``.

Traffic per row of N elements, b bytes each: forward reads x (+ residual) and writes out (+ s): 2Nb (4Nb fused);
backward reads dy, x (+ ds) and writes dx: 3Nb (4Nb). dweight partial sums (one fp32 row per program, then a
deterministic ``sum(0)``) and rstd (4 bytes/row) are small.
"""
from typing import Optional

import torch

from llava_fast import _ext, backend
from llava_fast.ops.act_linear import ExplicitAct

try:  # Triton is optional: imports never fail, the reference is the fallback.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - no triton on this platform
    HAS_TRITON = False

_MAX_N = 32768  # one row must fit in registers (BLOCK_N fp32 values per program)


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None):
    """HF ``LlamaRMSNorm`` numerics, in plain PyTorch.

    Args:
        x: ``(..., N)`` activations.
        weight: ``(N,)``.
        eps: variance epsilon.
        residual: optional ``(..., N)``, same dtype as ``x``; then ``s = x + residual`` is normalized.
    Returns:
        ``out`` of dtype ``promote(weight.dtype, x.dtype)``, or ``(out, s)`` when ``residual`` is given.
    For an fp32 reference, call it on ``x.float()`` / ``weight.float()``.
    """
    s = x + residual if residual is not None else x
    input_dtype = s.dtype
    h = s.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    out = weight * h.to(input_dtype)
    return (out, s) if residual is not None else out


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD,
                             M, N, stride_x, stride_r, stride_y, stride_s, eps,
                             HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0)
            # rounded to the input dtype, as HF's `residual + hidden_states`
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(S + r64 * stride_s + cols[None, :], x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(RSTD + rows, rstd, mask=rmask)
        # HF: cast back to the input dtype, THEN multiply by the weight (in the promoted dtype)
        hn = (h * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = w[None, :] * hn
        tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DS, DX, DW, Y,
                             M, N, rows_per_program, stride_dy, stride_x, stride_ds, stride_dx, stride_y,
                             HAS_DRES: tl.constexpr, HAS_Y: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, HAS_DW: tl.constexpr):
        # Persistent: program `pid` owns rows [pid * rows_per_program, ...) and writes one fp32 row of partial
        # dweight sums; the host reduces the (programs, N) partials with a fixed-order sum (deterministic).
        # HAS_Y: also write the forward's output y = w * xhat (the forward kernel's expression, the same bits), which
        # the following linears' weight gradients read: no separate recomputation launch (act_linear).
        # HAS_DW False (a frozen norm weight: stage 1's language model, LoRA): no partial dweight sums at all.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            r64 = rows.to(tl.int64)[:, None]
            x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = x.to(tl.float32) * rstd[:, None]
            # the forward multiplied the weight into xhat rounded to the input dtype
            hn = xhat.to(X.dtype.element_ty).to(tl.float32)
            if HAS_DW:
                dw += tl.sum(dy * hn, axis=0)
            if HAS_Y:
                tl.store(Y + r64 * stride_y + cols[None, :], (w[None, :] * hn).to(Y.dtype.element_ty), mask=mask)
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1) / N
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            if HAS_DRES:
                dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=cmask)


# --------------------------------------------------------------------------------------------------------------------
# 3. launchers
# --------------------------------------------------------------------------------------------------------------------
def _bwd_tile() -> int:
    """Elements per backward tile (BLOCK_M rows of BLOCK_N): 2048 by default; ``LLAVA_FAST_RMS_BWD_TILE`` (a power of
    two, 1024-16384, read at each launch) is the experiment of bench_rms_norm's ``llava_fast_bwd<tile>`` rows: more
    rows per loop iteration at small hidden sizes (N <= 1024: 2 rows at 2048) put more bytes in flight per program,
    the suspected limit of the 48-53% of bandwidth measured at N = 896 (perf-notes, "Third GPU run")."""
    v = _ext.getenv("LLAVA_FAST_RMS_BWD_TILE")
    if not v:
        return 2048
    try:
        t = int(v)
    except ValueError:
        t = 0
    if t < 1024 or t > 16384 or t & (t - 1):
        raise ValueError(f"LLAVA_FAST_RMS_BWD_TILE must be a power of two in [1024, 16384], got {v!r}")
    return t


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns ``(out, s, rstd)``; ``s`` is empty when ``residual`` is None and
    ``rstd`` (fp32, ``x.shape[:-1]``) is what the backward needs."""
    n = x.shape[-1]
    x2 = _ext.as_rows(x)
    weight = weight.contiguous()  # the kernels read it as W + col: a strided or expanded view would be misread
    m = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    # allocated in their final shapes (the kernel gets 2-D views): the returned tensors are not views, which
    # FSDP2 warns about when a wrapped layer returns one (the fused residual path returns s)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    y2 = y.view(m, n)
    if residual is not None:
        r2 = _ext.as_rows(residual)
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        s2 = s.view(m, n)
    else:
        r2, s, s2 = x2, x2.new_empty(0), y2
    if m > 0:
        block_m, block_n, num_warps = _ext.row_config(n, 4096)
        grid = (_ext.cdiv(m, block_m),)
        with _ext.device_guard(x.device):
            _ext.launch(
                _rms_norm_fwd_kernel, grid, x2, r2, weight, y2, s2, rstd,
                m, n, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0) if residual is not None else 0, eps,
                HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, s, rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dres: Optional[torch.Tensor] = None, want_out: bool = False, want_dw: bool = True):
    """Launch the backward kernel. ``x`` is the normalized input (``s`` in the fused variant), ``dres`` the
    gradient flowing into the returned ``s``. Returns ``(dx, dweight)``; ``dx`` is also the residual's gradient.
    ``want_out``: ``(dx, dweight, y)`` with ``y`` the forward's output (bitwise), written by the same kernel.
    ``want_dw=False`` (a frozen weight): ``dweight`` is an empty tensor, and neither the partial sums nor their
    reduction launch are made; ``dx`` is the same."""
    n = x.shape[-1]
    x2, dy2 = _ext.as_rows(x), _ext.as_rows(dy)
    weight = weight.contiguous()
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ds2 = _ext.as_rows(dres) if dres is not None else dx
    block_m, block_n, num_warps = _ext.row_config(n, _bwd_tile())
    programs, rows_per_program = _ext.persistent_split(x.device, m, block_m)
    # every program stores its whole partial row: no memset needed (zeros only when no program runs)
    dw_partial = ((torch.empty if m else torch.zeros)((programs, n), dtype=torch.float32, device=x.device)
                  if want_dw else dx)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device) if want_out else None
    y2 = y.view(m, n) if want_out else dx
    if m > 0:
        with _ext.device_guard(x.device):
            _ext.launch(
                _rms_norm_bwd_kernel, (programs,), dy2, x2, weight, rstd.reshape(-1), ds2, dx, dw_partial, y2,
                m, n, rows_per_program, dy2.stride(0), x2.stride(0), ds2.stride(0), dx.stride(0), y2.stride(0),
                HAS_DRES=dres is not None, HAS_Y=want_out, BLOCK_M=block_m, BLOCK_N=block_n, HAS_DW=want_dw,
                num_warps=num_warps)
    if want_dw:
        dw = dw_partial.sum(0)
        if dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
    else:
        dw = weight.new_empty(0)
    return (dx.view(x.shape), dw, y) if want_out else (dx.view(x.shape), dw)


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops (opaque to torch.compile, with fakes for shape propagation)
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, weight, eps, residual)


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return y, s, x.new_empty(x.shape[:-1], dtype=torch.float32)


@_ext.custom_op("llava_fast::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     dres: Optional[torch.Tensor], want_dw: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x, weight, rstd, dres, want_dw=want_dw)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, dres, want_dw=True):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if want_dw else (0,))


@_ext.custom_op("llava_fast::rms_norm_bwd_out", mutates_args=())
def _rms_norm_bwd_out_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                         dres: Optional[torch.Tensor],
                         want_dw: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rms_norm_bwd(..., want_out=True)``: the gradients and the forward's output in one launch."""
    return rms_norm_bwd(dy, x, weight, rstd, dres, want_out=True, want_dw=want_dw)


@_rms_norm_bwd_out_op.register_fake
def _(dy, x, weight, rstd, dres, want_dw=True):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape if want_dw else (0,)),
            x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)))


# --------------------------------------------------------------------------------------------------------------------
# 5. autograd
# --------------------------------------------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    """Always returns ``(out, s)``; ``s`` is an empty tensor when ``residual`` is None."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, s, rstd = _rms_norm_fwd_op(x, weight, residual, eps)
        ctx.has_res = residual is not None
        ctx.save_for_backward(s if ctx.has_res else x, weight, rstd)
        ctx.set_materialize_grads(False)
        if not ctx.has_res:
            ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        xs, weight, rstd = ctx.saved_tensors
        if dy is None:  # only s was used downstream
            dy = torch.zeros(xs.shape, dtype=torch.promote_types(xs.dtype, weight.dtype), device=xs.device)
        dres = ds if ctx.has_res else None
        dx, dw = _rms_norm_bwd_op(dy, xs, weight, rstd, dres, ctx.needs_input_grad[1])
        grads = (dx, dw if ctx.needs_input_grad[1] else None, (dx if ctx.has_res else None), None)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: the kernels' results have no graph
            grads = _ext.not_differentiable_again(grads, (xs, weight, dy, ds), "rms_norm")
        return grads


# --------------------------------------------------------------------------------------------------------------------
# 6. functional
# --------------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, weight, residual, eps):
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: x must be a float32/float16/bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x))}; cast it with x.to(torch.bfloat16)")
    if x.dim() < 1:
        raise ValueError("rms_norm: x must have at least one dimension (..., hidden)")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape (hidden,) = ({x.shape[-1]},) to match x.shape[-1], got "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: weight must be float32/float16/bfloat16, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}; move both to one device")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual dtype {residual.dtype} must equal x dtype {x.dtype}; "
                             f"cast one of them")
        if residual.device != x.device:
            raise ValueError(f"rms_norm: residual is on {residual.device} but x is on {x.device}")
    if not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None):
    """RMSNorm with HF Llama/Qwen2 numerics, optionally fused with the residual add before it.

    Args:
        x: ``(..., N)`` float32/float16/bfloat16.
        weight: ``(N,)``.
        eps: variance epsilon (Llama 1e-5 / 1e-6, Qwen2 1e-6).
        residual: optional ``(..., N)`` of x's dtype: normalizes ``s = x + residual`` instead of ``x``.
    Returns:
        ``out`` (dtype ``promote(x.dtype, weight.dtype)``), or ``(out, s)`` when ``residual`` is given; the
        gradient of ``s`` flows back into both ``x`` and ``residual``.
    Uses the Triton kernel for CUDA tensors (see ``llava_fast.backend``), the reference elsewhere.
    """
    _check(x, weight, residual, eps)
    if not (HAS_TRITON and backend.use_fast("rms_norm", x.device.type)):
        return rms_norm_ref(x, weight, eps, residual)
    if x.shape[-1] > _MAX_N:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} > {_MAX_N} is not supported by the Triton kernel; "
                         f"use llava_fast.set_backend('rms_norm', 'reference')")
    y, s = RMSNormFunction.apply(x, weight, residual, float(eps))
    return (y, s) if residual is not None else y


class RMSNormAct(ExplicitAct):
    """The fused RMSNorm as an :class:`~llava_fast.ops.act_linear.ExplicitAct` over ``hs = (x, weight)``: what
    ``act_linears`` recomputes for q/k/v and gate/up, differentiated by the backward kernel directly (the calls
    ``RMSNormFunction`` would make)."""

    def __init__(self, eps: float):
        self.eps = float(eps)

    def usable(self, hs) -> bool:
        return HAS_TRITON and backend.use_fast("rms_norm", hs[0].device.type) and hs[0].shape[-1] <= _MAX_N

    def forward(self, x, weight):
        return rms_norm(x, weight, self.eps)

    def recompute(self, x, weight):
        y, _, rstd = _rms_norm_fwd_op(x, weight, None, self.eps)
        return y, rstd

    def grad(self, da, hs, rstd, need):
        return _rms_norm_bwd_op(da, hs[0], hs[1], rstd, None, bool(need[1]))

    # the residual add fused in (ops/act_linear.residual_act_linears: the decoder layers' two adds per layer)
    def fusable(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """True when the kernel can compute ``s = x + residual`` exactly as ``x + residual`` would: same shape and
        device, and one of the two dtypes is the promoted one (bf16 + fp32 under autocast: the sum is fp32)."""
        if not (isinstance(residual, torch.Tensor) and residual.shape == x.shape and residual.device == x.device
                and x.dtype in _DTYPES and residual.dtype in _DTYPES and self.usable((x,))):
            return False
        return x.dtype == residual.dtype or torch.float32 in (x.dtype, residual.dtype)

    def add_forward(self, x, residual, weight):
        """``(norm(s), s, rstd)`` with ``s = x + residual`` rounded to their promoted dtype, one kernel (both addends
        are widened to fp32, summed, rounded: bitwise ``x + residual``, which is commutative)."""
        if residual.dtype == torch.float32 and x.dtype != torch.float32:
            x, residual = residual, x    # the kernel writes s in its first operand's dtype: the promoted one
        return _rms_norm_fwd_op(x, weight, residual, self.eps)

    def add_forward_autograd(self, x, residual, weight):
        """``(norm(s), s)`` differentiable by autograd (the path without recomputation)."""
        if x.dtype == residual.dtype:
            return rms_norm(x, weight, self.eps, residual)
        s = x + residual
        return rms_norm(s, weight, self.eps), s

    def add_grad(self, da, s, weight, rstd, ds, need_weight: bool = True):
        """``(dsum, dweight)``: the gradient of ``s`` (norm backward plus ``ds``, the gradient ``s`` received
        downstream, added in the kernel), i.e. of both addends, and of the weight (an empty tensor when not
        ``need_weight``: a frozen norm)."""
        return _rms_norm_bwd_op(da, s, weight, rstd, ds, need_weight)

    def add_grad_with_output(self, da, s, weight, rstd, ds, need_weight: bool = True):
        """``(dsum, dweight, norm(s))``: :meth:`add_grad` plus the forward's output (the same bits as the forward
        kernel's) from the same kernel, for the linears' weight gradients: no recomputation launch."""
        return _rms_norm_bwd_out_op(da, s, weight, rstd, ds, need_weight)


if HAS_TRITON:
    backend.register_fast("rms_norm", "triton")

__all__ = ["rms_norm_ref", "rms_norm_fwd", "rms_norm_bwd", "RMSNormFunction", "rms_norm", "RMSNormAct"]
