"""SwiGLU: Triton kernel vs the reference (HF eager numerics) and SwiGLUMLP vs HF LlamaMLP / Qwen2MLP with copied
weights, outputs and every gradient.

CPU: kernel under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes. GPU (`cuda` marker): bf16/fp16 at real sizes with
flash-attn's rule, and torch.compile.
"""
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

import llava_fast
from llava_fast.modules.mlp import SwiGLUMLP
from llava_fast.ops.swiglu import SwiGLUFunction, swiglu, swiglu_ref
from tests.utils import assert_close_verbose, assert_flash_rule

# fp32 kernel vs torch: exp differs by ~1 ulp (numpy/ex2 vs torch), a/(1+e) vs a*sigmoid(a) -> a few ulp relative
FP32_TOL = dict(atol=1e-6, rtol=1e-5)


def _grads(out, inputs, g):
    return list(torch.autograd.grad(out, inputs, g, retain_graph=True))


def _leaves(shape, dtype, device, fused):
    """gate/up as separate tensors, or as the two halves of one fused gate_up output (row-strided views)."""
    if fused:
        gu = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype).requires_grad_()
        a, b = gu.chunk(2, dim=-1)
        return [gu], a, b
    a = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
    b = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
    return [a, b], a, b


@pytest.fixture
def kdev(device):
    """Small kernel tests: the CPU interpreter here, the real GPU on a CUDA machine (the Triton path cannot take CPU
    tensors there). Factory calls inside the test default to this device."""
    with torch.device(device):
        yield device


# ---------------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(1, 8), (7, 123), (2, 3, 431), (5, 2048 + 3)])
def test_kernel_fp32_small(shape, fused, kdev):
    leaves, a, b = _leaves(shape, torch.float32, None, fused)
    a_big = a * 6  # reach the saturated ends of silu too
    c = SwiGLUFunction.apply(a_big, b)
    r = swiglu_ref(a_big, b)
    assert_close_verbose(c, r, name="out", **FP32_TOL)
    g = torch.randn_like(c)
    for i, (x, y) in enumerate(zip(_grads(c, leaves, g), _grads(r, leaves, g))):
        assert_close_verbose(x, y, name=f"grad{i}", **FP32_TOL)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_mlp_matches_hf(model, kdev):
    hidden, inter = 24, 40
    if model == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, hidden_act="silu")
        hf = LlamaMLP(cfg)
        ours = SwiGLUMLP.from_config(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4))
    else:
        hf = Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4))
        ours = SwiGLUMLP(hidden, inter)
    ours.load_state_dict(hf.state_dict())  # same keys: gate_proj / up_proj / down_proj
    x = torch.randn(3, 5, hidden, requires_grad=True)
    gy = torch.randn(3, 5, hidden)
    y_hf = hf(x)
    g_hf = _grads(y_hf, [x] + list(hf.parameters()), gy)
    llava_fast.set_backend("swiglu", "reference")
    try:
        y = ours(x)
    finally:
        llava_fast.set_backend("swiglu", "auto")
    assert torch.equal(y, y_hf)  # the reference path (the CPU default) is HF bit for bit
    llava_fast.set_backend("swiglu", "triton")
    try:
        y_k = ours(x)
        g_k = _grads(y_k, [x] + list(ours.parameters()), gy)
    finally:
        llava_fast.set_backend("swiglu", "auto")
    assert_close_verbose(y_k, y_hf, name="out", **FP32_TOL)
    names = ["dx"] + [n for n, _ in hf.named_parameters()]
    for name, a, b in zip(names, g_k, g_hf):
        assert_close_verbose(a, b, name=name, **FP32_TOL)


def test_mlp_bias_and_hidden_act_check():
    m = SwiGLUMLP(8, 12, bias=True)
    names = {f"{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")}
    assert set(m.state_dict()) == names
    with pytest.raises(ValueError, match="hidden_act"):
        SwiGLUMLP.from_config(LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2,
                                          hidden_act="gelu"))


def test_compile_aot_eager(kdev):
    leaves, a, b = _leaves((4, 100), torch.float32, None, True)
    llava_fast.set_backend("swiglu", "triton")
    try:
        c = torch.compile(swiglu, backend="aot_eager", fullgraph=True)(a, b)
        g = _grads(c, leaves, torch.ones_like(c))
    finally:
        llava_fast.set_backend("swiglu", "auto")
    r = swiglu_ref(a, b)
    assert_close_verbose(c, r, name="out", **FP32_TOL)
    assert_close_verbose(g[0], _grads(r, leaves, torch.ones_like(r))[0], name="grad", **FP32_TOL)


def test_bad_inputs():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(a, torch.randn(3, 5))
    with pytest.raises(ValueError, match="same dtype"):
        swiglu(a, a.half())
    with pytest.raises(ValueError, match="gate must be"):
        swiglu(a.long(), a)


# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4864), (4096, 11008), (2048, 18944), (3, 517, 1237), (1, 4864)])
def test_cuda_flash_rule(shape, dtype, fused):
    _flash_rule_case(shape, dtype, fused, "cuda")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 17, 123), (1, 64)])
def test_low_precision_flash_rule(shape, dtype, fused, forced):
    """test_cuda_flash_rule at small shapes under the interpreter (bf16 since session 36: _ext.interpreter_bf16)."""
    forced("swiglu")
    _flash_rule_case(shape, dtype, fused, "cpu")


def _flash_rule_case(shape, dtype, fused, device):
    leaves, a, b = _leaves(shape, dtype, device, fused)
    a = a * 4
    c = swiglu(a, b)
    s = swiglu_ref(a, b)
    assert torch.isfinite(c).all()
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    f = swiglu_ref(a32, b32)
    assert_flash_rule(c, f, s, name="out")
    g = torch.randn_like(c)
    gk = _grads(c, [a, b], g)
    gs = _grads(s, [a, b], g)
    gf = _grads(f, [a32, b32], g.float())
    for name, x, y, z in zip(["dgate", "dup"], gk, gf, gs):
        assert_flash_rule(x, y, z, name=name)


@pytest.mark.cuda
def test_cuda_mlp_vs_hf_bf16():
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
    hf = Qwen2MLP(cfg).to("cuda", torch.bfloat16)
    ours = SwiGLUMLP.from_config(cfg).to("cuda", torch.bfloat16)
    ours.load_state_dict(hf.state_dict())
    ref32 = Qwen2MLP(cfg).to("cuda")
    ref32.load_state_dict(hf.state_dict())
    x = torch.randn(2, 1000, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    gy = torch.randn(2, 1000, 896, device="cuda", dtype=torch.bfloat16)
    y, y_hf, y32 = ours(x), hf(x), ref32(x32)
    assert_flash_rule(y, y32, y_hf, name="out")
    gk = _grads(y, [x] + list(ours.parameters()), gy)
    gs = _grads(y_hf, [x] + list(hf.parameters()), gy)
    gf = _grads(y32, [x32] + list(ref32.parameters()), gy.float())
    names = ["dx"] + [n for n, _ in hf.named_parameters()]
    for name, a, b, c in zip(names, gk, gf, gs):
        assert_flash_rule(a, b, c, name=name)


@pytest.mark.cuda
def test_cuda_torch_compile():
    leaves, a, b = _leaves((2048, 4864), torch.bfloat16, "cuda", True)
    c = torch.compile(swiglu, fullgraph=True)(a, b)
    e = swiglu(a, b)
    assert torch.equal(c, e)
    g = torch.randn_like(c)
    assert torch.equal(_grads(c, leaves, g)[0], _grads(e, leaves, g)[0])
