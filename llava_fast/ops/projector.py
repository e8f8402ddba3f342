"""The multimodal projector ``mlp2x_gelu``: Linear(Dv -> Dt, bias) -> GELU -> Linear(Dt -> Dt, bias).

Shapes: ``x: (..., Dv)``, ``w1: (Dt, Dv)``, ``b1: (Dt,) | None``, ``w2: (N2, Dt)``, ``b2: (N2,) | None`` (N2 = Dt in
every LLaVA model); output ``(..., N2)``. Real models: 1024->4096->4096 (LLaVA-1.5/NeXT-7B), 1024->5120->5120 (13B),
1152->896->896 and 1152->3584->3584 (OneVision 0.5B / 7B).

Forward (fast path): one Triton GEMM computes ``h = x @ w1^T + b1`` and applies GELU in its epilogue, writing the
pre-activation ``h`` (the only M x Dt tensor kept for backward) and ``a = gelu(h)``; ``a`` feeds GEMM2 (cuBLAS
``addmm`` by default, or the same Triton kernel) and is freed. Eager PyTorch keeps both ``h`` (for GELU's backward)
and ``a`` (for linear_2's backward): we keep half of that.

Backward: one Triton GEMM computes ``dA = dY @ w2`` and, in its epilogue, ``dH = dA * gelu'(h)`` plus the recomputed
``a = gelu(h)``; then ``dW2 = dY^T @ a``, ``db2 = sum(dY)``, ``dW1 = dH^T @ x``, ``db1 = sum(dH)`` and, only when
``x`` needs a gradient, ``dX = dH @ w1`` (cuBLAS). In LLaVA stage 1 ``x`` comes from a frozen tower: no dX GEMM.

On Hopper, ``LLAVA_FAST_PROJECTOR_KERNEL=cutlass`` (opt-in, not yet run on a GPU) runs the GELU GEMM and the dGELU
GEMM as CUTLASS warp-specialized kernels with the same fused epilogues (``csrc/cutlass/projector_sm90*.cu``, loaded
with ctypes: ``_ext.cutlass_lib``), falling back to the Triton kernel per call when CUTLASS cannot take it.

Numerics follow eager bf16 PyTorch: fp32 accumulation, ``h`` rounded to the input dtype, GELU evaluated in fp32 on
the rounded ``h`` (so the forward activation and the one recomputed in backward are bit-identical); ``dH`` is taken
from the fp32 accumulator (one rounding fewer than eager). The CUTLASS forward evaluates GELU on the unrounded fp32
pre-activation (its aux store passes that value on), so there the two activations may differ by one rounding.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from llava_fast import _ext, backend

try:  # Triton is optional (no Triton on macOS / Windows): the reference then serves every device.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - a broken Triton install must not break the import
    triton = tl = None
    HAS_TRITON = False

__all__ = [
    "ProjectorFunction",
    "normalize_act",
    "projector",
    "projector_bwd",
    "projector_fwd",
    "projector_ref",
    "set_gemm2_impl",
]

_APPROX = ("none", "tanh")
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # what autocast casts (not float64)
# HF ACT2FN names (and nn.GELU's `approximate` values) -> our `approximate`.
_ACT_TO_APPROX = {
    "gelu": "none",
    "gelu_python": "none",
    "none": "none",
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_tanh": "tanh",
    "tanh": "tanh",
}


def normalize_act(act: str) -> str:
    """Map an HF ``projector_hidden_act`` name ("gelu", "gelu_pytorch_tanh", "gelu_new", ...) to "none" | "tanh"."""
    if act not in _ACT_TO_APPROX:
        raise ValueError(f"act must be one of {sorted(_ACT_TO_APPROX)} (exact erf GELU: 'gelu'; tanh GELU: "
                         f"'gelu_pytorch_tanh'), got {act!r}")
    return _ACT_TO_APPROX[act]


# ----------------------------------------------------------------------------------------------------------------------
# 1. Reference (also the CPU path)
# ----------------------------------------------------------------------------------------------------------------------
def projector_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """``linear(gelu(linear(x, w1, b1), approximate), w2, b2)`` in plain PyTorch, in the inputs' dtype.

    x: (..., Dv); w1: (Dt, Dv); b1: (Dt,) or None; w2: (N2, Dt); b2: (N2,) or None -> (..., N2).
    """
    h = torch.nn.functional.linear(x, w1, b1)
    return torch.nn.functional.linear(torch.nn.functional.gelu(h, approximate=approximate), w2, b2)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Triton kernel: one GEMM C = A @ B (+ bias) with three epilogues
# ----------------------------------------------------------------------------------------------------------------------
_EPI_BIAS = 0      # out = acc + bias                                    (GEMM2 in Triton)
_EPI_GELU = 1      # h = acc + bias -> store h (optional); out = gelu(h) (GEMM1 forward)
_EPI_DGELU = 2     # out = acc * gelu'(h) with h loaded; out2 = gelu(h)  (dA GEMM in backward)

if HAS_TRITON:

    from llava_fast.ops.gelu import _gelu_and_grad  # (gelu(h), gelu'(h)) in fp32, shared with ops/gelu.py

    @triton.jit
    def _epilogue(acc, offs_cm, offs_cn, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm, stride_cn,
                  EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, WRITE_ACT: tl.constexpr,
                  APPROX_TANH: tl.constexpr):
        """Bias, then one of: store acc (0); store h and gelu(h) (1); store acc * gelu'(h) and gelu(h) (2)."""
        c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
        c_off = offs_cm[:, None].to(tl.int64) * stride_cm + offs_cn[None, :] * stride_cn
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_cn, mask=offs_cn < N, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if EPILOGUE == 0:
            tl.store(out_ptr + c_off, acc.to(out_ptr.dtype.element_ty), mask=c_mask)
        elif EPILOGUE == 1:
            h = acc.to(out_ptr.dtype.element_ty)
            if STORE_H:
                tl.store(h_ptr + c_off, h, mask=c_mask)
            # GELU of the *rounded* h: the value backward recomputes from the saved h, bit for bit (and eager's).
            g, _ = _gelu_and_grad(h.to(tl.float32), APPROX_TANH, False)
            tl.store(out_ptr + c_off, g.to(out_ptr.dtype.element_ty), mask=c_mask)
        else:
            h = tl.load(h_ptr + c_off, mask=c_mask, other=0.0).to(tl.float32)
            g, dg = _gelu_and_grad(h, APPROX_TANH, True)
            tl.store(out_ptr + c_off, (acc * dg).to(out_ptr.dtype.element_ty), mask=c_mask)
            if WRITE_ACT:
                tl.store(out2_ptr + c_off, g.to(out2_ptr.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Grouped ordering: GROUP_M row-blocks sweep the N tiles together so their B tiles stay in L2."""
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _epilogue_tile(acc, pid_m, pid_n, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm, stride_cn,
                       EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
                       WRITE_ACT: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, EPI_SUBTILE: tl.constexpr):
        """The epilogue of one (BLOCK_M, BLOCK_N) tile, in EPI_SUBTILE column pieces (1, 2 or 4): the GELU temporaries
        of a 128x256 fp32 tile in one go spill registers (ptxas, sm_90, 8 warps: 188 B fwd / 2.2 KB bwd of spills;
        2 halves: 28 B / 240 B)."""
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if EPI_SUBTILE == 1:
            offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _epilogue(acc, offs_cm, offs_cn, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm, stride_cn,
                      EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH)
        else:
            HALF: tl.constexpr = BLOCK_N // 2
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            offs_cn = pid_n * BLOCK_N + tl.arange(0, HALF)
            if EPI_SUBTILE == 2:
                _epilogue(acc0, offs_cm, offs_cn, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm, stride_cn,
                          EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH)
                _epilogue(acc1, offs_cm, offs_cn + HALF, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm,
                          stride_cn, EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH)
            else:  # 4 quarters
                Q: tl.constexpr = HALF // 2
                offs_q = pid_n * BLOCK_N + tl.arange(0, Q)
                acc00, acc01 = tl.split(tl.permute(tl.reshape(acc0, (BLOCK_M, 2, Q)), (0, 2, 1)))
                _epilogue(acc00, offs_cm, offs_q, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm, stride_cn,
                          EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH)
                _epilogue(acc01, offs_cm, offs_q + Q, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm,
                          stride_cn, EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH)
                acc10, acc11 = tl.split(tl.permute(tl.reshape(acc1, (BLOCK_M, 2, Q)), (0, 2, 1)))
                _epilogue(acc10, offs_cm, offs_q + 2 * Q, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm,
                          stride_cn, EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH)
                _epilogue(acc11, offs_cm, offs_q + 3 * Q, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm,
                          stride_cn, EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH)

    @triton.jit
    def _projector_gemm_kernel(
        a_ptr, b_ptr, bias_ptr, h_ptr, out_ptr, out2_ptr,
        M, N, K, M_KEY,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, WRITE_ACT: tl.constexpr,
        APPROX_TANH: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EPI_SUBTILE: tl.constexpr,
    ):
        """C[M, N] = A[M, K] @ B[K, N] with an fp32 accumulator and one of the epilogues above.

        h, out and out2 share the (M, N) strides (stride_cm, stride_cn). M_KEY only keys the autotuner."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)

        # Rows/cols past the edge wrap around (modulo) so the main loop needs no M/N masks; the epilogue masks them.
        offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_am = tl.max_contiguous(tl.multiple_of(offs_am, BLOCK_M), BLOCK_M)
        offs_bn = tl.max_contiguous(tl.multiple_of(offs_bn, BLOCK_N), BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :].to(tl.int64) * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if IEEE:  # fp32 inputs: full-precision products, as torch does by default (no TF32)
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        _epilogue_tile(acc, pid_m, pid_n, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm, stride_cn, EPILOGUE,
                       HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH, BLOCK_M, BLOCK_N, EPI_SUBTILE)

    @triton.jit
    def _projector_gemm_tma_kernel(
        a_ptr, b_ptr, bias_ptr, h_ptr, out_ptr, out2_ptr,
        M, N, K, M_KEY,
        stride_am, stride_b, stride_cm, stride_cn,
        EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, WRITE_ACT: tl.constexpr,
        APPROX_TANH: tl.constexpr, IEEE: tl.constexpr, B_KMAJOR: tl.constexpr, NUM_SMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EPI_SUBTILE: tl.constexpr, FLATTEN: tl.constexpr = True,
    ):
        """The same GEMM + epilogue, persistent (NUM_SMS programs walk the tiles) with A and B loaded by TMA tensor
        descriptors (bounds handled by the copy engine: no masks, no modulo rows, any K).

        A is (M, K) with unit K stride (stride_am between rows). B is K-major (B_KMAJOR: stored (N, K), stride_b
        between its rows, i.e. a transposed weight) or N-major (stored (K, N), stride_b between rows)."""
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if B_KMAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_pid_m * num_pid_n
        k_tiles = tl.cdiv(K, BLOCK_K)
        # FLATTEN: the tile loop and the K loop become one loop for the software pipeliner, so the first K blocks of
        # a program's next tile are already loading during this tile's epilogue (the Triton persistent-matmul
        # tutorial's Hopper setting); without it every tile starts with an empty pipeline.
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kt in range(k_tiles):
                off_k = kt * BLOCK_K
                a = a_desc.load([off_m, off_k])
                if B_KMAJOR:
                    b = tl.trans(b_desc.load([off_n, off_k]))
                else:
                    b = b_desc.load([off_k, off_n])
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            _epilogue_tile(acc, pid_m, pid_n, bias_ptr, h_ptr, out_ptr, out2_ptr, M, N, stride_cm, stride_cn,
                           EPILOGUE, HAS_BIAS, STORE_H, WRITE_ACT, APPROX_TANH, BLOCK_M, BLOCK_N, EPI_SUBTILE)

    def _even_k(args):
        return args["K"] % args["BLOCK_K"] == 0

    _kernel_heur = triton.heuristics({"EVEN_K": _even_k})(_projector_gemm_kernel)


_TWO_PER_SM_MIN_M = 8192  # the two-CTAs-per-SM configs are tried only from this many rows (many tiles per SM)


def _cfg(bm, bn, bk, stages, warps, group=8, sub=1, two_per_sm=False):
    c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "EPI_SUBTILE": sub},
                      num_stages=stages, num_warps=warps)
    c.two_per_sm = two_per_sm
    return c


