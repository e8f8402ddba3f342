"""ops/cudnn_attention.py: the autograd wiring (CPU, with the two cuDNN entry points replaced by an emulation that
records what it is given and where it runs) and, on a GPU, cuDNN itself against fp32 by flash-attn's rule after a
foreign cuDNN graph with another dO layout has been left in autograd's thread."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from llava_fast.ops import cudnn_attention as ca


def _fake_cudnn(monkeypatch, calls):
    """_cudnn_fwd / _cudnn_bwd by SDPA's math path on the CPU; out is allocated in q's layout (as torch's cuDNN does),
    the log-sum-exp returned as cuDNN does; the backward records dO's strides, out's strides and its thread."""
    def fwd(q, k, v, scale, causal, lse=True):
        g = q.shape[1] // k.shape[1]                                       # GQA: query head h reads key head h // g
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(s, -1)
        out = torch.empty_like(q).copy_((torch.softmax(s, -1) @ v.float()).to(q.dtype))
        return out, lse, None, None, q.shape[2], k.shape[2], None, None

    def bwd(do, q, k, v, out, lse, seed, offset, cum_q, cum_k, max_q, max_k, scale, causal):
        calls.append({"do": do.stride(), "out": out.stride(), "thread": threading.current_thread().name,
                      "max": (max_q, max_k), "grad": torch.is_grad_enabled()})
        if calls[-1].get("fail") or getattr(bwd, "fail", False):
            raise RuntimeError("cuDNN says no")
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            o = ca.cudnn_attention_ref(*leaves, scale, causal)
            return torch.autograd.grad(o, leaves, do)
    monkeypatch.setattr(ca, "_cudnn_fwd", fwd)
    monkeypatch.setattr(ca, "_cudnn_bwd", bwd)
    return bwd


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dlayout", ["bhld", "blhd"])
@pytest.mark.parametrize("hkv", [6, 2])
def test_function_wiring_matches_reference(monkeypatch, causal, dlayout, hkv):
    """The Function's output and q/k/v gradients equal the reference's (fp32, the emulated entry points compute the
    same thing; GQA with 6 query heads on 2 key heads too); the backward entry point runs on the module's own
    thread, and always gets dO in out's layout, whatever layout the gradient arrives in."""
    calls = []
    _fake_cudnn(monkeypatch, calls)
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 6, 7, 16
    base = [torch.randn(b, n, hh, d, generator=g) for hh in (h, hkv, hkv)]  # (B, L, H, D) projections
    do = torch.randn(b, h, n, d, generator=g)
    if dlayout == "blhd":
        do = do.transpose(1, 2).contiguous().transpose(1, 2)               # the output's own (B, L, H, D) order

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in base]
        o = fn(*(t.transpose(1, 2) for t in leaves))
        return [o] + list(torch.autograd.grad(o, leaves, do))

    ours = run(lambda q, k, v: ca.CudnnAttentionFunction.apply(q, k, v, 0.25, causal))
    ref = run(lambda q, k, v: ca.cudnn_attention_ref(q, k, v, 0.25, causal))
    for name, a, r in zip(["out", "dq", "dk", "dv"], ours, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert len(calls) == 1
    assert calls[0]["thread"] == "llava_fast-cudnn-bwd" != threading.current_thread().name
    assert calls[0]["do"] == calls[0]["out"], calls[0]
    assert calls[0]["max"] == (n, n)
    assert calls[0]["grad"] is False            # autograd's backward mode, not the new thread's default

def test_backward_error_reaches_the_caller(monkeypatch):
    """An exception on the worker thread is raised in the backward's caller, and the worker keeps serving."""
    calls = []
    bwd = _fake_cudnn(monkeypatch, calls)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    bwd.fail = True
    with pytest.raises(RuntimeError, match="cuDNN says no"):
        ca.CudnnAttentionFunction.apply(q, q, q, 0.3, True).sum().backward()
    bwd.fail = False
    ca.CudnnAttentionFunction.apply(q, q, q, 0.3, True).sum().backward()
    assert q.grad is not None and len(calls) == 2


def test_backward_error_names_the_variables_that_avoid_it(monkeypatch):
    """A cuDNN backward that fails (no plan for these shapes in this cuDNN build) says which switch avoids it."""
    bwd = _fake_cudnn(monkeypatch, [])
    bwd.fail = True
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="LLAVA_FAST_TEXT_ATTENTION=triton .* LLAVA_FAST_SDPA_CUDNN=0"):
        ca.CudnnAttentionFunction.apply(q, q, q, 0.3, True).sum().backward()


