"""residual_act_linears: a decoder layer's residual add inside the RMSNorm kernel (forward) and the gradient
accumulation of the sum inside its backward kernel, with the norm's output recomputed for the linears' weight
gradients. Against the unfused path (``x + residual`` then act_linears over the same kernel: the same bits in fp32)
and the PyTorch reference (fp32, summation order), for every input, with parts frozen or unused; what it saves; the
paths without recomputation; mixed dtypes (an fp32 stream plus a low-precision branch, as under autocast)."""
import pytest
import torch
import torch.nn.functional as F

from llava_fast.ops import act_linear as al
from llava_fast.ops.rms_norm import RMSNormAct, rms_norm_ref

D, EPS = 24, 1e-6


@pytest.fixture
def rms_forced():
    import llava_fast

    llava_fast.set_backend("rms_norm", "triton")
    yield
    llava_fast.set_backend("all", "auto")


def _case(seed=0, shape=(2, 9), dtype=torch.float32, rdtype=None, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g).to(dtype)
    r = torch.randn(*shape, D, generator=g).to(rdtype or dtype)
    nw = 1 + 0.1 * torch.randn(D, generator=g)
    ws = [torch.randn(n, D, generator=g) / 5 for n in (24, 8)]
    bs = [torch.randn(n, generator=g) if bias else None for n in (24, 8)]
    dys = [torch.randn(*shape, n, generator=g) for n in (24, 8)]
    ds = torch.randn(*shape, D, generator=g).to(torch.promote_types(x.dtype, r.dtype))
    return x, r, nw, ws, bs, dys, ds


def _run(fn, case, req, use_s=True, use_out=(True, True)):
    """fn(x, r, nw, ws, bs) -> (*outs, s); returns the outputs, s, and the gradients of the leaves in ``req``."""
    x0, r0, nw0, ws0, bs0, dys, ds = case
    names = ["x", "r", "nw", "w0", "w1", "b0", "b1"]
    tensors = [x0, r0, nw0, *ws0, *bs0]
    leaves = [None if t is None else t.clone().requires_grad_(n in req) for n, t in zip(names, tensors)]
    x, r, nw, w0, w1, b0, b1 = leaves
    *outs, s = fn(x, r, nw, [w0, w1], [b0, b1])
    terms = [o for o, u in zip(outs, use_out) if u]
    grads_in = [dy for dy, u in zip(dys, use_out) if u]
    if use_s and s.requires_grad:
        terms.append(s)
        grads_in.append(ds)
    want = [t for n, t in zip(names, leaves) if n in req and t is not None]
    grads = torch.autograd.grad(terms, want, grads_in, allow_unused=True)
    return [*outs, s, *grads]


def _fused(x, r, nw, ws, bs):
    return al.residual_act_linears(RMSNormAct(EPS), x, r, nw, ws, bs)


def _unfused(x, r, nw, ws, bs):      # the model's path before: a plain add, then act_linears over the same kernel
    s = x + r
    return (*al.act_linears(RMSNormAct(EPS), (s, nw), ws, bs), s)


def _reference(x, r, nw, ws, bs):    # PyTorch only
    s = x + r
    a = rms_norm_ref(s, nw, EPS)
    return (*(F.linear(a, w, b) for w, b in zip(ws, bs)), s)


REQS = {
    "all": {"x", "r", "nw", "w0", "w1", "b0", "b1"},
    "frozen_linears": {"x", "r", "nw"},      # stage 1's language model: nothing to recompute for weights
    "stream_only": {"x"},
    "branch_only": {"r"},
    "weights_only": {"w0", "b1"},
}


