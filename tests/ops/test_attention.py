"""Tests for llava_fast/ops/attention.py (Triton varlen FlashAttention, fwd + bwd) against the naive per-document
fp32 reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) at tiny shapes: documents of 1-37 tokens,
2-7 heads, with the interpreter's block sizes (fwd 32x16, dK/dV 16x32, dQ 32x16) so that
every document spans full blocks, masked blocks and ragged tails. bf16 is GPU-only: the Triton 3.8 interpreter
computes bf16 tl.dot wrongly (checked: a plain 16x16 bf16 dot is off by 1e10), so CPU cases are fp32 and fp16.
Full-size bf16/fp16 cases carry the ``cuda`` marker.
"""
import pytest
import torch

from llava_fast import backend
from llava_fast.ops import attention as attn_mod
from llava_fast.ops.attention import (FlashAttnVarlenFunction, attention_ref, flash_attn_func,
                                      flash_attn_varlen_bwd, flash_attn_varlen_func, flash_attn_varlen_fwd)
from tests.utils import assert_flash_rule, raw_view

# fp32: the interpreter's dots are exact fp32 (numpy) and the reference has the same dtype, so the flash rule's
# "error of PyTorch in the same dtype" is 0. What is left is reassociation (online softmax over key blocks, exp2/log2
# instead of exp/log, sums of <= 37 keys): measured <= 3e-7 of the largest |value|. 1e-5 of the largest |value|
# (~80 fp32 ULP) bounds it with margin and is still 100x below any fp16 error.
FP32_REL_ATOL = 1e-5


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _make(lens_q, lens_k, hq, hkv, d, dtype, device, scale=1.0):
    q = (torch.randn(sum(lens_q), hq, d, device=device) * scale).to(dtype).requires_grad_()
    k = (torch.randn(sum(lens_k), hkv, d, device=device) * scale).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype).requires_grad_()
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device)


def _finite(x):
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def _check_against_ref(lens_q, lens_k, hq, hkv, d, causal, dtype, device, run):
    """run(q, k, v, cu_q, cu_k, max_q, max_k, causal) -> (out, lse) with autograd; checks out, lse, dq, dk, dv."""
    q, k, v, cu_q, cu_k = _make(lens_q, lens_k, hq, hkv, d, dtype, device)
    out, lse = run(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout) if out.numel() else (q * 0, k * 0, v * 0)

    ref, ref_lse = attention_ref(q, k, v, cu_q, cu_k, causal=causal, return_lse=True, upcast=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout, allow_unused=True)
    ref_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(ref_grads, (q, k, v))]

    # rows that see no key: lse = +inf in both, output 0
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: +inf rows differ from the reference"
    lse, ref_lse = _finite(lse), _finite(ref_lse)
    if dtype == torch.float32:
        for name, a, b in [("out", out, ref), ("lse", lse, ref_lse)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
            atol = FP32_REL_ATOL * max(1.0, b.abs().max().item() if b.numel() else 0.0)
            assert_flash_rule(a, b, b, name=name, atol=atol)
    else:
        low, low_lse = attention_ref(q, k, v, cu_q, cu_k, causal=causal, return_lse=True, upcast=False)
        low_grads = torch.autograd.grad(low, (q, k, v), dout, allow_unused=True)
        low_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(low_grads, (q, k, v))]
        assert_flash_rule(out, ref, low, name="out")
        # lse is fp32 in both implementations; its low-precision error comes from the fp16 scores
        assert_flash_rule(lse, ref_lse, _finite(low_lse), name="lse", atol=1e-5)
        for name, a, b, c in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
            # The fp32 reassociation floor (FP32_REL_ATOL, as in the fp32 branch): PyTorch's low-precision dQ can be
            # exactly 0 by cancellation (documents of one key: p = 1, dS = p * (dP - sum(p * dP)) = 0), while the
            # kernel computes delta = rowsum(dO * O) and dP = dO . V in different fp32 orders. Seen on an H200:
            # 2.5e-7 and 6.8e-7 against a PyTorch error of exactly 0; any bf16/fp16 defect is >= 1e-3.
            atol = FP32_REL_ATOL * max(1.0, b.abs().max().item() if b.numel() else 0.0)
            assert_flash_rule(a, b, c, name=name, atol=atol)
    return out, lse, grads


