"""tests/conftest.py speeds up Triton's CPU interpreter (``_interpreter_patches_triton_language_once_per_launch``,
docs/testing.md); these tests check that it still computes and still reports what it reported before."""
from __future__ import annotations

import os

import pytest
import torch

from llava_fast import _ext

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's patches only")

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _row_max(x):   # a @triton.jit helper: a call inside a launch, which calls tl.max (triton.language.standard)
    return tl.max(x, axis=0)


@triton.jit
def _helpers_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * n + cols, mask=cols < n, other=float("-inf"))
    tl.store(out_ptr + row, _row_max(x) + tl.sum(tl.where(cols < n, x, 0.0), axis=0))


@triton.jit
def _int_kernel(a_ptr, b_ptr, out_ptr, OP: tl.constexpr):
    a = tl.load(a_ptr)
    b = tl.load(b_ptr)
    if OP == 0:
        c = a + b
    elif OP == 1:
        c = a - b
    else:
        c = a * b
    tl.store(out_ptr, c)


def test_the_patches_are_in_place():
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "_llava_fast_once", False)
    assert interpreter._get_np_dtype.__module__ == "conftest"
    if _ext.triton_version() <= (3, 3):
        return   # Triton 3.3 (torch 2.7) has no interpreter_semantic: its overflow check stays (slower, same results)
    assert interpreter.interpreter_semantic.binary_op_sanitize_overflow_impl.__module__ == "conftest"


def test_helpers_inside_a_launch_compute_as_before():
    """Kernels that call @triton.jit functions (ours and triton.language's) per row, launch after launch: every
    launch and every row gives the reference answer; the language is unpatched between launches."""
    from triton.language import core

    builtin_before = core.tensor.__add__
    for n in (1, 5, 16):
        x = torch.randn(7, n)
        out = torch.empty(7)
        _helpers_kernel[(7,)](x, out, n, BLOCK=16)
        torch.testing.assert_close(out, x.max(1).values + x.sum(1))
    if _ext.triton_version() > (3, 3):   # 3.3 never unpatches (its behaviour)
        assert tl.tensor.__add__ is builtin_before


OVERFLOWS = [(0, 2**30, 2**30), (1, -2**31, 1), (2, 2**16, 2**15), (2, -2**16, 2**15 + 1)]   # +, -, *, * below


def _debug(monkeypatch):
    """The interpreter's options with debug=True until the test ends."""
    import dataclasses

    from triton.runtime import interpreter

    b = interpreter.interpreter_builder
    monkeypatch.setattr(b, "options", dataclasses.replace(b.options, debug=True))


