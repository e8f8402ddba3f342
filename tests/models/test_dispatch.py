"""The attention dispatch's opt-in paths against the reference (CPU: SDPA's math backend)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from llava_fast.models.dispatch import packed_sdpa_attention
from llava_fast.models.layers import varlen_attention_ref


@pytest.mark.parametrize("lens", [[5, 12, 1, 9], [7, 7, 7]])
def test_packed_sdpa_equals_per_document_reference(lens):
    """LLAVA_FAST_TEXT_ATTENTION=sdpa: packed causal attention through a right-padded SDPA batch equals the
    per-document reference, outputs and gradients, with GQA and a 1-token document; documents of one length take
    the view path (no padding)."""
    torch.manual_seed(0)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    t, hq, hkv, d = sum(lens), 6, 2, 16
    q = torch.randn(1, hq, t, d, requires_grad=True)
    k = torch.randn(1, hkv, t, d, requires_grad=True)
    v = torch.randn(1, hkv, t, d, requires_grad=True)
    out = packed_sdpa_attention(cu, max(lens), q.device)(q, k, v, d ** -0.5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    rep = hq // hkv
    ref = varlen_attention_ref(q[0].transpose(0, 1), k[0].transpose(0, 1).repeat_interleave(rep, 1),
                               v[0].transpose(0, 1).repeat_interleave(rep, 1), cu, d ** -0.5, causal=True)
    ref = ref.transpose(0, 1)[None]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_sdpa_in_the_model(monkeypatch, tmp_path):
    """The model's packed forward with the opt-in path gives the reference path's loss and logits (fp32, CPU)."""
    import llava_fast
    from test_llava_parity import make_batch
    from tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    batch = make_batch("llava_onevision", [[(20, 50)], []], left_pad=False)
    lens = [len(s) for s in batch["seqs"]]
    kw = dict(input_ids=torch.tensor([t for s in batch["seqs"] for t in s])[None],
              cu_seqlens=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32),
              position_ids=torch.cat([torch.arange(n) for n in lens])[None], max_seqlen=max(lens),
              pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
              labels=torch.cat([batch["labels"][i, :n] for i, n in enumerate(lens)])[None])
    ref = m(**kw)
    monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", "sdpa")
    out = m(**kw)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_dense_sdpa_text_path(monkeypatch, tmp_path):
    """LLAVA_FAST_TEXT_ATTENTION=sdpa on an unpadded batch (no mask): same logits as the reference path."""
    import llava_fast
    from tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava")
    m = llava_fast.from_pretrained(path)
    ids = torch.randint(3, 100, (2, 9))
    ref = m(input_ids=ids).logits
    monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", "sdpa")
    torch.testing.assert_close(m(input_ids=ids).logits, ref, atol=1e-4, rtol=0)


def test_vision_sdpa_prefers_cudnn_on_hopper_only(monkeypatch):
    """LLAVA_FAST_SDPA_CUDNN (dispatch._prefer_cudnn): "auto" (default since session 28) sends a trained tower's
    attention (autograd on, q/k/v requiring grad) through ops.cudnn_attention, a frozen one's (no grad, or inputs
    that do not require it) to SDPA's own order; "1" sends every tower, "0" none; all of it on compute capability
    9.x only, never under torch.compile; a bad value names the variable."""
    from llava_fast.models import dispatch

    caps = {0: (9, 0), 1: (8, 0), 2: (10, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    cudnn = [91900]
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn[0])

    def qkv(dev, grad):
        t = torch.empty(0, device="meta").requires_grad_(grad)
        return type("T", (), {"device": torch.device("cuda", dev), "requires_grad": t.requires_grad})()

    def prefer(dev, grad=True, enabled=True):
        with torch.set_grad_enabled(enabled):
            return dispatch._prefer_cudnn(qkv(dev, grad), qkv(dev, False), qkv(dev, False))

    monkeypatch.delenv("LLAVA_FAST_SDPA_CUDNN", raising=False)
    assert dispatch.vision_cudnn_choice() == "auto"
    assert prefer(0)                                                     # a trained tower on Hopper
    assert not prefer(0, grad=False) and not prefer(0, enabled=False)    # frozen: SDPA's own order
    assert not prefer(1) and not prefer(2)                               # Ampere, Blackwell: not measured there
    cudnn[0] = 91800                                                     # older than the cuDNN measured
    assert not prefer(0)
    monkeypatch.setenv("LLAVA_FAST_SDPA_CUDNN", "1")
    assert prefer(0) and prefer(0, grad=False) and prefer(0, enabled=False)
    assert not prefer(1) and not prefer(2, grad=False)
    monkeypatch.setenv("LLAVA_FAST_SDPA_CUDNN", "0")
    assert not prefer(0) and not prefer(0, grad=False)
    monkeypatch.setenv("LLAVA_FAST_SDPA_CUDNN", "auto")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not prefer(0)
    monkeypatch.setenv("LLAVA_FAST_SDPA_CUDNN", "off")
    with pytest.raises(ValueError, match="LLAVA_FAST_SDPA_CUDNN"):
        prefer(0)


def test_sdpa_backends_never_cudnn_with_a_backward(monkeypatch):
    """dispatch._sdpa_backends: cuDNN first for a call no backward follows, never cuDNN for a call on
    tensors that require grad with autograd on (torch caches cuDNN's backward graph without the output gradient's
    strides: wrong gradients, measured in session 19). The backends each call is given are recorded."""
    from torch.nn.attention import SDPBackend

    from llava_fast.models import dispatch

    seen = []

    def fake_kernel(order, set_priority=False):
        seen.append(list(order))
        return contextlib.nullcontext()
    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", fake_kernel)
    x, xg = torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8, requires_grad=True)
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with dispatch._sdpa_backends(x, x, x):
        pass
    assert seen.pop() == [SDPBackend.CUDNN_ATTENTION] + no_cudnn
    with dispatch._sdpa_backends(xg, x, x):
        pass
    assert seen.pop() == no_cudnn
    with torch.no_grad(), dispatch._sdpa_backends(xg, xg, xg):                  # no backward: cuDNN again
        pass
    assert seen.pop() == [SDPBackend.CUDNN_ATTENTION] + no_cudnn
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)    # a traced call keeps SDPA's own order
    with dispatch._sdpa_backends(xg, xg, xg), dispatch._sdpa_backends(x, x, x):
        pass
    assert seen == []


@pytest.mark.cuda
@pytest.mark.parametrize("cudnn", ["0", "1", "auto"])
@pytest.mark.parametrize("d,n", [(72, 729), (64, 577)])
def test_cuda_vision_attention_sdpa_backend_order(monkeypatch, d, n, cudnn):
    """The vision towers' SDPA as the model calls it (q/k/v transposed views of (B, N, H, D) projections), in SDPA's
    own order (LLAVA_FAST_SDPA_CUDNN=0) and through ops.cudnn_attention in training (=1 and the default "auto" on
    Hopper; after a foreign cuDNN graph with another dO layout has been left in autograd's thread, which that path
    must not meet): output and gradients
    by flash-attn's rule against fp32, the same-dtype error taken from SDPA's math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llava_fast.models import dispatch
    from utils import assert_flash_rule

    monkeypatch.setenv("LLAVA_FAST_SDPA_CUDNN", cudnn)
    g = torch.Generator().manual_seed(5)
    b, h = 3, 16
    base = [torch.randn(b, n, h, d, generator=g).cuda() for _ in range(3)]
    do = torch.randn(b, h, n, d, generator=g).cuda()
    ours_path = cudnn in ("1", "auto") and torch.cuda.get_device_capability()[0] == 9   # a trained tower here
    if ours_path:
        leaves = [t.to(torch.bfloat16).requires_grad_() for t in base]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), scale=d ** -0.5)
        torch.autograd.grad(o, leaves, do.to(torch.bfloat16).contiguous())   # dO (B, H, N, D): not out's layout
    from llava_fast.ops import cudnn_attention as ca
    ours_calls, cudnn_fn = [], ca.cudnn_attention
    monkeypatch.setattr(ca, "cudnn_attention", lambda *a, **k: ours_calls.append(1) or cudnn_fn(*a, **k))

    def run(dt, fn):
        leaves = [t.to(dt).requires_grad_() for t in base]
        q, k, v = (t.transpose(1, 2) for t in leaves)
        o = fn(q, k, v)
        return [o] + list(torch.autograd.grad(o, leaves, do.to(dt)))

    def math(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)

    ours = run(torch.bfloat16, lambda q, k, v: dispatch.vision_attention(q, k, v, d ** -0.5))
    assert len(ours_calls) == ours_path
    low = run(torch.bfloat16, math)
    ref = run(torch.float32, math)
    for name, o, lo, r in zip(["out", "dq", "dk", "dv"], ours, low, ref):
        assert_flash_rule(o, r, lo, name=name)