def _run_function(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    return FlashAttnVarlenFunction.apply(q, k, v, cu_q, cu_k, max_q, max_k, q.shape[-1] ** -0.5, causal, False)


# name: (lens_q, lens_k, Hq, Hkv, D, causal, dtype). Pruned for the interpreter (each case ~0.2-2 s): D 64/72 get
# the full causal x GQA grid, 80/96/128 one case each; ratios 1, 2 and 7; Sq < Sk and Sq > Sk (rows with no key) and
# empty documents; fp16 on three cases, bf16 on two. Everything, at full size and bf16, is repeated by the cuda tests
# below.
DOCS = [1, 17, 37]
CASES = {
    "mha-d64": (DOCS, DOCS, 4, 4, 64, False, torch.float32),
    "mha-d64-causal": (DOCS, DOCS, 4, 4, 64, True, torch.float32),
    "gqa2-d72": (DOCS, DOCS, 4, 2, 72, False, torch.float32),
    "gqa2-d72-causal": (DOCS, DOCS, 4, 2, 72, True, torch.float32),
    "mqa7-d64-causal": (DOCS, DOCS, 7, 1, 64, True, torch.float32),
    "mqa7-d72": ([5, 33], [5, 33], 7, 1, 72, False, torch.float32),
    "mha-d80-causal": (DOCS, DOCS, 2, 2, 80, True, torch.float32),
    "gqa2-d96": (DOCS, DOCS, 2, 1, 96, False, torch.float32),
    "mha-d128-causal": (DOCS, DOCS, 2, 2, 128, True, torch.float32),
    "sq<sk-gqa2-d64-causal": ([1, 5, 20], [3, 17, 37], 4, 2, 64, True, torch.float32),
    "sq<sk-d72": ([1, 5, 20], [3, 17, 37], 2, 2, 72, False, torch.float32),
    "sq>sk-empty-docs-causal": ([9, 0, 20, 3], [4, 3, 20, 0], 2, 1, 72, True, torch.float32),
    "no-keys-doc": ([3, 17], [0, 17], 2, 2, 64, False, torch.float32),
    "fp16-gqa2-d64-causal": (DOCS, DOCS, 4, 2, 64, True, torch.float16),
    "fp16-d72": (DOCS, DOCS, 2, 2, 72, False, torch.float16),
    "fp16-sq<sk-d128-causal": ([1, 5, 20], [3, 17, 37], 2, 1, 128, True, torch.float16),
    # bf16 from session 36 (before, the interpreter multiplied bf16 bit patterns in tl.dot: _ext.interpreter_bf16)
    "bf16-gqa2-d72-causal": (DOCS, DOCS, 4, 2, 72, True, torch.bfloat16),
    "bf16-sq<sk-d64": ([1, 5, 20], [3, 17, 37], 2, 1, 64, False, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fwd_bwd_vs_ref(case, device):
    lens_q, lens_k, hq, hkv, d, causal, dtype = CASES[case]
    _check_against_ref(lens_q, lens_k, hq, hkv, d, causal, dtype, device, _run_function)


@pytest.mark.parametrize("policy,d,chunks", [("masked", 72, (64, 16, True)), ("masked", 80, (64, 16, True)),
                                             ("none", 96, (128, 16, False)), ("exact", 72, (128, 16, False)),
                                             ("exact", 40, (64, 16, False)), ("overlap", 40, (32, 16, True))])
def test_head_dim_split_policies(monkeypatch, device, policy, d, chunks):
    """The head-dim splits (LLAVA_FAST_ATTN_SPLIT; the default "overlap" is what CASES above run: 72 -> 64 + [56, 72),
    80 -> 64 + 16, 96 -> 64 + 32) compute the right thing, forward and backward."""
    from llava_fast.ops.attention import _chunk1_start, _split_head_dim

    assert _split_head_dim(72) == (64, 16, True) and _chunk1_start(72, 64, 16, True) == 56
    assert _split_head_dim(96) == (64, 32, True) and _chunk1_start(96, 64, 32, True) == 64
    monkeypatch.setenv("LLAVA_FAST_ATTN_SPLIT", policy)
    assert _split_head_dim(d) == chunks
    if policy == "overlap":  # chunk 1 = [D - 16, D): overlaps chunk 0, no column of it out of bounds
        assert _chunk1_start(d, *chunks) == d - 16
        _check_against_ref([5, 37, 1], [5, 37, 9], 6, 2, d, False, torch.float32, device, _run_function)
    _check_against_ref(DOCS, DOCS, 4, 2, d, True, torch.float32, device, _run_function)
    _check_against_ref(DOCS, DOCS, 4, 2, d, False, torch.float32, device, _run_function)
    monkeypatch.setenv("LLAVA_FAST_ATTN_SPLIT", "bogus")
    with pytest.raises(ValueError, match="LLAVA_FAST_ATTN_SPLIT"):
        _split_head_dim(d)


@pytest.mark.parametrize("case", ["mha-d64-causal", "sq>sk-empty-docs-causal", "fp16-d72"])
def test_scale_first_variant(monkeypatch, device, case):
    """LLAVA_FAST_ATTN_FOLD=0 (for timing only): the forward's session-4 arithmetic, scores scaled before the row
    max, against the same reference; a bad value is named."""
    monkeypatch.setenv("LLAVA_FAST_ATTN_FOLD", "0")
    lens_q, lens_k, hq, hkv, d, causal, dtype = CASES[case]
    _check_against_ref(lens_q, lens_k, hq, hkv, d, causal, dtype, device, _run_function)
    monkeypatch.setenv("LLAVA_FAST_ATTN_FOLD", "no")
    with pytest.raises(ValueError, match="LLAVA_FAST_ATTN_FOLD"):
        _check_against_ref(lens_q, lens_k, hq, hkv, d, causal, dtype, device, _run_function)


def test_empty_rows_are_zero(device):
    """Queries that see no key (causal, Sq > Sk) get out = 0, lse = +inf and zero gradients (flash-attn)."""
    q, k, v, cu_q, cu_k = _make([6], [2], 2, 2, 64, torch.float32, device)
    out, lse = _run_function(q, k, v, cu_q, cu_k, 6, 2, True)
    # query i sees keys j <= i + 2 - 6: rows 0..3 see nothing
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert torch.isinf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()
    dq, _, _ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[:4], torch.zeros_like(dq[:4]))


@pytest.mark.parametrize("causal", [False, True])
def test_backward_is_deterministic(causal, device):
    q, k, v, cu_q, cu_k = _make([1, 17, 37], [1, 17, 37], 4, 2, 72, torch.float32, device)
    dout = torch.randn(q.shape, device=device)
    runs = []
    for _ in range(2):
        out, lse = FlashAttnVarlenFunction.apply(q, k, v, cu_q, cu_k, 37, 37, 72 ** -0.5, causal, True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.fixture
def force_triton(monkeypatch):
    """Route flash_attn_varlen_func through the Triton kernels even on CPU (they run under the interpreter)."""
    monkeypatch.setitem(backend._overrides, "attention", "triton")


def test_functional_strided_views(force_triton, device):
    """q/k/v as the model produces them: views of one fused projection, token stride 3*H*D, contiguous last dim."""
    lens, h, d = [5, 30], 2, 64
    t = sum(lens)
    qkv = torch.randn(t, 3 * h * d, device=device, requires_grad=True)
    q, k, v = qkv.view(t, 3, h, d).unbind(1)
    assert not q.is_contiguous() and q.stride(-1) == 1
    cu = _cu(lens, device)
    out, lse = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True, return_lse=True,
                                      deterministic=True)
    ref, ref_lse = attention_ref(q, k, v, cu, cu, causal=True, return_lse=True)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (rg,) = torch.autograd.grad(ref, qkv, dout)
    for name, a, b in (("out", out, ref), ("lse", lse, ref_lse), ("dqkv", g, rg)):
        assert_flash_rule(a, b, b, name=name, atol=FP32_REL_ATOL * max(1.0, b.abs().max().item()))
    # non-contiguous dout (a transposed view) goes through the same path
    dout_t = torch.randn(h, t, d, device=device).transpose(0, 1)
    (g2,) = torch.autograd.grad(flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, causal=True), qkv, dout_t)
    (rg2,) = torch.autograd.grad(attention_ref(q, k, v, cu, cu, causal=True), qkv, dout_t)
    assert_flash_rule(g2, rg2, rg2, name="dqkv(strided dout)", atol=FP32_REL_ATOL * max(1.0, rg2.abs().max().item()))


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_dense(force_triton, causal, device):
    b, s, hq, hkv, d = 2, 19, 4, 2, 64
    q = torch.randn(b, s, hq, d, device=device, requires_grad=True)
    k = torch.randn(b, s, hkv, d, device=device, requires_grad=True)
    v = torch.randn(b, s, hkv, d, device=device, requires_grad=True)
    out = flash_attn_func(q, k, v, causal=causal)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1),
        is_causal=causal).transpose(1, 2)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_flash_rule(a, r, r, name=name, atol=FP32_REL_ATOL * max(1.0, r.abs().max().item()))


