"""Projector (mlp2x_gelu) tests: the fused Triton forward/backward against HF's LlavaMultiModalProjector.

The small-size tests force the Triton kernels on the ``device`` fixture: under TRITON_INTERPRET=1 on CPU-only machines
(fp32 and fp16), on the GPU elsewhere. The full model shapes in bf16/fp16, and torch.compile with Inductor, run in the
``cuda``-marked tests.
"""
from __future__ import annotations

import pytest
import torch

from llava_fast import backend
from llava_fast.modules.projector import LlavaMultiModalProjector, Projector
from llava_fast.ops.projector import (
    ProjectorFunction,
    _projector_bwd_op,
    _projector_fwd_op,
    normalize_act,
    projector,
    projector_fwd,
    projector_ref,
)
from tests.utils import assert_flash_rule, max_err, raw_view

transformers = pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector as HFProjector

NAMES = ("out", "dx", "dw1", "db1", "dw2", "db2")


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    backend.set_backend("projector", "auto")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_projector(dv: int, dt: int, bias: bool, act: str) -> HFProjector:
    """The HF module built from a tiny LlavaConfig (only the hidden sizes matter to the projector)."""
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=dv, intermediate_size=2 * dv, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=dt, intermediate_size=2 * dt, num_hidden_layers=1,
                                num_attention_heads=2, vocab_size=64),
        multimodal_projector_bias=bias, projector_hidden_act=act, vision_feature_layer=-2,
    )
    return HFProjector(cfg)


def run_with_grads(fn, x, params, dy, x_grad: bool):
    """Forward + backward; returns [out, dx, dw1, db1, dw2, db2] (None where there is no gradient)."""
    x = x.detach().clone().requires_grad_(x_grad)
    params = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    out = fn(x, *params)
    out.backward(dy)
    grads = [x.grad] + [p.grad if p is not None else None for p in params]
    return [out.detach()] + grads


def fused(approximate):
    return lambda x, w1, b1, w2, b2: ProjectorFunction.apply(x, w1, b1, w2, b2, approximate)


def hf_run(mod, x, params, dy, dtype, x_grad):
    """HF forward+backward in ``dtype`` with params as leaves whose .grad we read."""
    x = x.detach().to(dtype).clone().requires_grad_(x_grad)
    m = mod.to(dtype)
    with torch.no_grad():
        m.linear_1.weight.copy_(params[0])
        m.linear_2.weight.copy_(params[2])
        if params[1] is not None:
            m.linear_1.bias.copy_(params[1])
            m.linear_2.bias.copy_(params[3])
    m.zero_grad(set_to_none=True)
    out = m(x)
    out.backward(dy.to(dtype))
    b1g = m.linear_1.bias.grad if m.linear_1.bias is not None else None
    b2g = m.linear_2.bias.grad if m.linear_2.bias is not None else None
    return [out.detach(), x.grad, m.linear_1.weight.grad, b1g, m.linear_2.weight.grad, b2g]


def make_inputs(m, dv, dt, bias, dtype=torch.float32, device="cpu"):
    """Inputs scaled like a trained projector: unit-variance features, weights ~ 1/sqrt(fan_in)."""
    x = torch.randn(m, dv, device=device)
    w1 = torch.randn(dt, dv, device=device) / dv ** 0.5
    w2 = torch.randn(dt, dt, device=device) / dt ** 0.5
    b1 = torch.randn(dt, device=device) * 0.1 if bias else None
    b2 = torch.randn(dt, device=device) * 0.1 if bias else None
    dy = torch.randn(m, dt, device=device)
    cast = lambda t: t.to(dtype) if t is not None else None
    return cast(x), [cast(w1), cast(b1), cast(w2), cast(b2)], cast(dy)


def check_all(ours, ref_hi, ref_same, x_grad, bias, atol_ulps: float = 0.0):
    for name, o, r, s in zip(NAMES, ours, ref_hi, ref_same):
        if name == "dx" and not x_grad:
            assert o is None, "dx must be None when x does not require grad"
            continue
        if name in ("db1", "db2") and not bias:
            assert o is None
            continue
        # atol: `atol_ulps` ulp of fp32 at the reference's magnitude (used only for fp32 runs, where PyTorch's own
        # error is itself a couple of ulp and a 2x ratio of two such tiny numbers is noise).
        atol = atol_ulps * torch.finfo(torch.float32).eps * r.abs().max().item()
        assert_flash_rule(o, r, s, name, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# CPU: reference, module, and the Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_ref_and_module_match_hf(act, bias):
    hf = hf_projector(40, 48, bias, act)
    ours = Projector(40, 48, bias=bias, act=act)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 5, 40)
    ref = hf(x)
    torch.testing.assert_close(ours(x), ref, atol=0, rtol=0)  # CPU -> the reference path, bit-identical
    p = [hf.linear_1.weight, hf.linear_1.bias, hf.linear_2.weight, hf.linear_2.bias]
    torch.testing.assert_close(projector_ref(x, *p, approximate=normalize_act(act)), ref, atol=0, rtol=0)
    assert LlavaMultiModalProjector is Projector
    assert backend.OPS["projector"] == "triton" and not backend.use_fast("projector", "cpu")
    assert isinstance(ours.act, torch.nn.GELU)


