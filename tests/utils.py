"""Test helpers shared by the op, model and training tests."""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_flash_rule(out: torch.Tensor, ref_fp32: torch.Tensor, ref_same_dtype: torch.Tensor, name: str = "out",
                      atol: float = 0.0) -> None:
    """flash-attn's tolerance rule: the kernel's error against an fp32 reference is at most twice the error of the
    same computation done by PyTorch in the kernel's dtype (plus ``atol``, for the fp32 case where that error is ~0:
    pass a few ULP of fp32 there, and say why at the call site)."""
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    err = max_err(out, ref_fp32)
    base = max_err(ref_same_dtype, ref_fp32)
    print(f"{name}: max err {err:.3e}, pytorch same-dtype err {base:.3e}")
    assert err <= 2 * base + atol, f"{name}: max error {err:.3e} > 2 x pytorch's {base:.3e} + {atol:.1e}"


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """torch.testing.assert_close, printing the max error and the first mismatching index first."""
    a, e = actual.float(), expected.float()
    diff = (a - e).abs()
    if diff.numel():
        idx = diff.argmax()
        print(f"{name}: max abs err {diff.max().item():.3e} at flat index {idx.item()}")
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