@pytest.mark.parametrize("req", list(REQS))
@pytest.mark.parametrize("use_s", [True, False])
def test_same_bits_as_unfused_and_close_to_reference(req, use_s, rms_forced):
    case = _case()
    got = _run(_fused, case, REQS[req], use_s)
    want = _run(_unfused, case, REQS[req], use_s)
    ref = _run(_reference, case, REQS[req], use_s)
    assert len(got) == len(want) == len(ref)
    for i, (a, b, c) in enumerate(zip(got, want, ref)):
        if b is None:
            assert a is None, i
            continue
        assert a.dtype == b.dtype and torch.equal(a, b), (req, i, (a - b).abs().max())
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_unused_linear_output_and_odd_rows(rms_forced):
    """One linear's output unused (its gradient None), 1 x 1 x D and 7 x 123 rows."""
    for shape in [(1, 1), (7, 123)]:
        case = _case(seed=3, shape=shape, bias=False)
        got = _run(_fused, case, REQS["all"], True, use_out=(False, True))
        want = _run(_unfused, case, REQS["all"], True, use_out=(False, True))
        for i, (a, b) in enumerate(zip(got, want)):
            assert (a is None) == (b is None), i
            assert a is None or torch.equal(a, b), (shape, i, (a - b).abs().max())


def test_mixed_dtypes_fp32_stream_low_branch(rms_forced):
    """An fp32 residual stream plus an fp16 branch (the o_proj output under autocast): s is fp32 and bitwise
    ``x + r``; each addend's gradient in its own dtype, as autograd's add gives; either operand order."""
    case = _case(seed=5, dtype=torch.float32, rdtype=torch.float16)
    got = _run(_fused, case, REQS["all"])
    want = _run(_unfused, case, REQS["all"])
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), (i, (a - b).abs().max())
    assert got[2].dtype == torch.float32
    x, r, *rest = case
    swapped = _run(_fused, (r, x, *rest), REQS["all"])
    assert torch.equal(swapped[2], got[2])


def test_autocast_fp32_master_weights(rms_forced):
    """Under autocast (fp16 on the CPU here; bf16 on a GPU in the trainer): fp32 stream and weights, an fp16 branch;
    the fused path gives the unfused path's bits (the linears autocast inside both)."""
    case = _case(seed=9, dtype=torch.float32, rdtype=torch.float16)

    def under(fn):
        def wrapped(*a):
            with torch.autocast("cpu", dtype=torch.float16):
                return fn(*a)
        return wrapped
    got = _run(under(_fused), case, REQS["all"])
    want = _run(under(_unfused), case, REQS["all"])
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float32
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), (i, (a - b).abs().max())


def test_not_fusable_cases():
    act = RMSNormAct(EPS)
    x = torch.randn(3, D)
    import llava_fast

    llava_fast.set_backend("rms_norm", "triton")
    try:
        assert act.fusable(x, torch.randn(3, D))
        assert not act.fusable(x, torch.randn(4, D))                          # shape
        assert not act.fusable(x.half(), torch.randn(3, D).bfloat16())         # fp16 + bf16 promotes to fp32
        assert not act.fusable(x, torch.randn(3, D).double())                  # float64
        assert not act.fusable(x, None)
    finally:
        llava_fast.set_backend("all", "auto")
    assert not act.fusable(x, torch.randn(3, D))                               # the kernel is not selected on CPU


def test_saves_the_sum_not_the_addends_nor_the_norm(rms_forced):
    """Saved: s (x's size), the fp32 rstd (4 bytes per row) and the parameters; not x, r or norm(s). The unfused path
    saves the same s (act_linears' input) and nothing else: the fusion costs the rstd only."""
    from test_act_linear import _saved_bytes

    x0, r0, nw, ws, bs, _, _ = _case(shape=(4, 50))
    x, r = x0.requires_grad_(), r0.requires_grad_()
    params = (nw, *ws, *[b for b in bs if b is not None])
    fused, _ = _saved_bytes(lambda: _fused(x, r, nw, ws, bs), exclude=params)
    unfused, _ = _saved_bytes(lambda: _unfused(x, r, nw, ws, bs), exclude=params)
    assert unfused == x.numel() * 4
    assert fused == x.numel() * 4 + 4 * 50 * 4