# Interpreter grid: two small shape families (40 is not a multiple of the 32-wide K tile, 48 not of the 64-wide N
# tile: masks are exercised), M = 1 / 7 / 577 (577 = one CLIP-L/336 image + CLS: odd, several M tiles), bias on/off,
# with/without input grad, all with erf GELU; tanh GELU on one family with bias (its epilogue is the only difference).
FP32_CASES = [(dims, m, bias, x_grad, "gelu") for dims in [(40, 48), (64, 96)] for m in [1, 7, 577]
              for bias in [True, False] for x_grad in [True, False]]
FP32_CASES += [((40, 48), m, True, x_grad, "gelu_pytorch_tanh") for m in [1, 7, 577] for x_grad in [True, False]]


@pytest.mark.parametrize("dims,m,bias,x_grad,act", FP32_CASES)
def test_fused_fp32_vs_hf(dims, m, bias, x_grad, act, device):
    dv, dt = dims
    hf = hf_projector(dv, dt, bias, act).to(device)
    x, params, dy = make_inputs(m, dv, dt, bias, device=device)
    ours = run_with_grads(fused(normalize_act(act)), x, params, dy, x_grad)
    ref64 = hf_run(hf, x.double(), [p.double() if p is not None else None for p in params], dy, torch.float64,
                   x_grad)
    ref32 = hf_run(hf, x, params, dy, torch.float32, x_grad)
    check_all(ours, ref64, ref32, x_grad, bias, atol_ulps=4)


def test_tma_kernel_on_triton_without_tensor_descriptors(monkeypatch, device):
    """LLAVA_FAST_PROJECTOR_KERNEL=tma on a Triton older than 3.4 (torch 2.6 / 2.7 bring 3.2 / 3.3: no
    tl.make_tensor_descriptor): the pointer kernel runs instead, after one warning that says why."""
    import triton.language as tl

    from llava_fast import _ext
    from llava_fast.ops import projector as P

    monkeypatch.delattr(tl, "make_tensor_descriptor", raising=False)   # Triton 3.3 has none
    monkeypatch.setattr(_ext, "_warned_once", set())
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_KERNEL", "tma")
    tried = []
    monkeypatch.setattr(P, "_tma_layout", lambda a, b: tried.append(1))
    dv, dt, m = 40, 48, 7
    hf = hf_projector(dv, dt, True, "gelu").to(device)
    x, params, dy = make_inputs(m, dv, dt, True, device=device)
    with pytest.warns(UserWarning, match=r"LLAVA_FAST_PROJECTOR_KERNEL=tma needs triton >= 3.4"):
        ours = run_with_grads(fused(normalize_act("gelu")), x, params, dy, True)
    ref_hi = hf_run(hf, x.double(), [p.double() for p in params], dy, torch.float64, True)
    check_all(ours, ref_hi, hf_run(hf, x, params, dy, torch.float32, True), True, True, atol_ulps=4)
    assert not tried


@pytest.mark.parametrize("sub", [1, 4])
def test_epilogue_subtiles(sub, monkeypatch, device):
    """The interpreter config uses 2 column sub-tiles in the epilogue; the GPU configs also use 1 and 4."""
    from llava_fast.ops import projector as P

    monkeypatch.setitem(P._INTERPRET_META, "EPI_SUBTILE", sub)
    dv, dt, m = 64, 96, 77
    hf = hf_projector(dv, dt, True, "gelu").to(device)
    x, params, dy = make_inputs(m, dv, dt, True, device=device)
    ours = run_with_grads(fused("none"), x, params, dy, True)
    ref64 = hf_run(hf, x.double(), [p.double() for p in params], dy, torch.float64, True)
    ref32 = hf_run(hf, x, params, dy, torch.float32, True)
    check_all(ours, ref64, ref32, True, True, atol_ulps=4)


TMA_CASES = [((40, 48), 1, True, "gelu", torch.float32), ((40, 48), 577, False, "gelu", torch.float32),
             ((64, 96), 7, True, "gelu_pytorch_tanh", torch.float32), ((64, 96), 577, True, "gelu", torch.float16),
             ((42, 48), 77, True, "gelu", torch.float32)]  # 42: rows of 168 B, not TMA-aligned -> pointer kernel