@pytest.mark.parametrize("op,a,b", OVERFLOWS)
def test_int32_overflow_reported_with_debug_and_wraps_without(monkeypatch, op, a, b):
    """The overflow check (sanitize_overflow) reports an int32 overflow when the interpreter's options say debug, as
    Triton's does; without debug (the interpreter's default) the result wraps, as it did before the patch and as it
    does on a GPU."""
    args = torch.tensor([a], dtype=torch.int32), torch.tensor([b], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    _int_kernel[(1,)](*args, out, OP=op)
    want = [a + b, a - b, a * b][op]
    assert int(out) == (want + 2**31) % 2**32 - 2**31 and int(out) != want
    _debug(monkeypatch)
    with pytest.raises(Exception, match="int32 overflow detected"):
        _int_kernel[(1,)](*args, out, OP=op)


@pytest.mark.parametrize("op,a,b,want", [(0, 2**30, 2**30 - 1, 2**31 - 1), (1, -2**31 + 1, 1, -2**31),
                                         (2, 2**15, 2**15 - 1, 2**30 - 2**15), (2, -2**16, 2**15, -2**31)])
def test_int32_at_the_limits_is_not_an_overflow(monkeypatch, op, a, b, want):
    _debug(monkeypatch)
    out = torch.zeros(1, dtype=torch.int32)
    _int_kernel[(1,)](torch.tensor([a], dtype=torch.int32), torch.tensor([b], dtype=torch.int32), out, OP=op)
    assert int(out) == want


# bfloat16 under the interpreter (llava_fast._ext.interpreter_bf16, applied by the library itself, not by conftest):
# Triton's interpreter multiplied bf16 bit patterns in tl.dot and truncated fp32 -> bf16 casts.
@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def _narrow_kernel(x_ptr, out_ptr, out_rtne_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, x.to(tl.bfloat16), mask=offs < n)
    tl.store(out_rtne_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=offs < n)


def _bf16_mended():
    import llava_fast.ops.projector  # noqa: F401  (registers a Triton kernel: the library mends the interpreter)

    return _ext.interpreter_bf16()


def test_bf16_dot_multiplies_values():
    """A bf16 ``tl.dot`` equals the fp32 product of the values (exact here: small integers); fp16 was already right
    and stays so. Unmended, Triton's interpreter gave ~1e10 (triton-lang/triton#11584)."""
    if not _bf16_mended():
        pytest.skip("this Triton's interpreter has another layout")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randint(-2, 3, (16, 32), generator=g).to(dtype)
        b = torch.randint(-2, 3, (32, 16), generator=g).to(dtype)
        c = torch.zeros(16, 16)
        _dot_kernel[(1,)](a, b, c, M=16, N=16, K=32)
        torch.testing.assert_close(c, a.float() @ b.float(), atol=0, rtol=0, msg=str(dtype))


def test_bf16_casts_round_to_nearest_even():
    """fp32 -> bf16 in a kernel, implicit and with ``fp_downcast_rounding="rtne"``, gives torch's bits (round to
    nearest even, as the GPU's cvt.rn): ties both ways, overflow to inf, subnormals, signed zeros, inf and NaN.
    Unmended, the interpreter truncated (twice the GPU's rounding error) and its "rtne" lost the exponent carry."""
    if not _bf16_mended():
        pytest.skip("this Triton's interpreter has another layout")
    one = 1.0
    edge = [0.0, -0.0, one + 2 ** -8, one + 3 * 2 ** -8, -(one + 2 ** -8), one + 2 ** -8 + 2 ** -20, 2.0 - 2 ** -9,
            3.3895e38, -3.3895e38, 3.0e38, 1e-45, 1e-39, -1e-39, float("inf"), -float("inf"), float("nan")]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(edge), torch.randn(1000, generator=g) * 10.0 ** torch.randint(-30, 30, (1000,),
                                                                                               generator=g)])
    ref = x.to(torch.bfloat16)
    for got in _narrow(x):
        same = (got.view(torch.int16) == ref.view(torch.int16)) | (got.isnan() & ref.isnan())
        assert same.all(), (x[~same][:5], got[~same][:5], ref[~same][:5])


def _narrow(x):
    out, out_rtne = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape, dtype=torch.bfloat16)
    _narrow_kernel[(triton.cdiv(x.numel(), 256),)](x, out, out_rtne, x.numel(), BLOCK=256)
    return out, out_rtne


def test_f32_to_bf16_bits_keeps_shapes():
    import numpy as np

    assert _ext.f32_to_bf16_bits(np.float32(1.0)).shape == ()
    nan = _ext.f32_to_bf16_bits(np.float32("nan"))   # a 0-d NaN: quiet NaN bits, still 0-d
    assert nan.shape == () and torch.from_numpy(nan.reshape(1).view(np.int16)).view(torch.bfloat16).isnan().all()
    assert int(_ext.f32_to_bf16_bits(np.float32(-3.4e38))) == 0xFF80   # rounds to -inf
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    bits = _ext.f32_to_bf16_bits(strided)
    assert bits.shape == (3, 2) and bits.dtype == np.uint16
    assert torch.equal(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float(), torch.from_numpy(strided))
