"""RoPE: reference bit-for-bit vs HF LlamaRotaryEmbedding + apply_rotary_pos_emb; Triton kernel (q and k in one
launch, packed position ids) vs the reference, forward and backward, in-place, cache and strided variants.

CPU: kernel under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes. GPU (`cuda` marker): bf16/fp16 at Qwen2-0.5B and
Llama-7B head shapes with flash-attn's rule, and torch.compile.
"""
import contextlib

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as qwen2_apply_rotary_pos_emb

import llava_fast
from llava_fast.modules.rope import RotaryEmbedding
from llava_fast.ops.rope import (RoPEFunction, apply_rotary_ref, rope, rope_cos_sin_cache, rope_fwd, rope_inv_freq,
                                 rope_ref)
from llava_fast.ops.rope import apply_rotary_pos_emb as lf_apply_rotary
from llava_fast.ops.rope import rotary_rows
from tests.utils import assert_close_verbose, assert_flash_rule

# fp32 kernel vs fp32 reference: cos/sin from numpy (interpreter) or libdevice vs torch differ by <= 1-2 ulp, and
# x1*c - x2*s may be fused (FMA) -> a few ulp of |x| ~ 4: atol 2e-6, rtol 1e-5.
FP32_TOL = dict(atol=2e-6, rtol=1e-5)


def _packed_positions(lengths, device=None):
    """Position ids restarting at every sample of a packed sequence."""
    return torch.cat([torch.arange(n, device=device) for n in lengths])


def _hf(cfg_cls, emb_cls, apply_fn, q, k, pos, theta):
    """HF on packed (T, H, D) q/k: position_ids (1, T) and (1, H, T, D) layouts."""
    hq, d = q.shape[-2], q.shape[-1]
    cfg = cfg_cls(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=k.shape[-2], head_dim=d,
                  rope_theta=theta, max_position_embeddings=4096)
    emb = emb_cls(cfg)
    cos, sin = emb(q, pos[None])
    qh, kh = apply_fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return qh[0].transpose(0, 1), kh[0].transpose(0, 1)


def _grads(outs, inputs, gouts):
    return list(torch.autograd.grad(outs, inputs, gouts))


def _flash_rule_qk(ours, same, fp32, inputs, inputs32):
    """flash-attn's rule on the (q, k) outputs ``ours`` against ``fp32`` (PyTorch's error: ``same``, at ours' dtype),
    then on dq, dk for one random upstream gradient. Returns our (dq, dk)."""
    for name, o, f, c in zip(["q", "k"], ours, fp32, same):
        assert_flash_rule(o, f, c, name=name)
    gq, gk = torch.randn_like(same[0]), torch.randn_like(same[1])
    g = _grads(ours, inputs, [gq, gk])
    gs = _grads(same, inputs, [gq, gk])
    gf = _grads(fp32, inputs32, [gq.float(), gk.float()])
    for name, a, b, c in zip(["dq", "dk"], g, gf, gs):
        assert_flash_rule(a, b, c, name=name)
    return g


@pytest.fixture
def kdev(device):
    """Small kernel tests: the CPU interpreter here, the real GPU on a CUDA machine (the Triton path cannot take CPU
    tensors there). Factory calls inside the test default to this device."""
    with torch.device(device):
        yield device