@pytest.mark.parametrize("dims,m,bias,act,dtype,kind", [c + ("tma",) for c in TMA_CASES]
                         + [TMA_CASES[1] + ("tma_nested",)])
def test_tma_persistent_kernel(dims, m, bias, act, dtype, kind, monkeypatch, device):
    """LLAVA_FAST_PROJECTOR_KERNEL=tma: the persistent kernel with TMA tensor-descriptor loads (K-major B in the
    forward GEMM, N-major B in the backward one), against HF; shapes whose rows are not 16-byte aligned fall back to
    the pointer kernel. ``tma_nested``: the same kernel without the flattened tile/K loop."""
    import triton.language as tl

    from llava_fast.ops import projector as P

    if not hasattr(tl, "make_tensor_descriptor"):
        pytest.skip("this Triton has no tensor descriptors (3.4 and later have): the pointer kernel "
                    "runs instead (test_tma_kernel_on_triton_without_tensor_descriptors)")
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_KERNEL", kind)
    layouts = []
    real = P._tma_layout
    monkeypatch.setattr(P, "_tma_layout", lambda a, b: layouts.append(real(a, b)) or layouts[-1])
    dv, dt = dims
    hf = hf_projector(dv, dt, bias, act).to(device)
    x, params, dy = make_inputs(m, dv, dt, bias, device=device)
    c = lambda t: t.to(dtype) if t is not None else None
    ours = run_with_grads(fused(normalize_act(act)), c(x), [c(p) for p in params], c(dy), True)
    if dtype == torch.float32:
        ref_hi = hf_run(hf, x.double(), [p.double() if p is not None else None for p in params], dy, torch.float64,
                        True)
        ref_same = hf_run(hf, x, params, dy, torch.float32, True)
        check_all(ours, ref_hi, ref_same, True, bias, atol_ulps=4)
    else:
        ref_hi = hf_run(hf, x, params, dy, torch.float32, True)
        ref_same = hf_run(hf, c(x), [c(p) for p in params], c(dy), dtype, True)
        check_all(ours, ref_hi, ref_same, True, bias)
    per16 = 4 if dtype == torch.float32 else 8  # elements per 16 bytes
    fwd_ok, bwd_ok = dv % per16 == 0, dt % per16 == 0  # GEMM1 reads x (M, dv); the dA GEMM dy (M, dt) and w2 (dt, dt)
    assert [u for u, _, _ in layouts] == [fwd_ok, bwd_ok]
    assert [k for u, k, _ in layouts if u] == [True, False][not fwd_ok:]  # B: w1.t() is K-major, w2 N-major
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_KERNEL", "bogus")
    with pytest.raises(ValueError, match="LLAVA_FAST_PROJECTOR_KERNEL"):
        P.kernel_kind()