def test_text_attention_auto_rule(monkeypatch):
    """LLAVA_FAST_TEXT_ATTENTION (dispatch.text_attention_choice): "auto" by default; "auto" takes SDPA for bf16/fp16
    CUDA attention over one-length documents (unpadded batch, or packed documents all of the longest length) without
    autograd, ops.cudnn_attention for them in training on Hopper (compute capability 9), the Triton kernel otherwise;
    "triton" never and "sdpa" always; "cudnn" for one-length documents on any GPU; a bad value names the variable.
    The routing is checked on the returned closure (no GPU needed: nothing runs)."""
    from llava_fast.models import dispatch

    monkeypatch.delenv("LLAVA_FAST_TEXT_ATTENTION", raising=False)
    assert dispatch.text_attention_choice() == "auto"
    monkeypatch.setattr(dispatch, "_fast_attention", lambda *a: object())   # as if the kernel were built
    cap = [(8, 0)]                                                          # an A100 first: no cuDNN rule there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: cap[0])
    cudnn = [91900]
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn[0])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    cu_equal = torch.tensor([0, 8, 16], dtype=torch.int32)
    cu_unequal = torch.tensor([0, 5, 16], dtype=torch.int32)

    monkeypatch.setattr(dispatch, "packed_sdpa_attention", lambda *a: "sdpa")
    monkeypatch.setattr(dispatch, "dense_sdpa_attention", lambda: "sdpa")
    arange = torch.arange   # the dense kernel path builds its cu_seqlens on the device: on the CPU here
    monkeypatch.setattr(torch, "arange", lambda *a, device=None, **k: arange(*a, **k))

    def route(dtype=bf16, device=cuda, cu=None, grad=False, mask=None, ms=8):
        with torch.set_grad_enabled(grad):
            try:
                fn = dispatch.text_attention(1 if cu is not None else 2, 16 if cu is not None else 8, dtype, device,
                                             mask, cu, ms if cu is not None else None, head_dim=64)
            except (RuntimeError, AssertionError):  # the kernel path builds CUDA tensors: no GPU on this machine
                return "triton"
        return fn if fn in ("sdpa", "cudnn") else "triton"

    assert route() == "sdpa" and route(cu=cu_equal) == "sdpa" and route(dtype=torch.float16) == "sdpa"
    assert route(grad=True) == "triton" and route(cu=cu_equal, grad=True) == "triton"    # training off Hopper
    assert route(cu=cu_unequal, ms=11) == "triton" and route(cu=cu_unequal, ms=11, grad=True) == "triton"
    assert route(dtype=torch.float32) == "triton" and route(device=torch.device("cpu")) == "triton"
    assert route(mask=torch.ones(2, 8, dtype=torch.long)) == "triton"                  # padded batch: not this rule
    monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", "triton")
    assert route() == "triton" and route(cu=cu_equal) == "triton" and route(grad=True) == "triton"
    monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", "sdpa")
    assert route(grad=True) == "sdpa" and route(cu=cu_unequal, grad=True, ms=11) == "sdpa"
    # "cudnn": one-length documents through ops.cudnn_attention (its closure falls back to the kernel per call),
    # packed ones as a (docs, max_seqlen) batch; documents of several lengths keep the kernel
    wrapped = []
    monkeypatch.setattr(dispatch, "_cudnn_or", lambda kernel, *a: wrapped.append(a) or "cudnn")
    monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", "cudnn")
    assert route(grad=True) == "cudnn" and route(cu=cu_equal, grad=True) == "cudnn" and route() == "cudnn"
    assert wrapped == [(), (2, 8), ()]
    assert route(cu=cu_unequal, ms=11, grad=True) == "triton" and len(wrapped) == 3
    # "auto" on Hopper (session 28): training over one-length documents through ops.cudnn_attention; no-grad forwards
    # keep SDPA, documents of several lengths and the CPU keep the kernel (fp32: _cudnn_or's closure falls back)
    monkeypatch.delenv("LLAVA_FAST_TEXT_ATTENTION")
    cap[0] = (9, 0)
    wrapped.clear()
    assert route(grad=True) == "cudnn" and route(cu=cu_equal, grad=True) == "cudnn"
    assert wrapped == [(), (2, 8)]
    assert route() == "sdpa" and route(cu=cu_equal) == "sdpa"
    assert route(cu=cu_unequal, ms=11, grad=True) == "triton" and len(wrapped) == 2
    assert route(device=torch.device("cpu"), grad=True) == "triton" and len(wrapped) == 2
    cudnn[0] = 91800                                                  # a cuDNN older than the one measured: our kernels
    assert route(grad=True) == "triton" and route(cu=cu_equal, grad=True) == "triton" and len(wrapped) == 2
    cudnn[0] = 91900
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # traced: the kernel, no device queries
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: pytest.fail("queried while tracing"))
    assert route(grad=True) == "triton" and route(cu=cu_equal, grad=True) == "triton" and len(wrapped) == 2
    monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", "flash")
    with pytest.raises(ValueError, match="LLAVA_FAST_TEXT_ATTENTION"):
        dispatch.text_attention_choice()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_inference_sdpa_default_matches_triton(monkeypatch, tmp_path, dtype):
    """The "auto" default routes a no-grad forward over one-length documents through SDPA: its logits, packed and
    padded-without-padding, stay within the flash rule of the Triton path's, both against the fp32 CPU logits."""
    import llava_fast
    from tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava")
    ref_m = llava_fast.from_pretrained(path)
    m = llava_fast.from_pretrained(path, dtype=dtype).cuda()
    ids = torch.randint(3, 100, (2, 64))
    cu = torch.tensor([0, 64, 128], dtype=torch.int32)
    pos = torch.arange(64).repeat(2)[None]
    with torch.no_grad():
        ref = ref_m(input_ids=ids).logits.float()
        runs = {}
        for choice in ("auto", "triton"):
            monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", choice)
            runs[choice] = (m(input_ids=ids.cuda()).logits.float().cpu(),
                            m(input_ids=ids.reshape(1, -1).cuda(), cu_seqlens=cu.cuda(), position_ids=pos.cuda(),
                              max_seqlen=64).logits.float().cpu().reshape(2, 64, -1))
    for got_auto, got_triton in zip(runs["auto"], runs["triton"]):
        err_auto, err_triton = (got_auto - ref).abs().max(), (got_triton - ref).abs().max()
        assert err_auto <= 2 * err_triton + 1e-3, (err_auto, err_triton)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cuda_training_sdpa_matches_triton(monkeypatch, tmp_path, dtype, kv_heads):
    """A training step over one-length documents (unpadded batch and packed equal documents): "sdpa" (SDPA in every
    layer, without cuDNN since a backward follows) and "cudnn" (ops.cudnn_attention, with GQA too) against
    "triton"; "auto" takes ops.cudnn_attention in training on Hopper, our kernels elsewhere. The loss
    and the gradients of every language-model weight stay within the flash rule of the Triton path's, both against
    fp32 on the CPU, with and without GQA; the SDPA calls are counted, so the test fails if the routing is not what
    the rule says."""
    import llava_fast
    from tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava", kv_heads=kv_heads)
    ref_m = llava_fast.from_pretrained(path)
    m = llava_fast.from_pretrained(path, dtype=dtype).cuda()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 64), generator=g)
    cu = torch.tensor([0, 64, 128], dtype=torch.int32)
    pos = torch.arange(64).repeat(2)[None]
    forms = {"dense": dict(input_ids=ids, labels=ids),
             "packed": dict(input_ids=ids.reshape(1, -1), labels=ids.reshape(1, -1), cu_seqlens=cu,
                            position_ids=pos, max_seqlen=64)}
    calls, cudnn_calls = [0], [0]
    sdpa = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls[0] += 1
        return sdpa(*a, **k)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    from llava_fast.ops import cudnn_attention as ca
    cudnn = ca.cudnn_attention

    def counting_cudnn(*a, **k):
        cudnn_calls[0] += 1
        return cudnn(*a, **k)
    monkeypatch.setattr(ca, "cudnn_attention", counting_cudnn)

    def step(model, kw, device):
        model.zero_grad(set_to_none=True)
        out = model(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()})
        out.loss.backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()
                 if p.grad is not None and ("language_model" in n or "lm_head" in n)}
        return out.loss.float().cpu(), grads

    hopper = torch.cuda.get_device_capability()[0] == 9
    for form, kw in forms.items():
        ref_loss, ref_grads = step(ref_m, kw, "cpu")
        runs = {}
        for choice in ("auto", "sdpa", "triton", "cudnn"):
            monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", choice)
            calls[0] = cudnn_calls[0] = 0
            runs[choice] = step(m, kw, "cuda")
            want = 2 if choice == "sdpa" else 0                            # one call per decoder layer (2 layers)
            assert calls[0] == want, (form, choice, calls[0])
            # GQA too; "auto" takes it in training on Hopper (session 28)
            want = 2 if choice == "cudnn" or (choice == "auto" and hopper) else 0
            assert cudnn_calls[0] == want, (form, choice, cudnn_calls[0])
        assert set(runs["sdpa"][1]) == set(ref_grads) == set(runs["cudnn"][1]) and ref_grads
        pairs = []
        for alt in ("sdpa", "cudnn"):
            pairs += [("loss", runs[alt][0], runs["triton"][0], ref_loss)]
            pairs += [(n, runs[alt][1][n], runs["triton"][1][n], ref_grads[n]) for n in ref_grads]
        for name, got_auto, got_triton, ref in pairs:
            err_auto, err_triton = (got_auto - ref).abs().max(), (got_triton - ref).abs().max()
            # the two paths round differently; 1e-3 of the reference's largest value covers an exact tie at ~0 error
            assert err_auto <= 2 * err_triton + 1e-3 * ref.abs().max(), (form, name, err_auto, err_triton)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["dense", "packed"])