def test_reference_matches_sdpa(device):
    """The reference itself, per document, against SDPA (Sq == Sk so that both causal conventions agree)."""
    lens = [3, 17, 9]
    q, k, v, cu, _ = _make(lens, lens, 4, 4, 64, torch.float32, device)
    for causal in (False, True):
        out = attention_ref(q, k, v, cu, cu, causal=causal)
        for b in range(len(lens)):
            sl = slice(int(cu[b]), int(cu[b + 1]))
            r = torch.nn.functional.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                                 v[sl].transpose(0, 1), is_causal=causal)
            torch.testing.assert_close(out[sl], r.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_cpu_path_is_reference(device):
    """Without a forced backend, CPU tensors take the PyTorch reference (with autograd)."""
    if device != "cpu":
        pytest.skip("CPU dispatch check")
    q, k, v, cu_q, cu_k = _make([4, 11], [4, 11], 2, 1, 72, torch.float32, device)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 11, causal=True, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None


def test_custom_ops_opcheck(device):
    q, k, v, cu_q, cu_k = _make([3, 17], [5, 17], 4, 2, 64, torch.float32, device)
    q, k, v = q.detach(), k.detach(), v.detach()
    args = (q, k, v, cu_q, cu_k, 17, 17, 0.125, True)
    torch.library.opcheck(torch.ops.llava_fast.flash_attn_varlen_fwd.default, args)
    out, lse = flash_attn_varlen_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, 17, 17, 0.125, True)
    torch.library.opcheck(torch.ops.llava_fast.flash_attn_varlen_bwd.default, bargs)
    dq, dk, dv = flash_attn_varlen_bwd(*bargs)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_torch_compile_fullgraph(device):
    """The autograd.Function over the custom ops traces with fullgraph=True (fake kernels give the shapes).
    aot_eager keeps the CPU run free of a C++ toolchain; the cuda test below uses inductor."""
    q, k, v, cu_q, cu_k = _make([1, 17, 37], [1, 17, 37], 4, 2, 72, torch.float32, device)

    def f(q, k, v):
        out, lse = FlashAttnVarlenFunction.apply(q, k, v, cu_q, cu_k, 37, 37, 72 ** -0.5, True, False)
        return out * 2.0, lse

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c, lse_c = compiled(q, k, v)
    out_e, lse_e = f(q, k, v)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)
    dout = torch.randn_like(out_c)
    for a, b in zip(torch.autograd.grad(out_c, (q, k, v), dout), torch.autograd.grad(out_e, (q, k, v), dout)):
        assert torch.equal(a, b)


def _bad_call(**over):
    q, k, v, cu_q, cu_k = _make([4, 12], [4, 12], 4, 2, 64, torch.float32, "cpu")
    kw = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=12, max_seqlen_k=12)
    kw.update(over)
    return flash_attn_varlen_func(**kw)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("over, match", [
    (dict(q=_t(16, 4, 64, dtype=torch.float64)), r"q has dtype torch.float64"),
    (dict(k=_t(16, 2, 64, dtype=torch.float16)), r"share one dtype"),
    (dict(q=_t(16, 4, 60)), r"head_dim .* multiple of 8"),
    (dict(q=_t(16, 4, 256), k=_t(16, 2, 256), v=_t(16, 2, 256)), r"head_dim .* 128"),
    (dict(k=_t(16, 2, 72)), r"head_dim of k"),
    (dict(q=_t(16, 3, 64)), r"multiple of the number of kv heads"),
    (dict(v=_t(16, 3, 64)), r"k and v must have the same"),
    (dict(q=_t(16, 64, 4).transpose(1, 2)), r"q must have a contiguous last dimension"),
    (dict(q=_t(2, 16, 4, 64)), r"q must have shape \(total_tokens"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 16])), r"cu_seqlens_q must have dtype torch.int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 16], dtype=torch.int32)), r"same length"),
    (dict(cu_seqlens_q=torch.tensor([16], dtype=torch.int32)), r"cu_seqlens_q must have shape \(batch \+ 1,\)"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 16], dtype=torch.int32, device="meta")), r"cu_seqlens_k is on meta"),
    (dict(v=torch.randn(16, 2, 64, device="meta")), r"v is on meta"),
    (dict(max_seqlen_q=torch.tensor(12)), r"max_seqlen_q must be a Python int"),
    (dict(dropout_p=0.1), r"dropout_p must be 0.0"),
    (dict(softmax_scale=0.0), r"softmax_scale must be a positive finite number"),  # the kernels scale the row max
    (dict(softmax_scale=-0.125), r"softmax_scale must be a positive finite number"),
    (dict(softmax_scale=float("nan")), r"softmax_scale must be a positive finite number"),
])
def test_bad_inputs(over, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**over)


# ---------------------------------------------------------------------------------------------------------------
# GPU (full sizes, bf16/fp16, the flash-attn rule)
# ---------------------------------------------------------------------------------------------------------------
GPU_DOCS = {"1": [1], "17": [17], "97": [97], "577": [577], "729": [729], "mix": [1, 17, 97, 577, 729, 300, 1024]}


