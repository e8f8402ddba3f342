"""What the language model's packed training step asks of torch besides our kernels (Triton launches stubbed out, as
benchmarks/host_overhead.py does): no ``select_backward`` (q[0] / k[0] / v[0] around the varlen attention made one
zero fill plus one copy of each whole gradient per layer: the stage-1 H200 profile's 3 ``Memcpy DtoD`` per layer),
no memset for the RMSNorm backward's partial sums, and no separate residual ``add`` in the forward (fused into the
norms). Each count is per layer (3 layers minus 1 layer, halved), so the model's fixed ops do not blur it."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llava_fast
from llava_fast.models.config import TextConfig
from llava_fast.models.language import LanguageModel


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.c = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.c[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stubbed(monkeypatch):
    from triton.runtime.jit import KernelInterface

    monkeypatch.setattr(KernelInterface, "__getitem__", lambda self, grid: (lambda *a, **k: None))
    for op in ("rms_norm", "rope", "swiglu", "attention"):
        llava_fast.set_backend(op, "triton")
    yield
    llava_fast.set_backend("all", "auto")


def _ops(layers):
    cfg = TextConfig.from_dict(dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(0)
    m = LanguageModel(cfg)
    emb = torch.randn(1, 24, 64, requires_grad=True)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with _Count() as f:
        y = m(emb, position_ids=pos, cu_seqlens=cu, max_seqlen=14)
    with _Count() as b:
        y.float().sum().backward()
    return f.c, b.c


def test_per_layer_ops_of_a_packed_step(stubbed):
    f1, b1 = _ops(1)
    f3, b3 = _ops(3)

    def per_layer(a, b, name):
        return (b[name] - a[name]) / 2
    assert per_layer(b1, b3, "aten.select_backward.default") == 0
    assert per_layer(b1, b3, "aten.zeros.default") == 0
    assert per_layer(f1, f3, "aten.add.Tensor") == 0
    assert per_layer(b1, b3, "aten.add.Tensor") == 0
    # GEMMs only; the input-gradient sums in place (an out-of-place addmm copies its input first, session 13)
    assert per_layer(b1, b3, "aten.mm.default") + per_layer(b1, b3, "aten.addmm_.default") == 14
    assert per_layer(b1, b3, "aten.addmm.default") == 0
