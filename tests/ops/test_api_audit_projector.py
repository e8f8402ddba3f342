"""API audit of the fused projector (``linear -> GELU -> linear``): ``llava_fast.ops.projector.projector`` on its
reference path (plain PyTorch, the CPU path) and on its Triton path (forced; the interpreter on CPU), the
``Projector`` module and the model's ``MultiModalProjector``, on the inputs and autograd situations
tests/ops/test_projector.py does not cover.

Defects fixed (each test in the first section fails without its fix):

* double backward: ``ProjectorFunction``'s backward was not marked non-differentiable, so the gradients of a
  ``create_graph=True`` backward silently acted as constants in the second-order terms (a Hessian-vector product
  w.r.t. w1 was off by ~80%, by ``backward()`` and by ``autograd.grad`` alike). Now differentiating them raises;
* arguments that are not tensors (a list, a numpy array; None for w1 / w2) failed with an AttributeError
  (``'list' object has no attribute 'dim'``) or a ValueError saying ``b2.dtype float32 != x.dtype torch.float32``;
  now a TypeError names the argument;
* under autocast every argument was cast to the autocast dtype, float64, integer and complex ones included: a
  float64 (or int, or complex) call silently ran in bf16, where ``nn.Linear`` leaves float64 alone (and refuses
  the others). Now only what autocast casts is cast, and the rest meets the dtype check;
* meta tensors (shape inference) failed with ``unknown device type for autocast``; now they take the reference path;
* a zero-width hidden or output layer (``nn.Linear(d, 0)``) failed in a ``reshape(-1, 0)`` (reference path and
  ``ProjectorFunction``'s backward); now it is computed;
* an in-place change of x after the fused forward was caught with a misleading message ("A view was created in
  no_grad mode ... modified inplace with grad mode enabled", for a change made under no_grad): the saved tensor was
  a view of x made inside the forward. x itself is saved now, and the usual version-counter error is raised;
* the ``Projector`` module (the HF drop-in) never called ``self.act``: a hook on it was skipped and a replaced
  activation (or a changed ``act.approximate``) was silently ignored, on every path. The model's
  ``MultiModalProjector`` likewise ignored a replaced ``self.act`` on the fused path. Both now fuse only when the
  activation is the GELU they were built with, and call the modules otherwise.

* the reference path's backward (``act_linear``, ``once_differentiable``) let ``torch.autograd.grad(grads,
  inputs)`` silently drop second-order terms (``once_differentiable`` hangs its error node off detached leaves):
  ``ActLinearFunction`` now refuses through the shared ``_ext.not_differentiable_again``, as the fused path does.
"""
import numpy as np
import pytest
import torch
from torch import nn

import llava_fast
from llava_fast.models.llava import MultiModalProjector
from llava_fast.modules import projector as projector_module
from llava_fast.modules.projector import Projector
from llava_fast.ops import projector as P
from llava_fast.ops.projector import ProjectorFunction, projector, projector_ref
from tests.ops.audit_common import kdev  # noqa: F401 (a fixture)
from tests.utils import assert_flash_rule

DV, DT = 40, 48  # 40: not a multiple of the 32-wide K tile; 48: not of the 64-wide N tile
PATHS = ["reference", "triton"]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    llava_fast.set_backend("all", "auto")


def _weights(dv=DV, dt=DT, n2=DT, bias=True, requires_grad=True):
    """Weights scaled like a trained projector (~ 1 / sqrt(fan_in))."""
    w1 = torch.randn(dt, dv) / dv ** 0.5
    w2 = torch.randn(n2, dt) / max(dt, 1) ** 0.5
    b1 = torch.randn(dt) * 0.1 if bias else None
    b2 = torch.randn(n2) * 0.1 if bias else None
    return [t.requires_grad_(requires_grad) if t is not None else None for t in (w1, b1, w2, b2)]