class FakeCutlassAttn:
    """The C contract of ``llava_fast_cutlass_attn_fwd`` (csrc/cutlass/attention_sm90.cu) in PyTorch, on CPU memory
    reached through the raw pointers: q, k, v, o (B*S, H, D) in bf16/fp16, lse (H, B*S) fp32 natural log, scale
    1/sqrt(D), causal top-left. It checks the wrapper's arguments and that our Triton backward can consume the LSE
    the kernel writes. ``rc`` != 0: refuse like can_implement does."""

    def __init__(self, rc: int = 0):
        self.rc, self.calls = rc, []

    view = staticmethod(raw_view)

    def llava_fast_cutlass_has_attn_fwd(self):
        return 1

    def llava_fast_cutlass_attn_fwd(self, dtype, causal, B, H, S, D, q, k, v, o, lse, stream, err, n):
        self.calls.append((dtype, causal, B, H, S, D))
        if self.rc:
            err.value = b"Error Not Supported (fake)"
            return self.rc
        dt = {0: torch.bfloat16, 1: torch.float16}[dtype]
        Q, K, V = (self.view(t, (B, S, H, D), dt).float() for t in (q, k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", Q, K) * D ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), V)
        self.view(o, (B * S, H, D), dt).copy_(out.reshape(B * S, H, D).to(dt))
        self.view(lse, (H, B * S), torch.float32).copy_(s.logsumexp(-1).permute(1, 0, 2).reshape(H, B * S))
        return 0


@pytest.fixture
def fake_cutlass_attn(monkeypatch):
    from llava_fast import _ext

    fake = FakeCutlassAttn()
    monkeypatch.setattr(_ext, "cutlass_lib", lambda: fake)
    monkeypatch.setattr(_ext, "CUTLASS_ON_CPU", True)
    monkeypatch.setattr(_ext, "_warned_once", set())
    monkeypatch.setenv("LLAVA_FAST_ATTN_CUTLASS", "1")
    return fake


@pytest.mark.parametrize("d,causal", [(64, True), (128, False)])
def test_cutlass_fwd_contract(fake_cutlass_attn, d, causal, device):
    """LLAVA_FAST_ATTN_CUTLASS=1 with documents of one length: the forward goes to the (fake) CUTLASS kernel with
    (B, H, S, D) and our Triton backward runs on the LSE it wrote; out, lse and every gradient against the fp32
    reference by the flash-attn rule."""
    runs = attn_mod._cutlass_runs
    _check_against_ref([16, 16, 16], [16, 16, 16], 2, 2, d, causal, torch.float16, device, _run_function)
    assert attn_mod._cutlass_runs == runs + 1
    assert fake_cutlass_attn.calls == [(1, int(causal), 3, 2, 16, d)]


@pytest.mark.parametrize("case,match", [
    ("lengths", "different lengths"), ("gqa", "GQA"), ("d72", "head dim 72"), ("scale", "softmax_scale"),
    ("len17", "length 17 .*multiple of 8"), ("refused", "attn_fwd returned 2: Error Not Supported")])
def test_cutlass_fwd_falls_back(fake_cutlass_attn, case, match, device):
    """Calls the CUTLASS forward cannot take run the Triton forward, with a warning that says why."""
    lens, hq, hkv, d = [16, 16, 16], 2, 2, 64
    if case == "len17":
        lens = [17, 17, 17]
    elif case == "lengths":
        lens = [5, 17, 20]
    elif case == "gqa":
        hkv = 1
    elif case == "d72":
        d = 72
    elif case == "refused":
        fake_cutlass_attn.rc = 2
    q, k, v, cu_q, cu_k = _make(lens, lens, hq, hkv, d, torch.float16, device)
    scale = 0.1 if case == "scale" else d ** -0.5
    runs = attn_mod._cutlass_runs
    with pytest.warns(UserWarning, match=match):
        out, lse = FlashAttnVarlenFunction.apply(q, k, v, cu_q, cu_k, max(lens), max(lens), scale, True, False)
    assert attn_mod._cutlass_runs == runs
    ref = attention_ref(q, k, v, cu_q, cu_k, causal=True, softmax_scale=scale, upcast=True)
    low = attention_ref(q, k, v, cu_q, cu_k, causal=True, softmax_scale=scale, upcast=False)
    assert_flash_rule(out, ref, low, name="out")


class _SmallSharedMemory:
    """``_ext.launch`` as on a GPU with little shared memory per block: Triton refuses (OutOfResources, before anything
    runs) every attention kernel whose BLOCK_M x BLOCK_N is over ``limit``; the others run (under the interpreter)."""

    def __init__(self, limit):
        from llava_fast import _ext

        self.limit, self.real, self.tried = limit, _ext.launch, []

    def __call__(self, kernel, grid, *args, **kw):
        import triton

        if "BLOCK_M" in kw and kernel in (attn_mod._flash_attn_fwd_kernel, attn_mod._flash_attn_bwd_dkdv_kernel,
                                           attn_mod._flash_attn_bwd_dq_kernel):
            self.tried.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))
            if kw["BLOCK_M"] * kw["BLOCK_N"] > self.limit:
                raise triton.runtime.OutOfResources(kw["BLOCK_M"] * kw["BLOCK_N"], self.limit, "shared memory")
        return self.real(kernel, grid, *args, **kw)


def test_configs_shrink_until_they_fit(monkeypatch, device):
    """A config that Triton refuses for lack of shared memory (the D128 forward's 128 x 128, 160 KB, on the 99 KB of
    an A10, L4, L40S or RTX 4090) is retried smaller, remembered per (kind, width, default config, device), and the
    results are the kernels' as usual: forward and every gradient against the fp32 reference."""
    from llava_fast import _ext

    fake = _SmallSharedMemory(limit=16 * 16)  # the interpreter's configs are 32 x 16 and 16 x 32: all refused
    monkeypatch.setattr(_ext, "launch", fake)
    monkeypatch.setattr(attn_mod, "_FITTED", {})
    _check_against_ref(DOCS, DOCS, 4, 2, 72, True, torch.float32, device, _run_function)
    assert fake.tried == [(32, 16, 1, 1), (16, 16, 1, 1), (16, 32, 1, 1), (16, 16, 1, 1), (32, 16, 1, 1),
                          (16, 16, 1, 1)]  # fwd, dK/dV, dQ: each refused once, then its fitted config
    assert set(attn_mod._FITTED.values()) == {(16, 16, 1, 1)} and len(attn_mod._FITTED) == 3
    fake.tried.clear()
    _check_against_ref(DOCS, DOCS, 4, 2, 72, False, torch.float32, device, _run_function)
    assert fake.tried == [(16, 16, 1, 1)] * 3  # remembered: no refused launch the second time


def test_no_config_fits_names_the_kernel(monkeypatch, device):
    from llava_fast import _ext

    monkeypatch.setattr(_ext, "launch", _SmallSharedMemory(limit=0))
    monkeypatch.setattr(attn_mod, "_FITTED", {})
    q, k, v, cu_q, cu_k = _make(DOCS, DOCS, 2, 2, 64, torch.float32, device)
    with pytest.raises(RuntimeError, match=r"flash attention \(fwd, head dim 64\): no kernel configuration fits"):
        FlashAttnVarlenFunction.apply(q, k, v, cu_q, cu_k, 37, 37, 0.125, True, False)


def test_smaller_cfg_from_the_defaults():
    """The fallbacks the launcher tries on a small-shared-memory GPU, from each default (aot_check.py --arch 86 shows
    the first ones fit in 99 KB without spills: 128 x 64 at 8 warps for the forward, 32 x 32 for fp32)."""
    seq = []
    cfg = (128, 128, 8, 3)
    while cfg is not None:
        seq.append(cfg)
        cfg = attn_mod._smaller_cfg(cfg)
    assert seq == [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 3),
                   (32, 16, 4, 3), (16, 16, 4, 3), (16, 16, 4, 2), (16, 16, 4, 1)]
    assert attn_mod._smaller_cfg((64, 32, 4, 2)) == (32, 32, 4, 2)        # fp32 dK/dV and dQ at D128
    assert attn_mod._smaller_cfg((64, 128, 8, 2)) == (64, 64, 4, 2)       # dK/dV