def _prune_configs(configs, named_args, **kwargs):
    """Autotune only what can win: the two-CTAs-per-SM configs (overlapping one CTA's epilogue with the other's
    MMAs) from _TWO_PER_SM_MIN_M rows on, where there are enough tiles; below it they only cost tuning time."""
    m_key = named_args.get("M_KEY", kwargs.get("M_KEY", 0))
    keep = [c for c in configs if not getattr(c, "two_per_sm", False) or m_key >= _TWO_PER_SM_MIN_M]
    return keep or configs


def _configs(capability: tuple[int, int], fp32: bool) -> list:
    """Small autotune lists. Shared memory per stage is (BM + BN) * BK * elem bytes: H100 has 227 KB, A100 163 KB."""
    if fp32:  # correctness path (tests, fp32 users): IEEE fp32 dot, modest tiles
        return [_cfg(64, 64, 32, 3, 4), _cfg(64, 128, 32, 3, 4, sub=2), _cfg(32, 64, 32, 3, 4)]
    if capability[0] in (9, 10):
        # Hopper (and B200-class smem): wgmma via tl.dot; 128x256x64 x3 stages = 144 KB. EPI_SUBTILE chosen so that
        # ptxas (sm_90a, triton 3.8) reports no register spills for the GELU and dGELU epilogues.
        # The last three fit two CTAs per SM (96 KB, <= 128 / 248 registers at 256 / 128 threads; ptxas, triton 3.6,
        # no spills): one CTA's GELU epilogue (~32 instructions per element, not overlapped with anything when one
        # 144 KB CTA holds the SM: about half of the main loop's time at K = 1024) runs under the other's MMAs.
        return [
            _cfg(128, 256, 64, 3, 8, sub=4),
            _cfg(256, 128, 64, 3, 8, sub=4),
            _cfg(128, 128, 64, 4, 8, sub=2),
            _cfg(64, 128, 64, 4, 4, sub=2),
            _cfg(64, 64, 64, 4, 4, sub=1),   # small M (one image, a few tokens)
            _cfg(128, 128, 64, 3, 8, sub=4, two_per_sm=True),
            _cfg(128, 128, 64, 3, 4, sub=2, two_per_sm=True),
            _cfg(128, 128, 64, 3, 4, sub=4, two_per_sm=True),
        ]
    if capability[0] >= 8:
        # Ampere / Ada / consumer Blackwell (~100 KB smem): mma.sync; 128x256x32 x3 stages = 72 KB; no spills at
        # these subtiles
        return [
            _cfg(128, 256, 32, 3, 8, sub=4),
            _cfg(256, 128, 32, 3, 8, sub=4),
            _cfg(128, 128, 32, 4, 4, sub=4),
            _cfg(64, 128, 32, 4, 4, sub=2),
            _cfg(64, 64, 32, 4, 4, sub=1),
        ]
    return [_cfg(64, 64, 32, 2, 4), _cfg(128, 64, 32, 2, 4)]  # pre-Ampere: correctness first


