"""The backward kernels of SwiGLU and RMSNorm also write their forward's output (``want_out``), so that the linears'
weight gradients after them (down_proj; q/k/v and gate/up after a fused-residual norm) need no recomputation launch
(``ops/act_linear``, ``LLAVA_FAST_FUSED_RECOMPUTE``; one Triton launch fewer per MLP and per norm, ~100 us of host
time each on the H100 box of session 12). Checked under the interpreter: the extra output has the forward kernel's
bits, the gradients are unchanged bit for bit, the whole act_linear / residual_act_linears backward gives the bits of
the recomputing path, and the recomputation launch is gone."""
import pytest
import torch
import torch.nn.functional as F

from llava_fast.ops import act_linear as al
from llava_fast.ops import rms_norm as rn
from llava_fast.ops import swiglu as sw

EPS = 1e-6


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.float16, torch.float32)])
@pytest.mark.parametrize("rows,n", [(1, 24), (7, 123), (130, 64)])
@pytest.mark.parametrize("dres", [False, True])
def test_rms_norm_bwd_writes_the_forward_output(dtype, wdtype, rows, n, dres):
    x = _randn(rows, n, dtype=dtype)
    w = (1 + 0.1 * _randn(n, seed=1)).to(wdtype)
    y, _, rstd = rn.rms_norm_fwd(x, w, EPS)
    dy = _randn(rows, n, dtype=y.dtype, seed=2)
    ds = _randn(rows, n, dtype=dtype, seed=3) if dres else None
    dx0, dw0 = rn.rms_norm_bwd(dy, x, w, rstd, ds)
    dx, dw, y2 = rn.rms_norm_bwd(dy, x, w, rstd, ds, want_out=True)
    assert y2.dtype == y.dtype == torch.promote_types(dtype, wdtype) and y2.shape == x.shape
    assert torch.equal(y2, y), (y2.float() - y.float()).abs().max()
    assert torch.equal(dx, dx0) and torch.equal(dw, dw0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 5), (7, 123), (3, 4, 2050)])
@pytest.mark.parametrize("strided", [False, True])
def test_swiglu_bwd_writes_the_forward_output(dtype, shape, strided):
    if strided:  # gate and up as halves of one wider tensor (a fused gate_up projection): the 2-D kernel path
        both = _randn(*shape[:-1], 2 * shape[-1], dtype=dtype)
        gate, up = both[..., :shape[-1]], both[..., shape[-1]:]
    else:
        gate, up = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype, seed=1)
    c = sw.swiglu_fwd(gate, up)
    dc = _randn(*shape, dtype=dtype, seed=2)
    dg0, du0 = sw.swiglu_bwd(dc, gate, up)
    dg, du, c2 = sw.swiglu_bwd(dc, gate, up, want_out=True)
    assert c2.dtype == c.dtype and c2.shape == c.shape
    assert torch.equal(c2, c), (c2.float() - c.float()).abs().max()
    assert torch.equal(dg, dg0) and torch.equal(du, du0)


class _Counter:
    """Counts the forward launchers (the recomputations) and the backward launchers called."""

    def __init__(self, monkeypatch):
        self.calls = {"swiglu_fwd": 0, "rms_norm_fwd": 0, "swiglu_bwd": 0, "rms_norm_bwd": 0}
        for mod, name in ((sw, "swiglu_fwd"), (rn, "rms_norm_fwd"), (sw, "swiglu_bwd"), (rn, "rms_norm_bwd")):
            real = getattr(mod, name)

            def counted(*a, _real=real, _name=name, **k):
                self.calls[_name] += 1
                return _real(*a, **k)
            monkeypatch.setattr(mod, name, counted)


def _mlp_down(gate, up, w, b):
    return al.act_linear(sw.SwiGLUAct(), (gate, up), w, b)


MLP_REQS = {"all": ("gate", "up", "w", "b"), "weights_only": ("w",), "inputs_only": ("gate", "up"),
            "w_and_up": ("w", "up")}


def _mlp_grads(req, dtype=torch.float32, autocast=False):
    gate, up = _randn(3, 5, 40, dtype=dtype), _randn(3, 5, 40, dtype=dtype, seed=1)
    w, b = _randn(24, 40, seed=2) / 6, _randn(24, seed=3)
    if not autocast:
        w, b = w.to(dtype), b.to(dtype)
    leaves = {n: t.clone().requires_grad_(n in MLP_REQS[req]) for n, t in
              (("gate", gate), ("up", up), ("w", w), ("b", b))}
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        y = _mlp_down(leaves["gate"], leaves["up"], leaves["w"], leaves["b"])
    dy = _randn(*y.shape, dtype=y.dtype, seed=4)
    want = [leaves[n] for n in MLP_REQS[req]]
    return [y, *torch.autograd.grad(y, want, dy)]