@pytest.mark.cuda
@pytest.mark.parametrize("docs", list(GPU_DOCS))
@pytest.mark.parametrize("d", [64, 72, 80, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_docs_x_headdim(docs, d, causal):
    lens = GPU_DOCS[docs]
    _check_against_ref(lens, lens, 4, 2, d, causal, torch.bfloat16, "cuda", _run_function)


@pytest.mark.cuda
def test_cuda_config_over_shared_memory_shrinks(monkeypatch):
    """On the GPU itself: configs over any GPU's shared memory (sm_90 builds at D128, aot_check.py: 416, 322 and 320
    KB) are refused by Triton at launch and the launcher retries smaller ones, as on a 99 KB A10 / L4 / L40S with the
    defaults; forward and every gradient pass the flash rule, and the fitted configs are remembered."""
    monkeypatch.setenv("LLAVA_FAST_ATTN_CFG", "fwd=128,256,8,3;dkdv=128,256,8,3;dq=256,128,8,3")
    monkeypatch.setattr(attn_mod, "_FITTED", {})
    _check_against_ref([300, 1, 1500], [300, 1, 1500], 8, 2, 128, True, torch.bfloat16, "cuda", _run_function)
    kinds = {key[0] for key in attn_mod._FITTED}
    assert kinds == {"fwd", "dkdv", "dq"}, attn_mod._FITTED
    assert all(cfg[0] * cfg[1] < 128 * 256 for cfg in attn_mod._FITTED.values())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv", [(8, 8), (8, 4), (14, 2), (28, 4), (7, 1)])
@pytest.mark.parametrize("d", [64, 72, 128])
def test_cuda_gqa(dtype, hq, hkv, d):
    lens = [300, 1, 577, 97, 1500]
    _check_against_ref(lens, lens, hq, hkv, d, True, dtype, "cuda", _run_function)


@pytest.mark.parametrize("split, hq, hkv, d, parts", [("k2", 6, 2, 64, 2), ("k2", 7, 1, 72, 2), ("k7", 7, 1, 64, 7),
                                                       ("k5", 6, 1, 64, 3), ("k1", 4, 2, 64, 1), ("k3", 4, 4, 64, 0),
                                                       ("0", 6, 2, 64, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_kernel_split_backward(monkeypatch, split, hq, hkv, d, parts, causal, device):
    """LLAVA_FAST_ATTN_GQA_SPLIT=kN: N programs per kv head (rounded so no part is empty: k5 over 6 heads is 3 parts
    of 2), each summing its query heads into an fp32 partial, launched key-block-major; out, lse and every gradient
    pass the default's rule, uneven documents and Sq != Sk included. The spy checks the grid really was (documents x
    Hkv x parts, key blocks) with the partial strides passed ("k1": no partials; MHA, or "0" (the default before
    session 17): the split is off, one program per (key block, document, kv head))."""
    _split_case(monkeypatch, split, hq, hkv, d, parts, causal, device,
                torch.float32 if device == "cpu" else torch.bfloat16)


@pytest.mark.parametrize("split, hq, hkv, d, parts", [("k2", 7, 1, 72, 2), ("k4", 6, 2, 64, 3)])
def test_gqa_kernel_split_backward_bf16_interpreter(monkeypatch, split, hq, hkv, d, parts):
    """The split backward (the GPU default is k4) in bf16 under the interpreter: fp32 partials summed, then rounded
    once, by flash-attn's rule (session 36: bf16 kernels ran wrong under the interpreter before)."""
    _split_case(monkeypatch, split, hq, hkv, d, parts, True, "cpu", torch.bfloat16)


def _split_case(monkeypatch, split, hq, hkv, d, parts, causal, device, dtype):
    launches = []
    real = attn_mod._launch

    def spy(kind, fn, grid_of, args, constexprs, *rest):
        if kind == "dkdv":
            launches.append((grid_of(64, 16), constexprs.get("KB_MAJOR"), constexprs.get("n_parts"),
                             constexprs.get("stride_dkp", 0)))
        return real(kind, fn, grid_of, args, constexprs, *rest)
    monkeypatch.setattr(attn_mod, "_launch", spy)
    monkeypatch.setenv("LLAVA_FAST_ATTN_GQA_SPLIT", split)
    lens_q, lens_k = [5, 40, 17], [9, 40, 30]
    _check_against_ref(lens_q, lens_k, hq, hkv, d, causal, dtype, device, _run_function)
    if parts:  # "k1": the longest-first order alone, dK/dV written in place (no partials)
        total_k = sum(lens_k)
        assert launches == [((3 * hkv * parts, 3), True, parts, 2 * total_k * hkv * d if parts > 1 else 0)]
    else:
        assert launches == [((3, 3, hkv), False, None, 0)]


@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 64), (3, 3, 72), (7, 1, 64)])
def test_heavy_first_order(monkeypatch, hq, hkv, d, device):
    """LLAVA_FAST_ATTN_HEAVY_FIRST=1 (attention._heavy_first, session 15): the causal forward and dQ kernels
    launched query-block-major, (documents x Hq, query blocks), heaviest block first. Out, lse and every gradient
    pass the default's rule over uneven documents with Sq != Sk; the spy checks both launches took that grid; a
    non-causal call keeps the default grid."""
    grids = {}
    real = attn_mod._launch

    def spy(kind, fn, grid_of, args, constexprs, *rest):
        grids.setdefault(kind, []).append((grid_of(32, 16), constexprs.get("QB_MAJOR", False)))
        return real(kind, fn, grid_of, args, constexprs, *rest)
    monkeypatch.setattr(attn_mod, "_launch", spy)
    monkeypatch.setenv("LLAVA_FAST_ATTN_HEAVY_FIRST", "1")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = [5, 40, 17], [9, 40, 30]
    _check_against_ref(lens_q, lens_k, hq, hkv, d, True, dtype, device, _run_function)
    assert grids["fwd"] == [((3 * hq, 2), True)] and grids["dq"] == [((3 * hq, 2), True)]
    grids.clear()
    _check_against_ref(lens_q, lens_k, hq, hkv, d, False, dtype, device, _run_function)
    assert grids["fwd"] == [((2, 3, hq), False)] and grids["dq"] == [((2, 3, hq), False)]
    grids.clear()
    monkeypatch.setenv("LLAVA_FAST_ATTN_HEAVY_FIRST", "0")  # off: one (document, head)'s blocks after another's
    _check_against_ref(lens_q, lens_k, hq, hkv, d, True, dtype, device, _run_function)
    assert grids["fwd"] == [((2, 3, hq), False)] and grids["dq"] == [((2, 3, hq), False)]


def test_heavy_first_only_where_kv_fits_in_l2(monkeypatch):
    """The order is taken only when all K/V bytes are small (<= 16 MB) and the call is causal; on by default since
    session 17, "0" turns it off; a bad value names the variable."""
    k_small = torch.empty(10906, 2, 64, dtype=torch.bfloat16)     # OneVision's Qwen2: 5.6 MB of K and V
    k_big = torch.empty(16384, 32, 128, dtype=torch.bfloat16)     # causal 4k D128, batch 4: 268 MB
    monkeypatch.delenv("LLAVA_FAST_ATTN_HEAVY_FIRST", raising=False)
    assert attn_mod._heavy_first(True, k_small, 100)
    monkeypatch.setenv("LLAVA_FAST_ATTN_HEAVY_FIRST", "0")
    assert not attn_mod._heavy_first(True, k_small, 100)
    monkeypatch.setenv("LLAVA_FAST_ATTN_HEAVY_FIRST", "1")
    assert attn_mod._heavy_first(True, k_small, 100)
    assert not attn_mod._heavy_first(False, k_small, 100)
    assert not attn_mod._heavy_first(True, k_big, 100)
    assert not attn_mod._heavy_first(True, k_small, 70000)
    monkeypatch.setenv("LLAVA_FAST_ATTN_HEAVY_FIRST", "yes")
    with pytest.raises(ValueError, match="LLAVA_FAST_ATTN_HEAVY_FIRST"):
        attn_mod._heavy_first(True, k_small, 100)


def test_gqa_split_setting():
    """The switch's values: parts rounded so none is empty, MHA always off, "k4" by default (session 17), and a bad
    value names the variable."""
    import os
    old = os.environ.get("LLAVA_FAST_ATTN_GQA_SPLIT")
    try:
        os.environ.pop("LLAVA_FAST_ATTN_GQA_SPLIT", None)
        assert attn_mod._gqa_split(7) == ("kernel", 4) and attn_mod._gqa_split(1) == ("off", 1)
        os.environ["LLAVA_FAST_ATTN_GQA_SPLIT"] = ""   # empty, as unset (_ext.env_str)
        assert attn_mod._gqa_split(7) == ("kernel", 4)
        for value, group, want in (("0", 7, ("off", 1)), ("k4", 7, ("kernel", 4)), ("k5", 7, ("kernel", 4)),
                                   ("k9", 7, ("kernel", 7)), ("K3", 6, ("kernel", 3)), ("k4", 1, ("off", 1)),
                                   ("0", 1, ("off", 1))):
            os.environ["LLAVA_FAST_ATTN_GQA_SPLIT"] = value
            assert attn_mod._gqa_split(group) == want, value
        for bad in ("1", "2", "k", "k0", "kx", "yes"):  # "1": session 10's repeat split, removed in session 21
            os.environ["LLAVA_FAST_ATTN_GQA_SPLIT"] = bad
            with pytest.raises(ValueError, match="LLAVA_FAST_ATTN_GQA_SPLIT"):
                attn_mod._gqa_split(7)
    finally:
        if old is None:
            os.environ.pop("LLAVA_FAST_ATTN_GQA_SPLIT", None)
        else:
            os.environ["LLAVA_FAST_ATTN_GQA_SPLIT"] = old


def test_forward_config_for_short_documents(monkeypatch, device):
    """The D128 forward takes 64 x 64 blocks at 4 warps when the longest query document is <= 1024 tokens (measured
    1.20x on the stage-1 shape, 0.96x at causal 4k: attention._FWD_SHORT_CFG_D128), 128 x 128 at 8 warps otherwise
    or when the length is not given; other head dims and kinds are unchanged; LLAVA_FAST_ATTN_CFG still overrides.
    The interpreter's small configs are left alone (the check below pretends to compile)."""
    monkeypatch.setattr(attn_mod._ext, "interpreting", lambda: False)
    monkeypatch.delenv("LLAVA_FAST_ATTN_CFG", raising=False)
    cfg = attn_mod._default_cfg
    assert cfg("fwd", 128, False, 640) == (64, 64, 4, 3) == cfg("fwd", 128, False, 1024)
    assert cfg("fwd", 128, False, 1025) == (128, 128, 8, 3) == cfg("fwd", 128) == cfg("fwd", 128, False, 4096)
    assert cfg("fwd", 64, False, 577) == (128, 64, 4, 3) and cfg("fwd", 80, False, 729) == (128, 128, 8, 3)
    assert cfg("dkdv", 128, False, 640) == attn_mod._DKDV_CFG
    assert cfg("fwd", 128, True, 640) == (64, 32, 4, 2)   # fp32 inputs keep their small tiles
    monkeypatch.setenv("LLAVA_FAST_ATTN_CFG", "fwd=128,64,8,3")
    assert cfg("fwd", 128, False, 640) == (128, 64, 8, 3)
    monkeypatch.undo()
    seen, real = [], attn_mod._default_cfg
    monkeypatch.setattr(attn_mod, "_default_cfg", lambda *a: seen.append(a) or real(*a))
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    _check_against_ref([5, 40, 17], [5, 40, 17], 2, 2, 128, True, dtype, device, _run_function)
    assert [a[3] for a in seen if a[0] == "fwd"] == [40]   # the launcher passes the longest query document


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(14, 2, 64), (28, 4, 128), (16, 2, 72)])
def test_cuda_gqa_split_backward(monkeypatch, dtype, hq, hkv, d):
    """The GQA splits on the GPU (device_check runs the cuda-marked tests): Qwen2-0.5B's and Qwen2-7B's head layouts
    and a D72 one, uneven causal documents, by the flash-attn rule."""
    lens = [300, 1, 577, 97, 1500]
    monkeypatch.setenv("LLAVA_FAST_ATTN_HEAVY_FIRST", "0")   # the splits alone, then with the heavy-first order
    for split in ("0", "k4", "k7"):
        monkeypatch.setenv("LLAVA_FAST_ATTN_GQA_SPLIT", split)
        _check_against_ref(lens, lens, hq, hkv, d, True, dtype, "cuda", _run_function)
    monkeypatch.setenv("LLAVA_FAST_ATTN_HEAVY_FIRST", "1")   # k7 with the heavy-first order
    _check_against_ref(lens, lens, hq, hkv, d, True, dtype, "cuda", _run_function)
    monkeypatch.delenv("LLAVA_FAST_ATTN_GQA_SPLIT")          # the defaults since session 17: k4 + heavy-first
    monkeypatch.delenv("LLAVA_FAST_ATTN_HEAVY_FIRST")
    assert attn_mod._gqa_split(hq // hkv)[0] == "kernel"
    _check_against_ref(lens, lens, hq, hkv, d, True, dtype, "cuda", _run_function)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_sq_lt_sk(dtype, causal):
    _check_against_ref([1, 64, 300, 577], [17, 700, 301, 2048], 8, 2, 128, causal, dtype, "cuda", _run_function)
    _check_against_ref([700, 5], [300, 5], 4, 4, 72, causal, dtype, "cuda", _run_function)  # Sq > Sk


@pytest.mark.cuda
def test_cuda_functional_and_dense():
    lens = [577] * 4
    t, h, d = sum(lens), 16, 64
    qkv = torch.randn(t, 3 * h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.view(t, 3, h, d).unbind(1)
    cu = _cu(lens, "cuda")
    out = flash_attn_varlen_func(q, k, v, cu, cu, 577, 577)
    ref = attention_ref(q, k, v, cu, cu)
    low = attention_ref(q, k, v, cu, cu, upcast=False)
    assert_flash_rule(out, ref, low, name="out(strided qkv)")
    qd = q.reshape(4, 577, h, d)
    out_d = flash_attn_func(qd, k.reshape(4, 577, h, d), v.reshape(4, 577, h, d))
    assert torch.equal(out_d.reshape(t, h, d), out)


@pytest.mark.cuda
def test_cuda_torch_compile():
    lens = [97, 577, 729]
    q, k, v, cu_q, cu_k = _make(lens, lens, 8, 2, 72, torch.bfloat16, "cuda")

    def f(q, k, v):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 729, 729, causal=True)
        return (out.float() * 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_deterministic():
    lens = [1, 17, 97, 577, 729, 2048]
    q, k, v, cu_q, cu_k = _make(lens, lens, 28, 4, 128, torch.bfloat16, "cuda")
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2048, 2048, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_no_host_sync():
    """The op launches without synchronising with the host (cu_seqlens never read back)."""
    lens = [300, 577]
    q, k, v, cu_q, cu_k = _make(lens, lens, 4, 2, 64, torch.bfloat16, "cuda")
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 577, 577, causal=True)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 577, 577, causal=True)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_module(device):
    from llava_fast.modules.attention import VarlenAttention

    q, k, v, cu_q, cu_k = _make([4, 11], [4, 11], 4, 2, 64, torch.float32, device)
    out = VarlenAttention(causal=True)(q, k, v, cu_q, cu_k, 11, 11)
    assert torch.equal(out, flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 11, causal=True))