def _grads(y, leaves, dy=None):
    dy = torch.randn(y.shape, dtype=y.dtype) if dy is None else dy
    want = [t for t in leaves if t is not None and t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, want, dy)] if want else [y.detach()]


# ============================================================================================== fixed defects
def test_double_backward_is_refused(forced, kdev):
    """create_graph=True on the fused path: the first-order gradients are right, and differentiating them raises
    (w.r.t. a weight, w.r.t. x with a constant output gradient, and through backward()) instead of treating them
    as constants."""
    forced("projector")
    x = torch.randn(5, DV, requires_grad=True)
    w1, b1, w2, b2 = _weights()
    y = projector(x, w1, b1, w2, b2)
    dx, dw1 = torch.autograd.grad(y.pow(2).sum(), (x, w1), create_graph=True)
    yr = projector_ref(x, w1, b1, w2, b2)
    rdx, rdw1 = torch.autograd.grad(yr.pow(2).sum(), (x, w1))
    torch.testing.assert_close(dx.detach(), rdx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw1.detach(), rdw1, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dx.pow(2).sum(), w1)
    y = projector(x, w1, b1, w2, b2)
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)  # the output gradient is a constant here
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dx.pow(2).sum(), x)
    y = projector(x, w1, b1, w2, b2)
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (y.sum() + dx.pow(2).sum()).backward()


def test_create_graph_first_order_only_still_works(forced, kdev):
    """create_graph=True whose gradients are only read (not differentiated): no error, the right values, and the
    frozen arguments get no gradient."""
    forced("projector")
    x = torch.randn(2, 3, DV)
    w1, b1, w2, b2 = _weights()
    w2.requires_grad_(False)
    y = projector(x, w1, b1, w2, b2)
    g = torch.autograd.grad(y.pow(2).sum(), (w1, b1, b2), create_graph=True)
    r = torch.autograd.grad(projector_ref(x, w1, b1, w2, b2).pow(2).sum(), (w1, b1, b2))
    for a, b in zip(g, r):
        torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=1e-5)


def test_double_backward_reference_path_is_refused(kdev):
    x = torch.randn(5, DV, requires_grad=True)
    w1, b1, w2, b2 = _weights()
    y = projector(x, w1, b1, w2, b2)  # "auto": the reference path (CPU; on CUDA, backend.AUTO_REFERENCE)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="act_linear: double backward"):
        torch.autograd.grad(dx.pow(2).sum(), w1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arg,bad", [("x", "list"), ("w1", "list"), ("w2", None), ("b1", "list"),
                                     ("b2", "ndarray")])
def test_non_tensor_arguments_raise_type_error(arg, bad, path):
    llava_fast.set_backend("projector", path)
    args = dict(zip(("x", "w1", "b1", "w2", "b2"), [torch.randn(3, DV), *_weights(requires_grad=False)]))
    t = args[arg]
    args[arg] = None if bad is None else (t.tolist() if bad == "list" else t.numpy())
    assert bad is None or isinstance(args[arg], (list, np.ndarray))
    with pytest.raises(TypeError, match=rf"projector: {arg} must be a torch.Tensor"):
        projector(**args)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.complex64])