class FakeCutlass:
    """The C contract of csrc/cutlass/projector_sm90.cu in PyTorch, on CPU memory reached through the raw pointers
    the Python wrapper passes: it checks the wrapper's argument order, shapes and layouts (w1 (N, K) for the
    forward, w2 (K, N) for the dgrad) without a GPU. ``rc`` != 0: refuse like can_implement does."""

    DTYPES = {0: torch.bfloat16, 1: torch.float16}

    def __init__(self, rc: int = 0):
        self.rc, self.calls = rc, []

    view = staticmethod(raw_view)

    def llava_fast_cutlass_workspace_bytes(self):
        return 0

    def _refuse(self, err):
        err.value = b"Error Misaligned Operand (fake)"
        return self.rc

    def llava_fast_cutlass_gelu_fwd(self, dtype, sched, M, N, K, a, b, bias, d, aux, ws, ws_bytes, stream, err, n):
        self.calls.append(("gelu_fwd", sched, M, N, K, bias is not None, aux is not None))
        if self.rc:
            return self._refuse(err)
        dt = self.DTYPES[dtype]
        acc = self.view(a, (M, K), dt).float() @ self.view(b, (N, K), dt).float().t()
        if bias is not None:
            acc += self.view(bias, (N,), dt).float()
        if aux is not None:
            self.view(aux, (M, N), dt).copy_(acc.to(dt))
        self.view(d, (M, N), dt).copy_(torch.nn.functional.gelu(acc).to(dt))
        return 0

    def llava_fast_cutlass_dgelu_bwd(self, dtype, sched, M, N, K, a, b, aux, d, act, ws, ws_bytes, stream, err, n):
        self.calls.append(("dgelu_bwd", sched, M, N, K, act is not None))
        if self.rc:
            return self._refuse(err)
        dt = self.DTYPES[dtype]
        acc = self.view(a, (M, K), dt).float() @ self.view(b, (K, N), dt).float()
        z = self.view(aux, (M, N), dt).float()
        dgelu = 0.5 * (1 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5
        self.view(d, (M, N), dt).copy_((acc * dgelu).to(dt))
        if act is not None:
            self.view(act, (M, N), dt).copy_(torch.nn.functional.gelu(z).to(dt))
        return 0


@pytest.fixture
def fake_cutlass(monkeypatch):
    from llava_fast import _ext

    fake = FakeCutlass()
    monkeypatch.setattr(_ext, "cutlass_lib", lambda: fake)
    monkeypatch.setattr(_ext, "CUTLASS_ON_CPU", True)
    monkeypatch.setattr(_ext, "_warned_once", set())
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_KERNEL", "cutlass")
    return fake


@pytest.mark.parametrize("bias,sched", [(True, "auto"), (False, "cooperative"), (True, "pingpong"),
                                        (True, "pingpong_c12/cooperative_256")])
def test_cutlass_wrapper_contract(fake_cutlass, bias, sched, monkeypatch):
    """LLAVA_FAST_PROJECTOR_KERNEL=cutlass through a fake library that implements the C contract: the wrapper's
    calls (shapes, schedules, optional bias / aux) and the results (flash rule against HF in fp16). The real kernels
    run in the cuda tests."""
    from llava_fast.ops import projector as P

    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_CUTLASS_SCHED", sched)
    m, dv, dt = 7, 64, 96
    hf = hf_projector(dv, dt, bias, "gelu")
    x, params, dy = make_inputs(m, dv, dt, bias)
    h = lambda t: t.half() if t is not None else None
    runs = P._cutlass_runs
    ours = run_with_grads(fused("none"), h(x), [h(p) for p in params], h(dy), True)
    assert P._cutlass_runs == runs + 2
    fwd, bwd = {"auto": (0, 1), "pingpong": (0, 0), "cooperative": (1, 1),
                "pingpong_c12/cooperative_256": (2, 3)}[sched]
    assert fake_cutlass.calls == [("gelu_fwd", fwd, m, dt, dv, bias, True), ("dgelu_bwd", bwd, m, dt, dt, True)]
    ref32 = hf_run(hf, x, params, dy, torch.float32, True)
    ref16 = hf_run(hf, h(x), [h(p) for p in params], h(dy), torch.float16, True)
    check_all(ours, ref32, ref16, True, bias)
    with torch.no_grad():  # inference: no aux (h) written
        backend.set_backend("projector", "triton")
        y = projector(h(x), *[h(p) for p in params])
    assert fake_cutlass.calls[-1] == ("gelu_fwd", fwd, m, dt, dv, bias, False)
    assert_flash_rule(y, ref32[0], ref16[0], "out (inference)")


def test_cutlass_frozen_w2_skips_act(fake_cutlass):
    """With linear_2 frozen nothing needs gelu(h) in the backward: the dgrad call gets no act output (the one-output
    kernel), and dx, dw1, db1 are still right."""
    m, dv, dt = 7, 64, 96
    hf = hf_projector(dv, dt, True, "gelu")
    x, params, dy = make_inputs(m, dv, dt, True)
    h = lambda t: t.half() if t is not None else None
    xs = h(x).requires_grad_()
    w1, b1, w2, b2 = [h(p).requires_grad_(i < 2) for i, p in enumerate(params)]
    ProjectorFunction.apply(xs, w1, b1, w2, b2, "none").backward(h(dy))
    assert fake_cutlass.calls[-1] == ("dgelu_bwd", 1, m, dt, dt, False)
    assert w2.grad is None and b2.grad is None
    ref32 = hf_run(hf, x, params, dy, torch.float32, True)
    ref16 = hf_run(hf, h(x), [h(p) for p in params], h(dy), torch.float16, True)
    for name, got, i in (("dx", xs.grad, 1), ("dw1", w1.grad, 2), ("db1", b1.grad, 3)):
        assert_flash_rule(got, ref32[i], ref16[i], name)


@pytest.mark.parametrize("case", ["refused", "misaligned", "tanh"])
def test_cutlass_falls_back_to_triton(fake_cutlass, case, device):
    """When CUTLASS cannot take a call (its can_implement refuses; rows that are not 16-byte multiples; tanh GELU)
    the Triton kernel runs instead, with a warning that says why, and the result is still right."""
    from llava_fast.ops import projector as P

    dv, dt = (42, 48) if case == "misaligned" else (64, 96)  # 42 halves: 84-byte rows
    act = "gelu_pytorch_tanh" if case == "tanh" else "gelu"
    if case == "refused":
        fake_cutlass.rc = 2
    hf = hf_projector(dv, dt, True, act).to(device)
    x, params, dy = make_inputs(7, dv, dt, True, device=device)
    h = lambda t: t.half() if t is not None else None
    runs = P._cutlass_runs
    if case == "tanh":  # never offered to CUTLASS (only the erf GELU is compiled), so no warning either
        ours = run_with_grads(fused("tanh"), h(x), [h(p) for p in params], h(dy), True)
        assert fake_cutlass.calls == []
    else:
        match = {"refused": "gelu_fwd returned 2: Error Misaligned", "misaligned": "16-byte aligned rows"}[case]
        with pytest.warns(UserWarning, match=match):
            ours = run_with_grads(fused("none"), h(x), [h(p) for p in params], h(dy), True)
    # each GEMM decides alone: with x's 84-byte rows only the forward falls back; the dgrad's operands (dy, w2, h:
    # 96-byte rows) still go to CUTLASS
    assert P._cutlass_runs == runs + (case == "misaligned")
    ref32 = hf_run(hf, x, params, dy, torch.float32, True)
    ref16 = hf_run(hf, h(x), [h(p) for p in params], h(dy), torch.float16, True)
    check_all(ours, ref32, ref16, True, True)


def test_cutlass_schedule_names(monkeypatch):
    from llava_fast.ops import projector as P

    for value, want in (("auto", (0, 1)), ("cooperative", (1, 1)), ("pingpong/cooperative_256", (0, 3)),
                        ("auto/pingpong_c12", (0, 2)), (" Pingpong_C12 ", (2, 2))):
        monkeypatch.setenv("LLAVA_FAST_PROJECTOR_CUTLASS_SCHED", value)
        assert (P.cutlass_sched("fwd"), P.cutlass_sched("bwd")) == want, value
    for bad in ("fast", "pingpong/", "a/b/c", "pingpong/coop"):
        monkeypatch.setenv("LLAVA_FAST_PROJECTOR_CUTLASS_SCHED", bad)
        with pytest.raises(ValueError, match="LLAVA_FAST_PROJECTOR_CUTLASS_SCHED"):
            P.cutlass_sched("fwd")


def test_cutlass_unusable_reasons():
    from llava_fast.ops import projector as P

    a = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert "erf" in P.cutlass_unusable(a, approximate="tanh")
    assert "bf16 and fp16" in P.cutlass_unusable(a.float())
    assert "16-byte aligned rows" in P.cutlass_unusable(a[:, :60])
    assert "16-byte aligned rows" in P.cutlass_unusable(a.t())
    assert "tensors on cpu" in P.cutlass_unusable(a)


def test_cutlass_library_loads_when_built():
    """The built library (``llava_fast/_cutlass_sm90.so``, when CUTLASS was found at build time) loads without a GPU
    and has this package's ABI version."""
    import os

    from llava_fast import _ext

    path = os.path.join(os.path.dirname(_ext.__file__), _ext.CUTLASS_LIB)
    if not os.path.exists(path):
        pytest.skip(f"{_ext.CUTLASS_LIB} not built ({_ext.CUTLASS_BUILD_HINT})")
    lib = _ext.cutlass_lib()
    assert lib is not None, _ext.CUTLASS_ERROR
    assert lib.llava_fast_cutlass_abi_version() == _ext.CUTLASS_ABI
    assert lib.llava_fast_cutlass_workspace_bytes() > 0


@pytest.mark.parametrize("m", [7, 577])
def test_fused_fp16_small(m, device):
    dv, dt = 64, 96
    hf = hf_projector(dv, dt, True, "gelu").to(device)
    x, params, dy = make_inputs(m, dv, dt, True, device=device)
    h = lambda t: t.half() if t is not None else None
    ours = run_with_grads(fused("none"), h(x), [h(p) for p in params], h(dy), True)
    ref32 = hf_run(hf, x, params, dy, torch.float32, True)
    ref16 = hf_run(hf, h(x), [h(p) for p in params], h(dy), torch.float16, True)
    check_all(ours, ref32, ref16, True, True)


def test_saves_one_activation_buffer(device):
    """Backward keeps x, the weights and h only: one M x Dt activation where eager keeps two (h and gelu(h))."""
    m, dv, dt = 64, 40, 48
    x, params, _ = make_inputs(m, dv, dt, True, device=device)
    params = [p.requires_grad_() for p in params]

    def saved_act_numels(fn):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn(x.requires_grad_(), *params)
        return sorted({(t.data_ptr(), t.numel()) for t in seen if t.numel() == m * dt})

    assert len(saved_act_numels(projector_ref)) == 2
    assert len(saved_act_numels(fused("none"))) == 1


def test_inference_path_saves_nothing_and_matches(device):
    backend.set_backend("projector", "triton")  # force the kernel on CPU (interpreter)
    x, params, _ = make_inputs(9, 40, 48, True, device=device)
    with torch.no_grad():
        y = projector(x.view(3, 3, 40), *params)
        _, h = _projector_fwd_op(x, *params, "none", False)
    assert h.numel() == 0
    torch.testing.assert_close(y.view(9, 48), projector_ref(x, *params), atol=1e-5, rtol=1e-5)


def test_module_triton_path_and_grads(device):
    backend.set_backend("projector", "triton")
    hf = hf_projector(40, 48, True, "gelu").to(device)
    ours = Projector(40, 48).to(device)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 7, 40, device=device)
    y, y_ref = ours(x), hf(x)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), hf.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


