"""LayerNorm: Triton kernels vs the reference (``F.layer_norm``), forward and backward (dx, dweight, dbias), and the
vision towers' norms through act_linear with the kernels against torch's.

CPU: kernels under TRITON_INTERPRET=1 on small fp32/fp16 shapes (odd widths, several rows per program, without
weight or bias). GPU (`cuda` marker): bf16/fp16 at the towers' sizes with flash-attn's rule, and torch.compile.
"""
import pytest
import torch
import torch.nn.functional as F

import llava_fast
from llava_fast.ops.act_linear import LayerNormAct, act_linears
from llava_fast.ops.layer_norm import (LayerNormFunction, kernel_usable, layer_norm, layer_norm_bwd, layer_norm_fwd,
                                       layer_norm_ref)
from tests.utils import assert_close_verbose, assert_flash_rule

FP32_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def kdev(device):
    """Small kernel tests: the CPU interpreter here, the real GPU on a CUDA machine."""
    with torch.device(device):
        yield device


@pytest.fixture
def triton_ln():
    llava_fast.set_backend("layer_norm", "triton")
    yield
    llava_fast.set_backend("layer_norm", "auto")


def _grads(y, leaves, g):
    return torch.autograd.grad(y, [t for t in leaves if t is not None], g, retain_graph=True)


def _params(n, dtype, affine, g):
    w = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype).requires_grad_() if affine in ("w", "wb") else None
    b = (0.5 * torch.randn(n, generator=g)).to(dtype).requires_grad_() if affine in ("b", "wb") else None
    return w, b


# ---------------------------------------------------------------------------------------------------------------- CPU
def test_reference_is_torch():
    x, w, b = torch.randn(3, 5, 17), torch.randn(17), torch.randn(17)
    assert torch.equal(layer_norm_ref(x, w, b, 1e-6), F.layer_norm(x, (17,), w, b, 1e-6))


@pytest.mark.parametrize("shape", [(1, 1), (7, 123), (2, 3, 431), (37, 64), (5, 1152)])
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_kernel_fp32_small(shape, affine, kdev, triton_ln):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(kdev).requires_grad_()
    w, b = (p.to(kdev).detach().requires_grad_() if p is not None else None
            for p in _params(shape[-1], torch.float32, affine, g))
    y = LayerNormFunction.apply(x, w, b, 1e-5)
    r = layer_norm_ref(x, w, b, 1e-5)
    assert_close_verbose(y, r, name="out", **FP32_TOL)
    gy = torch.randn(shape, generator=g).to(kdev)
    leaves = [x, w, b]
    for name, a, e in zip(["dx", "dw", "db"], _grads(y, leaves, gy), _grads(r, leaves, gy)):
        # dw, db sum over the rows: their error grows with the row count
        assert_close_verbose(a, e, name=name, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])   # bf16 since session 36 (_ext.interpreter_bf16)
def test_kernel_fp16_interpreter_flash_rule(kdev, triton_ln, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(19, 300, generator=g) * 2 + 0.5).to(dtype).to(kdev).requires_grad_()
    w, b = (p.to(kdev).detach().requires_grad_() for p in _params(300, dtype, "wb", g))
    y = LayerNormFunction.apply(x, w, b, 1e-6)
    s = layer_norm_ref(x, w, b, 1e-6)
    f32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    f = layer_norm_ref(*f32, 1e-6)
    assert_flash_rule(y, f, s, name="out")
    gy = torch.randn(19, 300, generator=g).to(dtype).to(kdev)
    for name, a, e, ss in zip(["dx", "dw", "db"], _grads(y, [x, w, b], gy), _grads(f, f32, gy.float()),
                              _grads(s, [x, w, b], gy)):
        assert_flash_rule(a, e, ss, name=name)


def test_backward_writes_the_forward_output(kdev, triton_ln):
    """The backward kernel's y (act_linear's recomputation) is the forward kernel's, bit for bit, and its gradients
    are those of the plain backward launch."""
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(23, 200).to(dtype) * 2
        w, b = (torch.randn(200) * 0.5 + 1).to(dtype), torch.randn(200).to(dtype)
        dy = torch.randn(23, 200).to(dtype)
        dx, dw, db, y = layer_norm_bwd(dy, x, w, b, 1e-5, want_out=True)
        assert torch.equal(y, layer_norm_fwd(x, w, b, 1e-5))
        for a, e in zip((dx, dw, db), layer_norm_bwd(dy, x, w, b, 1e-5)):
            assert torch.equal(a, e)


def test_backward_is_deterministic(kdev, triton_ln):
    x = torch.randn(301, 96, requires_grad=True)
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    gy = torch.randn(301, 96)
    runs = [_grads(LayerNormFunction.apply(x, w, b, 1e-5), [x, w, b], gy) for _ in range(2)]
    for a, e in zip(*runs):
        assert torch.equal(a, e)


def test_gradients_not_wanted(kdev, triton_ln):
    """A frozen norm (no weight/bias gradients) gets the same dx, and no partial sums are made."""
    x = torch.randn(11, 40)
    w, b, dy = torch.randn(40), torch.randn(40), torch.randn(11, 40)
    dx, dw, db = layer_norm_bwd(dy, x, w, b, 1e-5, want_dw=False, want_db=False)
    assert dw.numel() == 0 and db.numel() == 0
    assert torch.equal(dx, layer_norm_bwd(dy, x, w, b, 1e-5)[0])


