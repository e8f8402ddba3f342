"""RMSNorm: Triton kernel vs the fp32 reference and HF LlamaRMSNorm / Qwen2RMSNorm, forward and every gradient.

CPU: the kernel runs under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes (forced through RMSNormFunction or
set_backend). GPU (`cuda` marker): bf16/fp16 at real sizes with flash-attn's rule, and torch.compile.
"""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import llava_fast
from llava_fast.modules.norm import RMSNorm
from llava_fast.ops.rms_norm import RMSNormFunction, rms_norm, rms_norm_ref
from tests.utils import assert_close_verbose, assert_flash_rule

# fp32 kernel vs fp32 reference: same math, different reduction order (tree vs torch's cascade) and 1/sqrt vs rsqrt;
# a few fp32 ulp relative (2^-23 ~ 1.2e-7) on outputs of magnitude ~1-30 -> rtol 1e-5, atol 1e-5.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def _fwd_bwd(fn, x, w, r, gy, gs):
    """Outputs and grads (x, w, residual) of ``fn(x, w, r) -> y or (y, s)``."""
    inputs = [x, w] + ([r] if r is not None else [])
    out = fn(x, w, r)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = [gy, gs][: len(outs)]
    g = torch.autograd.grad(outs, inputs, grads)
    return outs, list(g)


def _inputs(shape, dtype, device, residual):
    n = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    r = torch.randn(shape, device=device, dtype=dtype).requires_grad_() if residual else None
    return x, w, r


def _kernel(eps):
    def f(x, w, r):
        y, s = RMSNormFunction.apply(x, w, r, eps)
        return (y, s) if r is not None else y
    return f


def _ref(eps):
    return lambda x, w, r: rms_norm_ref(x, w, eps, r)


def _upcast(t):
    return None if t is None else t.detach().float().requires_grad_()


@pytest.fixture
def kdev(device):
    """Small kernel tests: the CPU interpreter here, the real GPU on a CUDA machine (the Triton path cannot take CPU
    tensors there). Factory calls inside the test default to this device."""
    with torch.device(device):
        yield device


# ---------------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 16), (7, 123), (2, 5, 96), (33, 200)])
def test_kernel_fp32_small(shape, residual, kdev):
    x, w, r = _inputs(shape, torch.float32, None, residual)
    gy = torch.randn(shape)
    gs = torch.randn(shape) if residual else None
    outs, grads = _fwd_bwd(_kernel(1e-6), x, w, r, gy, gs)
    routs, rgrads = _fwd_bwd(_ref(1e-6), x, w, r, gy, gs)
    for i, (a, b) in enumerate(zip(outs, routs)):
        assert_close_verbose(a, b, name=f"out{i}", **FP32_TOL)
    # dweight sums over rows: error grows ~sqrt(M) ulp; M <= 165 here -> still within 1e-5 relative of |dw|~10-100
    for name, a, b in zip(["dx", "dweight", "dresidual"], grads, rgrads):
        assert_close_verbose(a, b, name=name, **FP32_TOL)
    if residual:  # x and residual receive the same gradient
        torch.testing.assert_close(grads[0], grads[2], atol=0, rtol=0)


@pytest.mark.parametrize("hf_cls,eps", [(LlamaRMSNorm, 1e-5), (Qwen2RMSNorm, 1e-6)])
def test_module_matches_hf(hf_cls, eps, kdev):
    n = 96
    hf = hf_cls(n, eps=eps)
    ours = RMSNorm(n, eps=eps)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(n))
    ours.load_state_dict(hf.state_dict())  # same state-dict keys
    x = torch.randn(3, 7, n, requires_grad=True)
    gy = torch.randn(3, 7, n)
    # the reference path (the CPU default): bit-for-bit HF
    y_hf = hf(x)
    llava_fast.set_backend("rms_norm", "reference")
    try:
        y = ours(x)
    finally:
        llava_fast.set_backend("rms_norm", "auto")
    assert torch.equal(y, y_hf)
    (gx_hf, gw_hf) = torch.autograd.grad(y_hf, [x, hf.weight], gy)
    (gx, gw) = torch.autograd.grad(y, [x, ours.weight], gy)
    assert torch.equal(gx, gx_hf) and torch.equal(gw, gw_hf)
    # the Triton kernel (interpreter), forced through the module
    llava_fast.set_backend("rms_norm", "triton")
    try:
        y_k = ours(x)
        gx_k, gw_k = torch.autograd.grad(y_k, [x, ours.weight], gy)
    finally:
        llava_fast.set_backend("rms_norm", "auto")
    assert_close_verbose(y_k, y_hf, name="out", **FP32_TOL)
    assert_close_verbose(gx_k, gx_hf, name="dx", **FP32_TOL)
    assert_close_verbose(gw_k, gw_hf, name="dweight", **FP32_TOL)