def test_from_config_and_from_hf():
    hf = hf_projector(40, 48, False, "gelu_pytorch_tanh")
    m = Projector.from_config(hf_config := LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=64),
        multimodal_projector_bias=False, projector_hidden_act="gelu_pytorch_tanh", vision_feature_layer=[-2, -1]))
    assert m.linear_1.in_features == 80 and m.linear_1.bias is None and m.approximate == "tanh"
    assert hf_config.projector_hidden_act == "gelu_pytorch_tanh"
    w = Projector.from_hf(hf, act="gelu_pytorch_tanh")
    x = torch.randn(5, 40)
    torch.testing.assert_close(w(x), hf(x), atol=0, rtol=0)


def test_compile_aot_eager_fullgraph(device):
    """The custom ops' fake kernels and the autograd.Function trace under torch.compile (aot_eager: no C++ compiler
    needed on CPU; Inductor runs in the cuda test)."""
    backend.set_backend("projector", "triton")
    x, params, dy = make_inputs(7, 40, 48, True, device=device)
    fn = torch.compile(lambda x, w1, b1, w2, b2: projector(x, w1, b1, w2, b2), backend="aot_eager", fullgraph=True)
    got = run_with_grads(fn, x, params, dy, True)
    want = run_with_grads(fused("none"), x, params, dy, True)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0, msg=lambda s, name=name: f"{name}: {s}")


