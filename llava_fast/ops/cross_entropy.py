"""Fused linear cross-entropy: the lm_head GEMM and the causal-LM loss in token chunks, never holding all logits.

Math, per supervised token ``i`` (``labels[i] != ignore_index``), with ``z = hidden @ weight.T (+ bias)``::

    loss_i   = logsumexp(z_i) - z_i[labels_i]                          (fp32)
    loss     = sum_i loss_i * scale,  scale = 1 / n_supervised       (reduction="mean"; 0 when nothing is supervised)
                                      scale = 1 / num_items          (num_items given: HF gradient accumulation)
                                      scale = 1                      (reduction="sum")
    dz_i     = (softmax(z_i) - onehot(labels_i)) * scale             (0 for ignored tokens)
    d hidden = dz @ weight,   d weight = dz.T @ hidden,   d bias = dz.sum(0)

The fused path (:class:`FusedLinearCrossEntropyFunction`) does, per chunk of ``C`` tokens: one cuBLAS GEMM into a
``(C, V)`` logits buffer, one Triton kernel that computes the fp32 log-sum-exp and loss per row and overwrites the
buffer with ``dz`` in place, then two cuBLAS GEMMs for the gradients. As in Liger, the gradients are computed in the
forward (backward only scales them by ``grad_output``), so the ``(N, V)`` logits never exist. Tokens whose label is
``ignore_index`` (in LLaVA: image and prompt tokens, often most of the sequence) are dropped before the GEMMs.

Memory: ``C`` is chosen so that the logits buffer plus the optional fp32 ``d weight`` accumulator stay within
:data:`MEMORY_BUDGET_BYTES` (896 MiB): at 8k tokens x 152064 vocab x 896 hidden in bf16 that is an fp32 accumulator
(520 MiB) plus ~1200-token chunks (~350 MiB), against ~20 GB for the eager lm_head + fp32 cross-entropy.

The vocab schedule (``schedule="vocab"`` or ``LLAVA_FAST_CE_SCHEDULE=vocab``, opt-in until measured on a GPU) loops
over blocks of the vocabulary instead: two passes (log-sum-exp, then gradients) that each recompute the block's
logits, so one more GEMM, but no ``(V, H)`` accumulator: ~0.13 GB extra instead of ~0.6 GB at that shape, and every
weight-gradient row rounded once (:func:`_fused_linear_cross_entropy_vocab`; docs/perf-notes.md has the counts). Its
budget ``LLAVA_FAST_CE_VOCAB_BUDGET_MB`` (default 128) goes down to Liger's footprint (~20 MB at that shape) by
splitting the tokens into chunks as well.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llava_fast import _ext, backend

backend.register_fast("cross_entropy", "triton")

# Extra device memory the fused path may use for its logits chunk and its fp32 grad-weight accumulator. 896 MiB keeps
# the whole op (plus compaction buffers and cuBLAS workspace, < 60 MB at 8k x 896) under 1 GB beyond its inputs and
# the gradients it returns. Override with LLAVA_FAST_CE_MEMORY_BUDGET_MB.
MEMORY_BUDGET_BYTES = int(float(os.environ.get("LLAVA_FAST_CE_MEMORY_BUDGET_MB", 896)) * 2**20)
# The fp32 grad-weight accumulator is used ("auto") when it needs at most this much: 152064 x 896 (Qwen2-0.5B,
# 520 MiB) and 32064 x 4096 (Vicuna-7B, 501 MiB) qualify; 152064 x 3584 (Qwen2-7B, 2.1 GiB) does not and accumulates
# in the weight dtype instead (see _accumulate_grad_weight for why that is fine with few, large chunks).
FP32_ACCUM_MAX_BYTES = 640 * 2**20
_CHUNK_MULTIPLE = 64  # chunk rows rounded to this: keeps the cuBLAS M dimension tile-friendly
_MIN_CHUNK = 64


# ----------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# ----------------------------------------------------------------------------------------------------------------------
def cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                      num_items=None, return_logits: bool = False):
    """Plain PyTorch: lm_head, logits upcast to fp32, ``F.cross_entropy`` (HF 5.x ``ForCausalLMLoss`` numerics).

    Args:
        hidden: ``(N, H)`` final hidden states. weight: ``(V, H)`` lm_head (or tied embedding) weight.
        labels: ``(N,)`` int64, already shifted (``labels[i]`` is the target of token ``i``); ``ignore_index`` skips.
        bias: optional ``(V,)``. reduction: ``"mean"`` over supervised tokens or ``"sum"``.
        num_items: when given (int or tensor), the loss is ``sum / num_items`` whatever ``reduction`` says, as HF's
            ``fixed_cross_entropy`` does with ``num_items_in_batch``; ``num_items=0`` counts as 1.
    Returns:
        fp32 scalar loss (and ``(N, V)`` logits in the weight dtype when ``return_logits``). Unlike HF, nothing
        supervised gives 0 for ``"mean"``, not NaN.
    """
    logits = F.linear(hidden, weight, bias)
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    if num_items is not None:
        loss = total / _num_items_tensor(num_items, total.device).clamp(min=1)
    elif reduction == "mean":
        loss = total / (labels != ignore_index).sum().clamp(min=1)
    else:
        loss = total
    return (loss, logits) if return_logits else loss


def _num_items_tensor(num_items, device) -> torch.Tensor:
    if torch.is_tensor(num_items):
        return num_items.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(num_items), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Triton kernel: per row, fp32 log-sum-exp, loss, and d logits written (in place when grad_ptr == logits_ptr)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _online_max_sumexp(logits_ptr, n_cols, offs, m, s, BLOCK: tl.constexpr):
    """Fold the row's columns [0, n_cols) into a running fp32 max ``m`` and sum of exp(x - m) ``s``."""
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m, s