def test_try_falls_back_once_per_kind_of_call(monkeypatch):
    """try_cudnn_attention: the result where cuDNN takes the call; None with one warning where it refuses (a
    RuntimeError: no execution plan), None without trying again for the same heads / head dim / dtype / causality /
    grad mode, cuDNN again for another kind; running out of memory is raised, not taken for a refusal; inputs
    :func:`supported` refuses give None without a try."""
    _fake_cudnn(monkeypatch, [])
    monkeypatch.setattr(ca, "_refused", set())
    real, tries = ca.cudnn_attention, []
    monkeypatch.setattr(ca, "cudnn_attention", lambda *a, **k: tries.append(a) or real(*a, **k))
    assert ca.try_cudnn_attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), 0.3) \
        is None and not tries                                    # CPU tensors: not supported, not tried
    monkeypatch.setattr(ca, "supported", lambda q, k: True)   # (CPU tensors here)

    def refusing(q, k, v, scale, causal=True):
        tries.append(q.shape)
        if q.shape[-1] == 8:
            raise RuntimeError("cuDNN Frontend error: No execution plans support the graph.")
        return real(q, k, v, scale, causal)
    monkeypatch.setattr(ca, "cudnn_attention", refusing)
    q8, q16 = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 16)
    with pytest.warns(UserWarning, match="No execution plans.*LLAVA_FAST_TEXT_ATTENTION=triton"):
        assert ca.try_cudnn_attention(q8, q8, q8, 0.3) is None
    assert ca.try_cudnn_attention(torch.randn(1, 2, 9, 8), q8, q8, 0.3) is None     # another length: not retried
    assert len(tries) == 1
    torch.testing.assert_close(ca.try_cudnn_attention(q16, q16, q16, 0.3), ca.cudnn_attention_ref(q16, q16, q16, 0.3))
    with pytest.warns(UserWarning, match="No execution plans"):                 # another kind: tried, refused
        assert ca.try_cudnn_attention(q8, q8, q8, 0.3, causal=False) is None and len(tries) == 3

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(ca, "cudnn_attention", oom)
    with pytest.raises(torch.OutOfMemoryError):
        ca.try_cudnn_attention(q16, q16, q16, 0.3, causal=False)


def test_dispatch_falls_back_to_the_kernel_where_cudnn_refuses(monkeypatch):
    """models/dispatch._cudnn_or: cuDNN's output where it takes the call (a packed sequence of equal documents folded
    to a batch and back), the kernel's where try_cudnn_attention returns None."""
    from llava_fast.models import dispatch

    monkeypatch.setattr(ca, "supported", lambda q, k: True)
    answer = [None]
    monkeypatch.setattr(ca, "try_cudnn_attention", lambda q, k, v, scale, causal=True: answer[0])
    kernel = lambda q, k, v, scale: "kernel"                                     # noqa: E731
    q = torch.randn(1, 2, 12, 8)                                                 # 3 documents of 4
    assert dispatch._cudnn_or(kernel, 3, 4)(q, q, q, 0.3) == "kernel"
    answer[0] = torch.arange(3 * 2 * 4 * 8.0).view(3, 2, 4, 8)                  # (docs, H, L, D)
    got = dispatch._cudnn_or(kernel, 3, 4)(q, q, q, 0.3)
    assert got.shape == (1, 2, 12, 8) and torch.equal(got[0, :, 4:8], answer[0][1])


