"""Bias gradient: the column sums ``dy.sum(0)`` of a linear's output gradient ``dy`` (M rows x N).

act_linear's backward takes each bias gradient as ``dy.sum(0)``: torch's ``reduce_kernel``, which the H200 OneVision
profile (session 14, 4 LLM layers) shows at 172 calls and 4.32 ms per step, ~30% of the copy bandwidth for the ~5.3
GB of gradients it reads (SigLIP's q, k, v, fc1 and fc2 biases on ~10k tokens; Qwen2's q, k, v biases).

Here: one Triton kernel reads ``dy`` once in (BLOCK_M x BLOCK_N) tiles, each program summing its share of the rows
of one column block into a register tile (fp32) and storing one fp32 partial row; a second, small kernel adds the
partial rows in a fixed order and rounds once to ``dy``'s dtype (deterministic; torch's result is fp32-accumulated and
rounded once too, in another order). Bytes: M N b read, N b written (+ the partials: programs x N x 4, small).

Opt-in (``backend.AUTO_REFERENCE``) until a GPU run measures it: ``set_backend("bias_grad", "triton")`` or
``LLAVA_FAST_BACKEND_BIAS_GRAD=triton`` (bench_model's ``llava_fast_bias_triton``; ``bench_bias_grad.py``).

Layout of this file (docs/style.md): reference -> Triton kernels -> launcher -> torch.library op (+ fake) ->
functional ``bias_grad`` (no autograd Function: a gradient is not differentiated again here).
"""
import torch

from llava_fast import _ext, backend

try:  # Triton is optional: imports never fail, the reference is the fallback.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - no triton on this platform
    HAS_TRITON = False


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------
def bias_grad_ref(dy: torch.Tensor) -> torch.Tensor:
    """``dy.sum(0)`` of a 2-D ``(M, N)`` gradient: what autograd computes for ``F.linear``'s bias."""
    return dy.sum(0)


# --------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _bias_grad_partial_kernel(DY, PART, M, N, stride_m, rows_per_program,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (column block, row share): the fp32 sum of rows [pid_m * rows_per_program, ...) of its columns
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_start = pid_m * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            mask = (rows < row_end)[:, None] & cmask[None, :]
            acc += tl.load(DY + rows.to(tl.int64)[:, None] * stride_m + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        tl.store(PART + pid_m.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=cmask)

    @triton.jit
    def _bias_grad_finish_kernel(PART, OUT, parts, N, BLOCK_N: tl.constexpr):
        # the partial rows added in order (deterministic), rounded once to the output dtype
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p in range(0, parts):
            acc += tl.load(PART + p * N + cols, mask=cmask, other=0.0)
        tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------------------------------------------------
# 3. launcher
# --------------------------------------------------------------------------------------------------------------------
# a 64 x 128 tile per loop iteration (16 KB of bf16 in flight per program, ~4 programs per SM) and 8 warps: each
# warp loads whole 256-byte row segments (16-byte accesses, ptxas: no spills at 56-60 registers)
_BLOCK_M, _BLOCK_N, _FINISH_N, _WARPS = 64, 128, 256, 8


def bias_grad_fwd(dy: torch.Tensor) -> torch.Tensor:
    """Launch the two kernels on a 2-D ``dy`` with a unit last stride: ``(N,)`` in ``dy``'s dtype."""
    m, n = dy.shape
    out = torch.empty(n, dtype=dy.dtype, device=dy.device)
    if n == 0:
        return out
    col_blocks = _ext.cdiv(n, _BLOCK_N)
    tiles = _ext.cdiv(m, _BLOCK_M) if m else 0
    if dy.device.type == "cuda":   # ~4 programs per SM in all
        shares = max(1, min(tiles, _ext.cdiv(4 * _ext.sm_count(dy.device), col_blocks)))
    else:                          # the interpreter: a few shares exercise the partial sums
        shares = max(1, min(tiles, 3))
    rows_per_program = _ext.cdiv(tiles, shares) * _BLOCK_M if m else 0
    shares = _ext.cdiv(m, rows_per_program) if m else 1
    part = (torch.empty if m else torch.zeros)((shares, n), dtype=torch.float32, device=dy.device)
    with _ext.device_guard(dy.device):
        if m:
            _ext.launch(_bias_grad_partial_kernel, (col_blocks, shares), dy, part, m, n, dy.stride(0),
                        rows_per_program, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_WARPS)
        _ext.launch(_bias_grad_finish_kernel, (_ext.cdiv(n, _FINISH_N),), part, out, shares, n,
                    BLOCK_N=_FINISH_N, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom op
# --------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::bias_grad", mutates_args=())
def _bias_grad_op(dy: torch.Tensor) -> torch.Tensor:
    return bias_grad_fwd(dy)


@_bias_grad_op.register_fake
def _(dy):
    return dy.new_empty(dy.shape[1:])


# --------------------------------------------------------------------------------------------------------------------
# 5. functional
# --------------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bias_grad(dy: torch.Tensor) -> torch.Tensor:
    """``dy.sum(0)`` for a 2-D gradient ``(M, N)``: the Triton kernels where backend "bias_grad" picks them (opt-in)
    and ``dy`` is a float tensor with a unit last stride, else torch's sum."""
    if not isinstance(dy, torch.Tensor) or dy.dim() != 2:
        raise ValueError(f"bias_grad: dy must be a 2-D (rows, features) tensor, got "
                         f"{tuple(dy.shape) if isinstance(dy, torch.Tensor) else type(dy)}")
    if not (HAS_TRITON and dy.dtype in _DTYPES and dy.stride(-1) == 1
            and backend.use_fast("bias_grad", dy.device.type)):
        return bias_grad_ref(dy)
    return _bias_grad_op(dy)


if HAS_TRITON:
    backend.register_fast("bias_grad", "triton")

__all__ = ["bias_grad_ref", "bias_grad_fwd", "bias_grad"]