@triton.jit
def _cross_entropy_fwd_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, loss_ptr, scale_ptr,
    n_cols, stride_logits, stride_grad, ignore_index,
    BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    grad_ptr += row * stride_grad
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK)
    if label == ignore_index:
        # Ignored row (only reached without compaction): loss 0 and, if asked, a zero gradient row; no logits read.
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                tl.store(grad_ptr + start + offs, zero, mask=start + offs < n_cols)
    else:
        x_label = tl.load(logits_ptr + label).to(tl.float32)
        if SINGLE_BLOCK:
            # The whole row fits one block (V <= 32768, e.g. 32064): read it once, write it once.
            mask = offs < n_cols
            x = tl.load(logits_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
            m = tl.max(x, axis=0)
            e = tl.exp(x - m)
            s = tl.sum(e, axis=0)
            lse = m + tl.log(s)
            tl.store(loss_ptr + row, lse - x_label)
            if WRITE_GRAD:
                scale = tl.load(scale_ptr)
                g = e * (scale / s)
                g = tl.where(offs == label, g - scale, g)
                tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # Pass 1: online max / sum of exp over blocks (fp32).
            m, s = _online_max_sumexp(logits_ptr, n_cols, offs, tl.full([], float("-inf"), tl.float32),
                                      tl.zeros([], tl.float32), BLOCK)
            lse = m + tl.log(s)
            tl.store(loss_ptr + row, lse - x_label)
            if WRITE_GRAD:
                # Pass 2: d z = (softmax - onehot) * scale, rounded once to the logits dtype.
                scale = tl.load(scale_ptr)
                for start in range(0, n_cols, BLOCK):
                    cols = start + offs
                    mask = cols < n_cols
                    x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    g = tl.exp(x - lse) * scale
                    g = tl.where(cols == label, g - scale, g)
                    tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lse_vocab_block_kernel(
    logits_ptr, labels_ptr, max_ptr, sum_ptr, target_ptr,
    n_cols, stride_logits, col0, BLOCK: tl.constexpr,
):
    """Vocab schedule, pass 1: fold one vocab block ``[col0, col0 + n_cols)`` of a row into its running fp32 max /
    sum of exp (online log-sum-exp across launches), and pick the label's logit when it falls in the block."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    offs = tl.arange(0, BLOCK)
    m, s = _online_max_sumexp(logits_ptr, n_cols, offs, tl.load(max_ptr + row), tl.load(sum_ptr + row), BLOCK)
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    label = tl.load(labels_ptr + row) - col0   # ignore_index (negative) never lands in [0, n_cols)
    if (label >= 0) & (label < n_cols):
        tl.store(target_ptr + row, tl.load(logits_ptr + label).to(tl.float32))


@triton.jit
def _softmax_grad_vocab_block_kernel(
    logits_ptr, labels_ptr, lse_ptr, scale_ptr,
    n_cols, stride_logits, col0, ignore_index, BLOCK: tl.constexpr,
):
    """Vocab schedule, pass 2: overwrite one vocab block of a row with ``(softmax - onehot) * scale`` from the row's
    final log-sum-exp (zeros for an ignored row), rounded once to the logits dtype."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    offs = tl.arange(0, BLOCK)
    label = tl.load(labels_ptr + row)
    keep = label != ignore_index
    lse = tl.load(lse_ptr + row)
    scale = tl.where(keep, tl.load(scale_ptr), 0.0)
    label = label - col0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(keep, tl.exp(x - lse), 0.0) * scale
        g = tl.where(cols == label, g - scale, g)
        tl.store(logits_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# 3. launchers
# ----------------------------------------------------------------------------------------------------------------------
_MAX_SINGLE_BLOCK = 32768   # rows up to this many columns are held in registers (32 warps x 32 lanes x 32 fp32)
_MULTI_BLOCK = 8192         # otherwise 8192-column blocks, three passes over the row (read, read, write)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int = -100,
                       grad_out: Optional[torch.Tensor] = None,
                       loss_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row fp32 loss of ``logits`` ``(M, V)`` against ``labels`` ``(M,)``; when ``grad_out`` (``(M, V)``, may
    be ``logits`` itself) is given, writes ``(softmax - onehot) * scale`` into it (zero rows for ignored labels).
    ``scale`` is a 1-element fp32 tensor on the logits' device (read on device: no host sync)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be 2-D with unit column stride"
    assert labels.shape == (logits.shape[0],) and labels.dtype == torch.int64, "labels must be int64 (M,)"
    assert scale.numel() == 1 and scale.dtype == torch.float32, "scale must be one fp32 value"
    m, v = logits.shape
    loss = torch.empty(m, dtype=torch.float32, device=logits.device) if loss_out is None else loss_out
    assert loss.shape == (m,) and loss.dtype == torch.float32 and loss.is_contiguous(), "loss_out: fp32 (M,)"
    if m == 0:
        return loss
    write_grad = grad_out is not None
    if write_grad:
        assert grad_out.shape == logits.shape and grad_out.stride(1) == 1, "grad_out must match logits"
    single = _ext.next_power_of_2(v) <= _MAX_SINGLE_BLOCK
    block = _ext.next_power_of_2(v) if single else _MULTI_BLOCK
    num_warps = max(1, min(32 if single else 16, block // 1024))
    gout = grad_out if write_grad else logits
    with _device_guard(logits.device):
        _cross_entropy_fwd_bwd_kernel[(m,)](
            logits, gout, labels, loss, scale,
            v, logits.stride(0), gout.stride(0), ignore_index,
            BLOCK=block, SINGLE_BLOCK=single, WRITE_GRAD=write_grad, num_warps=num_warps, **_ext.fp_fusion_kwargs(),
        )
    return loss


def _vocab_block_launch_cfg(n_cols: int) -> tuple[int, int]:
    block = min(_ext.next_power_of_2(max(n_cols, 1)), _MULTI_BLOCK)
    return block, max(1, min(16, block // 1024))


def lse_vocab_block(logits: torch.Tensor, labels: torch.Tensor, run_max: torch.Tensor, run_sum: torch.Tensor,
                    target: torch.Tensor, col0: int) -> None:
    """Vocab schedule, pass 1 (see :func:`_fused_linear_cross_entropy_vocab`): fold the block ``logits`` ``(M, Vb)``
    (vocab columns ``[col0, col0 + Vb)``) into the running fp32 ``run_max`` / ``run_sum`` ``(M,)`` and write the
    label's logit into ``target`` for the rows whose label is in the block. All three are updated in place."""
    m, vb = logits.shape
    if m == 0:
        return
    block, warps = _vocab_block_launch_cfg(vb)
    with _device_guard(logits.device):
        _lse_vocab_block_kernel[(m,)](logits, labels, run_max, run_sum, target, vb, logits.stride(0), col0,
                                      BLOCK=block, num_warps=warps, **_ext.fp_fusion_kwargs())


def softmax_grad_vocab_block(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                             col0: int, ignore_index: int = -100) -> None:
    """Vocab schedule, pass 2: ``logits`` ``(M, Vb)`` becomes ``(softmax - onehot) * scale`` in place, from the
    rows' final fp32 log-sum-exp ``lse`` ``(M,)`` (zero rows for ``ignore_index`` labels)."""
    m, vb = logits.shape
    if m == 0:
        return
    block, warps = _vocab_block_launch_cfg(vb)
    with _device_guard(logits.device):
        _softmax_grad_vocab_block_kernel[(m,)](logits, labels, lse, scale, vb, logits.stride(0), col0, ignore_index,
                                               BLOCK=block, num_warps=warps, **_ext.fp_fusion_kwargs())


def _device_guard(device: torch.device):
    return _ext.device_guard(device)


_FUSED_FP32_ADDMM: dict = {}


def _fused_fp32_addmm_ok(device: torch.device) -> bool:
    """Does this torch accumulate ``fp32 += bf16 @ bf16`` in one cuBLAS call (``addmm.dtype_out`` with an fp32
    ``self`` aliasing ``out``)? Older releases require ``self`` in the input dtype. Probed once per device on tiny
    tensors (never at import)."""
    key = (device.type, device.index)
    if key not in _FUSED_FP32_ADDMM:
        ok = False
        if device.type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype_out"):
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(32, 16, device=device, dtype=torch.bfloat16, generator=g)
                b = torch.randn(16, 24, device=device, dtype=torch.bfloat16, generator=g)
                acc = torch.randn(32, 24, device=device, dtype=torch.float32, generator=g)
                want = acc + a.float() @ b.float()
                torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
                ok = bool(torch.allclose(acc, want, atol=1e-3, rtol=1e-3))
            except Exception:
                ok = False
        _FUSED_FP32_ADDMM[key] = ok
    return _FUSED_FP32_ADDMM[key]


def _accumulate_grad_weight(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, first: bool,
                            fused_fp32: bool) -> None:
    """``acc += dlogits.T @ h`` (the vocab schedule also calls it for ``d hidden += dz @ W_c`` as
    ``(acc, dz.T, W_c)``). cuBLAS always multiplies and sums over the chunk's tokens in fp32; what differs is
    the accumulator between chunks:

    * ``acc`` in the weight dtype (fp32 models, and bf16 weights too large for an fp32 accumulator): ``addmm_``
      adds in fp32 and rounds once per chunk. With K chunks the error is at most K/2 ulp and typically
      ~sqrt(K)/2 ulp; the chunk planner keeps K small (3 at 8k tokens x 152064 x 3584), where a CPU simulation gave
      1.3x PyTorch's bf16 error (PyTorch itself rounds the per-token dlogits to bf16 before its one GEMM).
    * ``acc`` fp32 with bf16/fp16 inputs: one ``addmm.dtype_out`` call when torch supports it, else an extra
      ``(V, H)`` product in the input dtype added in fp32 (counted in the memory plan)."""
    a = dlogits.t()
    if acc.dtype == dlogits.dtype:
        if first:
            torch.mm(a, h, out=acc)
        else:
            acc.addmm_(a, h)
    elif fused_fp32:
        torch.ops.aten.addmm.dtype_out(acc, a, h, torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, h))


def _plan(n_rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, need_grad_weight: bool,
          grad_weight_accum: str, chunk_size: int) -> tuple[int, bool, bool]:
    """(chunk rows, fp32 grad-weight accumulator?, fused fp32 addmm?) for the memory budget."""
    itemsize = torch.finfo(dtype).bits // 8
    fp32_acc = fused = False
    acc_bytes = 0
    if need_grad_weight and dtype != torch.float32 and grad_weight_accum != "weight":
        fused = _fused_fp32_addmm_ok(device)
        acc_bytes = vocab * hidden * (4 if fused else 4 + itemsize)
        fp32_acc = grad_weight_accum == "fp32" or acc_bytes <= FP32_ACCUM_MAX_BYTES
        if not fp32_acc:
            acc_bytes = 0
    if chunk_size > 0:
        return max(1, min(chunk_size, n_rows)), fp32_acc, fused
    cmax = max(_MIN_CHUNK, (MEMORY_BUDGET_BYTES - acc_bytes) // (vocab * itemsize))
    k = max(1, math.ceil(n_rows / cmax))
    c = math.ceil(n_rows / k)
    c_rounded = math.ceil(c / _CHUNK_MULTIPLE) * _CHUNK_MULTIPLE
    return max(1, min(n_rows, c_rounded if c_rounded <= cmax else c)), fp32_acc, fused


SCHEDULES = ("token", "vocab")
GRAD_WEIGHT_ACCUMS = ("auto", "fp32", "weight")
# Vocab schedule: what its (T, Vb) logits block, its (T, H) fp32 d-hidden accumulator and the gathered rows may use
# together, in MiB (LLAVA_FAST_CE_VOCAB_BUDGET_MB, read per call). 128: all 8k tokens of a step in one chunk with
# ~5k-column blocks at H = 896; 20 (Liger's footprint at 8k x 152064 x 896): chunks of ~1.4k tokens, 4096 columns.
VOCAB_BUDGET_MB = 128
_MIN_VOCAB_BLOCK = 4096     # narrower blocks make GEMMs of a few us each: launch-bound, and more d-hidden traffic
_VOCAB_BLOCK_MULTIPLE = 256


def _vocab_budget_bytes() -> int:
    value = _ext.getenv("LLAVA_FAST_CE_VOCAB_BUDGET_MB", str(VOCAB_BUDGET_MB))
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise ValueError(f"LLAVA_FAST_CE_VOCAB_BUDGET_MB={value!r}: must be a positive number of MiB")
    return int(mb * 2**20)


def _vocab_plan(m: int, vocab: int, hidden: int, itemsize: int, gathered: bool, row_chunk: int,
                vocab_block: int) -> tuple[int, int]:
    """(rows per chunk T, vocabulary columns per block Vb) of the vocab schedule. Given values are kept; the others
    fill :func:`_vocab_budget_bytes`: all rows in one chunk when a ``_MIN_VOCAB_BLOCK``-wide block fits, else
    balanced chunks at that width; then the widest block the chunk leaves room for (multiple of 256)."""
    budget = _vocab_budget_bytes()
    per_row = hidden * 4 + (2 * hidden * itemsize if gathered else 0)  # fp32 d hidden; gathered rows + their cast
    cols = min(vocab_block, vocab) if vocab_block > 0 else min(vocab, _MIN_VOCAB_BLOCK)
    if row_chunk > 0:
        t = min(row_chunk, m)
    elif m * (per_row + cols * itemsize) <= budget:
        t = m
    else:
        t = max(_CHUNK_MULTIPLE, budget // (per_row + cols * itemsize) // _CHUNK_MULTIPLE * _CHUNK_MULTIPLE)
        t = math.ceil(m / math.ceil(m / t))   # balanced chunks
    t = max(1, min(t, m))
    if vocab_block <= 0:
        room = (budget - t * per_row) // (t * itemsize)
        cols = vocab if room >= vocab else max(cols, room // _VOCAB_BLOCK_MULTIPLE * _VOCAB_BLOCK_MULTIPLE)
    return t, cols


def _logits_block(buf, h, weight, bias, v0, v1):
    """``h @ weight[v0:v1].T (+ bias)`` into the front of the flat buffer ``buf``, as a contiguous ``(M, v1 - v0)``."""
    z = buf[: h.shape[0] * (v1 - v0)].view(h.shape[0], v1 - v0)
    if bias is not None:
        return torch.addmm(bias[v0:v1], h, weight[v0:v1].t(), out=z)
    return torch.mm(h, weight[v0:v1].t(), out=z)


def _fused_linear_cross_entropy_vocab(hidden, weight, labels, bias, scale, rows, ignore_index, need_grad_hidden,
                                      need_grad_bias, row_chunk, vocab_block, grad_weight_accum):
    """The vocab schedule: loops over blocks of ``Vb`` vocabulary rows of ``weight`` instead of chunks of tokens, for
    ``T`` (supervised) rows at once, all ``M`` of them unless the memory budget asks for chunks
    (:func:`_vocab_plan`). Per chunk of rows: pass 1 computes each block's logits and folds them into a running fp32
    log-sum-exp; pass 2 recomputes them, turns them into ``dz`` in place, adds ``dz @ W_c`` to an fp32 ``(T, H)``
    d-hidden accumulator and ``dz.T @ h`` to the returned ``weight.grad`` rows ``[v0, v1)``. With one chunk every
    weight-gradient row is one GEMM over all tokens, rounded once; with K chunks it is rounded once per chunk (the
    token schedule's ``"weight"`` accumulator) unless ``grad_weight_accum="fp32"`` (a ``(V, H)`` fp32 buffer: the
    memory this schedule exists to avoid).

    Cost against the token schedule: one more logits GEMM (``8 M V H`` FLOPs instead of ``6 M V H``); memory: the
    ``(T, Vb)`` block plus ``T x H`` fp32 (plus the gathered rows when some are ignored) instead of a ``(C, V)``
    chunk plus a ``(V, H)`` fp32 accumulator. ``hidden``/``weight``/``labels`` are contiguous, ``labels`` already
    compacted to ``rows`` (None: every row). Returns what :func:`fused_linear_cross_entropy_fwd` returns."""
    h_dim = hidden.shape[1]
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    m = labels.shape[0]
    t, cols = _vocab_plan(m, v, h_dim, hidden.element_size(), rows is not None, row_chunk, vocab_block)
    n_chunks = math.ceil(m / t)
    fused = dtype != torch.float32 and _fused_fp32_addmm_ok(dev)
    fp32_w = n_chunks > 1 and dtype != torch.float32 and grad_weight_accum == "fp32"
    gw = torch.zeros(v, h_dim, dtype=torch.float32, device=dev) if fp32_w else torch.empty_like(weight)
    if not need_grad_hidden:
        grad_hidden = hidden.new_empty(0)
    else:
        grad_hidden = torch.zeros_like(hidden) if rows is not None else torch.empty_like(hidden)
    gb_acc = torch.zeros(v, dtype=torch.float32, device=dev) if need_grad_bias else None
    loss = torch.zeros((), dtype=torch.float32, device=dev)
    buf = hidden.new_empty(t * cols)
    for ci, r0 in enumerate(range(0, m, t)):
        r1 = min(r0 + t, m)
        h_c = hidden.index_select(0, rows[r0:r1]) if rows is not None else hidden[r0:r1]
        lab = labels[r0:r1]
        run_max = torch.full((r1 - r0,), float("-inf"), dtype=torch.float32, device=dev)
        run_sum = torch.zeros(r1 - r0, dtype=torch.float32, device=dev)
        target = torch.zeros(r1 - r0, dtype=torch.float32, device=dev)
        for v0 in range(0, v, cols):
            z = _logits_block(buf, h_c, weight, bias, v0, min(v0 + cols, v))
            lse_vocab_block(z, lab, run_max, run_sum, target, v0)
        lse = run_max + run_sum.log()
        loss += torch.where(lab != ignore_index, lse - target, 0.0).sum()
        del run_max, run_sum, target
        gh_acc = torch.zeros(r1 - r0, h_dim, dtype=torch.float32, device=dev) if need_grad_hidden else None
        for v0 in range(0, v, cols):
            v1 = min(v0 + cols, v)
            dz = _logits_block(buf, h_c, weight, bias, v0, v1)
            softmax_grad_vocab_block(dz, lab, lse, scale, v0, ignore_index)
            if need_grad_hidden:
                _accumulate_grad_weight(gh_acc, dz.t(), weight[v0:v1], first=False, fused_fp32=fused)
            _accumulate_grad_weight(gw[v0:v1], dz, h_c, first=(ci == 0 and not fp32_w), fused_fp32=fused)
            if need_grad_bias:
                gb_acc[v0:v1] += dz.sum(0, dtype=torch.float32)
        if need_grad_hidden:
            if rows is not None:
                grad_hidden.index_copy_(0, rows[r0:r1], gh_acc.to(dtype))
            else:
                grad_hidden[r0:r1].copy_(gh_acc)
        del z, dz, h_c, gh_acc, lse
    del buf
    grad_weight = gw.to(weight.dtype) if fp32_w else gw
    grad_bias = gb_acc.to(bias.dtype) if need_grad_bias else hidden.new_empty(0)
    return loss * scale[0], grad_hidden, grad_weight, grad_bias, hidden.new_empty(0)


def fused_linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
    scale: torch.Tensor, ignore_index: int = -100, chunk_size: int = 0, need_grad_hidden: bool = True,
    need_grad_weight: bool = True, need_grad_bias: bool = True, return_logits: bool = False,
    skip_ignored: bool = True, grad_weight_accum: str = "auto", schedule: str = "token", vocab_block: int = 0,
    host_labels: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """Host loop over token chunks (``schedule="token"``), or over vocab blocks (``"vocab"``, taken only when the
    weight gradient is asked for and the logits are not: see :func:`_fused_linear_cross_entropy_vocab`). Returns ``(loss, grad_hidden, grad_weight, grad_bias, logits)``: fp32 scalar loss
    (already multiplied by ``scale``) and gradients of that loss in the input dtypes; a gradient not asked for, and
    the logits unless ``return_logits``, come back as empty tensors. ``host_labels``: a CPU copy of ``labels``,
    read instead of them for the counts and the supervised rows (no host synchronisation)."""
    if grad_weight_accum not in GRAD_WEIGHT_ACCUMS:
        raise ValueError(f"grad_weight_accum must be one of {GRAD_WEIGHT_ACCUMS}, got {grad_weight_accum!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    n, h_dim = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    labels = labels.contiguous()
    scale = scale.to(device=dev, dtype=torch.float32).reshape(1)
    need_grad_bias = need_grad_bias and bias is not None
    any_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    empty = lambda: hidden.new_empty(0)  # noqa: E731  (a fresh one each: custom-op outputs must not alias)

    # How many rows are supervised, and whether any supervised label is outside the vocabulary: one host sync, or
    # none when the caller has the labels on the host (host_labels).
    lab = host_labels if host_labels is not None else labels
    valid = lab != ignore_index
    bad = valid & ((lab < 0) | (lab >= v))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        lo, hi = lab[bad].min().item(), lab[bad].max().item()
        raise ValueError(f"labels must be in [0, {v}) or equal ignore_index={ignore_index}; {n_bad} labels are "
                         f"not (values in [{lo}, {hi}])")
    # Drop ignored rows before the GEMMs (a second sync, only when some rows are ignored; none with host_labels:
    # the count is known, so nonzero_static finds the rows on the device without reading anything back).
    rows = None
    if skip_ignored and not return_logits and n_valid < n:
        if host_labels is not None:
            rows = torch.nonzero_static(labels != ignore_index, size=n_valid).squeeze(1)
        else:
            rows = valid.nonzero().squeeze(1)
        labels = labels.index_select(0, rows)
    m = n_valid if rows is not None else n
    if schedule == "vocab" and need_grad_weight and not return_logits and m > 0:
        return _fused_linear_cross_entropy_vocab(hidden, weight, labels, bias, scale, rows, ignore_index,
                                                 need_grad_hidden, need_grad_bias, chunk_size, vocab_block,
                                                 grad_weight_accum)

    logits_out = hidden.new_empty(n, v) if return_logits else empty()
    grad_hidden = (torch.zeros_like(hidden) if (rows is not None or m == 0) else torch.empty_like(hidden)) \
        if need_grad_hidden else empty()
    grad_bias_acc = torch.zeros(v, dtype=torch.float32, device=dev) if need_grad_bias else None
    chunk, fp32_acc, fused = _plan(m, v, h_dim, dtype, dev, need_grad_weight, grad_weight_accum, chunk_size)
    if need_grad_weight:
        # The weight-dtype accumulator is written (not added to) by the first chunk; fp32 ones start at zero.
        gw_acc = (torch.zeros(v, h_dim, dtype=torch.float32, device=dev) if fp32_acc
                  else (torch.empty_like(weight) if m > 0 else torch.zeros_like(weight)))
    loss_rows = torch.zeros(max(m, 1), dtype=torch.float32, device=dev)

    if m > 0:
        # The chunk's logits live here and are overwritten by their gradient (unless only logits are wanted).
        buf = hidden.new_empty(min(chunk, m), v) if (any_grad or not return_logits) else None
        w_t = weight.t()
        for ci, start in enumerate(range(0, m, chunk)):
            end = min(start + chunk, m)
            if rows is not None:
                h_c = hidden.index_select(0, rows[start:end])
            else:
                h_c = hidden[start:end]
            z = logits_out[start:end] if return_logits else buf[: end - start]
            if bias is not None:
                torch.addmm(bias, h_c, w_t, out=z)
            else:
                torch.mm(h_c, w_t, out=z)
            dz = buf[: end - start] if any_grad else None
            cross_entropy_rows(z, labels[start:end], scale, ignore_index, grad_out=dz,
                               loss_out=loss_rows[start:end])
            if not any_grad:
                continue
            if need_grad_hidden:
                if rows is not None:
                    grad_hidden.index_copy_(0, rows[start:end], torch.mm(dz, weight))
                else:
                    torch.mm(dz, weight, out=grad_hidden[start:end])
            if need_grad_weight:
                _accumulate_grad_weight(gw_acc, dz, h_c, first=(ci == 0 and not fp32_acc), fused_fp32=fused)
            if need_grad_bias:
                grad_bias_acc += dz.sum(0, dtype=torch.float32)
        del buf, z, dz  # free the chunk buffer (z and dz are views of it) before the fp32 -> weight dtype cast
    loss = loss_rows.sum() * scale[0]
    grad_weight = (gw_acc.to(weight.dtype) if fp32_acc else gw_acc) if need_grad_weight else empty()
    grad_bias = grad_bias_acc.to(bias.dtype) if need_grad_bias else empty()
    return loss, grad_hidden, grad_weight, grad_bias, logits_out


# ----------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom op + fake (so torch.compile(fullgraph=True) keeps the chunk loop opaque)
# ----------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
    scale: torch.Tensor, ignore_index: int, chunk_size: int, need_grad_hidden: bool, need_grad_weight: bool,
    need_grad_bias: bool, return_logits: bool, skip_ignored: bool, grad_weight_accum: str, schedule: str,
    vocab_block: int, host_labels: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The dtypes were settled by the caller (autocast included); keep autocast from re-casting the fp32 accumulator.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return fused_linear_cross_entropy_fwd(hidden, weight, labels, bias, scale, ignore_index, chunk_size,
                                              need_grad_hidden, need_grad_weight, need_grad_bias, return_logits,
                                              skip_ignored, grad_weight_accum, schedule, vocab_block, host_labels)


@_fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, bias, scale, ignore_index, chunk_size, need_grad_hidden, need_grad_weight,
      need_grad_bias, return_logits, skip_ignored, grad_weight_accum, schedule, vocab_block, host_labels=None):
    n, v = hidden.shape[0], weight.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if (need_grad_bias and bias is not None) else hidden.new_empty(0),
        hidden.new_empty(n, v) if return_logits else hidden.new_empty(0),
    )


# ----------------------------------------------------------------------------------------------------------------------
# 5. autograd.Function: gradients come from the forward; backward scales them by grad_output
# ----------------------------------------------------------------------------------------------------------------------
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(hidden, weight, labels, bias, scale, ignore_index, chunk_size, return_logits, skip_ignored,
    grad_weight_accum, need_grad_hidden, need_grad_weight, need_grad_bias, schedule="token", vocab_block=0)``
    -> ``(loss, logits_or_empty)``.

    Inputs are assumed validated (see :func:`fused_linear_cross_entropy`, which also derives the ``need_grad_*``
    flags from ``requires_grad`` and grad mode: inside ``forward`` grad mode is always off, and
    ``ctx.needs_input_grad`` ignores ``torch.no_grad()``). ``scale`` is the fp32 loss multiplier (1/n_supervised,
    1/num_items or 1). The logits output is not differentiable.

    Backward scales the saved gradients in place (no second ``(V, H)`` buffer), so calling it twice
    (``retain_graph=True``) raises autograd's "modified by an inplace operation" error instead of scaling twice."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, scale, ignore_index=-100, chunk_size=0, return_logits=False,
                skip_ignored=True, grad_weight_accum="auto", need_grad_hidden=True, need_grad_weight=True,
                need_grad_bias=True, schedule="token", vocab_block=0, host_labels=None):
        need_b = need_grad_bias and bias is not None
        loss, gh, gw, gb, logits = _fused_linear_cross_entropy_op(
            hidden, weight, labels, bias, scale, ignore_index, chunk_size, need_grad_hidden, need_grad_weight,
            need_b, return_logits, skip_ignored, grad_weight_accum, schedule, vocab_block, host_labels)
        ctx.needs = (need_grad_hidden, need_grad_weight, need_b)
        ctx.params = (weight, bias)  # (parameters, alive anyway) the second derivative's error node hangs on them
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits):
        gh, gw, gb = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs
        g = grad_loss.to(torch.float32)
        inplace = not torch.compiler.is_compiling()

        def scaled(t):
            return t.mul_(g) if inplace else t * g

        grads = (scaled(gh) if need_h else None, scaled(gw) if need_w else None, None,
                 scaled(gb) if need_b else None, None, None, None, None, None, None, None, None, None, None, None,
                 None)
        if torch.is_grad_enabled() and not _ext._tracing():
            # create_graph=True: the gradients were computed in the forward, without a graph; differentiating them
            # again must raise (through the parameters or the incoming gradient; the hidden states are not kept)
            grads = _ext.not_differentiable_again(grads, (*ctx.params, grad_loss), "fused_linear_cross_entropy")
        return grads


# ----------------------------------------------------------------------------------------------------------------------
# 6. functional API
# ----------------------------------------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, labels, bias, reduction, num_items, chunk_size, schedule="auto",
                  vocab_block=None, grad_weight_accum="auto") -> None:
    name = "fused_linear_cross_entropy"
    for arg, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{name}: hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}; flatten it with "
                         f"hidden.reshape(-1, hidden.shape[-1]) (and labels.reshape(-1))")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (V, H) like lm_head.weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: hidden size mismatch: hidden is {tuple(hidden.shape)} (H={hidden.shape[1]}) but "
                         f"weight is {tuple(weight.shape)} (H={weight.shape[1]}); pass the (V, H) lm_head weight")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{name}: weight dtype {weight.dtype} != hidden dtype {hidden.dtype}; cast one of them "
                         f"(e.g. hidden.to(weight.dtype))")
    if weight.device != hidden.device:
        raise ValueError(f"{name}: weight is on {weight.device} but hidden is on {hidden.device}; move them to the "
                         f"same device")
    if labels.dtype != torch.int64:
        raise ValueError(f"{name}: labels must be torch.int64, got {labels.dtype}; use labels.long()")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"{name}: labels must have shape (N,) = ({hidden.shape[0]},) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(labels.shape)} (labels are already shifted, one per row)")
    if labels.device != hidden.device:
        raise ValueError(f"{name}: labels are on {labels.device} but hidden is on {hidden.device}; use "
                         f"labels.to(hidden.device)")
    if bias is not None:
        if not torch.is_tensor(bias) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{name}: bias must be a ({weight.shape[0]},) tensor, got "
                             f"{tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"{name}: bias must match weight's dtype and device ({weight.dtype}, {weight.device}), "
                             f"got ({bias.dtype}, {bias.device})")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{name}: reduction must be 'mean' or 'sum', got {reduction!r} (per-token losses are not "
                         f"supported by the fused path; use cross_entropy_ref)")
    if num_items is not None and torch.is_tensor(num_items) and num_items.numel() != 1:
        raise ValueError(f"{name}: num_items must be an int or a 1-element tensor, got shape "
                         f"{tuple(num_items.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{name}: chunk_size must be a positive int or None (auto), got {chunk_size!r}")
    if vocab_block is not None and (not isinstance(vocab_block, int) or vocab_block <= 0):
        raise ValueError(f"{name}: vocab_block must be a positive int or None (auto), got {vocab_block!r}")
    if grad_weight_accum not in GRAD_WEIGHT_ACCUMS:
        raise ValueError(f"{name}: grad_weight_accum must be one of {GRAD_WEIGHT_ACCUMS}, got {grad_weight_accum!r}")
    if schedule not in ("auto",) + SCHEDULES:
        raise ValueError(f"{name}: schedule must be 'auto', 'token' or 'vocab', got {schedule!r}")


