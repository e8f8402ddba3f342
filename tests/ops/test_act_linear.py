"""act_linear: linear(act(*hs)) with the activation recomputed in the backward. Gradients equal to the plain path's
(fp32 to GEMM rounding, bf16 by the flash-attn rule against an fp64 reference), what it saves (counted with
saved-tensor hooks: the activation's output is not kept), the fallbacks (no grad, autocast, the switch), and
torch.compile."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llava_fast.models.layers import get_activation
from llava_fast.ops.act_linear import act_linear, act_linear_ref
from llava_fast.ops.swiglu import swiglu

GELU_TANH = get_activation("gelu_pytorch_tanh")
QUICK_GELU = get_activation("quick_gelu")


def _gated(g, u):
    return F.silu(g) * u


ACTS = {"gelu_tanh": (GELU_TANH, 1), "quick_gelu": (QUICK_GELU, 1), "silu_gate": (_gated, 2),
        "swiglu_op": (swiglu, 2)}


def _inputs(n_h, dtype, shape=(3, 7), f=40, d=24, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(*shape, f, generator=g).to(dtype).requires_grad_() for _ in range(n_h)]
    w = (torch.randn(d, f, generator=g) / f ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(d, generator=g).to(dtype).requires_grad_() if bias else None
    return hs, w, b


def _grads(fn, hs, w, b, dy):
    y = fn(hs, w, b)
    leaves = [*hs, w] + ([b] if b is not None else [])
    return [y] + list(torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_plain_path_fp32(name, bias):
    act, n_h = ACTS[name]
    hs, w, b = _inputs(n_h, torch.float32, bias=bias)
    dy = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    ours = _grads(lambda h, ww, bb: act_linear(act, h, ww, bb), hs, w, b, dy)
    ref = _grads(lambda h, ww, bb: act_linear_ref(act, h, ww, bb), hs, w, b, dy)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gelu_tanh", "silu_gate"])
def test_bf16_error_within_twice_torch(name):
    """flash-attn's rule: our bf16 error against an fp64 reference at most twice that of the plain bf16 path."""
    act, n_h = ACTS[name]
    hs, w, b = _inputs(n_h, torch.bfloat16, shape=(5, 33), f=96, d=48, seed=3)
    dy = torch.randn(5, 33, 48, generator=torch.Generator().manual_seed(4)).bfloat16()
    ours = _grads(lambda h, ww, bb: act_linear(act, h, ww, bb), hs, w, b, dy)
    low = _grads(lambda h, ww, bb: act_linear_ref(act, h, ww, bb), hs, w, b, dy)
    h64 = [h.detach().double().requires_grad_() for h in hs]
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = _grads(lambda h, ww, bb: act_linear_ref(act, h, ww, bb), h64, w64, b64, dy.double())
    for name_, o, lo, r in zip(["y"] + [f"h{i}" for i in range(n_h)] + ["w", "b"], ours, low, ref):
        err = (o.double() - r).abs().max().item()
        base = (lo.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-6 * r.abs().max().item(), (name_, err, base)


def _saved_bytes(fn, exclude=()):
    """Bytes of the tensors autograd saves while running fn(), except those sharing storage with ``exclude`` (the
    parameters: saving them allocates nothing)."""
    total = []
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return sum(total), y


@pytest.mark.parametrize("name", ["gelu_tanh", "silu_gate", "swiglu_op"])
def test_activation_output_not_saved(name):
    """The plain path keeps act(*hs) for the weight gradient; ours keeps hs and the weight only: the difference is
    exactly one activation-sized tensor (mutation check: saving `a` in forward makes this fail)."""
    act, n_h = ACTS[name]
    hs, w, b = _inputs(n_h, torch.float32, shape=(4, 50), f=64, d=32)
    plain, _ = _saved_bytes(lambda: act_linear_ref(act, hs, w, b))
    ours, y = _saved_bytes(lambda: act_linear(act, hs, w, b))
    act_bytes = hs[0].numel() * hs[0].element_size()
    w_bytes = w.numel() * w.element_size()
    # ours: hs + weight; plain: the activation's own saved inputs (hs, plus its intermediates) + act output + weight
    assert ours == n_h * act_bytes + w_bytes, (ours, n_h, act_bytes, w_bytes)
    assert plain - ours >= act_bytes, (plain, ours, act_bytes)
    y.sum().backward()  # the recomputing backward runs from the saved tensors


def test_fallbacks(monkeypatch):
    hs, w, b = _inputs(1, torch.float32)
    with torch.no_grad():
        assert act_linear(GELU_TANH, hs, w, b).grad_fn is None
    y = act_linear(GELU_TANH, hs, w, b)
    assert type(y.grad_fn).__name__.startswith("ActLinearFunction")
    monkeypatch.delenv("LLAVA_FAST_RECOMPUTE_ACT", raising=False)   # default "llm" (session 18): vision keeps
    assert not type(act_linear(GELU_TANH, hs, w, b, part="vision").grad_fn).__name__.startswith("ActLinearFunction")
    monkeypatch.setenv("LLAVA_FAST_RECOMPUTE_ACT", "0")
    assert not type(act_linear(GELU_TANH, hs, w, b).grad_fn).__name__.startswith("ActLinearFunction")
    monkeypatch.setenv("LLAVA_FAST_RECOMPUTE_ACT", "llm")   # the language model recomputes, the vision towers keep
    assert type(act_linear(GELU_TANH, hs, w, b).grad_fn).__name__.startswith("ActLinearFunction")
    assert not type(act_linear(GELU_TANH, hs, w, b, part="vision").grad_fn).__name__.startswith("ActLinearFunction")
    monkeypatch.setenv("LLAVA_FAST_RECOMPUTE_ACT", "1")
    assert type(act_linear(GELU_TANH, hs, w, b, part="vision").grad_fn).__name__.startswith("ActLinearFunction")
    monkeypatch.setenv("LLAVA_FAST_RECOMPUTE_ACT", "yes")
    with pytest.raises(ValueError, match="LLAVA_FAST_RECOMPUTE_ACT='yes': must be one of"):
        act_linear(GELU_TANH, hs, w, b)


def test_recompute_in_the_language_model_only(monkeypatch, tmp_path):
    """LLAVA_FAST_RECOMPUTE_ACT=llm on a whole OneVision model (SigLIP tower trained, fp32 CPU): the vision tower's
    act_linears keep their activations (autograd path: no ActLinearFunction from models/vision.py), the language
    model's still recompute, and the loss and every gradient equal the default run's (recomputing everywhere)."""
    import sys

    import llava_fast
    from llava_fast.ops import act_linear as al

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from test_model_kernels import packed_inputs
    from tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava_onevision")
    kw = packed_inputs("llava_onevision")
    callers = []
    real = al.ActLinearFunction.apply

    def spy(*args):  # the first caller outside ops/act_linear.py: the model file
        f = sys._getframe(1)
        while Path(f.f_code.co_filename).name == "act_linear.py":
            f = f.f_back
        callers.append(Path(f.f_code.co_filename).name)
        return real(*args)
    monkeypatch.setattr(al.ActLinearFunction, "apply", spy)
    runs = {}
    for value in ("1", "llm"):
        monkeypatch.setenv("LLAVA_FAST_RECOMPUTE_ACT", value)
        callers.clear()
        m = llava_fast.from_pretrained(path)
        loss = m(**kw).loss
        loss.backward()
        runs[value] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None},
                       sorted(set(callers)))
    assert runs["1"][2] == ["language.py", "vision.py"], runs["1"][2]
    assert runs["llm"][2] == ["language.py"], runs["llm"][2]
    torch.testing.assert_close(runs["llm"][0], runs["1"][0], rtol=0, atol=1e-6)
    assert runs["llm"][1].keys() == runs["1"][1].keys() and any("vision_tower" in n for n in runs["1"][1])
    for n, g in runs["1"][1].items():
        torch.testing.assert_close(runs["llm"][1][n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["gelu_tanh", "swiglu_op"])
def test_autocast_fp32_master_weights(name):
    """The trainer's setting: fp32 weights under bf16 autocast. The backward runs in the forward's autocast state:
    gradients in the weights' dtype (fp32) within bf16 rounding of the plain autocast path's, and the activation
    still not kept."""
    act, n_h = ACTS[name]
    hs, w, b = _inputs(n_h, torch.float32, shape=(4, 30), f=64, d=32, seed=5)
    dy = torch.randn(4, 30, 32, generator=torch.Generator().manual_seed(6))

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h_bf = [h.bfloat16() for h in hs]  # what an autocast fc1 hands over
            y = fn(act, h_bf, w, b)
        return [y] + list(torch.autograd.grad(y, [*hs, w, b], dy))

    ours, ref = run(act_linear), run(act_linear_ref)
    assert ours[0].dtype == ref[0].dtype == torch.bfloat16
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.dtype == r.dtype, (i, o.dtype, r.dtype)
        torch.testing.assert_close(o.float(), r.float(), atol=3e-2, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_bf = [h.bfloat16() for h in hs]
        plain, _ = _saved_bytes(lambda: act_linear_ref(act, h_bf, w, b), exclude=(w, b))
        mine, _ = _saved_bytes(lambda: act_linear(act, h_bf, w, b), exclude=(w, b))
    # ours: the activation inputs only; plain: those (and the activation's intermediates), its output, and the
    # bf16 copy of the weight that autocast made for the GEMM
    assert mine == n_h * h_bf[0].numel() * 2, mine
    assert plain - mine >= h_bf[0].numel() * 2 + w.numel() * 2, (plain, mine)


def test_only_some_inputs_need_grad():
    """Frozen weights (stage 1's frozen towers pass activation gradients only) and frozen activations."""
    hs, w, b = _inputs(2, torch.float32)
    w.requires_grad_(False)
    b.requires_grad_(False)
    dy = torch.randn(3, 7, 24)
    y = act_linear(_gated, hs, w, b)
    got = torch.autograd.grad(y, hs, dy)
    want = torch.autograd.grad(act_linear_ref(_gated, hs, w, b), hs, dy)
    for x, r in zip(got, want):
        torch.testing.assert_close(x, r)
    h2 = [h.detach() for h in hs]
    w.requires_grad_(True)
    (dw,) = torch.autograd.grad(act_linear(_gated, h2, w, b), [w], dy)
    torch.testing.assert_close(dw, torch.autograd.grad(act_linear_ref(_gated, h2, w, b), [w], dy)[0])


def test_torch_compile_traces():
    """Under torch.compile the plain expression is traced (fullgraph, no break); AOTAutograd's partitioner decides
    what to recompute."""
    hs, w, b = _inputs(1, torch.float32)
    fn = torch.compile(lambda h, ww, bb: act_linear(GELU_TANH, [h], ww, bb), backend="aot_eager", fullgraph=True)
    y = fn(hs[0], w, b)
    ref = act_linear_ref(GELU_TANH, hs, w, b)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert hs[0].grad is not None and w.grad is not None


def test_act_linears_norm_shared_by_three_outputs():
    """q, k, v from one LayerNorm (act_linears): outputs and every gradient (x, the norm's weight and bias, the three
    weights and biases) equal to the plain path; the normalized input is not kept; an unused output is fine."""
    from llava_fast.ops.act_linear import act_linears, act_linears_ref

    g = torch.Generator().manual_seed(7)
    d = 24
    x = torch.randn(2, 9, d, generator=g).requires_grad_()
    nw, nb = (torch.randn(d, generator=g).requires_grad_() for _ in range(2))
    ws = [(torch.randn(n, d, generator=g) / d ** 0.5).requires_grad_() for n in (24, 8, 8)]
    bs = [torch.randn(n, generator=g).requires_grad_() for n in (24, 8, 8)]

    def ln(h, w, b):
        return F.layer_norm(h, (d,), w, b, 1e-6)

    leaves = [x, nw, nb, *ws, *bs]
    for used in ((0, 1, 2), (0, 2)):
        outs = act_linears(ln, (x, nw, nb), ws, bs)
        refs = act_linears_ref(ln, (x, nw, nb), ws, bs)
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r)
        dys = [torch.randn(o.shape, generator=g) for o in outs]
        got = torch.autograd.grad([outs[i] for i in used], leaves, [dys[i] for i in used], allow_unused=True)
        want = torch.autograd.grad([refs[i] for i in used], leaves, [dys[i] for i in used], allow_unused=True)
        for i, (a, b) in enumerate(zip(got, want)):
            if b is None:
                assert a is None or a.abs().max() == 0, i
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mine, _ = _saved_bytes(lambda: act_linears(ln, (x, nw, nb), ws, bs), exclude=(nw, nb, *ws, *bs))
    assert mine == x.numel() * 4, mine   # x only: not the normalized x
    with pytest.raises(ValueError, match="one bias"):
        act_linears(ln, (x, nw, nb), ws, bs[:2])


def test_double_backward_is_refused():
    hs, w, b = _inputs(1, torch.float32)
    y = act_linear(GELU_TANH, hs, w, b)
    (g,) = torch.autograd.grad(y.sum(), hs, create_graph=True)
    with pytest.raises(RuntimeError, match="act_linear: double backward"):
        torch.autograd.grad(g.sum(), w)
    # and through a gradient w.r.t. the input (once_differentiable let this one through: a wrong answer in silence)
    y = act_linear(GELU_TANH, hs, w, b)
    (g,) = torch.autograd.grad(y.pow(2).sum(), hs, create_graph=True)
    with pytest.raises(RuntimeError, match="act_linear: double backward"):
        torch.autograd.grad(g.pow(2).sum(), w)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_llm_mlp_block_with_kernels(dtype):
    """On the GPU with our RMSNorm and SwiGLU kernels inside the recomputation (the language model's MLP block:
    gate/up over a recomputed RMSNorm, down over a recomputed SwiGLU): output and every gradient by flash-attn's rule
    against fp32, compared with the plain path in the same dtype."""
    from llava_fast.ops.act_linear import act_linears
    from llava_fast.ops.rms_norm import rms_norm
    from utils import assert_flash_rule

    g = torch.Generator().manual_seed(11)
    t, d, f = 777, 256, 688
    x0 = torch.randn(t, d, generator=g)
    nw0 = 1 + 0.1 * torch.randn(d, generator=g)
    ws0 = [torch.randn(f, d, generator=g) / d ** 0.5 for _ in range(2)] + [torch.randn(d, f, generator=g) / f ** 0.5]
    dy = torch.randn(t, d, generator=g).cuda()

    def block(x, nw, wg, wu, wd, recompute, eps=1e-6):
        def norm(h, w):
            return rms_norm(h, w, eps)
        if recompute:
            gg, uu = act_linears(norm, (x, nw), [wg, wu], [None, None])
            return act_linear(swiglu, (gg, uu), wd, None)
        h = norm(x, nw)
        return F.linear(swiglu(F.linear(h, wg), F.linear(h, wu)), wd)

    def run(dt, recompute):
        leaves = [t_.cuda().to(dt).requires_grad_() for t_ in (x0, nw0, *ws0)]
        y = block(*leaves, recompute=recompute)
        return [y] + list(torch.autograd.grad(y, leaves, dy.to(dt)))

    ours, low, ref = run(dtype, True), run(dtype, False), run(torch.float32, False)
    for name, o, lo, r in zip(["y", "dx", "dnorm_w", "dwg", "dwu", "dwd"], ours, low, ref):
        assert_flash_rule(o, r, lo, name=name)


# -- activations with their own backward (ExplicitAct): the same bits as the nested-autograd path --------------------
def _explicit_cases():
    from llava_fast.ops.act_linear import GeluAct, LayerNormAct
    from llava_fast.ops.rms_norm import RMSNormAct
    from llava_fast.ops.swiglu import SwiGLUAct

    d = 24
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, d, generator=g)
    return {
        "gelu": (GeluAct("none"), [x]),
        "gelu_tanh": (GeluAct("tanh"), [x]),
        "layer_norm": (LayerNormAct((d,), 1e-6), [x, torch.randn(d, generator=g), torch.randn(d, generator=g)]),
        "rms_norm": (RMSNormAct(1e-6), [x, torch.randn(d, generator=g)]),
        "swiglu": (SwiGLUAct(), [x, torch.randn(2, 9, d, generator=g)]),
    }