@pytest.mark.parametrize("req", list(MLP_REQS))
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_act_linear_swiglu_same_bits_one_launch_fewer(req, dtype, autocast, forced, monkeypatch):
    forced("swiglu")
    counter = _Counter(monkeypatch)
    monkeypatch.setenv("LLAVA_FAST_FUSED_RECOMPUTE", "0")
    want = _mlp_grads(req, dtype, autocast)
    before, counter.calls = counter.calls, dict.fromkeys(counter.calls, 0)
    monkeypatch.setenv("LLAVA_FAST_FUSED_RECOMPUTE", "1")
    got = _mlp_grads(req, dtype, autocast)
    after = counter.calls
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), (req, i, (a.float() - b.float()).abs().max())
    fused = "w" in MLP_REQS[req] and ("gate" in MLP_REQS[req] or "up" in MLP_REQS[req])
    # the forward launch of the forward pass itself, plus the recomputation only on the old path
    assert before["swiglu_fwd"] == 1 + ("w" in MLP_REQS[req])
    assert after["swiglu_fwd"] == 1 + ("w" in MLP_REQS[req] and not fused)
    assert after["swiglu_bwd"] == before["swiglu_bwd"]


def _residual_grads(req, autocast=False):
    from test_act_linear_residual import REQS, _case, _fused, _run

    case = _case(seed=11, dtype=torch.float32, rdtype=torch.float16 if autocast else None)

    def fn(*a):
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            return _fused(*a)
    return _run(fn, case, REQS[req])


@pytest.mark.parametrize("req", ["all", "frozen_linears", "stream_only", "weights_only"])
@pytest.mark.parametrize("autocast", [False, True])
def test_residual_act_linears_same_bits_one_launch_fewer(req, autocast, forced, monkeypatch):
    forced("rms_norm")
    counter = _Counter(monkeypatch)
    monkeypatch.setenv("LLAVA_FAST_FUSED_RECOMPUTE", "0")
    want = _residual_grads(req, autocast)
    before, counter.calls = counter.calls, dict.fromkeys(counter.calls, 0)
    monkeypatch.setenv("LLAVA_FAST_FUSED_RECOMPUTE", "1")
    got = _residual_grads(req, autocast)
    after = counter.calls
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), (req, i, (a.float() - b.float()).abs().max())
    weights = req in ("all", "weights_only")
    inputs = req in ("all", "frozen_linears", "stream_only")
    assert before["rms_norm_fwd"] == 1 + weights
    assert after["rms_norm_fwd"] == 1 + (weights and not inputs)
    assert after["rms_norm_bwd"] == before["rms_norm_bwd"]


def test_reference_close(forced):
    """The fused path against plain PyTorch (fp32): down_proj(silu(gate) * up) and its gradients."""
    forced("swiglu")
    gate, up = _randn(2, 7, 16).requires_grad_(), _randn(2, 7, 16, seed=1).requires_grad_()
    w = (_randn(5, 16, seed=2) / 4).requires_grad_()
    y = _mlp_down(gate, up, w, None)
    dy = _randn(2, 7, 5, seed=3)
    got = torch.autograd.grad(y, [gate, up, w], dy)
    g2, u2, w2 = (t.detach().clone().requires_grad_() for t in (gate, up, w))
    ref = F.linear(F.silu(g2) * u2, w2)
    want = torch.autograd.grad(ref, [g2, u2, w2], dy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_same_bits_as_recomputing(dtype, monkeypatch):
    """On the GPU at OneVision-0.5B's widths (hidden 896, intermediate 4864, 3000 tokens): the extra outputs of the
    backward kernels equal the forward kernels' bit for bit, and so does every gradient of the MLP's down_proj and of
    a fused-residual norm + q/k/v block against the recomputing path (LLAVA_FAST_FUSED_RECOMPUTE=0)."""
    dev = "cuda"
    gate = _randn(3000, 4864, dtype=dtype).to(dev)
    up = _randn(3000, 4864, dtype=dtype, seed=1).to(dev)
    dc = _randn(3000, 4864, dtype=dtype, seed=2).to(dev)
    c = sw.swiglu_fwd(gate, up)
    *_, c2 = sw.swiglu_bwd(dc, gate, up, want_out=True)
    assert torch.equal(c, c2)
    x = _randn(3000, 896, dtype=dtype, seed=3).to(dev)
    w = (1 + 0.1 * _randn(896, seed=4)).to(dtype).to(dev)
    y, _, rstd = rn.rms_norm_fwd(x, w, EPS)
    *_, y2 = rn.rms_norm_bwd(_randn(3000, 896, dtype=dtype, seed=5).to(dev), x, w, rstd, want_out=True)
    assert torch.equal(y, y2)

    def run():
        g, u = gate[:, :1024].clone().requires_grad_(), up[:, :1024].clone().requires_grad_()
        wd = (_randn(896, 1024, seed=6) / 32).to(dtype).to(dev).requires_grad_()
        out = _mlp_down(g, u, wd, None)
        xs = x.clone().requires_grad_()
        r = _randn(3000, 896, dtype=dtype, seed=7).to(dev).requires_grad_()
        nw = w.clone().requires_grad_()
        wq = (_randn(1152, 896, seed=8) / 30).to(dtype).to(dev).requires_grad_()
        q, s = al.residual_act_linears(rn.RMSNormAct(EPS), xs, r, nw, [wq], [None])
        loss = out.float().square().mean() + q.float().square().mean() + s.float().mean()
        return torch.autograd.grad(loss, [g, u, wd, xs, r, nw, wq])

    monkeypatch.setenv("LLAVA_FAST_FUSED_RECOMPUTE", "0")
    want = run()
    monkeypatch.setenv("LLAVA_FAST_FUSED_RECOMPUTE", "1")
    got = run()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), (i, (a.float() - b.float()).abs().max())