def test_opcheck_custom_ops(device):
    x, (w1, b1, w2, b2), dy = make_inputs(7, 40, 48, True, device=device)
    # every opcheck test (session 35: AOT dispatch static and dynamic too; tests/ops/test_opcheck.py)
    torch.library.opcheck(torch.ops.llava_fast.projector_fwd.default, (x, w1, b1, w2, b2, "none", True))
    torch.library.opcheck(torch.ops.llava_fast.projector_fwd.default, (x, w1, None, w2, None, "tanh", False))
    _, h = projector_fwd(x, w1, b1, w2, b2)
    torch.library.opcheck(torch.ops.llava_fast.projector_bwd.default,
                          (dy, x, h, w1, w2, "none", False, True, True, True, False))
    torch.library.opcheck(torch.ops.llava_fast.projector_bwd.default,
                          (dy, x, h, w1, w2, "tanh", True, True, False, True, True))


def test_two_per_sm_configs_only_for_large_m():
    """The Hopper autotune list has configs that fit two CTAs per SM (one's GELU epilogue under the other's MMAs);
    they are tuned only from _TWO_PER_SM_MIN_M rows on (below, few tiles: they would only cost tuning time)."""
    from llava_fast.ops import projector as P

    if not P.HAS_TRITON:
        pytest.skip("triton missing")
    cs = P._configs((9, 0), False)
    two = [c for c in cs if getattr(c, "two_per_sm", False)]
    assert two and all(c.num_stages == 3 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 128 for c in two)
    small = P._prune_configs(cs, {"M_KEY": P._m_key(2881)})
    large = P._prune_configs(cs, {"M_KEY": P._m_key(23040)})
    assert len(small) == len(cs) - len(two) and not any(getattr(c, "two_per_sm", False) for c in small)
    assert large == cs
    ampere = P._configs((8, 0), False)
    assert P._prune_configs(ampere, {"M_KEY": 64}) == ampere


