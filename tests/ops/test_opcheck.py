"""``torch.library.opcheck`` over the elementwise / norm / RoPE / loss custom ops (the attention and projector ops have
theirs in test_attention.py and test_projector.py): the schema (mutation annotations), the fake implementation
against the real one (shapes, dtypes, strides), which ``torch.compile`` relies on, and AOT dispatch with static and
dynamic shapes. Session 35 (it found nothing). A fake that disagrees with the
kernel's output compiles into a graph that is silently wrong, or fails only on the GPU. Small inputs: the Triton
interpreter on the CPU here, the kernels on a GPU machine (the ``device`` fixture)."""
from __future__ import annotations

import types

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


def _inputs(dev):
    """The cases' tensors on ``dev`` (built per test: collection makes none, and launches no kernel)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    t = types.SimpleNamespace(x=r(5, 48), dy=r(5, 48), w=r(48), b=r(48), q=r(7, 4, 16), k=r(7, 2, 16))
    t.rstd = OPS.rms_norm_fwd(t.x, t.w, None, 1e-6)[2]
    t.pos = torch.arange(7, device=dev)
    t.inv = 1.0 / 10000 ** (torch.arange(0, 16, 2, device=dev).float() / 16)
    t.qb, t.kb = r(7, 4, 16, dtype=torch.bfloat16), r(7, 2, 16, dtype=torch.bfloat16)
    # transformers' (B * S, D) table rows, read through views of their first halves
    t.cos, t.sin = r(3, 16)[:, :8], r(3, 16)[:, :8]
    t.rows = torch.tensor([0, 1, 2, 0, 1, 2, 0], device=dev, dtype=torch.int32)
    t.hidden, t.weight, t.bias = r(9, 16), r(37, 16), r(37)
    t.labels = torch.tensor([1, -100, 5, 36, 0, 2, -100, 7, 9], device=dev)
    t.scale = torch.tensor([1 / 7], device=dev)
    return t


CASES = {   # name: (op name, the op's arguments from _inputs)
    "bias_grad": ("bias_grad", lambda t: (t.dy,)),
    "gelu_fwd": ("gelu_fwd", lambda t: (t.x, "none")),
    "gelu_bwd": ("gelu_bwd", lambda t: (t.dy, t.x, "tanh")),
    "gelu_bwd_out": ("gelu_bwd_out", lambda t: (t.dy, t.x, "none")),
    "layer_norm_fwd": ("layer_norm_fwd", lambda t: (t.x, t.w, t.b, 1e-5)),
    "layer_norm_bwd": ("layer_norm_bwd", lambda t: (t.dy, t.x, t.w, t.b, 1e-5)),
    "layer_norm_bwd_out": ("layer_norm_bwd_out", lambda t: (t.dy, t.x, t.w, None, 1e-5)),
    "quick_gelu_fwd": ("quick_gelu_fwd", lambda t: (t.x,)),
    "quick_gelu_bwd": ("quick_gelu_bwd", lambda t: (t.dy, t.x)),
    "quick_gelu_bwd_out": ("quick_gelu_bwd_out", lambda t: (t.dy, t.x)),
    "rms_norm_fwd": ("rms_norm_fwd", lambda t: (t.x, t.w, None, 1e-6)),
    "rms_norm_fwd residual": ("rms_norm_fwd", lambda t: (t.x, t.w, t.dy, 1e-6)),
    "rms_norm_bwd": ("rms_norm_bwd", lambda t: (t.dy, t.x, t.w, t.rstd, None)),
    "rms_norm_bwd_out": ("rms_norm_bwd_out", lambda t: (t.dy, t.x, t.w, t.rstd, t.dy)),
    "rope": ("rope", lambda t: (t.q, t.k, t.pos, t.inv, None, None, False)),
    "rope_ (in place)": ("rope_", lambda t: (t.q.clone(), t.k.clone(), t.pos, t.inv, None, None, True)),
    "rope_tables bf16 -> fp32": ("rope_tables", lambda t: (t.qb, t.kb, t.rows, t.cos, t.sin, torch.float32, False)),
    "rope_tables backward fp32 -> bf16": ("rope_tables",
                                          lambda t: (t.q, t.k, t.rows, t.cos, t.sin, torch.bfloat16, True)),
    "swiglu_fwd": ("swiglu_fwd", lambda t: (t.x, t.dy)),
    "swiglu_bwd": ("swiglu_bwd", lambda t: (t.dy, t.x, t.x)),
    "swiglu_bwd_out": ("swiglu_bwd_out", lambda t: (t.dy, t.x, t.x)),
    "fused_linear_cross_entropy": ("fused_linear_cross_entropy", lambda t: (
        t.hidden, t.weight, t.labels, None, t.scale, -100, 4, True, True, False, False, True, "auto", "token", 0)),
    "fused_linear_cross_entropy logits": ("fused_linear_cross_entropy", lambda t: (
        t.hidden, t.weight, t.labels, t.bias, t.scale, -100, 4, False, True, True, True, True, "auto", "token", 0)),
}


def _opcheck(case, dev):
    name, args = CASES[case]
    torch.library.opcheck(getattr(OPS, name).default, args(_inputs(dev)), test_utils=CHECKS)


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case, device):
    _opcheck(case, device)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_opcheck(case):
    """The same checks against the compiled kernels (device_check runs the ``cuda`` tests only; session 35, not yet run
    on a GPU)."""
    _opcheck(case, "cuda")