# ---------------------------------------------------------------------------------------------------------------
# seqused_k: a preallocated per-sequence KV cache (B, Lmax, Hkv, D) read in place (forward only)
# ---------------------------------------------------------------------------------------------------------------
def _cache_case(nq, used, hq, hkv, d, dtype, device, lmax=None, rows=None):
    """q of len(nq) documents against a cache of B = len(used) rows; document i reads cache row rows[i] (default i).
    Slots past each row's used length hold NaN: the kernel must never read them."""
    b = len(used)
    lmax = lmax or max(used) + 3
    kc = torch.full((b, lmax, hkv, d), float("nan"), device=device)
    vc = torch.full((b, lmax, hkv, d), float("nan"), device=device)
    for i, u in enumerate(used):
        kc[i, :u] = torch.randn(u, hkv, d, device=device)
        vc[i, :u] = torch.randn(u, hkv, d, device=device)
    kc, vc = kc.to(dtype), vc.to(dtype)
    rows = list(range(b)) if rows is None else rows
    q = torch.randn(sum(nq), hq, d, device=device).to(dtype)
    cu_q = _cu(nq, device)
    cu_k = torch.tensor([r * lmax for r in rows] + [b * lmax], dtype=torch.int32, device=device)
    seqused = torch.tensor([used[r] for r in rows], dtype=torch.int32, device=device)
    # the same problem with the used keys copied out into an ordinary packed layout
    k_dense = torch.cat([kc[r, :used[r]] for r in rows])
    v_dense = torch.cat([vc[r, :used[r]] for r in rows])
    cu_dense = _cu([used[r] for r in rows], device)
    flat = (kc.view(b * lmax, hkv, d), vc.view(b * lmax, hkv, d))
    return q, flat, cu_q, cu_k, seqused, lmax, (k_dense, v_dense, cu_dense)