# Fixed config under TRITON_INTERPRET=1 (no autotune there): big tiles = fewer interpreted programs = faster tests.
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "EPI_SUBTILE": 2}
_tuned_kernels: dict = {}


def _get_kernel(device: torch.device, fp32: bool, tma: bool = False):
    """The autotuned kernel for this GPU generation (built lazily: no GPU query at import); ``tma``: the persistent
    TMA variant."""
    cap = torch.cuda.get_device_capability(device)
    key = (cap, fp32, tma)
    if key not in _tuned_kernels:
        kw = {"configs": _configs(cap, fp32),
              "key": ["M_KEY", "N", "K", "EPILOGUE", "HAS_BIAS", "STORE_H", "WRITE_ACT", "APPROX_TANH"]
              + (["B_KMAJOR", "FLATTEN"] if tma else []),
              "prune_configs_by": {"early_config_prune": _prune_configs}}
        fn = _projector_gemm_tma_kernel if tma else _kernel_heur
        try:  # shorter timing than the default 25/100 ms per config: each config differs by >5% or not at all
            tuned = triton.autotune(**kw, do_bench=_autotune_bench)(fn)
        except TypeError:  # a Triton without the do_bench argument
            tuned = triton.autotune(**kw)(fn)
        _tuned_kernels[key] = tuned
    return _tuned_kernels[key]


