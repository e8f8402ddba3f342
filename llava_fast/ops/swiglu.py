"""SwiGLU activation ``silu(gate) * up`` (HF ``LlamaMLP``: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``).

Numerics follow HF eager in the activation dtype: ``silu(gate)`` is computed in fp32 and rounded to the input dtype
(torch's silu output), then multiplied by ``up`` in fp32 and rounded once. The backward recomputes silu from the saved
``gate`` instead of storing it::

    s = sigmoid(a);  d_up = dc * silu(a);  d_gate = dc * up * s * (1 + a * (1 - s))

Traffic per element of ``b`` bytes: forward reads gate, up and writes out: 3b; backward reads dc, gate, up and writes
d_gate, d_up: 5b.
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


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` exactly as HF eager. ``gate``, ``up``: ``(..., I)`` of one dtype; returns that dtype."""
    return torch.nn.functional.silu(gate) * up


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _offsets(pid, numel, N, stride, n_col_blocks, FLAT: tl.constexpr, BLOCK: tl.constexpr):
        # FLAT: all tensors contiguous, one 1-D range over M*N elements (no wasted lanes at row ends);
        # else one row segment per program with the row's own stride (e.g. halves of a fused gate_up output).
        if FLAT:
            offs_in = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs_in < numel  # numel passed from the host (an int arg equal to 1 is a constexpr)
            offs_out = offs_in
        else:
            row = (pid // n_col_blocks).to(tl.int64)
            cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
            offs_in = row * stride + cols
            mask = cols < N
            offs_out = row * N + cols
        return offs_in, mask, offs_out

    @triton.jit
    def _swiglu_fwd_kernel(A, B, C, numel, N, stride_a, stride_b, n_col_blocks,
                           FLAT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs_a, mask, offs_c = _offsets(pid, numel, N, stride_a, n_col_blocks, FLAT, BLOCK)
        offs_b, _, _ = _offsets(pid, numel, N, stride_b, n_col_blocks, FLAT, BLOCK)
        a = tl.load(A + offs_a, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs_b, mask=mask, other=0.0).to(tl.float32)
        silu = (a / (1.0 + tl.exp(-a))).to(C.dtype.element_ty).to(tl.float32)  # torch's silu, rounded as HF
        tl.store(C + offs_c, (silu * b).to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DC, A, B, DA, DB, C, numel, N, stride_dc, stride_a, stride_b, n_col_blocks,
                           FLAT: tl.constexpr, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
        # HAS_C: also write the forward's output c = silu(a) * b, by the forward kernel's expression (the same
        # bits), for down_proj's weight gradient: no separate recomputation launch (act_linear)
        pid = tl.program_id(0)
        offs_a, mask, offs_o = _offsets(pid, numel, N, stride_a, n_col_blocks, FLAT, BLOCK)
        offs_b, _, _ = _offsets(pid, numel, N, stride_b, n_col_blocks, FLAT, BLOCK)
        offs_dc, _, _ = _offsets(pid, numel, N, stride_dc, n_col_blocks, FLAT, BLOCK)
        dc = tl.load(DC + offs_dc, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + offs_a, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs_b, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        silu = (a * sig).to(DB.dtype.element_ty).to(tl.float32)  # the value the forward multiplied by `up`
        db = dc * silu
        da = dc * b * (sig * (1.0 + a * (1.0 - sig)))
        tl.store(DA + offs_o, da.to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + offs_o, db.to(DB.dtype.element_ty), mask=mask)
        if HAS_C:
            silu_f = (a / (1.0 + tl.exp(-a))).to(C.dtype.element_ty).to(tl.float32)
            tl.store(C + offs_o, (silu_f * b).to(C.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# 3. launchers
# --------------------------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if (t2.stride(-1) == 1 or t2.numel() == 0) else t2.contiguous()


def _geometry(m: int, n: int, tensors, block: int):
    flat = all(t.is_contiguous() for t in tensors)
    if flat:
        return True, block, 1, _ext.cdiv(m * n, block)
    blk = min(block, _ext.next_power_of_2(n))
    n_col_blocks = _ext.cdiv(n, blk)
    return False, blk, n_col_blocks, m * n_col_blocks


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: ``silu(gate) * up`` for ``(..., I)`` inputs with a unit last stride."""
    shape = gate.shape
    a, b = _rows(gate), _rows(up)
    m, n = a.shape
    c = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    if m * n:
        flat, block, ncb, programs = _geometry(m, n, (a, b), 2048)
        with _ext.device_guard(gate.device):
            _ext.launch(_swiglu_fwd_kernel, (programs,), a, b, c, m * n, n, a.stride(0), b.stride(0), ncb,
                        FLAT=flat, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return c.view(shape)


def swiglu_bwd(dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, want_out: bool = False):
    """Launch the backward kernel; returns ``(d_gate, d_up)`` (contiguous, input shape), and with ``want_out`` also
    the forward's output ``silu(gate) * up`` (the same bits) from the same kernel: ``(d_gate, d_up, out)``."""
    shape = gate.shape
    d, a, b = _rows(dc), _rows(gate), _rows(up)
    m, n = a.shape
    da = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    db = torch.empty((m, n), dtype=up.dtype, device=up.device)
    c = torch.empty((m, n), dtype=gate.dtype, device=gate.device) if want_out else None
    if m * n:
        flat, block, ncb, programs = _geometry(m, n, (d, a, b), 1024)
        with _ext.device_guard(gate.device):
            _ext.launch(_swiglu_bwd_kernel, (programs,), d, a, b, da, db, c if want_out else da, m * n, n,
                        d.stride(0), a.stride(0), b.stride(0), ncb, FLAT=flat, HAS_C=want_out, BLOCK=block,
                        num_warps=4)
    if want_out:
        return da.view(shape), db.view(shape), c.view(shape)
    return da.view(shape), db.view(shape)


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@_ext.custom_op("llava_fast::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dc, gate, up)


@_swiglu_bwd_op.register_fake
def _(dc, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@_ext.custom_op("llava_fast::swiglu_bwd_out", mutates_args=())
def _swiglu_bwd_out_op(dc: torch.Tensor, gate: torch.Tensor,
                       up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``swiglu_bwd(..., want_out=True)``: the gradients and the forward's output in one launch."""
    return swiglu_bwd(dc, gate, up, want_out=True)


@_swiglu_bwd_out_op.register_fake
def _(dc, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape), gate.new_empty(gate.shape)


# --------------------------------------------------------------------------------------------------------------------
# 5. autograd
# --------------------------------------------------------------------------------------------------------------------
class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd_op(gate, up)

    @staticmethod
    def backward(ctx, dc):
        gate, up = ctx.saved_tensors
        grads = tuple(_swiglu_bwd_op(dc, gate, up))
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: the kernel's results have no graph
            grads = _ext.not_differentiable_again(grads, (gate, up, dc), "swiglu")
        return grads


# --------------------------------------------------------------------------------------------------------------------
# 6. functional
# --------------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with HF numerics, fused forward and backward on CUDA.

    Args:
        gate: ``(..., I)`` output of ``gate_proj``; up: same shape and dtype (output of ``up_proj``). Row-strided
            views (e.g. the two halves of a fused gate/up projection) are read without a copy.
    Returns:
        ``(..., I)`` in the inputs' dtype.
    """
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            raise ValueError(f"swiglu: {name} must be a float32/float16/bfloat16 tensor, got "
                             f"{getattr(t, 'dtype', type(t))}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate ({gate.device}) and up ({up.device}) must be on the same device")
    if gate.dim() == 0:
        raise ValueError("swiglu: gate and up must have at least one dimension")
    if not (HAS_TRITON and backend.use_fast("swiglu", gate.device.type)):
        return swiglu_ref(gate, up)
    return SwiGLUFunction.apply(gate, up)


class SwiGLUAct(ExplicitAct):
    """:func:`swiglu` as an :class:`~llava_fast.ops.act_linear.ExplicitAct` over ``hs = (gate, up)``: what
    ``act_linear`` recomputes for down_proj, differentiated by the backward kernel directly (the call
    ``SwiGLUFunction`` would make)."""

    pointwise = True

    def usable(self, hs) -> bool:
        return HAS_TRITON and backend.use_fast("swiglu", hs[0].device.type)

    def forward(self, gate, up):
        return swiglu(gate, up)

    def recompute(self, gate, up):
        return _swiglu_fwd_op(gate, up), None

    def grad(self, da, hs, state, need):
        return _swiglu_bwd_op(da, hs[0], hs[1])

    def grad_with_output(self, da, hs, need):
        """``(grads, out)``: :meth:`grad` and the forward's output (the same bits) from one kernel launch."""
        dg, du, out = _swiglu_bwd_out_op(da, hs[0], hs[1])
        return (dg, du), out


if HAS_TRITON:
    backend.register_fast("swiglu", "triton")

__all__ = ["swiglu_ref", "swiglu_fwd", "swiglu_bwd", "SwiGLUFunction", "swiglu", "SwiGLUAct"]