# name: (queries per document, keys used per cache row, Hq, Hkv, D, causal, dtype)
SEQUSED_CASES = {
    "decode-gqa-d64": ([1, 1, 1, 1], [1, 9, 33, 20], 4, 2, 64, True, torch.float32),
    "decode-mqa-d72": ([1, 1, 1], [40, 2, 17], 4, 1, 72, True, torch.float32),
    "chunked-prefill-d64": ([3, 7, 17, 1], [5, 30, 17, 37], 4, 2, 64, True, torch.float32),
    "chunked-prefill-d80-noncausal": ([2, 16], [19, 33], 2, 2, 80, False, torch.float32),
    "chunked-prefill-fp16": ([5, 1, 12], [12, 20, 40], 4, 2, 64, True, torch.float16),
}


@pytest.mark.parametrize("case", list(SEQUSED_CASES))
def test_seqused_k_vs_ref(case, device):
    nq, used, hq, hkv, d, causal, dtype = SEQUSED_CASES[case]
    q, (kf, vf), cu_q, cu_k, seqused, lmax, (kd, vd, cud) = _cache_case(nq, used, hq, hkv, d, dtype, device)
    with torch.no_grad():
        out, lse = flash_attn_varlen_fwd(q, kf, vf, cu_q, cu_k, max(nq), lmax, d ** -0.5, causal, seqused)
    ref, ref_lse = attention_ref(q, kf, vf, cu_q, cu_k, causal=causal, return_lse=True, seqused_k=seqused)
    # the reference with seqused_k is the dense reference on the copied-out keys (bottom-right causal)
    dense, dense_lse = attention_ref(q, kd, vd, cu_q, cud, causal=causal, return_lse=True)
    assert torch.equal(ref, dense) and torch.equal(ref_lse, dense_lse)
    if dtype == torch.float32:
        for name, a, b in (("out", out, ref), ("lse", lse, ref_lse)):
            assert_flash_rule(a, b, b, name=name, atol=FP32_REL_ATOL * max(1.0, b.abs().max().item()))
    else:
        low, low_lse = attention_ref(q, kf, vf, cu_q, cu_k, causal=causal, return_lse=True, upcast=False,
                                     seqused_k=seqused)
        assert_flash_rule(out, ref, low, name="out")
        assert_flash_rule(lse, ref_lse, low_lse, name="lse", atol=1e-5)


