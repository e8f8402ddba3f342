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
