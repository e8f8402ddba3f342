"""API audit of ``llava_fast.ops.attention``: the Triton path (forced; the interpreter on CPU) against the naive
per-document fp32 reference, on the inputs and autograd situations tests/ops/test_attention.py does not cover.

Defects fixed (each test in the first section fails without its fix):

* ``return_lse=True`` under autograd: the lse was marked non-differentiable, so a loss that used it (merging the
  attention of several key chunks, a z-loss on it) got silently wrong dq and dk (the gradient through lse dropped);
  the CPU reference path differentiates it. Now its gradient enters the backward as ``delta - dlse``;
* a ``create_graph=True`` backward returned gradients that silently acted as constants (second-order terms, e.g. of a
  gradient penalty, dropped); now differentiating them raises;
* ``attention_ref`` (also the CPU path of ``flash_attn_varlen_func``) concatenated the documents' outputs from row 0:
  with ``cu_seqlens_q[0] != 0`` every row was shifted against q (silently wrong rows), and with rows of q past
  ``cu_seqlens_q[-1]`` the output had fewer rows than q; the kernels place document ``b`` at rows
  ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``. The reference now does too (rows outside documents: 0, lse +inf);
* ``flash_attn_func`` with an empty batch or a zero sequence length raised "step must be nonzero" or an error naming
  ``cu_seqlens_q`` (an argument it does not take); k and v of different sequence lengths failed in a reshape without
  naming v;
* ``flash_attn_func`` (and ``flash_attn_varlen_func(q, k, v, cu, cu, ...)``, the self-attention call) under
  ``torch.compile(fullgraph=True)``: dynamo refused the same cu_seqlens tensor passed twice to the autograd.Function.
"""
import pytest
import torch

from llava_fast import backend
from llava_fast.ops import attention as attn_mod
from llava_fast.ops.attention import attention_ref, flash_attn_func, flash_attn_varlen_func

# fp32 under the interpreter: reassociation only (see FP32_REL_ATOL in test_attention.py)
REL = 1e-5


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setitem(backend._overrides, "attention", "triton")


def _cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _qkv(tq, tk, hq, hkv, d, device, dtype=torch.float32):
    g = [torch.randn(tq, hq, d, device=device), torch.randn(tk, hkv, d, device=device),
         torch.randn(tk, hkv, d, device=device)]
    return [t.to(dtype).requires_grad_() for t in g]


def _close(a, b, name):
    assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
    atol = REL * max(1.0, b.abs().max().item() if b.numel() else 0.0)
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def _grads(loss, inputs):
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


def _finite(x):
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


# ---------------------------------------------------------------------------------------------- fixed defects
@pytest.mark.parametrize("use", ["out_and_lse", "lse_only", "lse_sum"])
def test_lse_gradient(triton_path, device, use):
    """lse used downstream: dq, dk, dv include its gradient (d lse_i / d s_ij = P_ij), as the reference's. GQA 2:1,
    causal with Sq > Sk (rows with lse = +inf) and Sq < Sk, an empty document; lse only (no gradient reaches out),
    and lse.sum() (an expanded, stride-0 gradient)."""
    lq, lk = [6, 0, 3, 17], [2, 4, 9, 17]
    q, k, v = _qkv(sum(lq), sum(lk), 4, 2, 16, device)
    cq, ck = _cu(lq, device), _cu(lk, device)
    w_out = torch.randn(sum(lq), 4, 16, device=device)
    w_lse = torch.randn(4, sum(lq), device=device)

    def loss(out, lse):
        lse = _finite(lse)  # rows that see no key: lse = +inf, used as 0
        if use == "lse_only":
            return (lse * w_lse).sum()
        if use == "lse_sum":
            return (out * w_out).sum() + lse.sum()
        return (out * w_out).sum() + (lse * w_lse).sum()

    out, lse = flash_attn_varlen_func(q, k, v, cq, ck, 17, 17, causal=True, return_lse=True, softmax_scale=0.3)
    assert lse.requires_grad
    ref, ref_lse = attention_ref(q, k, v, cq, ck, causal=True, return_lse=True, softmax_scale=0.3)
    got, want = _grads(loss(out, lse), (q, k, v)), _grads(loss(ref, ref_lse), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        _close(a, b, name)


def test_lse_gradient_bwd_op(device):
    """The backward custom op takes the lse gradient as an optional argument (opcheck: schema, fake, eager)."""
    lens = [3, 9]
    q, k, v = (t.detach() for t in _qkv(12, 12, 2, 1, 16, device))
    cu = _cu(lens, device)
    out, lse = attn_mod.flash_attn_varlen_fwd(q, k, v, cu, cu.clone(), 9, 9, 0.25, True)
    args = (torch.randn_like(out), q, k, v, out, lse, cu, cu.clone(), 9, 9, 0.25, True, torch.randn_like(lse))
    torch.library.opcheck(torch.ops.llava_fast.flash_attn_varlen_bwd.default, args)


def test_double_backward_is_refused(triton_path, device):
    """create_graph=True: the first-order gradients are right, and differentiating them raises (through
    autograd.grad w.r.t. q and through backward()) instead of treating them as constants."""
    lens = [5, 11]
    q, k, v = _qkv(16, 16, 2, 1, 16, device)
    cu = _cu(lens, device)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True)
    dq, dk = torch.autograd.grad(out.pow(2).sum(), (q, k), create_graph=True)
    ref = attention_ref(q, k, v, cu, cu, causal=True)
    rdq, rdk = torch.autograd.grad(ref.pow(2).sum(), (q, k))
    _close(dq.detach(), rdq, "dq")
    _close(dk.detach(), rdk, "dk")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.pow(2).sum(), q)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (out.sum() + dq.pow(2).sum()).backward()


