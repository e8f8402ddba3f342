"""``torch.library.opcheck`` over the elementwise / norm / RoPE / loss custom ops (the attention and projector ops have
theirs in test_attention.py and test_projector.py): the schema (mutation annotations), the fake implementation
against the real one (shapes, dtypes, strides), which ``torch.compile`` relies on, and AOT dispatch with static and
dynamic shapes. Session 35 (it found nothing). A fake that disagrees with the
kernel's output compiles into a graph that is silently wrong, or fails only on the GPU. Small inputs: the Triton
interpreter on the CPU here, the kernels on a GPU machine (the ``device`` fixture)."""
from __future__ import annotations

import pytest
import torch

import llava_fast.ops.cross_entropy  # noqa: F401  (each module registers its ops)
import llava_fast.ops.gelu  # noqa: F401
import llava_fast.ops.layer_norm  # noqa: F401
import llava_fast.ops.quick_gelu  # noqa: F401
import llava_fast.ops.rms_norm  # noqa: F401
import llava_fast.ops.rope  # noqa: F401
import llava_fast.ops.swiglu  # noqa: F401

OPS = torch.ops.llava_fast
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
          "test_aot_dispatch_dynamic")   # (opcheck's whole list, named so that a torch adding one is seen)


def _cases(dev):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    x, dy, w, b = r(5, 48), r(5, 48), r(48), r(48)
    _, _, rstd = OPS.rms_norm_fwd(x, w, None, 1e-6)
    q, k = r(7, 4, 16), r(7, 2, 16)
    pos = torch.arange(7, device=dev)
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2, device=dev).float() / 16)
    qb, kb = r(7, 4, 16, dtype=torch.bfloat16), r(7, 2, 16, dtype=torch.bfloat16)
    table = r(3, 16)   # transformers' (B * S, D) table rows, read through views of their first halves
    cos, sin = table[:, :8], r(3, 16)[:, :8]
    rows = torch.tensor([0, 1, 2, 0, 1, 2, 0], device=dev, dtype=torch.int32)
    hidden, weight = r(9, 16), r(37, 16)
    labels = torch.tensor([1, -100, 5, 36, 0, 2, -100, 7, 9], device=dev)
    scale = torch.tensor([1 / 7], device=dev)
    return [
        ("bias_grad", OPS.bias_grad, (dy,)),
        ("gelu_fwd", OPS.gelu_fwd, (x, "none")),
        ("gelu_bwd", OPS.gelu_bwd, (dy, x, "tanh")),
        ("gelu_bwd_out", OPS.gelu_bwd_out, (dy, x, "none")),
        ("layer_norm_fwd", OPS.layer_norm_fwd, (x, w, b, 1e-5)),
        ("layer_norm_bwd", OPS.layer_norm_bwd, (dy, x, w, b, 1e-5)),
        ("layer_norm_bwd_out", OPS.layer_norm_bwd_out, (dy, x, w, None, 1e-5)),
        ("quick_gelu_fwd", OPS.quick_gelu_fwd, (x,)),
        ("quick_gelu_bwd", OPS.quick_gelu_bwd, (dy, x)),
        ("quick_gelu_bwd_out", OPS.quick_gelu_bwd_out, (dy, x)),
        ("rms_norm_fwd", OPS.rms_norm_fwd, (x, w, None, 1e-6)),
        ("rms_norm_fwd residual", OPS.rms_norm_fwd, (x, w, dy, 1e-6)),
        ("rms_norm_bwd", OPS.rms_norm_bwd, (dy, x, w, rstd, None)),
        ("rms_norm_bwd_out", OPS.rms_norm_bwd_out, (dy, x, w, rstd, dy)),
        ("rope", OPS.rope, (q, k, pos, inv, None, None, False)),
        ("rope_ (in place)", OPS.rope_, (q.clone(), k.clone(), pos, inv, None, None, True)),
        ("rope_tables bf16 -> fp32", OPS.rope_tables, (qb, kb, rows, cos, sin, torch.float32, False)),
        ("rope_tables backward fp32 -> bf16", OPS.rope_tables, (q, k, rows, cos, sin, torch.bfloat16, True)),
        ("swiglu_fwd", OPS.swiglu_fwd, (x, dy)),
        ("swiglu_bwd", OPS.swiglu_bwd, (dy, x, x)),
        ("swiglu_bwd_out", OPS.swiglu_bwd_out, (dy, x, x)),
        ("fused_linear_cross_entropy", OPS.fused_linear_cross_entropy,
         (hidden, weight, labels, None, scale, -100, 4, True, True, False, False, True, "auto", "token", 0)),
        ("fused_linear_cross_entropy logits", OPS.fused_linear_cross_entropy,
         (hidden, weight, labels, r(37), scale, -100, 4, False, True, True, True, True, "auto", "token", 0)),
    ]


def _ids():   # (the names of _cases, listed here so that collection builds no tensors)
    return ["bias_grad", "gelu_fwd", "gelu_bwd", "gelu_bwd_out", "layer_norm_fwd", "layer_norm_bwd",
            "layer_norm_bwd_out", "quick_gelu_fwd", "quick_gelu_bwd", "quick_gelu_bwd_out", "rms_norm_fwd",
            "rms_norm_fwd residual", "rms_norm_bwd", "rms_norm_bwd_out", "rope", "rope_ (in place)",
            "rope_tables bf16 -> fp32", "rope_tables backward fp32 -> bf16", "swiglu_fwd", "swiglu_bwd",
            "swiglu_bwd_out", "fused_linear_cross_entropy", "fused_linear_cross_entropy logits"]


@pytest.mark.parametrize("case", _ids())
def test_opcheck(case, device):
    (_, op, args), = [c for c in _cases(device) if c[0] == case]
    torch.library.opcheck(op.default, args, test_utils=CHECKS)


def test_case_list_matches_ids():
    assert [c[0] for c in _cases("cpu")] == _ids()


@pytest.mark.cuda
@pytest.mark.parametrize("case", _ids())
def test_cuda_opcheck(case):
    """The same checks against the compiled kernels (device_check runs the ``cuda`` tests only; session 35, not yet run
    on a GPU)."""
    (_, op, args), = [c for c in _cases("cuda") if c[0] == case]
    torch.library.opcheck(op.default, args, test_utils=CHECKS)