def test_autocast_does_not_cast_float64_int_complex(dtype, path, kdev):
    """autocast casts fp16 / bf16 / fp32 only (nn.Linear in float64 under autocast stays float64): such calls meet
    the dtype check instead of running in bf16."""
    llava_fast.set_backend("projector", path)
    x = torch.randn(3, DV).to(dtype)
    params = [p.detach().to(dtype) for p in _weights()]
    with torch.autocast(kdev, dtype=torch.bfloat16):
        if dtype == torch.float64:
            assert nn.functional.linear(x, params[0], params[1]).dtype == torch.float64
        with pytest.raises(ValueError, match="x.dtype must be float16, bfloat16 or float32"):
            projector(x, *params)


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_meta_tensors(path):
    """Shape inference on the meta device: the output and the gradients have the right shapes, on any backend."""
    llava_fast.set_backend("projector", path)
    with torch.device("meta"):
        x = torch.randn(2, 3, DV, requires_grad=True)
        w1, b1, w2, b2 = _weights(n2=24)
    y = projector(x, w1, b1, w2, b2, "tanh")
    assert y.device.type == "meta" and y.shape == (2, 3, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and b2.grad.shape == b2.shape


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dt,n2", [(0, DT), (DT, 0)])
def test_zero_width_layers(dt, n2, path, kdev):
    llava_fast.set_backend("projector", path)
    x = torch.randn(2, 3, DV, requires_grad=True)
    params = _weights(dt=dt, n2=n2)
    dy = torch.randn(2, 3, n2)
    got = _grads(projector(x, *params), [x, *params], dy)
    want = _grads(projector_ref(x, *params), [x, *params], dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_projector_function_zero_width_output(kdev):
    """ProjectorFunction (public) with N2 = 0: its backward flattened dy with reshape(-1, 0)."""
    x = torch.randn(2, 3, DV, requires_grad=True)
    params = _weights(n2=0)
    dy = torch.randn(2, 3, 0)
    got = _grads(ProjectorFunction.apply(x, *params, "none"), [x, *params], dy)
    want = _grads(projector_ref(x, *params), [x, *params], dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _TimesTwoGELU(nn.GELU):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("path", ["auto", "triton"])
@pytest.mark.parametrize("case", ["plain", "hook", "replaced", "approximate_changed", "subclass"])
def test_projector_module_calls_its_activation(case, path, monkeypatch, kdev):
    """What ``Projector.forward`` computes is ``linear_2(act(linear_1(x)))`` with the module's current ``act``:
    hooked, replaced or subclassed, it is called (not the fused op); a plain GELU is fused with its own
    ``approximate`` (also after a change)."""
    llava_fast.set_backend("projector", path)
    calls = []
    monkeypatch.setattr(projector_module, "projector", lambda *a, **k: calls.append(1) or projector(*a, **k))
    m = Projector(DV, DT)
    fired = []
    if case == "hook":
        m.act.register_forward_hook(lambda mod, i, o: fired.append(1) or o * 3)
    elif case == "replaced":
        m.act = nn.ReLU()
    elif case == "approximate_changed":
        m.act.approximate = "tanh"
    elif case == "subclass":
        m.act = _TimesTwoGELU()
    x = torch.randn(2, 3, DV)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y = m(xs[0])
    y_modules = m.linear_2(m.act(m.linear_1(xs[1])))
    fused = case in ("plain", "approximate_changed")
    assert calls == ([1] if fused else [])
    assert fired == ([1, 1] if case == "hook" else [])
    assert m.approximate == {"replaced": None, "approximate_changed": "tanh"}.get(case, "none")
    tol = {"atol": 1e-5, "rtol": 1e-5} if fused and path == "triton" else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(y, y_modules, **tol)
    dy = torch.randn(y.shape)
    torch.testing.assert_close(*(torch.autograd.grad(t, xi, dy)[0] for t, xi in ((y, xs[0]), (y_modules, xs[1]))),
                               **tol)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_model_projector_calls_a_replaced_activation(act, forced, monkeypatch, kdev):
    """MultiModalProjector on the fused path: fused while ``act`` is the config's GELU (tanh for gelu_new),
    the modules once ``act`` is replaced."""
    forced("projector")
    calls = []
    monkeypatch.setattr(P, "projector", lambda *a, **k: calls.append(k.get("approximate")) or projector(*a, **k))
    m = MultiModalProjector(DV, DT, act=act)
    x = torch.randn(2, 3, DV)
    torch.testing.assert_close(m(x), m.linear_2(m.act(m.linear_1(x))), atol=1e-5, rtol=1e-5)
    assert calls == ["none" if act == "gelu" else "tanh"]
    m.act = nn.ReLU()
    torch.testing.assert_close(m(x), m.linear_2(torch.relu(m.linear_1(x))), atol=0, rtol=0)
    assert len(calls) == 1


# ================================================================================ checked and found correct
LAYOUTS = ["1d", "3d", "4d", "m0", "m1", "x_transposed", "x_sliced", "x_expanded", "w_transposed", "w_sliced",
           "b1_none", "b2_none", "x_frozen", "w1_only", "b2_only", "w2_b1_only", "nothing", "tanh", "n2_ne_dt"]


def _layout_case(case, dtype):
    """(leaves, the call's arguments) for one case; the leaves are what gradients are taken for."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # fp64 runs: the same fp32 values
    shape = {"1d": (DV,), "4d": (2, 2, 2, DV), "m0": (0, DV), "m1": (1, DV)}.get(case, (2, 3, DV))
    n2 = 24 if case == "n2_ne_dt" else DT
    W1, W2 = r(DT, DV) / DV ** 0.5, r(n2, DT) / DT ** 0.5
    B1, B2 = r(DT) * 0.1, r(n2) * 0.1
    if case == "x_transposed":
        X = r(DV, 3, 2)
        x = lambda X: X.permute(2, 1, 0)
    elif case == "x_sliced":
        X = r(2, 3, 2 * DV)
        x = lambda X: X[..., 1::2]
    elif case == "x_expanded":
        X = r(DV)
        x = lambda X: X.expand(2, 3, DV)
    else:
        X = r(*shape)
        x = lambda X: X
    w1, w2 = (lambda W: W), (lambda W: W)
    if case == "w_transposed":
        W1, W2 = W1.t().contiguous(), W2.t().contiguous()
        w1, w2 = (lambda W: W.t()), (lambda W: W.t())
    elif case == "w_sliced":
        W1, W2 = torch.cat([W1, W1], 1), torch.cat([W2, W2], 0)
        w1, w2 = (lambda W: W[:, 1::2]), (lambda W: W[::2])
    req = {"x_frozen": (0, 1, 1, 1, 1), "w1_only": (0, 1, 0, 0, 0), "b2_only": (0, 0, 0, 0, 1),
           "w2_b1_only": (0, 0, 1, 1, 0), "nothing": (0, 0, 0, 0, 0)}.get(case, (1, 1, 1, 1, 1))
    leaves = [t.requires_grad_(bool(q)) for t, q in zip((X, W1, B1, W2, B2), req)]
    X, W1, B1, W2, B2 = leaves
    args = [x(X), w1(W1), None if case == "b1_none" else B1, w2(W2), None if case == "b2_none" else B2]
    return leaves, args, "tanh" if case == "tanh" else "none"


def _run_layout(case, fn, dtype):
    leaves, args, approximate = _layout_case(case, dtype)
    y = fn(*args, approximate=approximate)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    used = [t for t, a in zip(leaves, (1, 1, args[2] is not None, 1, args[4] is not None)) if a]
    return _grads(y, used, dy)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_and_partial_grads(case, path, kdev):
    """Any leading shape (1-D .. 4-D, M = 0, M = 1), transposed / sliced / expanded inputs and weights, missing
    biases, gradients for only some arguments: the reference path gives projector_ref's (plain autograd) bits; the
    kernel meets the flash-attn rule against fp64 (fp32 error at most twice PyTorch's, plus 4 fp32 ulp)."""
    llava_fast.set_backend("projector", path)
    got = _run_layout(case, projector, torch.float32)
    same = _run_layout(case, projector_ref, torch.float32)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in same]
    if path == "reference":
        for a, b in zip(got, same):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        return
    hi = _run_layout(case, projector_ref, torch.float64)
    for i, (a, b, c) in enumerate(zip(got, hi, same)):
        atol = 4 * EPS32 * (b.abs().max().item() if b.numel() else 0.0)
        assert_flash_rule(a, b, c, f"{case} item {i}", atol=atol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("target", ["x", "w1", "w2"])
def test_inplace_change_after_forward_is_detected(target, path, kdev):
    llava_fast.set_backend("projector", path)
    x = torch.randn(2, 3, DV, requires_grad=True)  # dx needs w1 (the reference path saves it for that only)
    w1, b1, w2, b2 = _weights()
    src = {"x": x, "w1": w1, "w2": w2}[target]
    view = src * 1  # a non-leaf (a leaf that requires grad cannot be changed in place)
    args = {"x": x, "w1": w1, "w2": w2, target: view}
    y = projector(args["x"], args["w1"], b1, args["w2"], b2)
    with torch.no_grad():
        view.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case,match", [
    ("b1_shape", "b1 must have shape"), ("w1_1d", "w1 and w2 must be 2-D"), ("w2_3d", "w1 and w2 must be 2-D"),
    ("b2_dtype", r"b2.dtype torch.float16 != x.dtype"), ("w2_device", "w2 is on meta but x is on"),
    ("bf16_weights", r"w1.dtype torch.bfloat16 != x.dtype torch.float32; cast the weights"),
    ("x_fp64", "x.dtype must be float16, bfloat16 or float32"), ("x_0d", "x must be a tensor of shape"),
    ("approximate_gelu", "approximate must be 'none'"), ("approximate_None", "approximate must be 'none'")])
def test_bad_arguments_name_the_argument(case, match, path, kdev):
    llava_fast.set_backend("projector", path)
    x = torch.randn(3, DV)
    w1, b1, w2, b2 = _weights(requires_grad=False)
    kw = {"approximate": "none"}
    if case == "b1_shape":
        b1 = b1[:-1]
    elif case == "w1_1d":
        w1 = w1[0]
    elif case == "w2_3d":
        w2 = w2[None]
    elif case == "b2_dtype":
        b2 = b2.half()
    elif case == "w2_device":
        w2 = w2.to("meta")
    elif case == "bf16_weights":
        w1, b1, w2, b2 = (t.bfloat16() for t in (w1, b1, w2, b2))
    elif case == "x_fp64":
        x, w1, b1, w2, b2 = (t.double() for t in (x, w1, b1, w2, b2))
    elif case == "x_0d":
        x = x[0, 0]
    else:
        kw["approximate"] = {"approximate_gelu": "gelu", "approximate_None": None}[case]
    with pytest.raises(ValueError, match=match):
        projector(x, w1, b1, w2, b2, **kw)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_autocast_reference_path_matches_modules_bits(approximate, kdev):
    """Under autocast (bf16, fp32 parameters) the reference path gives nn.Linear -> nn.GELU -> nn.Linear's output
    and gradients bit for bit, in their dtypes (fp32 parameter gradients)."""
    llava_fast.set_backend("projector", "reference")
    l1, l2, act = nn.Linear(DV, DT), nn.Linear(DT, DT), nn.GELU(approximate=approximate)
    x0, dy = torch.randn(2, 5, DV), torch.randn(2, 5, DT)

    def run(fn):
        for m in (l1, l2):
            m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast(kdev, dtype=torch.bfloat16):
            y = fn(x)
        y.backward(dy.to(y.dtype))
        return [y.detach(), x.grad, l1.weight.grad, l1.bias.grad, l2.weight.grad, l2.bias.grad]

    want = run(lambda x: l2(act(l1(x))))
    got = run(lambda x: projector(x, l1.weight, l1.bias, l2.weight, l2.bias, approximate))
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_autocast_kernel_flash_rule(approximate, forced, kdev):
    """Under autocast the kernel path (fp16 on the CPU interpreter, whose bf16 tl.dot is wrong, see test_attention;
    bf16 on a GPU): output and fp32 gradients within twice the error of the modules under the same autocast,
    against the modules in fp32 without it."""
    forced("projector")
    dtype = torch.float16 if kdev == "cpu" else torch.bfloat16
    l1, l2, act = nn.Linear(DV, DT), nn.Linear(DT, DT), nn.GELU(approximate=approximate)
    x0, dy = torch.randn(2, 5, DV), torch.randn(2, 5, DT)

    def run(fn, enabled=True):
        for m in (l1, l2):
            m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast(kdev, dtype=dtype, enabled=enabled):
            y = fn(x)
        y.backward(dy.to(y.dtype))
        return [y.detach(), x.grad, l1.weight.grad, l1.bias.grad, l2.weight.grad, l2.bias.grad]

    modules = lambda x: l2(act(l1(x)))
    got = run(lambda x: projector(x, l1.weight, l1.bias, l2.weight, l2.bias, approximate))
    same, ref32 = run(modules), run(modules, enabled=False)
    assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[1:])
    for name, a, b, c in zip(("out", "dx", "dw1", "db1", "dw2", "db2"), got, ref32, same):
        assert_flash_rule(a, b, c, name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(mode, path, kdev):
    llava_fast.set_backend("projector", path)
    x = torch.randn(2, 3, DV, requires_grad=True)
    params = _weights()
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        y = projector(x, *params, "tanh")
    assert not y.requires_grad and y.grad_fn is None
    assert y.is_inference() == (mode == "inference_mode")
    tol = {"atol": 0, "rtol": 0} if path == "reference" else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y, projector_ref(x, *params, "tanh").detach(), **tol)


@pytest.mark.parametrize("path", PATHS)
def test_compile_3d_partial_grads(path, kdev):
    """torch.compile (aot_eager, fullgraph) with a 3-D input, no b1, tanh GELU and w1 frozen: the eager path's
    output and gradients, bit for bit."""
    llava_fast.set_backend("projector", path)
    torch._dynamo.reset()
    fn = lambda x, w1, w2, b2: projector(x, w1, None, w2, b2, "tanh")
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x0 = torch.randn(2, 3, DV)
    w1, _, w2, b2 = _weights()
    w1.requires_grad_(False)
    dy = torch.randn(2, 3, DT)
    out = []
    for f in (compiled, fn):
        x = x0.clone().requires_grad_()
        out.append(_grads(f(x, w1, w2, b2), [x, w2, b2], dy))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _Shifted(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.5


@pytest.mark.parametrize("path", ["auto", "triton"])
@pytest.mark.parametrize("case", ["subclass_1", "subclass_2", "hook_1", "backward_hook_2"])
def test_projector_module_wrapped_linears_are_called(case, path, monkeypatch, kdev):
    """A LoRA-like linear (its own forward) or a hooked linear in the Projector module: the modules are called,
    not the fused op (whose weights alone would skip the adapter or hook)."""
    llava_fast.set_backend("projector", path)
    calls = []
    monkeypatch.setattr(projector_module, "projector", lambda *a, **k: calls.append(1) or projector(*a, **k))
    m = Projector(DV, DT)
    fired = []
    if case.startswith("subclass"):
        lin = m.linear_1 if case.endswith("1") else m.linear_2
        new = _Shifted(lin.in_features, lin.out_features)
        new.load_state_dict(lin.state_dict())
        setattr(m, "linear_1" if case.endswith("1") else "linear_2", new)
    elif case == "hook_1":
        m.linear_1.register_forward_hook(lambda mod, i, o: fired.append(1) or o + 1)
    else:
        m.linear_2.register_full_backward_hook(lambda mod, gi, go: fired.append(1))
    x = torch.randn(2, 3, DV, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert calls == []
    assert fired == ([1] if case in ("hook_1", "backward_hook_2") else [])
    with torch.no_grad():
        torch.testing.assert_close(y, m.linear_2(m.act(m.linear_1(x))), atol=0, rtol=0)