@pytest.mark.parametrize("causal", [False, True])
def test_rows_follow_cu_seqlens(triton_path, device, causal):
    """cu_seqlens_q starting past 0 (a slice of a bigger pack's cu_seqlens) and q rows past cu_seqlens_q[-1]: the
    kernel and the reference (the CPU path) both put document b at q's rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]; the
    reference gives rows outside documents 0 / +inf (the kernels leave them unwritten, as documented)."""
    q, k, v = _qkv(20, 14, 2, 1, 16, device)
    cq = torch.tensor([3, 8, 16], dtype=torch.int32, device=device)   # rows 0-2 and 16-19 in no document
    ck = torch.tensor([1, 5, 14], dtype=torch.int32, device=device)
    ref, ref_lse = attention_ref(q, k, v, cq, ck, causal=causal, return_lse=True)
    assert ref.shape == q.shape and ref_lse.shape == (2, 20)
    rebased = attention_ref(q[3:16], k[1:14], v[1:14], cq - 3, ck - 1, causal=causal)
    assert torch.equal(ref[3:16], rebased)
    assert not ref[:3].any() and not ref[16:].any()
    assert torch.isinf(ref_lse[:, :3]).all() and torch.isinf(ref_lse[:, 16:]).all()

    out, lse = flash_attn_varlen_func(q, k, v, cq, ck, 8, 9, causal=causal, return_lse=True)
    _close(out[3:16], ref[3:16], "out")
    _close(lse[:, 3:16], ref_lse[:, 3:16], "lse")
    dout = torch.randn_like(out)
    dout[:3] = 0
    dout[16:] = 0
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b, rows in zip(("dq", "dk", "dv"), got, want, (slice(3, 16), slice(1, 14), slice(1, 14))):
        _close(a[rows], b[rows], name)


def test_cpu_path_rows_follow_cu_seqlens(device):
    """The default CPU dispatch (the reference) returns q's rows too."""
    if device != "cpu":
        pytest.skip("CPU dispatch check")
    q, k, v = _qkv(12, 12, 2, 2, 16, device)
    cu = torch.tensor([2, 6, 10], dtype=torch.int32)
    out, lse = flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 12)
    assert torch.equal(out[2:10], attention_ref(q[2:10], k[2:10], v[2:10], cu - 2, cu - 2, causal=True))


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("b,sq,sk", [(0, 4, 4), (2, 0, 4), (2, 4, 0), (0, 0, 0)])
def test_flash_attn_func_empty(monkeypatch, device, path, b, sq, sk):
    """Empty batches and zero-length sequences: an empty output (no keys: zeros), as the varlen function gives for
    empty documents, on both paths."""
    monkeypatch.setitem(backend._overrides, "attention", path)
    q = torch.randn(b, sq, 2, 16, device=device, requires_grad=True)
    k = torch.randn(b, sk, 1, 16, device=device, requires_grad=True)
    v = torch.randn(b, sk, 1, 16, device=device, requires_grad=True)
    out = flash_attn_func(q, k, v, causal=True)
    assert out.shape == (b, sq, 2, 16)
    assert not out.any()
    if out.requires_grad:
        out.sum().backward()


def test_flash_attn_func_names_v():
    q, k = torch.randn(2, 4, 2, 16), torch.randn(2, 4, 1, 16)
    with pytest.raises(ValueError, match="k and v must have the same sequence length"):
        flash_attn_func(q, k, torch.randn(2, 5, 1, 16))


def test_flash_attn_func_compiles_fullgraph(triton_path, device, monkeypatch):
    """Self-attention passes one cu_seqlens tensor as both cu_seqlens_q and cu_seqlens_k (flash_attn_func does, so
    does models/dispatch.py); under torch.compile(fullgraph=True) that traces, with the eager results. Without
    return_lse the traced backward hands the kernels no lse gradient (no zero-filled dlse to read)."""
    dlse_seen = []
    real = attn_mod.flash_attn_varlen_bwd

    def spy(*args):
        dlse_seen.append(args[12] if len(args) > 12 else None)
        return real(*args)

    monkeypatch.setattr(attn_mod, "flash_attn_varlen_bwd", spy)
    q, k, v = _qkv(2 * 9, 2 * 9, 4, 2, 16, device)
    q, k, v = (t.detach().view(2, 9, t.shape[1], 16).requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True) * 2.0

    out_c = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    out_e = f(q, k, v)
    assert torch.equal(out_c, out_e)
    dout = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, (q, k, v), dout), torch.autograd.grad(out_e, (q, k, v), dout)):
        assert torch.equal(a, b)
    assert dlse_seen == [None, None], dlse_seen