@pytest.fixture
def kernels_forced():
    import llava_fast

    for op in ("rms_norm", "swiglu"):
        llava_fast.set_backend(op, "triton")
    yield
    llava_fast.set_backend("all", "auto")


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "layer_norm", "rms_norm", "swiglu"])
@pytest.mark.parametrize("need", ["all", "first", "rest"])
def test_explicit_backward_same_bits(name, need, kernels_forced, monkeypatch):
    """An ExplicitAct's direct backward gives the bits of the nested-autograd path (the same act behind a lambda) for
    every input gradient, the weights' too, with some inputs frozen; and it never calls torch.autograd.grad."""
    from llava_fast.ops import act_linear as al

    act, hs0 = _explicit_cases()[name]
    g = torch.Generator().manual_seed(12)
    ws = [(torch.randn(n, 24, generator=g) / 5).requires_grad_() for n in (24, 8)]
    bs = [torch.randn(n, generator=g).requires_grad_() for n in (24, 8)]
    req = [need in ("all", "first") if i == 0 else need in ("all", "rest") for i in range(len(hs0))]
    if not any(req):
        req[0] = True
    dys = [torch.randn(2, 9, n, generator=g) for n in (24, 8)]

    def run(a):
        hs = [h.clone().requires_grad_(r) for h, r in zip(hs0, req)]
        outs = al.act_linears(a, hs, ws, bs)
        leaves = [h for h in hs if h.requires_grad] + ws + bs
        return list(outs) + list(torch.autograd.grad(outs, leaves, dys))

    want = run(lambda *h: act(*h))   # not an ExplicitAct: recomputed under enable_grad, nested autograd.grad

    def no_nested(*a, **k):
        raise AssertionError("the explicit backward called torch.autograd.grad")
    monkeypatch.setattr(al.torch.autograd, "grad", no_nested)
    try:
        hs = [h.clone().requires_grad_(r) for h, r in zip(hs0, req)]
        outs = al.act_linears(act, hs, ws, bs)
        leaves = [h for h in hs if h.requires_grad] + ws + bs
        for t in leaves:
            t.grad = None
        torch.autograd.backward(outs, dys)   # (torch.autograd.grad is the patched one)
        got = list(outs) + [t.grad for t in leaves]
    finally:
        monkeypatch.undo()
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), (name, i, (a - b).abs().max())