# ---------------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_reference_bitexact_vs_hf(model, dtype):
    cfg_cls, emb_cls, apply_fn, theta = {
        "llama": (LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb, 1e4),
        "qwen2": (Qwen2Config, Qwen2RotaryEmbedding, qwen2_apply_rotary_pos_emb, 1e6),
    }[model]
    pos = _packed_positions([5, 1, 300, 17])
    q = torch.randn(len(pos), 7, 32, dtype=dtype, requires_grad=True)
    k = torch.randn(len(pos), 3, 32, dtype=dtype, requires_grad=True)
    qh, kh = _hf(cfg_cls, emb_cls, apply_fn, q, k, pos, theta)
    qr, kr = rope_ref(q, k, pos, theta)
    assert torch.equal(qr, qh) and torch.equal(kr, kh)
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    for a, b in zip(_grads([qr, kr], [q, k], [gq, gk]), _grads([qh, kh], [q, k], [gq, gk])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("theta", [1e4, 1e6])
@pytest.mark.parametrize("t_hq_hkv_d", [(1, 1, 1, 2), (11, 7, 3, 16), (40, 14, 2, 64), (9, 4, 4, 6)])
def test_kernel_fp32_small(t_hq_hkv_d, theta, kdev):
    t, hq, hkv, d = t_hq_hkv_d
    pos = _packed_positions([t // 2, t - t // 2] if t > 1 else [1]) * 37  # large angles too
    q = torch.randn(t, hq, d, requires_grad=True)
    k = torch.randn(t, hkv, d, requires_grad=True)
    inv = rope_inv_freq(d, theta)
    qo, ko = RoPEFunction.apply(q, k, pos, inv, None, None, False)
    qr, kr = rope_ref(q, k, pos, theta)
    assert_close_verbose(qo, qr, name="q", **FP32_TOL)
    assert_close_verbose(ko, kr, name="k", **FP32_TOL)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    for name, a, b in zip(["dq", "dk"], _grads([qo, ko], [q, k], [gq, gk]), _grads([qr, kr], [q, k], [gq, gk])):
        assert_close_verbose(a, b, name=name, **FP32_TOL)


def test_cache_and_batched_layout(kdev):
    b, s, hq, hkv, d = 2, 9, 4, 2, 16
    pos = torch.stack([torch.arange(s), torch.arange(s) + 5])
    q = torch.randn(b, s, hq, d)
    k = torch.randn(b, s, hkv, d)
    qr, kr = rope_ref(q, k, pos, 1e4)
    cos, sin = rope_cos_sin_cache(64, d, 1e4)
    qc, kc = RoPEFunction.apply(q, k, pos, None, cos, sin, False)
    assert qc.shape == q.shape
    # the cache is computed by torch exactly as HF: same cos/sin, so fp32 results agree to FMA-level rounding
    assert_close_verbose(qc, qr, name="q", **FP32_TOL)
    assert_close_verbose(kc, kr, name="k", **FP32_TOL)
    # the reference path with the cache is HF-exact
    llava_fast.set_backend("rope", "reference")
    try:
        qc2, kc2 = rope(q, k, pos, cos_sin_cache=(cos, sin))
    finally:
        llava_fast.set_backend("rope", "auto")
    assert torch.equal(qc2, qr) and torch.equal(kc2, kr)


def test_strided_qkv_views_and_inplace(kdev):
    t, hq, hkv, d = 13, 4, 2, 8
    qkv = torch.randn(t, hq + 2 * hkv, d)
    pos = _packed_positions([6, 7])
    q, k = qkv[:, :hq], qkv[:, hq:hq + hkv]
    qr, kr = rope_ref(q, k, pos, 1e4)
    qo, ko = rope_fwd(q, k, pos, rope_inv_freq(d, 1e4))
    assert_close_verbose(qo, qr, name="q", **FP32_TOL)
    assert_close_verbose(ko, kr, name="k", **FP32_TOL)
    v_before = qkv[:, hq + hkv:].clone()
    with torch.no_grad():
        q2, k2 = RoPEFunction.apply(q, k, pos, rope_inv_freq(d, 1e4), None, None, True)
    assert q2.data_ptr() == q.data_ptr()
    torch.testing.assert_close(qkv[:, :hq], qo, atol=0, rtol=0)
    torch.testing.assert_close(qkv[:, hq:hq + hkv], ko, atol=0, rtol=0)
    assert torch.equal(qkv[:, hq + hkv:], v_before)  # v untouched


def test_inplace_with_autograd(kdev):
    pos = _packed_positions([3, 4])
    q0 = torch.randn(7, 3, 8, requires_grad=True)
    k0 = torch.randn(7, 1, 8, requires_grad=True)
    llava_fast.set_backend("rope", "triton")
    try:
        q, k = q0 * 1.0, k0 * 1.0  # non-leaf activations
        qo, ko = rope(q, k, pos, 1e4, inplace=True)
        assert qo.data_ptr() == q.data_ptr()
        g = _grads([qo, ko], [q0, k0], [torch.ones_like(qo), torch.ones_like(ko)])
    finally:
        llava_fast.set_backend("rope", "auto")
    qr, kr = rope_ref(q0, k0, pos, 1e4)
    gr = _grads([qr, kr], [q0, k0], [torch.ones_like(qr), torch.ones_like(kr)])
    assert_close_verbose(qo, qr, name="q", **FP32_TOL)
    for a, b in zip(g, gr):
        assert_close_verbose(a, b, name="grad", **FP32_TOL)


def test_module_from_config_matches_hf(kdev):
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    mod = RotaryEmbedding.from_config(cfg)
    assert mod.theta == 1e6 and mod.head_dim == 16
    assert len(mod.state_dict()) == 0  # inv_freq is non-persistent, as in HF
    pos = _packed_positions([4, 9])
    q, k = torch.randn(13, 4, 16), torch.randn(13, 2, 16)
    qh, kh = _hf(Qwen2Config, Qwen2RotaryEmbedding, qwen2_apply_rotary_pos_emb, q, k, pos, 1e6)
    llava_fast.set_backend("rope", "reference")
    try:
        qo, ko = mod(q, k, pos)
    finally:
        llava_fast.set_backend("rope", "auto")
    assert torch.equal(qo, qh) and torch.equal(ko, kh)  # the reference path is HF bit for bit
    cos, sin = mod.cos_sin(q, pos)
    cos_hf, sin_hf = Qwen2RotaryEmbedding(cfg)(q, pos[None])
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
    llava_fast.set_backend("rope", "triton")
    try:
        with torch.no_grad():
            qi, ki = q.clone(), k.clone()
            qo2, ko2 = mod(qi, ki, pos)  # in place under no_grad
        assert qo2.data_ptr() == qi.data_ptr()
    finally:
        llava_fast.set_backend("rope", "auto")
    assert_close_verbose(qo2, qh, name="q", **FP32_TOL)
    assert_close_verbose(ko2, kh, name="k", **FP32_TOL)


def test_compile_aot_eager(kdev):
    pos = _packed_positions([5, 3])
    q = torch.randn(8, 3, 16, requires_grad=True)
    k = torch.randn(8, 1, 16, requires_grad=True)
    inv = rope_inv_freq(16, 1e4)
    llava_fast.set_backend("rope", "triton")
    try:
        f = torch.compile(lambda q, k, p: rope(q, k, p, inv_freq=inv), backend="aot_eager", fullgraph=True)
        qo, ko = f(q, k, pos)
        g = _grads([qo, ko], [q, k], [torch.ones_like(qo), torch.ones_like(ko)])
    finally:
        llava_fast.set_backend("rope", "auto")
    qr, kr = rope_ref(q, k, pos, 1e4)
    gr = _grads([qr, kr], [q, k], [torch.ones_like(qr), torch.ones_like(kr)])
    assert_close_verbose(qo, qr, name="q", **FP32_TOL)
    for a, b in zip(g, gr):
        assert_close_verbose(a, b, name="grad", **FP32_TOL)


def test_bad_inputs():
    q, k, pos = torch.randn(5, 2, 8), torch.randn(5, 1, 8), torch.arange(5)
    with pytest.raises(ValueError, match="position_ids"):
        rope(q, k, torch.arange(4))
    with pytest.raises(ValueError, match="position_ids must be int"):
        rope(q, k, pos.float())
    with pytest.raises(ValueError, match="head_dim"):
        rope(q, torch.randn(5, 1, 6), pos)
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(5, 2, 7), torch.randn(5, 1, 7), pos)
    with pytest.raises(ValueError, match="same dtype"):
        rope(q, k.half(), pos)


@contextlib.contextmanager
def _kernel():
    llava_fast.set_backend("rope", "triton")
    try:
        yield
    finally:
        llava_fast.set_backend("rope", "auto")


def _hf_tables(b, s, hq, hkv, d, q_dtype, table_dtype, batch_tables, theta=1e6, device=None):
    """transformers' layout: q (B, Hq, S, D) and k (B, Hkv, S, D) as its attention makes them (transposed views of
    (B, S, H, D)), and its rotary embedding's (B or 1, S, D) cos / sin in ``table_dtype`` (fp32 next to bf16 q / k:
    autocast), at positions that differ per row (left padding) or are shared (1 row of tables)."""
    cfg = Qwen2Config(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                      rope_theta=theta, max_position_embeddings=4096)
    pos = torch.arange(s, device=device)[None] * 3 + (torch.arange(b, device=device)[:, None] * 5 if batch_tables
                                                      else 0)
    cos, sin = Qwen2RotaryEmbedding(cfg).to(device)(torch.ones((), dtype=table_dtype, device=device), pos)
    q = torch.randn(b, s, hq, d, dtype=q_dtype, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hkv, d, dtype=q_dtype, device=device).transpose(1, 2).requires_grad_()
    return q, k, cos, sin


@pytest.mark.parametrize("batch_tables", [True, False], ids=["tables_per_row", "tables_shared"])
@pytest.mark.parametrize("b_s_hq_hkv_d", [(1, 1, 1, 1, 2), (2, 11, 4, 2, 16), (3, 7, 6, 6, 10)])
def test_hf_tables_fp32(b_s_hq_hkv_d, batch_tables, kdev):
    """apply_rotary_pos_emb (transformers' cos / sin tables, patch_hf(rope=True)) against transformers' own function:
    fp32 values, layout and gradients; the reference path is transformers' bit for bit."""
    q, k, cos, sin = _hf_tables(*b_s_hq_hkv_d, torch.float32, torch.float32, batch_tables)
    qh, kh = qwen2_apply_rotary_pos_emb(q, k, cos, sin)
    with _kernel():
        qo, ko = lf_apply_rotary(q, k, cos, sin)
    assert qo.shape == qh.shape and qo.stride() == qh.stride() and qo.dtype == qh.dtype
    assert_close_verbose(qo, qh, name="q", **FP32_TOL)
    assert_close_verbose(ko, kh, name="k", **FP32_TOL)
    gq, gk = torch.randn_like(qh), torch.randn_like(kh)
    for name, a, b in zip(["dq", "dk"], _grads([qo, ko], [q, k], [gq, gk]), _grads([qh, kh], [q, k], [gq, gk])):
        assert_close_verbose(a, b, name=name, **FP32_TOL)
    qr, kr = lf_apply_rotary(q, k, cos, sin)   # CPU "auto": the reference
    assert torch.equal(qr, qh) and torch.equal(kr, kh)
    assert torch.equal(apply_rotary_ref(q, k, cos, sin)[0], qh)


@pytest.mark.parametrize("q_dtype,table_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=["fp16", "bf16_autocast"])
def test_hf_tables_low_precision_flash_rule(q_dtype, table_dtype, kdev):
    """fp16 tables next to fp16 q / k, and fp32 tables next to bf16 q / k (autocast: transformers returns fp32): the
    output dtype is transformers', the forward with fp32 tables is its value exactly (both multiply the same numbers
    in fp32 and add once), and the values and gradients follow flash-attn's rule against fp32."""
    q, k, cos, sin = _hf_tables(2, 33, 4, 2, 32, q_dtype, table_dtype, True, theta=1e4)
    qs, ks = qwen2_apply_rotary_pos_emb(q, k, cos, sin)
    with _kernel():
        qo, ko = lf_apply_rotary(q, k, cos, sin)
    assert qo.dtype == qs.dtype == torch.promote_types(q_dtype, table_dtype)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    qf, kf = qwen2_apply_rotary_pos_emb(q32, k32, cos.float(), sin.float())
    if table_dtype == torch.float32:
        assert torch.equal(qo, qs) and torch.equal(ko, ks)
    g = _flash_rule_qk([qo, ko], [qs, ks], [qf, kf], [q, k], [q32, k32])
    assert g[0].dtype == q_dtype


def test_hf_tables_compile_aot_eager(kdev):
    q, k, cos, sin = _hf_tables(2, 6, 2, 1, 8, torch.float32, torch.float32, False)
    with _kernel():
        qo, ko = torch.compile(lf_apply_rotary, backend="aot_eager", fullgraph=True)(q, k, cos, sin)
        g = _grads([qo, ko], [q, k], [torch.ones_like(qo), torch.ones_like(ko)])
    qh, kh = qwen2_apply_rotary_pos_emb(q, k, cos, sin)
    gh = _grads([qh, kh], [q, k], [torch.ones_like(qh), torch.ones_like(kh)])
    assert_close_verbose(qo, qh, name="q", **FP32_TOL)
    for a, b in zip(g, gh):
        assert_close_verbose(a, b, name="grad", **FP32_TOL)


def test_hf_tables_bad_inputs(kdev):
    q, k, cos, sin = _hf_tables(2, 5, 2, 1, 8, torch.float32, torch.float32, True)
    with _kernel():
        with pytest.raises(ValueError, match="cos / sin must both be"):
            lf_apply_rotary(q, k, cos[:, :4], sin[:, :4])
        with pytest.raises(ValueError, match="k .* must match q"):
            lf_apply_rotary(q, k[:1], cos, sin)
        with pytest.raises(ValueError, match="q must have 4 dims"):
            lf_apply_rotary(q[0], k, cos, sin)
        with pytest.raises(ValueError, match="rows needs one table row per token"):
            lf_apply_rotary(q, k, cos, sin, rows=torch.arange(3, dtype=torch.int32))
        # rows made once and shared (patch_hf): the same result
        qa, _ = lf_apply_rotary(q, k, cos[:1], sin[:1], rows=rotary_rows(cos[:1], 2))
        qb, _ = lf_apply_rotary(q, k, cos[:1], sin[:1])
    assert torch.equal(qa, qb)


# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,theta", [(14, 2, 64, 1e6), (32, 32, 128, 1e4), (28, 4, 128, 1e6), (5, 3, 96, 1e4)])
def test_cuda_flash_rule(hq, hkv, d, theta, dtype):
    _flash_rule_case([1, 2500, 4000, 1691], hq, hkv, d, theta, dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,theta", [(7, 3, 32, 1e6), (2, 2, 96, 1e4)])
def test_low_precision_flash_rule(hq, hkv, d, theta, dtype, forced):
    """test_cuda_flash_rule at small shapes under the interpreter (bf16 since session 36: _ext.interpreter_bf16)."""
    forced("rope")
    _flash_rule_case([1, 40, 23], hq, hkv, d, theta, dtype, "cpu")


def _flash_rule_case(docs, hq, hkv, d, theta, dtype, device):
    pos = _packed_positions(docs, device)
    t = len(pos)
    q = torch.randn(t, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(t, hkv, d, device=device, dtype=dtype, requires_grad=True)
    qo, ko = rope(q, k, pos, theta)
    qs, ks = rope_ref(q, k, pos, theta)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    qf, kf = rope_ref(q32, k32, pos, theta)
    _flash_rule_qk([qo, ko], [qs, ks], [qf, kf], [q, k], [q32, k32])
    # the cache variant agrees with the in-kernel cos/sin
    cos, sin = rope_cos_sin_cache(4096, d, theta, device)
    qc, kc = rope(q, k, pos, cos_sin_cache=(cos, sin))
    assert_flash_rule(qc, qf, qs, name="q(cache)")


@pytest.mark.cuda
def test_cuda_fp32_close_to_hf():
    pos = _packed_positions([3000, 1000], "cuda")
    q = torch.randn(len(pos), 14, 64, device="cuda")
    k = torch.randn(len(pos), 2, 64, device="cuda")
    qh, kh = _hf(Qwen2Config, Qwen2RotaryEmbedding, qwen2_apply_rotary_pos_emb, q, k, pos, 1e6)
    qo, ko = rope(q, k, pos, 1e6)
    assert_close_verbose(qo, qh, name="q", **FP32_TOL)
    assert_close_verbose(ko, kh, name="k", **FP32_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_torch_compile(inplace):
    pos = _packed_positions([700, 1348], "cuda")
    q0 = torch.randn(len(pos), 14, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k0 = torch.randn(len(pos), 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    inv = rope_inv_freq(64, 1e6, "cuda")

    def f(q, k, p):
        return rope(q * 1.0, k * 1.0, p, inv_freq=inv, inplace=inplace)

    qo, ko = torch.compile(f, fullgraph=True)(q0, k0, pos)
    qe, ke = f(q0, k0, pos)
    assert torch.equal(qo, qe) and torch.equal(ko, ke)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    for a, b in zip(_grads([qo, ko], [q0, k0], [gq, gk]), _grads([qe, ke], [q0, k0], [gq, gk])):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("q_dtype,table_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.float32)],
                         ids=["bf16", "fp16", "bf16_autocast"])
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (32, 32, 128)])
def test_cuda_hf_tables_flash_rule(hq, hkv, d, q_dtype, table_dtype):
    """patch_hf(rope=True)'s kernel on transformers' tables at Qwen2-0.5B / Llama-7B head shapes, 2 rows of 2500
    tokens (session 35, not yet run on a GPU)."""
    q, k, cos, sin = _hf_tables(2, 2500, hq, hkv, d, q_dtype, table_dtype, True, device="cuda")
    qs, ks = qwen2_apply_rotary_pos_emb(q, k, cos, sin)
    llava_fast.set_backend("rope", "auto")
    qo, ko = lf_apply_rotary(q, k, cos, sin)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    qf, kf = qwen2_apply_rotary_pos_emb(q32, k32, cos.float(), sin.float())
    assert qo.dtype == qs.dtype and qo.stride() == qs.stride()
    _flash_rule_qk([qo, ko], [qs, ks], [qf, kf], [q, k], [q32, k32])
    if hq == 14:   # under torch.compile (the custom op), one graph (one head shape: inductor compiles are slow)
        qc, kc = torch.compile(lf_apply_rotary, fullgraph=True)(q, k, cos, sin)
        assert torch.equal(qc, qo) and torch.equal(kc, ko)
