"""QuickGELU ``x * sigmoid(1.702 * x)``: the MLP activation of CLIP's towers (LLaVA-1.5 and LLaVA-NeXT).

transformers' ``QuickGELUActivation`` is three elementwise kernels (``1.702 * x``, ``sigmoid``, the product): 3 reads
and 3 writes of the MLP's widest activation. In the stage-1 H100 profile (16 x 577 tokens, 4096 wide) they took
4.1 ms per step, a quarter of the frozen tower's time. One kernel reads ``x`` and writes ``y``: 2 passes instead of 6.

Numerics follow HF eager in the activation dtype: ``t = 1.702 * x`` and ``s = sigmoid(t)`` are each computed in fp32
and rounded to the input dtype (torch's results), then ``x * s`` in fp32, rounded once. The backward recomputes ``s``
from ``x`` (nothing but ``x`` is kept)::

    dx = dy * (s + 1.702 * x * s * (1 - s))

in fp32, rounded once (autograd of the eager expression rounds each of its five steps). Traffic per element of
``b`` bytes: forward 2b; backward reads dy and x and writes dx: 3b (4b when it also writes the forward's output
for fc2's weight gradient, ``want_out``).
"""

import torch

from llava_fast import _ext, backend
from llava_fast.ops.act_linear import ExplicitAct

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

ALPHA = 1.702


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def quick_gelu_ref(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 * x)`` exactly as transformers' ``QuickGELUActivation``."""
    return x * torch.sigmoid(ALPHA * x)


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _sigmoid_of_scaled(x, DTYPE: tl.constexpr):
        # torch's two ops, each rounded to the activation dtype: t = 1.702 * x, s = sigmoid(t)
        t = (x * 1.702).to(DTYPE).to(tl.float32)
        return (1.0 / (1.0 + tl.exp(-t))).to(DTYPE).to(tl.float32)

    @triton.jit
    def _quick_gelu_fwd_kernel(X, Y, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid_of_scaled(x, Y.dtype.element_ty)
        tl.store(Y + offs, (x * s).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _quick_gelu_bwd_kernel(DY, X, DX, Y, numel, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
        # HAS_Y: also write the forward's output (the forward kernel's expression: the same bits), for the weight
        # gradient of the linear after the activation (act_linear): no separate recomputation launch
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid_of_scaled(x, DX.dtype.element_ty)
        dx = dy * (s + 1.702 * x * s * (1.0 - s))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_Y:
            tl.store(Y + offs, (x * s).to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# 3. launchers
# --------------------------------------------------------------------------------------------------------------------
_FWD_BLOCK, _BWD_BLOCK = 2048, 1024


def quick_gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel; a new contiguous tensor of ``x``'s shape and dtype."""
    return _ext.launch_pointwise_fwd(_quick_gelu_fwd_kernel, x, _FWD_BLOCK, 8)


def quick_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, want_out: bool = False):
    """Launch the backward kernel: ``dx`` (``x``'s shape and dtype), and with ``want_out`` ``(dx, y)`` with ``y`` the
    forward's output (the same bits) from the same launch."""
    return _ext.launch_pointwise_bwd(_quick_gelu_bwd_kernel, dy, x, want_out, _BWD_BLOCK, 4)


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::quick_gelu_fwd", mutates_args=())
def _quick_gelu_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return quick_gelu_fwd(x)


@_quick_gelu_fwd_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_ext.custom_op("llava_fast::quick_gelu_bwd", mutates_args=())
def _quick_gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return quick_gelu_bwd(dy, x)


@_quick_gelu_bwd_op.register_fake
def _(dy, x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_ext.custom_op("llava_fast::quick_gelu_bwd_out", mutates_args=())
def _quick_gelu_bwd_out_op(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quick_gelu_bwd(..., want_out=True)``: the gradient and the forward's output in one launch."""
    return quick_gelu_bwd(dy, x, want_out=True)


@_quick_gelu_bwd_out_op.register_fake
def _(dy, x):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------------------------------
# 5. autograd
# --------------------------------------------------------------------------------------------------------------------
class QuickGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _quick_gelu_fwd_op(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = _quick_gelu_bwd_op(dy, x)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: the kernel's result has no graph
            (dx,) = _ext.not_differentiable_again((dx,), (x, dy), "quick_gelu")
        return dx


# --------------------------------------------------------------------------------------------------------------------
# 6. functional and activation
# --------------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 * x)`` with HF numerics, one fused kernel forward and backward on CUDA.

    Args:
        x: a float32/float16/bfloat16 tensor of any shape (a strided one is copied to contiguous first).
    Returns:
        A tensor of ``x``'s shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise ValueError(f"quick_gelu: x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if not (HAS_TRITON and backend.use_fast("quick_gelu", x.device.type)):
        return quick_gelu_ref(x)
    if not (x.requires_grad and torch.is_grad_enabled()):   # inference, a frozen tower: no autograd node
        return _quick_gelu_fwd_op(x)
    return QuickGELUFunction.apply(x)


class QuickGeluAct(ExplicitAct):
    """:func:`quick_gelu` as an :class:`~llava_fast.ops.act_linear.ExplicitAct` (CLIP's MLP activation): what
    ``act_linear`` recomputes for fc2, differentiated by the backward kernel directly. Where the kernel is not used
    (the CPU), ``usable`` is False and act_linear differentiates the eager expression by autograd, as before, so the
    CPU path keeps transformers' bits."""

    pointwise = True

    def usable(self, hs) -> bool:
        return HAS_TRITON and backend.use_fast("quick_gelu", hs[0].device.type)

    def forward(self, h):
        return quick_gelu(h)

    def recompute(self, h):
        return _quick_gelu_fwd_op(h), None

    def grad(self, da, hs, state, need):
        return (_quick_gelu_bwd_op(da, hs[0]) if need[0] else None,)

    def grad_with_output(self, da, hs, need):
        """``(grads, out)``: :meth:`grad` and the forward's output (the same bits) from one kernel launch."""
        dx, out = _quick_gelu_bwd_out_op(da, hs[0])
        return (dx if need[0] else None,), out


if HAS_TRITON:
    backend.register_fast("quick_gelu", "triton")

__all__ = ["quick_gelu_ref", "quick_gelu_fwd", "quick_gelu_bwd", "QuickGELUFunction", "quick_gelu", "QuickGeluAct"]