def test_empty_rows(kdev, triton_ln):
    x = torch.randn(0, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    y = layer_norm(x, w, None)
    assert y.shape == (0, 32)
    dx, dw = torch.autograd.grad(y, [x, w], torch.randn(0, 32))
    assert dx.shape == (0, 32) and torch.equal(dw, torch.zeros(32))


def test_vision_norms_through_act_linear(kdev, triton_ln):
    """q, k, v of norm(x) by act_linears with LayerNormAct on the kernels (the backward writes norm(x) for the weight
    gradients: grad_with_output) against the eager expression: outputs and every gradient."""
    g = torch.Generator(device=kdev).manual_seed(0)
    x = torch.randn(2, 9, 24, generator=g, device=kdev).requires_grad_()
    nw = (1 + 0.2 * torch.randn(24, generator=g, device=kdev)).requires_grad_()
    nb = (0.1 * torch.randn(24, generator=g, device=kdev)).requires_grad_()
    ws = [torch.randn(24, 24, generator=g, device=kdev).div(5).requires_grad_() for _ in range(3)]
    bs = [torch.randn(24, generator=g, device=kdev).requires_grad_() for _ in range(3)]
    act = LayerNormAct((24,), 1e-6)
    assert act._kernel((x, nw, nb)) and act.grad_with_output is not None
    leaves = [x, nw, nb, *ws, *bs]
    h = F.layer_norm(x, (24,), nw, nb, 1e-6)
    ref = [F.linear(h, w, b) for w, b in zip(ws, bs)]
    gys = [torch.randn(2, 9, 24, generator=g, device=kdev) for _ in range(3)]
    want = torch.autograd.grad(ref, leaves, gys)
    out = act_linears(act, (x, nw, nb), ws, bs)
    got = torch.autograd.grad(out, leaves, gys)
    for o, r in zip(out, ref):
        assert_close_verbose(o, r, name="out", **FP32_TOL)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close_verbose(a, e, name=f"grad {i}", atol=1e-4, rtol=1e-4)


def test_torch_path_unchanged_without_the_kernel():
    """Without the kernels (the CPU default) LayerNormAct's fused backward makes torch's calls: the same bits as
    recompute + grad, i.e. as autograd of F.layer_norm."""
    act = LayerNormAct((30,), 1e-5)
    x, w, b = torch.randn(7, 30), torch.randn(30), torch.randn(30)
    da = torch.randn(7, 30)
    assert not act._kernel((x, w, b))
    gs, y = act.grad_with_output(da, (x, w, b), (True, True, True))
    y2, state = act.recompute(x, w, b)
    assert torch.equal(y, y2) and torch.equal(y, F.layer_norm(x, (30,), w, b, 1e-5))
    for a, e in zip(gs, act.grad(da, (x, w, b), state, (True, True, True))):
        assert torch.equal(a, e)


def test_kernel_usable_rules(kdev, triton_ln):
    x = torch.randn(4, 8)
    assert kernel_usable(x, torch.randn(8), None)
    assert not kernel_usable(x, torch.randn(8, dtype=torch.float64), None)    # mixed dtypes: torch's path
    assert not kernel_usable(x.half(), torch.randn(8), None)
    llava_fast.set_backend("layer_norm", "auto")
    assert not kernel_usable(x, None, None)                                   # opt-in: auto keeps torch's


def test_compile_aot_eager(kdev, triton_ln):
    x = torch.randn(4, 100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    y = torch.compile(lambda t: layer_norm(t, w, None, 1e-5), backend="aot_eager", fullgraph=True)(x)
    r = layer_norm_ref(x, w, None, 1e-5)
    assert_close_verbose(y, r, name="out", **FP32_TOL)
    gy = torch.randn_like(y)
    for a, e in zip(_grads(y, [x, w], gy), _grads(r, [x, w], gy)):
        assert_close_verbose(a, e, name="grad", atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="layer_norm: x must be"):
        layer_norm(torch.arange(4))
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(hidden,\) = \(4,\)"):
        layer_norm(torch.randn(2, 4), torch.randn(5))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        layer_norm(torch.randn(2, 4), eps=-1.0)


# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,eps", [((10906, 1152), 1e-6), ((16, 577, 1024), 1e-5), ((3, 517, 1237), 1e-5),
                                       ((1, 4096), 1e-6)])
def test_cuda_flash_rule(shape, eps, dtype, triton_ln):
    n = shape[-1]
    x = (torch.randn(shape, device="cuda") * 2 + 0.3).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(n, device="cuda")).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(n, device="cuda")).to(dtype).requires_grad_()
    y = layer_norm(x, w, b, eps)
    assert "LayerNormFunction" in type(y.grad_fn).__name__   # the kernel, not torch's
    s = layer_norm_ref(x, w, b, eps)
    f32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    f = layer_norm_ref(*f32, eps)
    assert_flash_rule(y, f, s, name="out")
    gy = torch.randn_like(y)
    for name, a, e, ss in zip(["dx", "dw", "db"], _grads(y, [x, w, b], gy), _grads(f, f32, gy.float()),
                              _grads(s, [x, w, b], gy)):
        assert_flash_rule(a, e, ss, name=name)


@pytest.mark.cuda
def test_cuda_torch_compile(triton_ln):
    x = torch.randn(2048, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fn = lambda t: layer_norm(t, w, b, 1e-6)  # noqa: E731
    y = torch.compile(fn, fullgraph=True)(x)
    e = fn(x)
    assert torch.equal(y, e)
    gy = torch.randn_like(y)
    for a, c in zip(_grads(y, [x, w, b], gy), _grads(e, [x, w, b], gy)):
        assert torch.equal(a, c)