def test_seqused_k_rows_out_of_order_and_empty(force_triton, device):
    """Documents read any cache rows (starts not increasing: finished sequences dropped from a batch); a row with no
    used key gives output 0 and lse +inf; the functional API routes seqused_k to the kernel."""
    nq, used = [2, 1, 3], [25, 0, 6, 11]
    q, (kf, vf), cu_q, cu_k, seqused, lmax, _ = _cache_case(nq, used, 4, 2, 64, torch.float32, device,
                                                             rows=[3, 1, 0])
    assert seqused.tolist() == [11, 0, 25]
    with torch.no_grad():
        out, lse = flash_attn_varlen_func(q, kf, vf, cu_q, cu_k, 3, lmax, causal=True, return_lse=True,
                                          seqused_k=seqused)
    ref, ref_lse = attention_ref(q, kf, vf, cu_q, cu_k, causal=True, return_lse=True, seqused_k=seqused)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isinf(lse[:, 2]).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    atol = FP32_REL_ATOL * max(1.0, ref.abs().max().item())
    assert_flash_rule(out, ref, ref, name="out", atol=atol)
    assert_flash_rule(_finite(lse), _finite(ref_lse), _finite(ref_lse), name="lse", atol=atol)


def test_seqused_k_cpu_reference_and_opcheck(device):
    nq, used = [1, 4], [7, 19]
    q, (kf, vf), cu_q, cu_k, seqused, lmax, _ = _cache_case(nq, used, 4, 2, 64, torch.float32, device)
    if device == "cpu":  # default dispatch on CPU: the reference
        out = flash_attn_varlen_func(q, kf, vf, cu_q, cu_k, 4, lmax, causal=True, seqused_k=seqused)
        assert torch.equal(out, attention_ref(q, kf, vf, cu_q, cu_k, causal=True, seqused_k=seqused))
    kf, vf = torch.nan_to_num(kf), torch.nan_to_num(vf)   # opcheck compares outputs with NaN-unaware checks
    torch.library.opcheck(torch.ops.llava_fast.flash_attn_varlen_fwd.default,
                          (q, kf, vf, cu_q, cu_k, 4, lmax, 0.125, True, seqused))


def test_seqused_k_is_forward_only(force_triton):
    nq, used = [1, 2], [5, 9]
    q, (kf, vf), cu_q, cu_k, seqused, lmax, _ = _cache_case(nq, used, 2, 2, 64, torch.float32, "cpu")
    q.requires_grad_()
    with pytest.raises(ValueError, match="seqused_k is forward only"):
        flash_attn_varlen_func(q, kf, vf, cu_q, cu_k, 2, lmax, causal=True, seqused_k=seqused)
    # the autograd.Function itself refuses the backward
    out, _ = FlashAttnVarlenFunction.apply(q, kf, vf, cu_q, cu_k, 2, lmax, 0.125, True, False, seqused)
    with pytest.raises(RuntimeError, match="does not support seqused_k"):
        out.sum().backward()


@pytest.mark.parametrize("seqused, match", [
    (torch.tensor([4, 12]), r"seqused_k must be an int32 tensor"),
    (torch.tensor([4, 12, 1], dtype=torch.int32), r"seqused_k must have shape \(batch,\) = \(2,\)"),
    (torch.tensor([4, 12], dtype=torch.int32, device="meta"), r"seqused_k is on meta"),
    (torch.tensor([4, 0, 12, 0], dtype=torch.int32)[::2], r"seqused_k must be contiguous"),
])
def test_seqused_k_bad_inputs(seqused, match):
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        _bad_call(seqused_k=seqused)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128])
@pytest.mark.parametrize("nq", [[1] * 8, [1, 17, 64, 300, 1, 5, 128, 2]], ids=["decode", "chunked"])
def test_cuda_seqused_k(dtype, d, nq):
    used = [1, 700, 2048, 301, 4000, 17, 1000, 129]
    q, (kf, vf), cu_q, cu_k, seqused, lmax, _ = _cache_case(nq, used, 16, 2, d, dtype, "cuda", lmax=4100)
    with torch.no_grad():
        out, lse = flash_attn_varlen_func(q, kf, vf, cu_q, cu_k, max(nq), lmax, causal=True, return_lse=True,
                                          seqused_k=seqused)
    ref, ref_lse = attention_ref(q, kf, vf, cu_q, cu_k, causal=True, return_lse=True, seqused_k=seqused)
    low = attention_ref(q, kf, vf, cu_q, cu_k, causal=True, upcast=False, seqused_k=seqused)
    assert_flash_rule(out, ref, low, name="out")
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_cutlass_fwd(monkeypatch, dtype, d, causal):
    """LLAVA_FAST_ATTN_CUTLASS=1: the CUTLASS dense forward (576-token documents, CLIP's grid without its class
    token, and 1024) ran (no fallback), and out, lse and the Triton backward's gradients from its LSE pass the
    flash-attn rule. (577 itself is refused before the call: test_cutlass_fwd_refuses_lengths_not_multiple_of_8.)"""
    import warnings

    from llava_fast import _ext

    lib = _ext.cutlass_lib()
    if lib is None or not lib.llava_fast_cutlass_has_attn_fwd() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"CUTLASS attention forward not available here ({_ext.CUTLASS_ERROR or 'no FMHA or not sm_90'})")
    monkeypatch.setenv("LLAVA_FAST_ATTN_CUTLASS", "1")
    # 520: a multiple of 8 but not of either key tile (64 at D = 64, 128 at D = 128), like 576 at D = 128: the keys
    # past S in the last tile must be masked (ResidualFusion; the H100 run of session 12 found them in the softmax)
    for lens in ([576] * 6, [1024] * 2, [520] * 3):
        runs = attn_mod._cutlass_runs
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warns: make it fail here
            _check_against_ref(lens, lens, 4, 4, d, causal, dtype, "cuda", _run_function)
        assert attn_mod._cutlass_runs == runs + 1


def test_cutlass_fwd_refuses_lengths_not_multiple_of_8():
    """The CUTLASS FMHA's can_implement takes document lengths that are multiples of 8 only: on the H200 (session 10)
    every call with CLIP's 577 tokens reached the library and failed there. The launcher now says why before calling
    (the warning names the length) and the Triton forward takes the call. Runs on the CPU."""
    for n, ok in ((577, False), (729, False), (576, True), (1024, True)):
        q = torch.empty(3 * n, 4, 64, dtype=torch.bfloat16)
        why = attn_mod.cutlass_fwd_unusable(q, q, q, 3, n, n, 64 ** -0.5, True)
        if ok:
            assert why is None or "multiple of 8" not in why
        else:
            assert why is not None and "multiple of 8" in why and str(n) in why