def test_residual_matches_hf_decoder_pattern(kdev):
    """HF decoder: ``residual = h; h = attn(...); h = residual + h; residual = h; h = norm(h)``."""
    n = 64
    hf = LlamaRMSNorm(n, eps=1e-5)
    x = torch.randn(5, n, requires_grad=True)
    res = torch.randn(5, n, requires_grad=True)
    s_hf = res + x
    y_hf = hf(s_hf)
    llava_fast.set_backend("rms_norm", "triton")
    try:
        y, s = rms_norm(x, hf.weight, 1e-5, residual=res)
    finally:
        llava_fast.set_backend("rms_norm", "auto")
    assert torch.equal(s, s_hf)
    assert_close_verbose(y, y_hf, name="out", **FP32_TOL)
    gy, gs = torch.randn(5, n), torch.randn(5, n)
    g_hf = torch.autograd.grad([y_hf, s_hf], [x, res, hf.weight], [gy, gs])
    g = torch.autograd.grad([y, s], [x, res, hf.weight], [gy, gs])
    for name, a, b in zip(["dx", "dresidual", "dweight"], g, g_hf):
        assert_close_verbose(a, b, name=name, **FP32_TOL)


def test_weight_fp32_activations_fp16_promotes_like_hf(kdev):
    n = 40
    x = torch.randn(6, n, dtype=torch.float16)
    w = 1 + 0.1 * torch.randn(n)
    y = RMSNormFunction.apply(x, w, None, 1e-6)[0]
    y_hf = rms_norm_ref(x, w, 1e-6)
    assert y.dtype == y_hf.dtype == torch.float32
    assert_close_verbose(y, y_hf, name="out", **FP32_TOL)


def test_dweight_deterministic(kdev):
    x, w, _ = _inputs((37, 50), torch.float32, None, False)
    gy = torch.randn(37, 50)
    g1 = torch.autograd.grad(_kernel(1e-6)(x, w, None), [w], gy)[0]
    g2 = torch.autograd.grad(_kernel(1e-6)(x, w, None), [w], gy)[0]
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("want_out", [False, True])
def test_frozen_weight_skips_dweight(want_out, kdev):
    """want_dw=False (a frozen norm: stage 1's language model, LoRA): the same dx and output bit for bit, no dweight
    (an empty tensor), and no reduction launch; through autograd a frozen weight gets no gradient."""
    from llava_fast.ops.rms_norm import rms_norm_bwd
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator(device=kdev).manual_seed(0)
    x, dy, ds = (torch.randn(37, 96, generator=g, device=kdev) for _ in range(3))
    w = torch.randn(96, generator=g, device=kdev)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    full = rms_norm_bwd(dy, x, w, rstd, ds, want_out=want_out)
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops():
        frozen = rms_norm_bwd(dy, x, w, rstd, ds, want_out=want_out, want_dw=False)
    assert torch.equal(frozen[0], full[0]) and frozen[1].numel() == 0 and full[1].shape == (96,)
    if want_out:
        assert torch.equal(frozen[2], full[2])
    assert "aten.sum.dim_IntList" not in seen, seen
    llava_fast.set_backend("rms_norm", "triton")
    try:
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(rms_norm(xr, w), [xr], dy)
    finally:
        llava_fast.set_backend("rms_norm", "auto")
    assert_close_verbose(gx, torch.autograd.grad(rms_norm_ref(xr, w), [xr], dy)[0], name="dx", atol=1e-5, rtol=1e-5)


def test_compile_aot_eager(kdev):
    """Dynamo + fake tensors + AOT autograd over the custom ops (the kernel itself runs in the interpreter)."""
    x, w, r = _inputs((4, 32), torch.float32, None, True)
    llava_fast.set_backend("rms_norm", "triton")
    try:
        f = torch.compile(lambda x, w, r: rms_norm(x, w, 1e-6, residual=r), backend="aot_eager", fullgraph=True)
        y, s = f(x, w, r)
        g = torch.autograd.grad([y, s], [x, w, r], [torch.ones_like(y), torch.ones_like(s)])
    finally:
        llava_fast.set_backend("rms_norm", "auto")
    y_r, s_r = rms_norm_ref(x, w, 1e-6, r)
    g_r = torch.autograd.grad([y_r, s_r], [x, w, r], [torch.ones_like(y), torch.ones_like(s)])
    assert_close_verbose(y, y_r, name="out", **FP32_TOL)
    for a, b in zip(g, g_r):
        assert_close_verbose(a, b, name="grad", **FP32_TOL)


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(9))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8), residual=torch.randn(4, 7))
    with pytest.raises(ValueError, match="residual dtype"):
        rms_norm(x, torch.ones(8), residual=x.half())


# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 896), (4096, 3584), (8192, 4096), (2, 1823, 781), (1, 8192), (513, 5120)])
def test_cuda_flash_rule(shape, dtype, residual):
    _flash_rule_case(shape, dtype, residual, "cuda")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 123), (2, 5, 96)])
def test_low_precision_flash_rule(shape, dtype, residual, forced):
    """test_cuda_flash_rule at small shapes under the interpreter (bf16 since session 36: _ext.interpreter_bf16)."""
    forced("rms_norm")
    _flash_rule_case(shape, dtype, residual, "cpu")


def _flash_rule_case(shape, dtype, residual, device):
    x, w, r = _inputs(shape, dtype, device, residual)
    gy = torch.randn(shape, device=device, dtype=dtype)
    gs = torch.randn(shape, device=device, dtype=dtype) if residual else None
    outs, grads = _fwd_bwd(lambda x, w, r: rms_norm(x, w, 1e-6, r), x, w, r, gy, gs)
    same, sgrads = _fwd_bwd(_ref(1e-6), x, w, r, gy, gs)
    f32, fgrads = _fwd_bwd(_ref(1e-6), _upcast(x), _upcast(w), _upcast(r), gy.float(),
                           gs.float() if residual else None)
    for i in range(len(outs)):
        assert outs[i].dtype == same[i].dtype
        assert_flash_rule(outs[i], f32[i], same[i], name=f"out{i}")
    for name, a, b, c in zip(["dx", "dweight", "dresidual"], grads, fgrads, sgrads):
        assert_flash_rule(a, b, c, name=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_module_vs_hf(dtype):
    n = 3584
    hf = Qwen2RMSNorm(n, eps=1e-6).to("cuda", dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(n))
    ours = RMSNorm(n, eps=1e-6).to("cuda", dtype)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 1000, n, device="cuda", dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    y_hf, y = hf(x), ours(x)
    g_hf = torch.autograd.grad(y_hf, [x, hf.weight], gy)
    g = torch.autograd.grad(y, [x, ours.weight], gy)
    if dtype == torch.float32:
        assert_close_verbose(y, y_hf, name="out", **FP32_TOL)
        assert_close_verbose(g[0], g_hf[0], name="dx", **FP32_TOL)
        # dweight sums 2000 rows: sqrt(2000)*ulp relative ~ 5e-6 of a sum whose terms are O(1) -> 1e-4
        assert_close_verbose(g[1], g_hf[1], name="dweight", atol=1e-4, rtol=1e-5)
    else:
        # bf16: different rounding points (ours is fp32 to the end); at most 1 bf16 ulp on ~all outputs
        assert (y.float() - y_hf.float()).abs().max() <= 2 ** -7 * y_hf.float().abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_torch_compile(residual):
    shape = (2048, 896)
    x, w, r = _inputs(shape, torch.bfloat16, "cuda", residual)
    f = torch.compile(lambda x, w, r: rms_norm(x, w, 1e-6, r), fullgraph=True)
    gy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    gs = torch.randn(shape, device="cuda", dtype=torch.bfloat16) if residual else None
    outs, grads = _fwd_bwd(f, x, w, r, gy, gs)
    e_outs, e_grads = _fwd_bwd(lambda x, w, r: rms_norm(x, w, 1e-6, r), x, w, r, gy, gs)
    for a, b in zip(outs + grads, e_outs + e_grads):
        assert torch.equal(a, b)  # same kernels, same inputs


def test_backward_tile_setting(monkeypatch):
    """LLAVA_FAST_RMS_BWD_TILE (bench_rms_norm's backward tile experiment) changes how many rows a loop iteration
    takes: dx identical per row, dweight equal up to the partial sums' grouping; a bad value names the variable."""
    import llava_fast
    from llava_fast.ops.rms_norm import rms_norm

    llava_fast.set_backend("rms_norm", "triton")
    try:
        g = torch.Generator().manual_seed(3)
        # N = 300: BLOCK_N 512, i.e. 4 rows per iteration by default, 8 and 16 with the settings below
        x0, w0 = torch.randn(37, 300, generator=g), 1 + 0.1 * torch.randn(300, generator=g)
        dy = torch.randn(37, 300, generator=g)

        def grads():
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            return torch.autograd.grad(rms_norm(x, w), (x, w), dy)
        want = grads()
        for tile in ("4096", "8192"):
            monkeypatch.setenv("LLAVA_FAST_RMS_BWD_TILE", tile)
            got = grads()
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
        monkeypatch.setenv("LLAVA_FAST_RMS_BWD_TILE", "3000")
        with pytest.raises(ValueError, match="LLAVA_FAST_RMS_BWD_TILE"):
            grads()
    finally:
        llava_fast.set_backend("all", "auto")