_KERNEL_ENV = "LLAVA_FAST_PROJECTOR_KERNEL"
KERNELS = ("pointer", "tma", "tma_nested", "cutlass")


def kernel_kind() -> str:
    """``LLAVA_FAST_PROJECTOR_KERNEL``: ``"pointer"`` (default: pointer loads, one program per tile; measured on an
    H200) or ``"tma"`` (persistent, TMA tensor-descriptor loads, tile and K loops flattened for the pipeliner;
    measured on an H100 before the flattening at 0.97x the pointer kernel, M = 23040) or ``"tma_nested"`` (the
    same without the flattening, as measured then) or ``"cutlass"`` (the CUTLASS warp-specialized Hopper GEMMs of
    ``csrc/cutlass/projector_sm90*.cu`` for the GELU forward and the dGELU backward GEMM, where they apply: sm_90,
    bf16/fp16, exact GELU, contiguous operands with 16-byte rows; the pointer kernel elsewhere; not yet run on a
    GPU). Read at every call."""
    return _ext.env_choice(_KERNEL_ENV, KERNELS, "pointer")


def _tma_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, bool, int]:
    """(usable, B is K-major, B's row stride) for the TMA kernel: A with unit K stride, B (K, N) with a unit stride on
    one axis, 16-byte aligned base pointers and row strides (what a TMA descriptor needs)."""
    e = a.element_size()
    if a.stride(1) != 1 or (a.stride(0) * e) % 16 or a.data_ptr() % 16 or b.data_ptr() % 16:
        return False, False, 0
    if b.stride(0) == 1:      # stored (N, K): a transposed weight, w.t()
        row = b.stride(1)
        return (row * e) % 16 == 0, True, row
    if b.stride(1) == 1:      # stored (K, N)
        row = b.stride(0)
        return (row * e) % 16 == 0, False, row
    return False, False, 0


def _sm_count(device: torch.device) -> int:
    return 4 if _ext.interpreting() else _ext.sm_count(device)



def _autotune_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


def _m_key(m: int) -> int:
    """Autotune bucket for M: next power of two, capped (any M works; tuning runs once per bucket)."""
    return min(1 << max(m - 1, 0).bit_length(), 1 << 16)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------------------------------