def test_paths_without_recomputation(rms_forced, monkeypatch):
    """No gradients (inference), LLAVA_FAST_RECOMPUTE_ACT=0 (autograd through the fused norm op): the same outputs;
    the latter the same gradients."""
    case = _case(seed=7)
    x, r, nw, ws, bs, _, _ = case
    with torch.no_grad():
        out = _fused(x, r, nw, ws, bs)
    want = _run(_fused, case, REQS["all"])
    for a, b in zip(out, want):
        assert torch.equal(a, b)
    monkeypatch.setenv("LLAVA_FAST_RECOMPUTE_ACT", "0")
    got = _run(_fused, case, REQS["all"])
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{i}: {m}")


def test_double_backward_refused_and_argument_errors(rms_forced):
    x0, r0, nw, ws, bs, _, _ = _case()
    x = x0.requires_grad_()
    w = ws[0].requires_grad_()
    out = _fused(x, r0, nw, ws, bs)
    (g,) = torch.autograd.grad(out[0].pow(2).sum() + out[-1].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="residual_act_linears: double backward"):
        torch.autograd.grad(g.pow(2).sum(), w)
    with pytest.raises(ValueError, match="one bias"):
        al.residual_act_linears(RMSNormAct(EPS), x, r0, nw, ws, bs[:1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stream", ["same", "fp32"])
def test_cuda_fused_residual_block(dtype, stream):
    """On the GPU, bf16/fp16 at a Qwen2-0.5B width: the fused add + RMSNorm + two linears, output, s and every
    gradient (s also used downstream) by flash-attn's rule against fp32, next to the plain PyTorch path in the same
    dtype; ``stream="fp32"`` is autocast's case (an fp32 residual stream plus a low-precision branch)."""
    from utils import assert_flash_rule

    g = torch.Generator().manual_seed(21)
    t, d, f = 1031, 896, 640
    x0, r0 = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
    nw0 = 1 + 0.1 * torch.randn(d, generator=g)
    ws0 = [torch.randn(f, d, generator=g) / d ** 0.5 for _ in range(2)]
    dys = [torch.randn(t, f, generator=g).cuda() for _ in range(2)]
    ds = torch.randn(t, d, generator=g).cuda()

    def run(dt, fused):
        # "fp32": the trainer's autocast (fp32 master weights and stream, the branch and the GEMMs in dt)
        auto = stream == "fp32" and dt != torch.float32
        sdt = torch.float32 if stream == "fp32" else dt
        x = x0.cuda().to(sdt).requires_grad_()
        r = r0.cuda().to(dt).requires_grad_()
        nw = nw0.cuda().to(sdt).requires_grad_()
        ws = [w.cuda().to(sdt).requires_grad_() for w in ws0]
        with torch.autocast("cuda", dtype=dt, enabled=auto):
            if fused:
                *outs, s = al.residual_act_linears(RMSNormAct(EPS), x, r, nw, ws, [None, None])
            else:
                s = x + r
                a = rms_norm_ref(s, nw, EPS)
                outs = [F.linear(a, w) for w in ws]
        leaves = [x, r, nw, *ws]
        grads = torch.autograd.grad([*outs, s], leaves, [dy.to(outs[0].dtype) for dy in dys] + [ds.to(s.dtype)])
        return [*outs, s, *grads]

    import llava_fast

    llava_fast.set_backend("rms_norm", "triton")
    try:
        ours, low = run(dtype, True), run(dtype, False)
    finally:
        llava_fast.set_backend("all", "auto")
    ref = run(torch.float32, False)
    for name, o, lo, rf in zip(["out0", "out1", "s", "dx", "dr", "dnorm_w", "dw0", "dw1"], ours, low, ref):
        assert o.dtype == lo.dtype, name
        assert_flash_rule(o, rf, lo, name=name, atol=1e-6 if name == "s" else 0.0)