# ---------------------------------------------------------------------------------------------- checked, correct
def test_layouts_and_partial_grads(triton_path, device):
    """Layouts the existing tests do not exercise, all against the reference: q/k/v as slices of one wider tensor at
    head-dim offsets (token stride 80, head strides 40), token-major views of head-major tensors, an expanded dout
    (stride 0 on tokens), grads wanted for q only / k, v only, a second backward with retain_graph (same bits),
    max_seqlen larger than the longest document, documents of 0 and 1 tokens."""
    lens = [0, 1, 5, 13]
    t, cu = sum(lens), _cu(lens, device)
    wide = torch.randn(t, 2, 40, device=device, requires_grad=True)
    q, k, v = wide[:, :, 4:20], wide[:, :1, 20:36], wide[:, 1:, 24:40]
    dout = torch.randn(16, device=device).expand(t, 2, 16)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 40, 50, causal=True)
    ref = attention_ref(q, k, v, cu, cu, causal=True)
    _close(out, ref, "out")
    (g,) = torch.autograd.grad(out, wide, dout, retain_graph=True)
    (g2,) = torch.autograd.grad(out, wide, dout)
    assert torch.equal(g, g2)
    _close(g, torch.autograd.grad(ref, wide, dout)[0], "dwide")

    hm = [torch.randn(h, t, 16, device=device, requires_grad=True) for h in (3, 1, 1)]
    q, k, v = (x.transpose(0, 1) for x in hm)
    for wanted in ((hm[0],), (hm[1], hm[2])):
        out = flash_attn_varlen_func(q.detach() if len(wanted) == 2 else q, k if len(wanted) == 2 else k.detach(),
                                     v if len(wanted) == 2 else v.detach(), cu, cu, 13, 13)
        ref = attention_ref(q, k, v, cu, cu)
        for name, a, b in zip("xy", torch.autograd.grad(out.sum(), wanted), torch.autograd.grad(ref.sum(), wanted)):
            _close(a, b, f"grad {name} of {len(wanted)} wanted")


@pytest.mark.parametrize("d,hq,hkv", [(8, 3, 1), (24, 3, 1), (40, 2, 2)])
def test_small_head_dims_and_gqa3(triton_path, device, d, hq, hkv):
    """Head dims below 64 (one masked 16- or 32-wide chunk; 40 as 32 + [24, 40)) and GQA 3:1, with a softmax_scale
    given and return_lse: out, lse and every gradient against the reference; deterministic=True twice, same bits."""
    lq, lk = [1, 9, 6], [4, 9, 2]
    q, k, v = _qkv(sum(lq), sum(lk), hq, hkv, d, device)
    cq, ck = _cu(lq, device), _cu(lk, device)
    runs = []
    for _ in range(2):
        out, lse = flash_attn_varlen_func(q, k, v, cq, ck, 9, 9, causal=True, return_lse=True, softmax_scale=0.7,
                                          deterministic=True)
        dout = torch.ones_like(out)
        runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref, ref_lse = attention_ref(q, k, v, cq, ck, causal=True, return_lse=True, softmax_scale=0.7)
    assert torch.equal(torch.isinf(runs[0][1]), torch.isinf(ref_lse))
    _close(runs[0][0], ref, "out")
    _close(_finite(runs[0][1]), _finite(ref_lse), "lse")
    for name, a, b in zip(("dq", "dk", "dv"), runs[0][2:], torch.autograd.grad(ref, (q, k, v), dout)):
        _close(a, b, name)


@pytest.mark.parametrize("over, match", [
    (dict(cu_seqlens_k=torch.tensor([0, 4, 16])), r"cu_seqlens_k must have dtype torch.int32"),
    (dict(k=torch.randn(16, 2, 64, dtype=torch.float16)), r"share one dtype.*k torch.float16"),
    (dict(v=torch.randn(16, 2, 64, dtype=torch.float16)), r"share one dtype.*v torch.float16"),
    (dict(v=torch.randn(16, 2, 60)), r"head_dim of k \(64\) and v \(60\)"),
    (dict(q=torch.randn(16, 4, 136), k=torch.randn(16, 2, 136), v=torch.randn(16, 2, 136)),
     r"head_dim \(q.shape\[-1\]\) must be a multiple of 8 between 8 and 128, got 136"),
    (dict(k=torch.randn(16, 2, 64, device="meta")), r"k is on meta"),
    (dict(seqused_k=torch.tensor([4, 12], dtype=torch.int64)), r"seqused_k must be an int32 tensor"),
])
def test_errors_name_the_argument(over, match):
    kw = dict(q=torch.randn(16, 4, 64), k=torch.randn(16, 2, 64), v=torch.randn(16, 2, 64),
              cu_seqlens_q=torch.tensor([0, 4, 16], dtype=torch.int32),
              cu_seqlens_k=torch.tensor([0, 4, 16], dtype=torch.int32), max_seqlen_q=12, max_seqlen_k=12)
    kw.update(over)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(**kw)