def _gemm(a: torch.Tensor, b: torch.Tensor, epilogue: int, out: torch.Tensor, bias: torch.Tensor | None = None,
          h: torch.Tensor | None = None, out2: torch.Tensor | None = None, approximate: str = "none") -> None:
    """out = epilogue(a @ b): a (M, K) and b (K, N) with any strides; out, h, out2 contiguous (M, N)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    fp32 = a.dtype == torch.float32
    dummy = out
    bias = bias.contiguous() if bias is not None else None
    args = (
        a, b, bias if bias is not None else dummy, h if h is not None else dummy, out,
        out2 if out2 is not None else dummy,
        M, N, K, _m_key(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
    )
    flags = {"EPILOGUE": epilogue, "HAS_BIAS": bias is not None, "STORE_H": h is not None and epilogue == _EPI_GELU,
             "WRITE_ACT": out2 is not None, "APPROX_TANH": approximate == "tanh", "IEEE": fp32}
    if a.device.type != "cuda" and not _ext.interpreting():
        raise ValueError(f"projector: the Triton kernel needs CUDA tensors (got {a.device}); use the reference "
                         f"(llava_fast.set_backend('projector', 'auto')) or set TRITON_INTERPRET=1 to debug on CPU")
    kind = kernel_kind()
    if kind in ("tma", "tma_nested") and not hasattr(tl, "make_tensor_descriptor"):
        _ext.warn_once(f"projector: {_KERNEL_ENV}={kind} needs triton >= 3.4 (tl.make_tensor_descriptor), this is "
                       f"{triton.__version__}; using the pointer kernel")
        kind = "pointer"
    if kind in ("tma", "tma_nested"):
        usable, b_kmajor, b_row = _tma_layout(a, b)
        if usable:
            tma_args = args[:10] + (a.stride(0), b_row, out.stride(0), out.stride(1))
            sms = _sm_count(a.device)
            flags = dict(flags, B_KMAJOR=b_kmajor, NUM_SMS=sms, FLATTEN=kind == "tma")

            def tma_grid(meta):
                return (min(sms, _ext.cdiv(M, meta["BLOCK_M"]) * _ext.cdiv(N, meta["BLOCK_N"])),)
            if _ext.interpreting():
                _projector_gemm_tma_kernel[tma_grid(_INTERPRET_META)](*tma_args, **flags, **_INTERPRET_META,
                                                                       **_ext.fp_fusion_kwargs())
                return
            _ext.ensure_tma_allocator()
            with _ext.device_guard(a.device):
                _get_kernel(a.device, fp32, tma=True)[tma_grid](*tma_args, **flags, **_ext.fp_fusion_kwargs())
            return
    if _ext.interpreting():
        grid = (_ext.cdiv(M, _INTERPRET_META["BLOCK_M"]) * _ext.cdiv(N, _INTERPRET_META["BLOCK_N"]),)
        _kernel_heur[grid](*args, **flags, **_INTERPRET_META, **_ext.fp_fusion_kwargs())
        return
    kernel = _get_kernel(a.device, fp32)
    grid = lambda meta: (_ext.cdiv(M, meta["BLOCK_M"]) * _ext.cdiv(N, meta["BLOCK_N"]),)
    with _ext.device_guard(a.device):
        kernel[grid](*args, **flags, **_ext.fp_fusion_kwargs())


# CUTLASS (sm_90) launchers: the GELU forward GEMM and the dGELU backward GEMM of csrc/cutlass/projector_sm90*.cu.
_CUTLASS_SCHED_ENV = "LLAVA_FAST_PROJECTOR_CUTLASS_SCHED"
# schedule name -> code of csrc/cutlass/projector_sm90.cuh (`Schedule`); the last two are built for bf16 only
CUTLASS_SCHEDS = {"pingpong": 0, "cooperative": 1, "pingpong_c12": 2, "cooperative_256": 3}
_cutlass_workspaces: dict = {}
_cutlass_runs = 0       # successful CUTLASS calls (tests assert the kernel ran rather than the fallback)


def cutlass_sched(gemm: str) -> int:
    """Schedule code of the CUTLASS GEMM ``gemm`` ("fwd" or "bwd") from ``LLAVA_FAST_PROJECTOR_CUTLASS_SCHED``:
    ``auto`` (default: ping-pong 128x128 for the forward, whose short K leaves the epilogue exposed unless another
    warp group's main loop hides it; cooperative 128x256 for the dgrad, K = Dt), one name of ``CUTLASS_SCHEDS`` for
    both GEMMs, or ``FWD/BWD`` (e.g. ``pingpong_c12/cooperative_256``). ``pingpong_c12`` (cluster 1x2: A multicast)
    and ``cooperative_256`` (256x128 tiles) are built for bf16 only: fp16 then falls back to Triton."""
    value = _ext.getenv(_CUTLASS_SCHED_ENV, "auto").strip().lower()
    names = value.split("/") if "/" in value else [value, value]
    if len(names) != 2 or any(n not in CUTLASS_SCHEDS and n != "auto" for n in names):
        raise ValueError(f"{_CUTLASS_SCHED_ENV}={value!r}: must be 'auto', one of {tuple(CUTLASS_SCHEDS)}, or "
                         f"FWD/BWD with one of those each")
    name = names[0 if gemm == "fwd" else 1]
    if name == "auto":
        name = "pingpong" if gemm == "fwd" else "cooperative"
    return CUTLASS_SCHEDS[name]


def _cutlass_warn(msg: str) -> None:
    _ext.warn_once(f"projector: LLAVA_FAST_PROJECTOR_KERNEL=cutlass: {msg}; using the Triton kernel")


def cutlass_unusable(*tensors: torch.Tensor, approximate: str = "none") -> str | None:
    """Why the CUTLASS GEMMs cannot take these operands (None: they can). ``tensors``: the row-major matrices of
    one call (A, B, outputs, aux), whose last dims must be contiguous 16-byte rows at 16-byte aligned addresses
    (TMA descriptors)."""
    if approximate != "none":
        return "only exact (erf) GELU is compiled"
    t0 = tensors[0]
    if _ext.cutlass_dtype_code(t0.dtype) is None:
        return f"dtype {t0.dtype} (bf16 and fp16 only)"
    for t in tensors:
        if t.dim() != 2 or not t.is_contiguous() or t.data_ptr() % 16 or (t.shape[1] * t.element_size()) % 16:
            return (f"an operand of shape {tuple(t.shape)} is not a contiguous matrix with 16-byte aligned rows "
                    f"(last dim a multiple of {16 // t.element_size()})")
        if max(t.shape) >= 2 ** 31:
            return f"an operand of shape {tuple(t.shape)} exceeds int32 sizes"
    return _ext.cutlass_unavailable(t0.device)


def _cutlass_workspace(device: torch.device) -> torch.Tensor:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _cutlass_workspaces:
        nbytes = _ext.cutlass_lib().llava_fast_cutlass_workspace_bytes()
        _cutlass_workspaces[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return _cutlass_workspaces[key]


def _cutlass_call(name: str, dtype: torch.dtype, device: torch.device, *args) -> bool:
    """Run ``llava_fast_cutlass_<name>(dtype, *args, workspace, bytes, stream, err, errlen)`` on ``device``'s current
    stream; False (and one warning per message) when CUTLASS refuses the problem, so the caller falls back."""
    global _cutlass_runs
    ws = _cutlass_workspace(device) if device.type == "cuda" else None  # None: the tests' fake library on CPU
    rc, msg = _ext.cutlass_invoke(name, device, _ext.cutlass_dtype_code(dtype), *args,
                                  ws.data_ptr() if ws is not None else None, ws.numel() if ws is not None else 0)
    if rc != 0:
        _cutlass_warn(f"{name} returned {rc}: {msg}")
        return False
    _cutlass_runs += 1
    return True


def _cutlass_gemm(name: str, gemm: str, mats: list, bias: torch.Tensor | None, M: int, N: int, K: int,
                  ptrs: list) -> bool:
    """Run ``llava_fast_cutlass_<name>`` on the tensors ``ptrs`` (None: a null pointer) after checking the matrices
    ``mats`` (None entries skipped) and the bias; False (with one warning per reason) when CUTLASS cannot take it."""
    why = cutlass_unusable(*[t for t in mats if t is not None])
    if why is None and bias is not None and (not bias.is_contiguous() or bias.data_ptr() % 16):
        why = "the bias is not contiguous and 16-byte aligned"
    if why is not None:
        _cutlass_warn(why)
        return False
    if M == 0:
        return True
    return _cutlass_call(name, mats[0].dtype, mats[0].device, cutlass_sched(gemm), M, N, K,
                         *[t.data_ptr() if t is not None else None for t in ptrs])


def _cutlass_gelu_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, out: torch.Tensor,
                      h: torch.Tensor | None) -> bool:
    """out = gelu(x @ w1^T + b1) and, when given, h = x @ w1^T + b1 (rounded), with CUTLASS; False: not run."""
    return _cutlass_gemm("gelu_fwd", "fwd", [x, w1, out, h], b1, x.shape[0], w1.shape[0], x.shape[1],
                         [x, w1, b1, out, h])


def _cutlass_dgelu_bwd(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, dh: torch.Tensor,
                       act: torch.Tensor | None) -> bool:
    """dh = (dy @ w2) * gelu'(h) and, when given, act = gelu(h), with CUTLASS; False: not run."""
    return _cutlass_gemm("dgelu_bwd", "bwd", [dy, w2, h, dh, act], None, dy.shape[0], w2.shape[1], dy.shape[1],
                         [dy, w2, h, dh, act])


_GEMM2_IMPL = os.environ.get("LLAVA_FAST_PROJECTOR_GEMM2", "cublas")


def set_gemm2_impl(impl: str) -> None:
    """Second GEMM of the forward (Dt -> N2, 80% of the FLOPs): "cublas" (torch.addmm, default) or "triton"."""
    global _GEMM2_IMPL
    if impl not in ("cublas", "triton"):
        raise ValueError(f"set_gemm2_impl: impl must be 'cublas' or 'triton', got {impl!r}")
    _GEMM2_IMPL = impl


def _check_types(x, w1, b1, w2, b2):
    """A TypeError naming the argument that is not a tensor (x, w1, w2) or neither a tensor nor None (b1, b2)."""
    for name, t, optional in (("x", x, False), ("w1", w1, False), ("b1", b1, True), ("w2", w2, False),
                              ("b2", b2, True)):
        if not isinstance(t, torch.Tensor) and not (optional and t is None):
            raise TypeError(f"projector: {name} must be a torch.Tensor{' or None' if optional else ''}, got "
                            f"{type(t).__name__}" + ("; convert it with torch.as_tensor" if t is not None else ""))


def _check(x, w1, b1, w2, b2, approximate):
    if approximate not in _APPROX:
        raise ValueError(f"projector: approximate must be 'none' (exact erf GELU) or 'tanh', got {approximate!r}")
    _check_types(x, w1, b1, w2, b2)
    if x.dim() < 1:
        raise ValueError("projector: x must be a tensor of shape (..., in_features)")
    if w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"projector: w1 and w2 must be 2-D (out_features, in_features), got shapes "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    if x.shape[-1] != w1.shape[1]:
        raise ValueError(f"projector: x's last dim {x.shape[-1]} != w1.shape[1] = {w1.shape[1]} (w1 is "
                         f"(hidden, in_features)); pass x of shape (..., {w1.shape[1]})")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"projector: w2.shape[1] = {w2.shape[1]} must equal w1.shape[0] = {w1.shape[0]}")
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"projector: {name} must have shape ({n},), got {tuple(b.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"projector: {name}.dtype {t.dtype} != x.dtype {x.dtype}; cast the weights (e.g. "
                             f"module.to({x.dtype})) or the input so they match")
        if t.device != x.device:
            raise ValueError(f"projector: {name} is on {t.device} but x is on {x.device}; move them to one device")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"projector: x.dtype must be float16, bfloat16 or float32, got {x.dtype}")


