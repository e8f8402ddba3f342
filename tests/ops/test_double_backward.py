"""Double backward (differentiating gradients computed with create_graph=True) through the memory-bound kernels and
the fused loss raises instead of treating the kernels' gradients as constants (a silently wrong second derivative):
RMSNorm (also with the residual), SwiGLU, RoPE, feature packing's scatter and the fused linear cross-entropy, each
with its Triton kernel forced (the interpreter on the CPU)."""
import pytest
import torch


@pytest.fixture
def kernels(forced):
    forced("rms_norm", "swiglu", "rope", "cross_entropy", "pack_features")


def _refused(first, wrt_first, second_wrt, what):
    """first() -> y; g = d(y.sum())/d(wrt_first) with create_graph; differentiating g must raise naming ``what``."""
    y = first()
    gs = torch.autograd.grad(y.pow(2).sum(), wrt_first, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{what}: double backward"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in gs), second_wrt)


def test_rms_norm(kernels):
    from llava_fast.ops.rms_norm import rms_norm

    x = torch.randn(5, 24, requires_grad=True)
    w = (1 + 0.1 * torch.randn(24)).requires_grad_()
    _refused(lambda: rms_norm(x, w), [x], [w], "rms_norm")
    r = torch.randn(5, 24, requires_grad=True)
    _refused(lambda: rms_norm(x, w, residual=r)[0], [r], [x], "rms_norm")


def test_swiglu(kernels):
    from llava_fast.ops.swiglu import swiglu

    g, u = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    _refused(lambda: swiglu(g, u), [g], [u], "swiglu")


def test_rope(kernels):
    """RoPE is linear in q and k, but its gradient's derivative through the incoming gradient is not zero."""
    from llava_fast.ops.rope import rope

    q, k = torch.randn(1, 6, 4, 16, requires_grad=True), torch.randn(1, 6, 2, 16, requires_grad=True)
    pos = torch.arange(6)[None]
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    a = torch.randn(1, 6, 4, 16, requires_grad=True)

    def first():
        qr, kr = rope(q * a, k, pos, inv_freq=inv)
        return qr.sum(-1) + kr.sum((-1, -2))[..., None]
    _refused(first, [q], [a], "rope")


def test_fused_linear_cross_entropy(kernels):
    from llava_fast.ops.cross_entropy import fused_linear_cross_entropy

    h = torch.randn(7, 16, requires_grad=True)
    w = (torch.randn(40, 16) / 4).requires_grad_()
    labels = torch.randint(0, 40, (7,))
    loss = fused_linear_cross_entropy(h, w, labels)
    (gh,) = torch.autograd.grad(loss, [h], create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_cross_entropy: double backward"):
        torch.autograd.grad(gh.pow(2).sum(), [w])


def test_pack_and_scatter(kernels):
    """The scatter is linear, but its gradient's derivative through the incoming gradient is not zero."""
    from test_pack_features import _kernel, make_case

    emb, ids, feats, sizes, nl, kw = make_case("next", [[("img", (30, 50), False)]], layout="packed")
    f = feats.clone().requires_grad_()
    a = torch.randn(emb.shape, requires_grad=True)

    def first():
        return _kernel(emb, ids, f, sizes, nl, kw) * a
    _refused(first, [f], [a], "pack_and_scatter")
