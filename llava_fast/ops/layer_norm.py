"""LayerNorm (the CLIP and SigLIP towers' two norms per layer), forward and a backward that recomputes its statistics.

torch's CUDA LayerNorm is three kernels per layer norm in a training step of ours: the forward
(``vectorized_layer_norm_kernel``), the input gradient (``layer_norm_grad_input_kernel``) and the weight/bias gradients
(``GammaBetaBackwardCUDAKernel``), plus the forward again, since act_linear recomputes the norm's output for the
linears' weight gradients instead of keeping it. The H200 profile of the OneVision-0.5B step (session 14, 4 LLM
layers) has them at 3.02 + 1.36 + 2.44 ms per step (104 + 52 + 52 calls over SigLIP's 26 layers): ~36% of the H200's
bandwidth for the forward.

Here the forward is one pass (read x, write y) and the backward is one persistent kernel that reads x and dy, recomputes
each row's mean and rstd in registers (a row fits: N <= 32768), and writes dx, fp32 partial sums of dweight and dbias
(one row per program, then a fixed-order ``sum(0)``: deterministic) and, on request, the forward's output ``y`` (the
same expression as the forward kernel: the same bits) for the linears' weight gradients, so that act_linear needs no
recomputation launch (``LayerNormAct.grad_with_output``). Nothing but x is kept between forward and backward.

Numerics: fp32 statistics (two passes over the row in registers: mean, then the mean of squared deviations; torch uses
Welford, which rounds differently in the last bits), ``y = (x - mean) * rstd * w + b`` in fp32 rounded once, as
torch; the backward ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * w``. Against torch the
outputs differ by rounding only (the tests hold them to flash-attn's rule).

Traffic per row of N elements of b bytes: forward 2Nb; backward reads dy, x and writes dx: 3Nb (4Nb with y).

Opt-in (``backend.AUTO_REFERENCE``) until a GPU run measures it end to end: ``set_backend("layer_norm", "triton")``
or ``LLAVA_FAST_BACKEND_LAYER_NORM=triton`` (bench_model's ``llava_fast_ln_triton``).

Layout of this file (docs/style.md): reference -> Triton kernels -> launchers -> torch.library ops (+ fakes) ->
autograd Function -> functional ``layer_norm``.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from llava_fast import _ext, backend

try:  # Triton is optional: imports never fail, the reference is the fallback.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - no triton on this platform
    HAS_TRITON = False

_MAX_N = 32768  # one row must fit in registers


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def layer_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension (what transformers' CLIP/SigLIP towers call).

    Args:
        x: ``(..., N)``.
        weight, bias: ``(N,)`` or None.
        eps: variance epsilon.
    For an fp32 reference, call it on fp32 copies."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _ln_xhat(x, mask, N, eps):
        """Rows of fp32 ``x`` (zeros where masked): ``(xhat, rstd)``, xhat zero in the masked columns. One function
        for both kernels: the backward's recomputed output has the forward's bits."""
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        return xc * rstd[:, None], rstd

    @triton.jit
    def _layer_norm_fwd_kernel(X, W, B, Y, M, N, stride_x, stride_y, eps,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y, _ = _ln_xhat(x, mask, N, eps)
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_bwd_kernel(DY, X, W, B, DX, DW, DB, Y,
                               M, N, rows_per_program, stride_dy, stride_x, stride_dx, stride_y, eps,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DW: tl.constexpr,
                               HAS_DB: tl.constexpr, HAS_Y: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
        # Persistent: program `pid` owns rows [pid * rows_per_program, ...), recomputes their statistics from x, and
        # writes one fp32 row of partial dweight / dbias sums each (the host sums the (programs, N) partials in a
        # fixed order). HAS_Y: also the forward's output y (the forward kernel's expression: the same bits).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            r64 = rows.to(tl.int64)[:, None]
            x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat, rstd = _ln_xhat(x, mask, N, eps)
            if HAS_DW:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_DB:
                db += tl.sum(dy, axis=0)
            if HAS_Y:
                y = xhat
                if HAS_W:
                    y = y * w[None, :]
                if HAS_B:
                    y = y + b[None, :]
                tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
            g = dy
            if HAS_W:
                g = dy * w[None, :]
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=cmask)
        if HAS_DB:
            tl.store(DB + pid.to(tl.int64) * N + cols, db, mask=cmask)


# --------------------------------------------------------------------------------------------------------------------
# 3. launchers
# --------------------------------------------------------------------------------------------------------------------
def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> torch.Tensor:
    """Launch the forward kernel: ``y`` of ``x``'s shape and dtype (a new contiguous tensor)."""
    n = x.shape[-1]
    x2 = _ext.as_rows(x)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m > 0:
        w = weight.contiguous() if weight is not None else x2
        b = bias.contiguous() if bias is not None else x2
        block_m, block_n, num_warps = _ext.row_config(n, 4096)
        with _ext.device_guard(x.device):
            _ext.launch(_layer_norm_fwd_kernel, (_ext.cdiv(m, block_m),), x2, w, b, y.view(m, n), m, n, x2.stride(0),
                        n, eps, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                        num_warps=num_warps)
    return y


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, want_dw: bool = True, want_db: bool = True, want_out: bool = False):
    """Launch the backward kernel: ``(dx, dweight, dbias)`` (an empty tensor for a gradient not wanted or a parameter
    that is None), and with ``want_out`` ``(dx, dweight, dbias, y)`` with ``y`` the forward's output (the same bits)
    from the same launch."""
    n = x.shape[-1]
    x2, dy2 = _ext.as_rows(x), _ext.as_rows(dy)
    m = x2.shape[0]
    want_dw = want_dw and weight is not None
    want_db = want_db and bias is not None
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps = _ext.row_config(n, 2048)
    programs, rows_per_program = _ext.persistent_split(x.device, m, block_m)
    alloc = torch.empty if m else torch.zeros   # every program stores its whole partial row
    dw_p = alloc((programs, n), dtype=torch.float32, device=x.device) if want_dw else dx
    db_p = alloc((programs, n), dtype=torch.float32, device=x.device) if want_db else dx
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_out else None
    if m > 0:
        w = weight.contiguous() if weight is not None else x2
        b = bias.contiguous() if bias is not None else x2
        with _ext.device_guard(x.device):
            _ext.launch(_layer_norm_bwd_kernel, (programs,), dy2, x2, w, b, dx, dw_p, db_p,
                        y.view(m, n) if want_out else dx, m, n, rows_per_program, dy2.stride(0), x2.stride(0), n, n,
                        eps, HAS_W=weight is not None, HAS_B=bias is not None, HAS_DW=want_dw, HAS_DB=want_db,
                        HAS_Y=want_out, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    dw = dw_p.sum(0).to(weight.dtype) if want_dw else x.new_empty(0)
    db = db_p.sum(0).to(bias.dtype) if want_db else x.new_empty(0)
    dx = dx.view(x.shape)
    return (dx, dw, db, y) if want_out else (dx, dw, db)


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops (opaque to torch.compile, with fakes for shape propagation)
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float) -> torch.Tensor:
    return layer_norm_fwd(x, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


def _grad_fakes(x, weight, bias, want_dw, want_db):
    return (x.new_empty(x.shape), x.new_empty(weight.shape if want_dw and weight is not None else (0,)),
            x.new_empty(bias.shape if want_db and bias is not None else (0,)))


@_ext.custom_op("llava_fast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, want_dw: bool = True,
                       want_db: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_bwd(dy, x, weight, bias, eps, want_dw, want_db)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, eps, want_dw=True, want_db=True):
    return _grad_fakes(x, weight, bias, want_dw, want_db)


@_ext.custom_op("llava_fast::layer_norm_bwd_out", mutates_args=())
def _layer_norm_bwd_out_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float, want_dw: bool = True,
                           want_db: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer_norm_bwd(..., want_out=True)``: the gradients and the forward's output in one launch."""
    return layer_norm_bwd(dy, x, weight, bias, eps, want_dw, want_db, want_out=True)


@_layer_norm_bwd_out_op.register_fake
def _(dy, x, weight, bias, eps, want_dw=True, want_db=True):
    return (*_grad_fakes(x, weight, bias, want_dw, want_db), x.new_empty(x.shape))


# --------------------------------------------------------------------------------------------------------------------
# 5. autograd
# --------------------------------------------------------------------------------------------------------------------
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias)
        return _layer_norm_fwd_op(x, weight, bias, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _layer_norm_bwd_op(dy, x, weight, bias, ctx.eps, bool(need[1]), bool(need[2]))
        grads = (dx, dw if need[1] and weight is not None else None, db if need[2] and bias is not None else None,
                 None)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: the kernels' results have no graph
            grads = _ext.not_differentiable_again(grads, tuple(t for t in (x, weight, bias, dy) if t is not None),
                                                  "layer_norm")
        return grads


# --------------------------------------------------------------------------------------------------------------------
# 6. functional
# --------------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_usable(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """The kernel runs: backend "layer_norm" picks it for x's device, the row fits, the parameters have x's dtype and
    device (mixed dtypes, e.g. fp32 norm weights under autocast, take torch's path) and no autocast is on."""
    if not (HAS_TRITON and isinstance(x, torch.Tensor) and x.dtype in _DTYPES and x.dim() >= 1
            and 0 < x.shape[-1] <= _MAX_N and backend.use_fast("layer_norm", x.device.type)):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return all(p is None or (p.dtype == x.dtype and p.device == x.device and p.shape == (x.shape[-1],))
               for p in (weight, bias))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, ``F.layer_norm(x, (N,), weight, bias, eps)``; the Triton kernels where
    :func:`kernel_usable` says so, torch's elsewhere.

    Args:
        x: ``(..., N)`` float32/float16/bfloat16.
        weight, bias: ``(N,)`` or None.
        eps: variance epsilon (CLIP 1e-5, SigLIP 1e-6).
    Returns:
        A tensor of ``x``'s shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise ValueError(f"layer_norm: x must be a float32/float16/bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x))}; cast it with x.to(torch.bfloat16)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != x.shape[-1]):
            raise ValueError(f"layer_norm: {name} must have shape (hidden,) = ({x.shape[-1]},) to match "
                             f"x.shape[-1], got {tuple(p.shape)}")
    if not eps >= 0:
        raise ValueError(f"layer_norm: eps must be >= 0, got {eps}")
    if not kernel_usable(x, weight, bias):
        return layer_norm_ref(x, weight, bias, eps)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not grad:   # inference, a frozen tower: no autograd node
        return _layer_norm_fwd_op(x, weight, bias, float(eps))
    return LayerNormFunction.apply(x, weight, bias, float(eps))


if HAS_TRITON:
    backend.register_fast("layer_norm", "triton")

__all__ = ["layer_norm_ref", "layer_norm_fwd", "layer_norm_bwd", "LayerNormFunction", "layer_norm", "kernel_usable"]