def projector_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None, approximate: str = "none", save_h: bool = True,
                  gemm2: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on 2-D ``x: (M, Dv)``. Returns ``(y: (M, N2), h: (M, Dt))``; ``h`` is the pre-activation kept
    for backward, or an empty tensor when ``save_h`` is False (inference: one M x Dt write fewer)."""
    _check(x, w1, b1, w2, b2, approximate)
    if x.dim() != 2:
        raise ValueError(f"projector_fwd: x must be 2-D (M, in_features), got shape {tuple(x.shape)}")
    M, Dt = x.shape[0], w1.shape[0]
    h = torch.empty((M, Dt), device=x.device, dtype=x.dtype) if save_h else x.new_empty(0)
    a = torch.empty((M, Dt), device=x.device, dtype=x.dtype)
    if not (kernel_kind() == "cutlass" and approximate == "none"
            and _cutlass_gelu_fwd(x, w1, b1, a, h if save_h else None)):
        _gemm(x, w1.t(), _EPI_GELU, out=a, bias=b1, h=h if save_h else None, approximate=approximate)
    if (gemm2 or _GEMM2_IMPL) == "triton":
        y = torch.empty((M, w2.shape[0]), device=x.device, dtype=x.dtype)
        _gemm(a, w2.t(), _EPI_BIAS, out=y, bias=b2)
    elif b2 is not None:
        y = torch.addmm(b2, a, w2.t())
    else:
        y = torch.mm(a, w2.t())
    return y, h


def projector_bwd(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  approximate: str = "none", need_dx: bool = True, need_w1: bool = True, need_b1: bool = True,
                  need_w2: bool = True, need_b2: bool = True):
    """Backward on 2-D tensors: ``dy: (M, N2)``, ``x: (M, Dv)``, ``h: (M, Dt)``.

    Returns ``(dx, dw1, db1, dw2, db2)``; each one not asked for is an empty tensor (custom ops cannot return None).
    """
    dy = dy.contiguous()
    M, Dt = h.shape
    empty = lambda: dy.new_empty(0)
    dh = torch.empty((M, Dt), device=dy.device, dtype=dy.dtype)
    act = torch.empty((M, Dt), device=dy.device, dtype=dy.dtype) if need_w2 else None
    # dA = dY @ W2 ; epilogue: dH = dA * gelu'(h), act = gelu(h) (recomputed, for dW2)
    if not (kernel_kind() == "cutlass" and approximate == "none"
            and _cutlass_dgelu_bwd(dy, w2.contiguous(), h, dh, act)):
        _gemm(dy, w2, _EPI_DGELU, out=dh, h=h, out2=act, approximate=approximate)
    dw2 = dy.t().mm(act) if need_w2 else empty()
    del act
    db2 = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_b2 else empty()
    dw1 = dh.t().mm(x) if need_w1 else empty()
    db1 = dh.sum(0, dtype=torch.float32).to(dh.dtype) if need_b1 else empty()
    dx = dh.mm(w1) if need_dx else empty()
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------------------------------
# 4. torch.library custom ops (opaque to torch.compile) + fake implementations
# ----------------------------------------------------------------------------------------------------------------------
@_ext.custom_op("llava_fast::projector_fwd", mutates_args=())
def _projector_fwd_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None, approximate: str, save_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return projector_fwd(x, w1, b1, w2, b2, approximate, save_h)


@_projector_fwd_op.register_fake
def _(x, w1, b1, w2, b2, approximate, save_h):
    y = x.new_empty((x.shape[0], w2.shape[0]))
    h = x.new_empty((x.shape[0], w1.shape[0])) if save_h else x.new_empty(0)
    return y, h


@_ext.custom_op("llava_fast::projector_bwd", mutates_args=())
def _projector_bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      approximate: str, need_dx: bool, need_w1: bool, need_b1: bool, need_w2: bool,
                      need_b2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return projector_bwd(dy, x, h, w1, w2, approximate, need_dx, need_w1, need_b1, need_w2, need_b2)


@_projector_bwd_op.register_fake
def _(dy, x, h, w1, w2, approximate, need_dx, need_w1, need_b1, need_w2, need_b2):
    e = lambda: dy.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else e(), w1.new_empty(w1.shape) if need_w1 else e(),
            dy.new_empty((w1.shape[0],)) if need_b1 else e(), w2.new_empty(w2.shape) if need_w2 else e(),
            dy.new_empty((w2.shape[0],)) if need_b2 else e())


# ----------------------------------------------------------------------------------------------------------------------
# 5. autograd.Function
# ----------------------------------------------------------------------------------------------------------------------
class ProjectorFunction(torch.autograd.Function):
    """Fused projector with autograd. Saves x (the caller keeps it anyway), the weights and h only.

    The backward is not differentiable: with ``create_graph=True`` the gradients it returns raise when differentiated
    again (by ``backward()`` and by ``torch.autograd.grad(..., inputs)`` alike) instead of acting as constants."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate="none"):
        shape = x.shape
        m = math.prod(shape[:-1])
        x2 = x.reshape(m, shape[-1])  # any strides: the kernel takes them
        need = ctx.needs_input_grad
        save_h = any(need[:5])
        y, h = _projector_fwd_op(x2, w1, b1, w2, b2, approximate, save_h)
        if save_h:
            # x itself (not the 2-D view): an input, so that a double backward can be refused through it; b1 only
            # for that (h depends on it)
            ctx.save_for_backward(x, h, w1, w2, b1)
        ctx.approximate = approximate
        ctx.x_shape = shape
        ctx.has_b = (b1 is not None, b2 is not None)
        return y.reshape(*shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, h, w1, w2, b1 = ctx.saved_tensors
        need = ctx.needs_input_grad
        m = h.shape[0]
        x2 = x.reshape(m, x.shape[-1])
        dy2 = dy.reshape(m, w2.shape[0])  # not (-1, N2): ambiguous when N2 = 0
        with torch.no_grad():
            dx, dw1, db1, dw2, db2 = _projector_bwd_op(
                dy2, x2, h, w1, w2, ctx.approximate, need[0], need[1], need[2] and ctx.has_b[0], need[3],
                need[4] and ctx.has_b[1])
        grads = (dx.reshape(ctx.x_shape) if need[0] else None, dw1 if need[1] else None,
                 db1 if need[2] and ctx.has_b[0] else None, dw2 if need[3] else None,
                 db2 if need[4] and ctx.has_b[1] else None)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True: refuse a double backward loudly
            grads = _ext.not_differentiable_again(grads, (x, w1, b1, w2, dy), "projector")
        return (*grads, None)


# ----------------------------------------------------------------------------------------------------------------------
# 6. Functional
# ----------------------------------------------------------------------------------------------------------------------
def projector(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              b2: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """LLaVA's ``mlp2x_gelu`` projector: ``gelu(x @ w1^T + b1) @ w2^T + b2``.

    Args:
        x: (..., Dv) image features (fp16, bf16 or fp32).
        w1: (Dt, Dv); b1: (Dt,) or None; w2: (N2, Dt); b2: (N2,) or None; same dtype and device as x.
        approximate: "none" (exact erf GELU, HF "gelu") or "tanh" (HF "gelu_pytorch_tanh" / "gelu_new").

    Returns:
        (..., N2) in x's dtype. Fused Triton kernels on CUDA (see module docstring), the reference elsewhere (and
        for meta tensors, zero-width layers and empty inputs). Under autocast every fp16 / bf16 / fp32 argument is
        first cast to the autocast dtype, as ``nn.Linear`` would (fp32 master weights; the casts are differentiable,
        so their gradients come back in fp32); autocast leaves float64 alone, and so does this (then refused).

    Raises:
        TypeError: an argument that is not a tensor (b1, b2: nor None). ValueError: shapes, dtypes or devices that
        do not match (the message names the argument), or an unknown ``approximate``.

    The gradients are not differentiable again: on the fused path, differentiating the gradients of a
    ``create_graph=True`` backward raises.
    """
    _check_types(x, w1, b1, w2, b2)
    dev = x.device.type
    # cuda / cpu first: torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (a graph break in every
    # compiled model: tests/ops/test_projector.py::test_cuda_module_compile_inductor failed on the H100, session 12)
    if (dev in ("cuda", "cpu") or torch.amp.is_autocast_available(dev)) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        # what autocast casts (as for nn.Linear): floating tensors other than float64; float64, integer and complex
        # tensors are left as they are (and refused by the dtype check below)
        x, w1, b1, w2, b2 = (t.to(dt) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dt else t
                             for t in (x, w1, b1, w2, b2))
    _check(x, w1, b1, w2, b2, approximate)
    if dev == "meta" or 0 in (w1.shape[0], w2.shape[0]):
        # meta tensors (shape inference: no kernel, no autocast state) and a zero-width hidden or output layer
        # (nn.Linear allows it; act_linear cannot flatten a zero-width activation): plain autograd
        return projector_ref(x, w1, b1, w2, b2, approximate)
    if not (HAS_TRITON and backend.use_fast("projector", dev) and x.numel() > 0):
        # the reference's expression (cuBLAS on CUDA: "auto"), with the GELU output recomputed in the backward
        # instead of kept (ops/act_linear.py): x and h are saved, as by the fused kernel (0.56x eager's bytes at
        # 1024 -> 4096 -> 4096)
        from llava_fast.ops.act_linear import act_linear

        h = torch.nn.functional.linear(x, w1, b1)
        return act_linear(functools.partial(torch.nn.functional.gelu, approximate=approximate), (h,), w2, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)):
        return ProjectorFunction.apply(x, w1, b1, w2, b2, approximate)
    # Inference: nothing is saved, so the fused GEMM1 skips writing h (one M x Dt store fewer).
    y, _ = _projector_fwd_op(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2, approximate, False)
    return y.reshape(*x.shape[:-1], w2.shape[0])


if HAS_TRITON:
    backend.register_fast("projector", "triton")  # also marks the op as loaded (no lazy import under compile)