def test_bad_inputs_raise_value_error():
    x, (w1, b1, w2, b2), _ = make_inputs(4, 40, 48, True)
    with pytest.raises(ValueError, match="x's last dim"):
        projector(torch.randn(4, 41), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w1.dtype"):
        projector(x, w1.double(), b1, w2, b2)
    with pytest.raises(ValueError, match="b2 must have shape"):
        projector(x, w1, b1, w2, b2[:3])
    with pytest.raises(ValueError, match="approximate"):
        projector(x, w1, b1, w2, b2, approximate="erf")
    with pytest.raises(ValueError, match="w2.shape"):
        projector(x, w1, b1, torch.randn(48, 47), b2)
    with pytest.raises(ValueError, match="act must be one of"):
        Projector(40, 48, act="relu")
    with pytest.raises(ValueError, match="x.dtype must be"):
        projector(x.to(torch.float64), w1.double(), b1.double(), w2.double(), b2.double())


# ----------------------------------------------------------------------------------------------------------------------
# GPU: full model shapes in bf16/fp16 (flash-attn rule vs an fp32 reference), torch.compile with Inductor
# ----------------------------------------------------------------------------------------------------------------------
FAMILIES = [(1024, 4096), (1024, 5120), (1152, 896), (1152, 3584)]  # LLaVA-1.5/NeXT 7B, 13B, OneVision 0.5B, 7B


def _flash_rule_case(m, dims, dtype, bias, x_grad, approximate="none", device="cuda"):
    dv, dt = dims
    x, params, dy = make_inputs(m, dv, dt, bias, device=device)
    cast = lambda t: t.to(dtype) if t is not None else None
    ours = run_with_grads(fused(approximate), cast(x), [cast(p) for p in params], cast(dy), x_grad)
    ref_fn = lambda x, w1, b1, w2, b2: projector_ref(x, w1, b1, w2, b2, approximate)
    # fp32 reference from the *rounded* inputs: it measures the kernel's error, not the input quantisation.
    up = lambda t: t.to(dtype).float() if t is not None else None
    ref32 = run_with_grads(ref_fn, up(x), [up(p) for p in params], up(dy), x_grad)
    same = run_with_grads(ref_fn, cast(x), [cast(p) for p in params], cast(dy), x_grad)
    check_all(ours, ref32, same, x_grad, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,dims,bias,approximate", [(7, (48, 64), True, "none"), (37, (32, 96), False, "tanh")])
def test_low_precision_flash_rule(m, dims, bias, approximate, dtype):
    """bf16 and fp16 on the CPU (the interpreter) by flash-attn's rule, output and every gradient, as the cuda tests
    check at full size. Until session 36 the interpreter could not run this in bf16: its tl.dot multiplied bf16 bit
    patterns (errors ~1e11) and its fp32 -> bf16 casts truncated (twice the GPU's rounding error);
    ``_ext.interpreter_bf16`` mends both."""
    torch.manual_seed(0)
    _flash_rule_case(m, dims, dtype, bias=bias, x_grad=True, approximate=approximate, device="cpu")


_FIRST_BACKWARD = """
import os, warnings, torch
os.environ["LLAVA_FAST_PROJECTOR_KERNEL"] = "cutlass"
from llava_fast import backend
from llava_fast.ops.projector import projector
from llava_fast.ops import projector as P
backend.set_backend("projector", "triton")
warnings.simplefilter("error")
g = torch.Generator().manual_seed(0)
x, w1, w2 = (torch.randn(s, generator=g).mul(0.05).cuda().bfloat16().requires_grad_()
             for s in ((7, 1024), (5120, 1024), (5120, 5120)))
dy = torch.randn(7, 5120, generator=g).cuda().bfloat16()
y = projector(x, w1, None, w2, None)
spare = [torch.empty(7 * 5120, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
del spare  # cached blocks: the backward's allocations need no runtime call that would bind a context
# the forward on this thread, the backward on autograd's device thread: its first CUDA work is the CUTLASS GEMM
y.backward(dy)
torch.cuda.synchronize()
assert P._cutlass_runs >= 2 and torch.isfinite(x.grad.float()).all(), P._cutlass_runs
print("ok")
"""


@pytest.mark.cuda
def test_cuda_cutlass_first_backward_of_a_process():
    """The CUTLASS backward GEMM as the first CUDA work of autograd's device thread in a fresh process (no current
    context there): it failed so on the H100 (session 12, CUDA_ERROR_INVALID_CONTEXT from the TMA descriptors);
    _ext.ensure_cuda_context binds the primary context first."""
    import subprocess
    import sys

    _require_cutlass()
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _FIRST_BACKWARD], capture_output=True, text=True, timeout=300,
                       cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.cuda
@pytest.mark.parametrize("dims", FAMILIES)
@pytest.mark.parametrize("m", [1, 7, 577, 2881])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_full_shapes(dims, m, dtype):
    _flash_rule_case(m, dims, dtype, bias=True, x_grad=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dims", [(1024, 4096), (1152, 896)])
@pytest.mark.parametrize("m", [1, 577, 2881])
@pytest.mark.parametrize("kind", ["tma", "tma_nested"])
def test_cuda_tma_kernel(dims, m, kind, monkeypatch):
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_KERNEL", kind)
    _flash_rule_case(m, dims, torch.bfloat16, bias=True, x_grad=True)


def _require_cutlass():
    from llava_fast import _ext

    if _ext.cutlass_lib() is None:
        pytest.skip(f"CUTLASS library: {_ext.CUTLASS_ERROR} ({_ext.CUTLASS_BUILD_HINT})")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS kernels are sm_90 only")


@pytest.mark.cuda
@pytest.mark.parametrize("dims", FAMILIES)
@pytest.mark.parametrize("m", [1, 7, 577, 2881])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_cutlass(dims, m, dtype, monkeypatch):
    """LLAVA_FAST_PROJECTOR_KERNEL=cutlass: the CUTLASS GELU forward and dGELU backward GEMMs (both ran: no
    fallback) against the fp32 reference, flash-attn rule, every model shape."""
    import warnings

    from llava_fast.ops import projector as P

    _require_cutlass()
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_KERNEL", "cutlass")
    runs = P._cutlass_runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns: make it fail here
        _flash_rule_case(m, dims, dtype, bias=True, x_grad=True)
    assert P._cutlass_runs == runs + 2


@pytest.mark.cuda
@pytest.mark.parametrize("sched", ["pingpong", "cooperative"])
@pytest.mark.parametrize("m,bias", [(577, False), (2881, True)])
def test_cuda_cutlass_schedules_and_inference(sched, m, bias, monkeypatch):
    import warnings

    from llava_fast.ops import projector as P

    _require_cutlass()
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_KERNEL", "cutlass")
    monkeypatch.setenv("LLAVA_FAST_PROJECTOR_CUTLASS_SCHED", sched)
    runs = P._cutlass_runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _flash_rule_case(m, (1024, 4096), torch.bfloat16, bias=bias, x_grad=False)
        x, params, _ = make_inputs(m, 1152, 896, bias, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            y, h = projector_fwd(x, *params, save_h=False)
            ref32 = projector_ref(x.float(), *[p.float() if p is not None else None for p in params])
            same = projector_ref(x, *params)
    assert h.numel() == 0
    assert_flash_rule(y, ref32, same, f"out (inference, {sched})")
    assert P._cutlass_runs == runs + 3


@pytest.mark.cuda
@pytest.mark.parametrize("dims", [(1024, 4096), (1152, 896)])
@pytest.mark.parametrize("m", [1, 577, 2881])
@pytest.mark.parametrize("x_grad", [True, False])
def test_cuda_no_bias_and_frozen_input(dims, m, x_grad):
    _flash_rule_case(m, dims, torch.bfloat16, bias=False, x_grad=x_grad)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [7, 2881])
def test_cuda_tanh(m):
    _flash_rule_case(m, (1024, 4096), torch.bfloat16, bias=True, x_grad=True, approximate="tanh")


@pytest.mark.cuda
def test_cuda_fp32_ieee():
    dv, dt, m = 1152, 896, 577
    x, params, dy = make_inputs(m, dv, dt, True, device="cuda")
    ours = run_with_grads(fused("none"), x, params, dy, True)
    ref64 = run_with_grads(projector_ref, x.double(), [p.double() for p in params], dy.double(), True)
    ref32 = run_with_grads(projector_ref, x, params, dy, True)
    # atol: 4 fp32 ulp at the output's magnitude (see check_all): fp32 products are exact-IEEE in both.
    check_all(ours, ref64, ref32, True, True, atol_ulps=4)


@pytest.mark.cuda
@pytest.mark.parametrize("gemm2", ["cublas", "triton"])
def test_cuda_inference_and_gemm2_option(gemm2):
    from llava_fast.ops import projector as P

    x, params, _ = make_inputs(2881, 1024, 4096, True, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        y, h = projector_fwd(x, *params, save_h=False, gemm2=gemm2)
        ref32 = projector_ref(x.float(), *[p.float() for p in params])
        same = projector_ref(x, *params)
    assert h.numel() == 0
    assert_flash_rule(y, ref32, same, f"out ({gemm2})")
    assert P._GEMM2_IMPL in ("cublas", "triton")


@pytest.mark.cuda
@pytest.mark.parametrize("m", [577, 2881])
def test_cuda_module_compile_inductor(m):
    backend.set_backend("projector", "triton")  # "auto" is cuBLAS eager on CUDA (backend.AUTO_REFERENCE)
    torch._dynamo.reset()
    hf = hf_projector(1024, 4096, True, "gelu").cuda().bfloat16()
    ours = Projector(1024, 4096).cuda().bfloat16()
    ours.load_state_dict(hf.state_dict())
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc = compiled(xc)
    yc.backward(dy)
    ye = ours(xe)
    ye.backward(dy)
    assert max_err(yc, ye) == 0 and max_err(xc.grad, xe.grad) == 0  # same kernels, compiled or not
    hf32 = hf_projector(1024, 4096, True, "gelu").cuda()
    hf32.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
    x32 = x.float().requires_grad_()
    y32 = hf32(x32)
    y32.backward(dy.float())
    xh = x.clone().requires_grad_()
    yh = hf(xh)
    yh.backward(dy)
    assert_flash_rule(yc, y32, yh, "out (compiled)")
    assert_flash_rule(xc.grad, x32.grad, xh.grad, "dx (compiled)")