def test_cuda_text_sdpa_training_at_stage1_shape(dtype, form):
    """The attention LLAVA_FAST_TEXT_ATTENTION=sdpa runs in a stage-1 training step (Vicuna-7B: 32 heads, D128,
    causal, documents of 640 tokens; 2 of the 16 here), as the model calls it: the output and the q/k/v gradients by
    flash-attn's rule against fp32, the same-dtype error taken from SDPA's math backend. Dense: an unpadded batch
    (dense_sdpa_attention); packed: one sequence of equal documents (packed_sdpa_attention's view). First a cuDNN
    fwd+bwd on q/k/v of the same layout with the output gradient in the other layout than ours gets: torch caches
    cuDNN's backward graph without dO's strides, so through cuDNN our gradients came out wrong (session 19: dq error
    5.0 against PyTorch's 0.016); _sdpa_backends keeps cuDNN out of calls that a backward follows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llava_fast.models import dispatch
    from utils import assert_flash_rule

    b, h, n, d = 2, 32, 640, 128
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(b, n, h, d, generator=g).cuda() for _ in range(3)]     # (B, L, H, D) projections
    do = torch.randn(b, h, n, d, generator=g).cuda()
    scale = d ** -0.5
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32, device="cuda")
    ours_fn = dispatch.dense_sdpa_attention() if form == "dense" else \
        dispatch.packed_sdpa_attention(cu, n, torch.device("cuda"))

    def run(dt, fn, packed):
        leaves = [t.to(dt).requires_grad_() for t in base]
        if packed:  # (1, H, B * L, D) views, as the packed model passes them
            o = fn(*(t.reshape(1, b * n, h, d).transpose(1, 2) for t in leaves), scale)
            o = o.transpose(1, 2).reshape(b, n, h, d).transpose(1, 2)
        else:       # (B, H, L, D) views
            o = fn(*(t.transpose(1, 2) for t in leaves), scale)
        return [o] + list(torch.autograd.grad(o, leaves, do.to(dt)))

    def math(q, k, v, s):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)

    def cudnn(q, k, v, s):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)

    leaves = [t.to(dtype).requires_grad_() for t in base]
    try:
        o = cudnn(*(t.transpose(1, 2) for t in leaves), scale)              # o strides follow q: (B, L, H, D) order
        # dense: ours gets dO contiguous (B, H, L, D), so the graph left behind reads the (B, L, H, D) order; packed:
        # ours gets dO in o's order, so the graph left behind reads the contiguous one
        bad = do.to(dtype).transpose(1, 2).contiguous().transpose(1, 2) if form == "dense" else do.to(dtype)
        torch.autograd.grad(o, leaves, bad)
    except RuntimeError:    # no cuDNN attention for this shape on this GPU / torch: nothing cached to trip over
        pass

    ours = run(dtype, ours_fn, form == "packed")
    low = run(dtype, math, False)
    ref = run(torch.float32, math, False)
    for name, o, lo, r in zip(["out", "dq", "dk", "dv"], ours, low, ref):
        assert_flash_rule(o, r, lo, name=name)