def test_explicit_acts_are_used_by_the_models(kernels_forced):
    """The models hand act_linear ExplicitActs: the GELUs, the vision LayerNorm, and (kernels on) RMSNorm and SwiGLU;
    the RMSNorm act stays the reference lambda when the kernel is off."""
    import llava_fast
    from llava_fast.models.layers import RMSNorm, get_activation
    from llava_fast.ops.act_linear import ExplicitAct

    for name in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        assert isinstance(get_activation(name), ExplicitAct), name
    assert isinstance(RMSNorm(8).functional(), ExplicitAct)
    llava_fast.set_backend("rms_norm", "reference")
    assert not isinstance(RMSNorm(8).functional(), ExplicitAct)


def test_explicit_layer_norm_under_autocast_takes_autograd_path():
    """LayerNorm runs in fp32 under autocast: its ExplicitAct defers to the autograd path there (same bits as the
    act behind a lambda)."""
    from llava_fast.ops.act_linear import LayerNormAct, act_linears

    act, hs0 = _explicit_cases()["layer_norm"]
    w = (torch.randn(8, 24) / 5).requires_grad_()

    def run(a):
        hs = [h.bfloat16().requires_grad_() for h in hs0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (y,) = act_linears(a, hs, [w], [None])
            assert not isinstance(a, LayerNormAct) or not a.usable(hs)
        return [y] + list(torch.autograd.grad(y, hs + [w], torch.ones_like(y)))

    for a, b in zip(run(act), run(lambda *h: act(*h))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "layer_norm", "rms_norm", "swiglu"])
