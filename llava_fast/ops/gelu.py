"""GELU ``x * Phi(x)`` (exact erf, transformers' "gelu") and its tanh approximation ("gelu_pytorch_tanh"): the MLP
activation of the SigLIP tower (tanh; LLaVA-OneVision) and of the projector (erf).

Forward, one kernel (torch's ``F.gelu`` is one kernel too: the same bytes). What it adds is the backward for
``act_linear``, which recomputes the activation for fc2's weight gradient and differentiates it: torch needs two
launches (``gelu`` again, then ``gelu_backward``: reads x twice, dy once, writes y and dx), the kernel here one (reads
x and dy once, writes dx and y). In the OneVision-0.5B step that is the 26 SigLIP layers' recompute launches gone
(the H100 profile's 52 ``GeluCUDAKernelImpl`` calls, 3.0 ms per step, are the 26 forwards and 26 recomputations).

Numerics as torch's: the value and the derivative in fp32 from the input, each rounded once to the activation dtype;
tanh written as ``2 sigmoid(2u) - 1`` (exp-based, on every Triton version), the erf by ``tl.math.erf``. Bytes per
element of ``b`` bytes: forward 2b; backward 3b, 4b with the forward's output (``want_out``).
"""

import torch
import torch.nn.functional as F

from llava_fast import _ext, backend

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

APPROXIMATES = ("none", "tanh")


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def gelu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=...)``, as transformers' GELU activations."""
    return F.gelu(x, approximate=approximate)


def gelu_bwd_ref(dy: torch.Tensor, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """torch's ``gelu_backward``: what autograd calls for :func:`gelu_ref`."""
    return torch.ops.aten.gelu_backward(dy, x, approximate=approximate)


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gelu_and_grad(h, APPROX_TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
        """(gelu(h), gelu'(h)) in fp32; the second is h itself when NEED_GRAD is False (unused)."""
        if APPROX_TANH:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), written with exp so it exists on every Triton version
            g = 0.5 * h * (1.0 + t)
            if NEED_GRAD:
                dg = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * h * h)
            else:
                dg = h
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
            g = h * cdf
            if NEED_GRAD:
                dg = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
            else:
                dg = h
        return g, dg

    @triton.jit
    def _gelu_fwd_kernel(X, Y, numel, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g, _ = _gelu_and_grad(x, APPROX_TANH, False)
        tl.store(Y + offs, g.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_bwd_kernel(DY, X, DX, Y, numel, APPROX_TANH: tl.constexpr, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
        # HAS_Y: also write the forward's output (the forward kernel's expression: the same bits) for the weight
        # gradient of the linear after the activation (act_linear): no separate recomputation launch
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g, dg = _gelu_and_grad(x, APPROX_TANH, True)
        tl.store(DX + offs, (dy * dg).to(DX.dtype.element_ty), mask=mask)
        if HAS_Y:
            tl.store(Y + offs, g.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# 3. launchers
# --------------------------------------------------------------------------------------------------------------------
_FWD_BLOCK, _BWD_BLOCK = 2048, 1024


def _check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATES:
        raise ValueError(f"gelu: approximate must be 'none' (exact erf GELU) or 'tanh', got {approximate!r}")


def gelu_fwd(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Launch the forward kernel; a new contiguous tensor of ``x``'s shape and dtype."""
    return _ext.launch_pointwise_fwd(_gelu_fwd_kernel, x, _FWD_BLOCK, 8, APPROX_TANH=approximate == "tanh")


def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, approximate: str = "none", want_out: bool = False):
    """Launch the backward kernel: ``dx`` (``x``'s shape and dtype), and with ``want_out`` ``(dx, y)`` with ``y`` the
    forward's output (the same bits as :func:`gelu_fwd`) from the same launch."""
    return _ext.launch_pointwise_bwd(_gelu_bwd_kernel, dy, x, want_out, _BWD_BLOCK, 4,
                                     APPROX_TANH=approximate == "tanh")


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::gelu_fwd", mutates_args=())
def _gelu_fwd_op(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return gelu_fwd(x, approximate)


@_gelu_fwd_op.register_fake
def _(x, approximate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_ext.custom_op("llava_fast::gelu_bwd", mutates_args=())
def _gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    return gelu_bwd(dy, x, approximate)


@_gelu_bwd_op.register_fake
def _(dy, x, approximate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_ext.custom_op("llava_fast::gelu_bwd_out", mutates_args=())
def _gelu_bwd_out_op(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``gelu_bwd(..., want_out=True)``: the gradient and the forward's output in one launch."""
    return gelu_bwd(dy, x, approximate, want_out=True)


@_gelu_bwd_out_op.register_fake
def _(dy, x, approximate):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------------------------------
# 5. autograd
# --------------------------------------------------------------------------------------------------------------------
class GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return _gelu_fwd_op(x, approximate)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = _gelu_bwd_op(dy, x, ctx.approximate)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: the kernel's result has no graph
            (dx,) = _ext.not_differentiable_again((dx,), (x, dy), "gelu")
        return dx, None


# --------------------------------------------------------------------------------------------------------------------
# 6. functional (the activation for act_linear is act_linear.GeluAct, which calls the ops above on CUDA)
# --------------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_usable(x: torch.Tensor) -> bool:
    """Whether :func:`gelu` (and act_linear's GeluAct) runs the Triton kernels for ``x``."""
    return HAS_TRITON and backend.use_fast("gelu", x.device.type)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=...)`` with torch's numerics, one Triton kernel forward and backward on CUDA.

    Args:
        x: a float32/float16/bfloat16 tensor of any shape (a strided one is copied to contiguous first).
        approximate: ``"none"`` (exact erf, transformers' "gelu") or ``"tanh"`` ("gelu_pytorch_tanh").
    Returns:
        A tensor of ``x``'s shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise ValueError(f"gelu: x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    _check_approximate(approximate)
    if not kernel_usable(x):
        return gelu_ref(x, approximate)
    if not (x.requires_grad and torch.is_grad_enabled()):   # inference, a frozen tower: no autograd node
        return _gelu_fwd_op(x, approximate)
    return GELUFunction.apply(x, approximate)


if HAS_TRITON:
    backend.register_fast("gelu", "triton")

__all__ = ["gelu_ref", "gelu_bwd_ref", "gelu_fwd", "gelu_bwd", "GELUFunction", "gelu", "kernel_usable"]