def _schedule(schedule: str) -> str:
    """``"auto"`` -> ``LLAVA_FAST_CE_SCHEDULE`` (read per call) or ``"token"``, the measured default."""
    if schedule != "auto":
        return schedule
    return _ext.env_choice("LLAVA_FAST_CE_SCHEDULE", SCHEDULES, "token")


def _autocast_inputs(hidden, weight, bias):
    """Under ``torch.autocast`` (fp32 master weights, bf16 compute) cast as ``F.linear`` would: the lm_head GEMM runs
    in the autocast dtype and the weight gradient flows back to the fp32 parameter through the cast."""
    if not (torch.is_tensor(hidden) and torch.is_tensor(weight)) or hidden.device.type not in ("cuda", "cpu"):
        return hidden, weight, bias
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if (torch.is_tensor(t) and t.is_floating_point()) else t  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def _scale(labels: torch.Tensor, ignore_index: int, reduction: str, num_items, device) -> torch.Tensor:
    """The loss/gradient multiplier as a device tensor (no host sync)."""
    if num_items is not None:
        return 1.0 / _num_items_tensor(num_items, device).clamp(min=1)
    if reduction == "mean":
        return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
    return torch.ones((), dtype=torch.float32, device=device)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                               reduction: str = "mean", num_items=None, return_logits: bool = False,
                               chunk_size: Optional[int] = None, *, skip_ignored: bool = True,
                               grad_weight_accum: str = "auto", schedule: str = "auto",
                               vocab_block: Optional[int] = None, host_labels: Optional[torch.Tensor] = None):
    """Causal-LM loss of ``hidden @ weight.T (+ bias)`` without materialising the ``(N, V)`` logits.

    Args:
        hidden: ``(N, H)`` fp32/fp16/bf16 final hidden states (after the final norm).
        weight: ``(V, H)`` lm_head weight, same dtype and device. For tied embeddings pass the embedding matrix; its
            gradient here adds up with the embedding's in autograd.
        labels: ``(N,)`` int64, already shifted by the caller (target of row ``i``); ``ignore_index`` rows are
            skipped and get zero gradient.
        bias: optional ``(V,)``.
        reduction: ``"mean"`` over supervised tokens (0 when there are none) or ``"sum"``.
        num_items: int or 1-element tensor; when given the loss is ``sum / num_items`` (HF ``num_items_in_batch``
            gradient accumulation), whatever ``reduction`` says.
        return_logits: also return the ``(N, V)`` logits. This materialises them (``N * V`` elements in the weight
            dtype, the memory this op exists to avoid) and they carry no gradient.
        chunk_size: tokens per chunk; None picks it from the memory budget (:data:`MEMORY_BUDGET_BYTES` for the token
            schedule, ``LLAVA_FAST_CE_VOCAB_BUDGET_MB`` for the vocab one, where it is usually all tokens at once).
        skip_ignored: drop ignored tokens before the GEMMs (False keeps them: zero rows through the GEMMs). Either
            way the call syncs with the host once to count supervised tokens and validate labels, as Liger does
            (none with ``host_labels``), so it cannot be captured in a CUDA graph.
        grad_weight_accum: ``"auto"`` (fp32 when it fits :data:`FP32_ACCUM_MAX_BYTES`), ``"fp32"`` or ``"weight"``
            (accumulate the weight gradient across chunks in the weight dtype). The vocab schedule accumulates in
            the weight dtype unless ``"fp32"`` (with one chunk of tokens, its usual case, nothing is accumulated).
        schedule: ``"token"`` (chunks of tokens, the default), ``"vocab"`` (blocks of the vocabulary: one more
            logits GEMM, ~4x less extra memory at 8k x 152064 x 896, each weight-gradient row rounded once; used only
            when the weight needs a gradient) or ``"auto"``: ``LLAVA_FAST_CE_SCHEDULE`` if set, else ``"token"``.
        vocab_block: vocabulary columns per block for the vocab schedule; None picks them from the budget
            ``LLAVA_FAST_CE_VOCAB_BUDGET_MB`` (default :data:`VOCAB_BUDGET_MB`, 128 MiB for block + accumulator).
        host_labels: optional CPU copy of ``labels`` (same values; an int64 ``(N,)`` tensor): the supervised tokens
            are counted and their rows selected on the host, so the call does not wait for the GPU (the model passes
            the copy its input checks read). Its values are trusted to equal ``labels``.
    Returns:
        fp32 scalar loss, or ``(loss, logits)`` when ``return_logits``.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_inputs(hidden, weight, labels, bias, reduction, num_items, chunk_size, schedule, vocab_block,
                  grad_weight_accum)
    if host_labels is not None and (not torch.is_tensor(host_labels) or host_labels.device.type != "cpu"
                                    or host_labels.dtype != torch.int64 or host_labels.shape != labels.shape):
        got = ((host_labels.dtype, host_labels.device, tuple(host_labels.shape)) if torch.is_tensor(host_labels)
               else type(host_labels).__name__)
        raise ValueError(f"fused_linear_cross_entropy: host_labels must be a CPU int64 tensor of labels' shape "
                         f"{tuple(labels.shape)} holding the same values, got {got}")
    if not backend.use_fast("cross_entropy", hidden.device.type):
        return cross_entropy_ref(hidden, weight, labels, bias, ignore_index, reduction, num_items, return_logits)
    scale = _scale(labels, ignore_index, reduction, num_items, hidden.device)
    grad_on = torch.is_grad_enabled()
    loss, logits = FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, bias, scale, ignore_index, chunk_size or 0, return_logits, skip_ignored,
        grad_weight_accum, grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, _schedule(schedule), vocab_block or 0, host_labels)
    return (loss, logits) if return_logits else loss