def test_like_out_copies_only_when_the_layout_differs():
    out = torch.empty(2, 5, 3, 8).transpose(1, 2)                          # (B, H, L, D) in (B, L, H, D) order
    same = torch.randn(2, 5, 3, 8).transpose(1, 2)
    other = torch.randn(2, 3, 5, 8)
    assert ca._like_out(same, out) is same
    moved = ca._like_out(other, out)
    assert moved.stride() == out.stride() and torch.equal(moved, other)


def test_unsupported_inputs_name_the_fix():
    """CPU tensors (and, on a GPU, fp32, GQA, head dims cuDNN lacks) are refused with the variable that avoids them."""
    q = torch.randn(1, 2, 4, 8)
    assert not ca.supported(q, q)
    with pytest.raises(ValueError, match="LLAVA_FAST_TEXT_ATTENTION=triton"):
        ca.cudnn_attention(q, q, q, 0.3)


@pytest.mark.cuda
def test_cuda_supported_limits():
    q = torch.zeros(1, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
    assert ca.supported(q, q)
    assert not ca.supported(q.float(), q.float())
    assert ca.supported(q, q[:, :2]) and not ca.supported(q, q[:, :3])     # GQA: key heads must divide
    assert not ca.supported(torch.zeros(1, 4, 8, 72, device="cuda", dtype=torch.bfloat16)[..., :68],
                            torch.zeros(1, 4, 8, 68, device="cuda", dtype=torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["dense", "packed", "gqa"])
def test_cuda_cudnn_attention_after_a_foreign_graph(dtype, form):
    """cuDNN through ops.cudnn_attention at the stage-1 shape (32 heads, D128, causal, documents of 640 tokens; 2 of
    the 16 here), as dispatch calls it (dense: (B, H, L, D) views; packed: the (docs, H, L, D) view of one packed
    sequence; gqa: OneVision's Qwen2 heads, packed): output and q/k/v gradients by flash-attn's rule against fp32,
    after plain SDPA (cuDNN) ran a backward
    in autograd's thread on the same q/k/v layout with dO in the other layout than ours (contiguous (B, H, L, D)).
    Through torch's shared cache that left graph gives a dq error of ~5 (session 19); on our thread it is not seen."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from utils import assert_flash_rule

    from llava_fast.models import dispatch

    # gqa: OneVision-0.5B's Qwen2 (14 query heads on 2 key heads, D64), two documents of 1000 tokens, packed
    b, h, hkv, n, d = (2, 32, 32, 640, 128) if form != "gqa" else (2, 14, 2, 1000, 64)
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(b, n, hh, d, generator=g).cuda() for hh in (h, hkv, hkv)]
    do = torch.randn(b, h, n, d, generator=g).cuda()
    scale = d ** -0.5

    leaves = [t.to(dtype).requires_grad_() for t in base]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True, scale=scale,
                                           enable_gqa=hkv != h)
    torch.autograd.grad(o, leaves, do.to(dtype).contiguous())              # dO (B, H, L, D): not out's layout

    kernel_calls = []
    attn = dispatch._cudnn_or(lambda *a: kernel_calls.append(1), None if form == "dense" else b,
                              None if form == "dense" else n)

    def run(dt, fn, packed):
        leaves = [t.to(dt).requires_grad_() for t in base]
        if packed:
            o = fn(*(t.reshape(1, b * n, t.shape[2], d).transpose(1, 2) for t in leaves), scale)
            o = o.transpose(1, 2).reshape(b, n, h, d).transpose(1, 2)
        else:
            o = fn(*(t.transpose(1, 2) for t in leaves), scale)
        return [o] + list(torch.autograd.grad(o, leaves, do.to(dt)))

    def math(q, k, v, s):
        return ca.cudnn_attention_ref(q, k, v, s, True)

    ours = run(dtype, attn, form != "dense")
    assert not kernel_calls
    low = run(dtype, math, False)
    ref = run(torch.float32, math, False)
    for name, o, lo, r in zip(["out", "dq", "dk", "dv"], ours, low, ref):
        assert_flash_rule(o, r, lo, name=name)
