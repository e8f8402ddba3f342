"""Shared by tests/ops/test_api_audit_*.py: run a public op on its reference path and on its Triton path (forced;
the interpreter on the CPU) with the same seed, and compare every result."""
import pytest
import torch

import llava_fast


@pytest.fixture
def kdev(device):
    """Tensors created in the test land on the test device."""
    with torch.device(device):
        yield device


def both(op: str, fn, seed: int) -> list:
    """``fn()`` on the reference path of ``op``, then on its Triton path (same seed): the two results."""
    out = []
    for b in ("reference", "triton"):
        llava_fast.set_backend(op, b)
        torch.manual_seed(seed)
        try:
            out.append(fn())
        finally:
            llava_fast.set_backend("all", "auto")
    return out


def assert_same(ref, got, **tol) -> None:
    """Same length; item by item the same None-ness, dtype and shape, and values within ``tol``."""
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        if a is None or b is None:
            assert a is None and b is None, f"item {i}: {a is None} vs {b is None}"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"item {i}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"item {i}: {m}")