def test_frozen_linears_skip_the_recomputation(name, kernels_forced):
    """Frozen linears (no weight or bias gradient, as stage 1's language model): a pointwise act (GELU, SwiGLU) is
    not recomputed in the backward, since only the weight gradients read it; a norm still is (its gradient needs the
    recomputed statistics). The input gradients keep the bits of the nested-autograd path."""
    from llava_fast.ops import act_linear as al

    act, hs0 = _explicit_cases()[name]
    g = torch.Generator().manual_seed(13)
    ws = [torch.randn(n, 24, generator=g) / 5 for n in (24, 8)]
    bs = [torch.randn(n, generator=g) for n in (24, 8)]
    dys = [torch.randn(2, 9, n, generator=g) for n in (24, 8)]

    def run(a):
        hs = [h.clone().requires_grad_() for h in hs0]
        outs = al.act_linears(a, hs, ws, bs)
        return list(outs) + list(torch.autograd.grad(outs, hs, dys))

    want = run(lambda *h: act(*h))
    calls = []
    real = type(act).recompute

    def counting(self, *hs):
        calls.append(1)
        return real(self, *hs)
    type(act).recompute, saved = counting, real
    try:
        got = run(act)
    finally:
        type(act).recompute = saved
    assert len(calls) == (0 if act.pointwise else 1)
    assert act.pointwise == (name in ("gelu", "gelu_tanh", "swiglu"))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), (name, i, (a - b).abs().max())


def test_input_gradients_accumulate_in_place():
    """The q/k/v (gate/up) input gradients are summed by in-place ``addmm_`` into the first GEMM's output: the
    out-of-place ``torch.addmm(da, ...)`` copied ``da`` into a fresh output first (a device-to-device memcpy per
    extra linear, 3 per decoder layer in the stage-1 profile). Frozen linears, as in stage 1."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llava_fast.ops.act_linear import LayerNormAct, act_linears

    g = torch.Generator().manual_seed(3)
    d = 16
    x = torch.randn(5, d, generator=g).requires_grad_()
    nw, nb = torch.ones(d), torch.zeros(d)
    ws = [torch.randn(n, d, generator=g) for n in (16, 8, 8)]
    outs = act_linears(LayerNormAct((d,), 1e-6), (x, nw, nb), ws, [None] * 3)
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    dys = [torch.randn(o.shape, generator=g) for o in outs]
    with Ops():
        (dx,) = torch.autograd.grad(outs, [x], dys)
    assert seen.count("aten.addmm_.default") == 2 and "aten.addmm.default" not in seen, seen
    want = torch.autograd.grad(act_linears_ref_ln(x, d, ws), [x], dys)[0]
    torch.testing.assert_close(dx, want, atol=1e-5, rtol=1e-5)


def act_linears_ref_ln(x, d, ws):
    from llava_fast.ops.act_linear import act_linears_ref

    return act_linears_ref(lambda h: F.layer_norm(h, (d,), None, None, 1e-6), (x,), ws, [None] * 3)
