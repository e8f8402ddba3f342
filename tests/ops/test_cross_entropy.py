"""Fused linear cross-entropy: Triton path vs the fp32 reference (itself checked against HF's ForCausalLMLoss):
loss, grad hidden, grad weight, grad bias; ignored / all-ignored labels; mean and sum / num_items; tied weights.

CPU: the kernel runs under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes, forced through ``set_backend``.
GPU (`cuda` marker): bf16/fp16 at real sizes (8k tokens, vocab 32064 / 152064) with flash-attn's rule, the < 1 GB
extra-memory target at vocab 152064, and torch.compile with Inductor.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from llava_fast import backend
from llava_fast.modules.loss import FusedLinearCrossEntropyLoss
from llava_fast.ops import cross_entropy as ce
from llava_fast.ops.cross_entropy import (FusedLinearCrossEntropyFunction, cross_entropy_ref,
                                          fused_linear_cross_entropy)
from tests.utils import assert_close_verbose, assert_flash_rule, big_gpu_memory, peak_live_bytes

# fp32 kernel vs fp32 reference: same math, different summation order (chunked GEMMs, block-wise log-sum-exp vs
# torch's log_softmax). Loss ~ log(V) ~ 6; gradients are softmax/N-sized (<= 1) summed over <= 861 tokens or over H:
# a few fp32 ulp relative each -> atol 1e-5, rtol 1e-5 (observed errors ~3e-8).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def triton_backend():
    """Force the fused (Triton) path, on CPU under the interpreter."""
    backend.set_backend("cross_entropy", "triton")
    yield
    backend.set_backend("cross_entropy", "auto")


def _inputs(n, h, v, dtype=torch.float32, device="cpu", ignore_frac=0.3, bias=False, w_scale=None):
    hidden = torch.randn(n, h, device=device, dtype=torch.float32)
    # Logit std ~2-3 (peaked softmax, like a trained LM head) without overflow in bf16.
    weight = torch.randn(v, h, device=device, dtype=torch.float32) * (w_scale or 2.5 / h ** 0.5)
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignore_frac] = -100
    b = torch.randn(v, device=device) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), labels, cast(b)


def _loss_and_grads(fn, hidden, weight, labels, bias, grad_scale=1.0, **kw):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss = fn(hidden, weight, labels, bias, **kw)
    (loss * grad_scale).backward()
    grads = [t.grad.detach().clone() if t is not None else None for t in (hidden, weight, bias)]
    return loss.detach(), grads


def _assert_all_close(got, want, tol, tag):
    (lg, gg), (lw, gw) = got, want
    assert_close_verbose(lg, lw, name=f"{tag} loss", **tol)
    for name, a, b in zip(("grad_hidden", "grad_weight", "grad_bias"), gg, gw):
        if b is not None:
            assert a is not None, f"{tag}: {name} missing"
            assert_close_verbose(a, b, name=f"{tag} {name}", **tol)


# ----------------------------------------------------------------------------------------------- reference vs HF
@pytest.mark.parametrize("with_num_items", [False, True])
def test_reference_matches_hf_for_causal_lm_loss(with_num_items):
    """HF shifts inside ForCausalLMLoss; our labels come shifted by the caller (pad with -100, drop the first)."""
    b, t, h, v = 3, 11, 16, 431
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[:, :4] = -100                                  # prompt / image tokens
    num_items = int((labels[:, 1:] != -100).sum()) + 5 if with_num_items else None

    hf_loss = ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=v, num_items_in_batch=num_items)
    hf_grads = torch.autograd.grad(hf_loss, (hidden, weight))

    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    loss = cross_entropy_ref(hidden.reshape(-1, h), weight, shifted, num_items=num_items)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert_close_verbose(loss, hf_loss, atol=1e-6, rtol=1e-6, name="loss")
    for a, b_ in zip(grads, hf_grads):
        assert_close_verbose(a, b_, atol=1e-7, rtol=1e-6, name="grad")


def test_reference_all_ignored_is_zero_not_nan():
    hidden, weight, _, _ = _inputs(5, 8, 37)
    labels = torch.full((5,), -100)
    for kw in (dict(reduction="mean"), dict(reduction="sum"), dict(num_items=7)):
        loss, (gh, gw, _) = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, None, **kw)
        assert loss.item() == 0.0 and not gh.any() and not gw.any(), kw


# ----------------------------------------------------------------------------------------------- kernel, fp32, CPU
@pytest.mark.parametrize("n,h,v,chunk,bias", [
    (1, 16, 431, None, False),           # one token
    (1, 16, 431, None, True),
    (7 * 123, 24, 431, None, False),     # 7 x 123 tokens, vocab not a multiple of the block, one chunk
    (7 * 123, 24, 431, 100, True),       # 9 chunks, last one partial
    (50, 8, 1000, 16, False),
])
def test_kernel_fp32_interpreter(triton_backend, n, h, v, chunk, bias):
    hidden, weight, labels, b = _inputs(n, h, v, bias=bias, ignore_frac=0.3 if n > 1 else 0.0)
    want = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, b)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, b, chunk_size=chunk)
    _assert_all_close(got, want, FP32_TOL, f"n={n} v={v} chunk={chunk}")


@pytest.mark.parametrize("skip_ignored", [True, False])
def test_kernel_multi_block_path(triton_backend, monkeypatch, skip_ignored):
    """Vocab 152064 rows take the multi-block (online log-sum-exp) path; force it at V=431 with 128-wide blocks
    (4 blocks, the last one partial)."""
    monkeypatch.setattr(ce, "_MAX_SINGLE_BLOCK", 64)
    monkeypatch.setattr(ce, "_MULTI_BLOCK", 128)
    hidden, weight, labels, b = _inputs(40, 16, 431, bias=True)
    want = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, b)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, b, chunk_size=16,
                          skip_ignored=skip_ignored)
    _assert_all_close(got, want, FP32_TOL, "multi-block")


# ----------------------------------------------------------------------------------------------- vocab schedule
def test_vocab_plan_fills_the_budget(monkeypatch):
    """All tokens in one chunk when a 4096-column block fits the budget, the widest block that fits then; otherwise
    balanced chunks of tokens at 4096 columns. The 8k x 152064 x 896 case at the default 128 MiB and at Liger's
    ~20 MB; given values are kept; a bad budget is named."""
    mib = 2**20
    t, cols = ce._vocab_plan(8192, 152064, 896, 2, False, 0, 0)
    assert t == 8192 and 4096 <= cols < 152064 and cols % 256 == 0
    assert 8192 * (cols * 2 + 896 * 4) <= 128 * mib < 8192 * ((cols + 256) * 2 + 896 * 4)
    monkeypatch.setenv("LLAVA_FAST_CE_VOCAB_BUDGET_MB", "20")
    t, cols = ce._vocab_plan(8192, 152064, 896, 2, True, 0, 0)
    assert 4096 <= cols < 8192 and 8192 / t <= 7 and t * (cols * 2 + 896 * 4 + 2 * 896 * 2) <= 20 * mib, (t, cols)
    assert ce._vocab_plan(100, 431, 16, 4, False, 0, 0) == (100, 431)
    assert ce._vocab_plan(100, 431, 16, 4, False, 33, 50) == (33, 50)
    monkeypatch.setenv("LLAVA_FAST_CE_VOCAB_BUDGET_MB", "0")
    with pytest.raises(ValueError, match="LLAVA_FAST_CE_VOCAB_BUDGET_MB"):
        ce._vocab_plan(100, 431, 16, 4, False, 0, 0)



@pytest.mark.parametrize("n,h,v,vocab_block,chunk,bias,skip_ignored,multi", [
    (1, 16, 431, None, None, False, True, False),     # one token, one block (the whole vocabulary)
    (7 * 123, 24, 431, 100, None, True, True, False),  # 5 blocks, the last one partial; ignored rows compacted
    (7 * 123, 24, 431, 100, 250, True, True, False),   # and 3 chunks of supervised tokens (the last one partial)
    (200, 24, 431, 100, 64, True, False, False),      # ignored rows kept: zero gradient rows through the GEMMs
    (50, 8, 1000, 128, None, False, True, True),      # the kernels loop inside a block (32-wide steps, 4 per block)
])
def test_kernel_vocab_schedule_fp32(triton_backend, monkeypatch, n, h, v, vocab_block, chunk, bias, skip_ignored,
                                    multi):
    if multi:
        monkeypatch.setattr(ce, "_MULTI_BLOCK", 32)
    calls = []
    real = ce._fused_linear_cross_entropy_vocab
    monkeypatch.setattr(ce, "_fused_linear_cross_entropy_vocab", lambda *a: calls.append(a[-2]) or real(*a))
    hidden, weight, labels, b = _inputs(n, h, v, bias=bias, ignore_frac=0.3 if n > 1 else 0.0)
    want = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, b)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, b, schedule="vocab",
                          vocab_block=vocab_block, chunk_size=chunk, skip_ignored=skip_ignored)
    assert calls == [vocab_block or 0], "the vocab schedule did not run"
    _assert_all_close(got, want, FP32_TOL, f"vocab n={n} v={v} block={vocab_block}")


@pytest.mark.parametrize("chunk,accum", [(None, "auto"), (32, "auto"), (32, "fp32")])
def test_kernel_vocab_schedule_fp16_flash_rule(triton_backend, chunk, accum):
    """fp16. One chunk of tokens: the weight gradient of every vocab row comes from one GEMM over all tokens, rounded
    once. Two chunks: rounded once per chunk in fp16 ("auto"), or summed in fp32 and rounded once ("fp32")."""
    n, h, v = 64, 32, 431
    hidden, weight, labels, _ = _inputs(n, h, v, dtype=torch.float16)
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    ref32 = _loss_and_grads(cross_entropy_ref, h32, w32, labels, None)
    ref16 = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, None)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, None, schedule="vocab", vocab_block=100,
                          chunk_size=chunk, grad_weight_accum=accum)
    assert got[1][0].dtype == got[1][1].dtype == torch.float16
    assert_flash_rule(got[0], ref32[0], ref16[0], "loss", atol=4 * 4.8e-7)   # see the fp16 token-schedule test
    assert_flash_rule(got[1][0], ref32[1][0], ref16[1][0], "grad_hidden")
    assert_flash_rule(got[1][1], ref32[1][1], ref16[1][1], "grad_weight")


def test_vocab_schedule_selection(triton_backend, monkeypatch):
    """"auto" follows LLAVA_FAST_CE_SCHEDULE (default token); the vocab schedule only runs when the weight needs a
    gradient and the logits are not returned (otherwise it would cost a GEMM for nothing); a bad value is named."""
    calls = []
    real = ce._fused_linear_cross_entropy_vocab
    monkeypatch.setattr(ce, "_fused_linear_cross_entropy_vocab", lambda *a: calls.append(1) or real(*a))
    hidden, weight, labels, _ = _inputs(12, 8, 64)
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    assert calls == []
    monkeypatch.setenv("LLAVA_FAST_CE_SCHEDULE", "vocab")
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    assert calls == [1]
    fused_linear_cross_entropy(hidden, weight, labels, schedule="token").backward()
    fused_linear_cross_entropy(hidden, weight, labels, return_logits=True)[0].backward()
    fused_linear_cross_entropy(hidden, weight.detach(), labels).backward()   # frozen lm_head (stage 1)
    assert calls == [1]
    monkeypatch.setenv("LLAVA_FAST_CE_SCHEDULE", "vocabulary")
    with pytest.raises(ValueError, match="LLAVA_FAST_CE_SCHEDULE"):
        fused_linear_cross_entropy(hidden, weight, labels)


@pytest.mark.parametrize("skip_ignored", [True, False])
def test_peak_memory_of_both_schedules_within_plan(triton_backend, skip_ignored):
    """Peak memory of each schedule beyond its inputs, counted op by op on the CPU (``peak_live_bytes``), against
    what its plan says is alive at its peak (the CPU has no fused fp32 addmm, so both pay a GEMM temporary):
    token, at a chunk's weight-gradient GEMM: d hidden (N, H) + the (C, V) chunk (C = M here) + the (V, H) fp32
    accumulator + a (V, H) temporary + the gathered chunk rows; vocab, at a block's d-hidden GEMM: d hidden (N, H) +
    d weight (V, H) + the (M, Vb) block + the (M, H) fp32 accumulator + an (M, H) temporary + the gathered rows. Small
    per-row vectors (labels, row indices, loss, log-sum-exp) are the slack. Fails if either schedule holds logits
    for every token and the whole vocabulary, or the vocab schedule a (V, H) fp32 buffer."""
    n, h, v, vb = 128, 32, 2000, 512
    hidden, weight, labels, _ = _inputs(n, h, v, dtype=torch.float16, ignore_frac=0.0)
    hidden, weight = hidden.detach(), weight.detach()
    labels[:50] = -100
    m = int((labels != -100).sum()) if skip_ignored else n
    scale = torch.tensor([1.0 / m])
    b = 2
    t = 32   # the chunked vocab run: 32 tokens at a time
    gathered = m * h * b if skip_ignored else 0
    plans = {"token": n * h * b + m * v * b + v * h * 4 + v * h * b + gathered,
             "vocab": n * h * b + v * h * b + m * vb * b + m * h * 4 + m * h * b + gathered,
             "vocab chunked": n * h * b + v * h * b + t * vb * b + t * h * 4 + t * h * b + (t * h * b if skip_ignored
                                                                                           else 0)}
    peaks = {}
    for name, plan in plans.items():
        peaks[name], _ = peak_live_bytes(lambda: ce.fused_linear_cross_entropy_fwd(
            hidden, weight, labels, None, scale, skip_ignored=skip_ignored, schedule=name.split()[0], vocab_block=vb,
            chunk_size=t if "chunked" in name else 0), keep=(hidden, weight, labels, scale))
        print(f"{name}: peak {peaks[name]} B, plan {plan} B")
        assert plan <= peaks[name] <= plan + 64 * n, (name, peaks[name], plan)
    assert peaks["vocab chunked"] < peaks["vocab"] < peaks["token"] / 2


@pytest.mark.parametrize("skip_ignored", [True, False])
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="sum"), dict(num_items=9),
                                dict(reduction="sum", num_items=torch.tensor(9))])
def test_kernel_all_ignored(triton_backend, kw, skip_ignored):
    hidden, weight, _, b = _inputs(9, 8, 431, bias=True)
    labels = torch.full((9,), -100)
    loss, (gh, gw, gb) = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, b,
                                         skip_ignored=skip_ignored, **kw)
    assert loss.item() == 0.0, kw
    assert torch.isfinite(loss)
    assert not gh.any() and not gw.any() and not gb.any(), kw


@pytest.mark.parametrize("kw", [dict(reduction="sum"), dict(num_items=123), dict(reduction="sum", num_items=123),
                                dict(num_items=torch.tensor(77.0)), dict(num_items=torch.tensor([40]))])
def test_kernel_sum_and_num_items(triton_backend, kw):
    hidden, weight, labels, _ = _inputs(60, 16, 431)
    want = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, None, **kw)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, None, chunk_size=32, **kw)
    _assert_all_close(got, want, FP32_TOL, str(kw))
    # gradient accumulation: two micro-batches with num_items = total supervised == one mean over both
    n_items = int((labels != -100).sum())
    parts = [fused_linear_cross_entropy(hidden[s], weight, labels[s], num_items=n_items)
             for s in (slice(0, 25), slice(25, 60))]
    whole = fused_linear_cross_entropy(hidden, weight, labels)
    assert_close_verbose(parts[0] + parts[1], whole, atol=1e-6, rtol=1e-6, name="accumulated")


def test_kernel_tied_weight_gradients_add_up(triton_backend):
    """Qwen2-0.5B ties lm_head to the embedding: the same tensor is gathered by the embedding and used by the fused
    loss; autograd must add both gradients."""
    v, h, b, t = 431, 16, 2, 13
    weight = (torch.randn(v, h) * 0.5).requires_grad_()
    ids = torch.randint(0, v, (b, t))
    labels = F.pad(ids, (0, 1), value=-100)[:, 1:].reshape(-1)

    def graph(loss_fn):
        weight.grad = None
        hidden = torch.tanh(F.embedding(ids, weight) * 1.5).reshape(-1, h)
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        return loss.detach(), weight.grad.clone()

    loss_ref, g_ref = graph(cross_entropy_ref)
    loss, g = graph(fused_linear_cross_entropy)
    assert_close_verbose(loss, loss_ref, name="loss", **FP32_TOL)
    assert_close_verbose(g, g_ref, name="tied grad", **FP32_TOL)
    # both paths really contribute: the embedding-only gradient differs from the total
    weight.grad = None
    F.embedding(ids, weight).sum().backward()
    assert (weight.grad - g).abs().max() > 1e-3


def test_kernel_return_logits_and_grad_output(triton_backend):
    hidden, weight, labels, b = _inputs(30, 16, 431, bias=True)
    loss, logits = fused_linear_cross_entropy(hidden, weight, labels, b, return_logits=True, chunk_size=8)
    assert not logits.requires_grad
    assert_close_verbose(logits, F.linear(hidden, weight, b), name="logits", **FP32_TOL)
    assert_close_verbose(loss, cross_entropy_ref(hidden, weight, labels, b), name="loss", **FP32_TOL)
    # grad_output != 1 scales every gradient (backward only rescales what the forward computed)
    want = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, b, grad_scale=-2.5)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, b, grad_scale=-2.5)
    _assert_all_close(got, want, FP32_TOL, "grad_output=-2.5")


def test_kernel_backward_twice_raises(triton_backend):
    hidden, weight, labels, _ = _inputs(10, 8, 100)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_kernel_frozen_inputs_and_no_grad(triton_backend):
    hidden, weight, labels, _ = _inputs(20, 8, 200)
    want = cross_entropy_ref(hidden, weight, labels)
    with torch.no_grad():
        assert_close_verbose(fused_linear_cross_entropy(hidden, weight, labels), want, name="no_grad", **FP32_TOL)
        loss, logits = fused_linear_cross_entropy(hidden, weight, labels, return_logits=True, chunk_size=7)
        assert_close_verbose(loss, want, name="no_grad + logits", **FP32_TOL)
        assert_close_verbose(logits, hidden @ weight.T, name="no_grad logits", **FP32_TOL)
    # frozen lm_head (LLaVA stage 1): only the hidden gradient is computed
    w_frozen = weight.detach()
    (gh,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, w_frozen, labels), (hidden,))
    (gh_ref,) = torch.autograd.grad(cross_entropy_ref(hidden, w_frozen, labels), (hidden,))
    assert_close_verbose(gh, gh_ref, name="grad_hidden (frozen weight)", **FP32_TOL)
    h_frozen = hidden.detach()
    (gw,) = torch.autograd.grad(fused_linear_cross_entropy(h_frozen, weight, labels), (weight,))
    (gw_ref,) = torch.autograd.grad(cross_entropy_ref(h_frozen, weight, labels), (weight,))
    assert_close_verbose(gw, gw_ref, name="grad_weight (frozen hidden)", **FP32_TOL)


@pytest.mark.parametrize("accum,chunk", [("fp32", 16), ("weight", 32)])
def test_kernel_fp16_interpreter_flash_rule(triton_backend, accum, chunk):
    """fp16 on CPU (numpy has fp16; bf16 waits for the GPU). Both grad-weight accumulators: fp32 (4 chunks) and
    fp16 (2 chunks: one rounding per chunk, see _accumulate_grad_weight)."""
    n, h, v = 64, 32, 431
    hidden, weight, labels, _ = _inputs(n, h, v, dtype=torch.float16)
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    ref32 = _loss_and_grads(cross_entropy_ref, h32, w32, labels, None)
    ref16 = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, None)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, None, chunk_size=chunk,
                          grad_weight_accum=accum)
    assert got[1][1].dtype == torch.float16
    # fp32 reference error of the scalar loss is ~0 for both when the fp16 logits round the same way: allow a few
    # fp32 ulp of the loss (~6 -> 4.8e-7 per ulp).
    assert_flash_rule(got[0], ref32[0], ref16[0], "loss", atol=4 * 4.8e-7)
    assert_flash_rule(got[1][0], ref32[1][0], ref16[1][0], "grad_hidden")
    assert_flash_rule(got[1][1], ref32[1][1], ref16[1][1], "grad_weight")


def test_kernel_under_autocast(triton_backend):
    """fp32 parameters under torch.autocast(bfloat16), as HF Trainer's bf16 mode runs them: the fused path casts like
    F.linear does, and the fp32 weight gets an fp32 gradient."""
    hidden, weight, labels, _ = _inputs(48, 32, 431)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, None)
        got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, None)
    assert got[1][0].dtype == got[1][1].dtype == torch.float32
    # Same bf16 logits and bf16 dlogits on both sides; they differ by bf16 roundings of the GEMM outputs (2^-8
    # relative on the largest entries) -> rtol 2^-6, atol 2^-8 of the largest gradient.
    assert_close_verbose(got[0], want[0], atol=1e-3, rtol=1e-3, name="loss")
    for a, b_ in zip(got[1][:2], want[1][:2]):
        assert_close_verbose(a, b_, atol=b_.abs().max().item() / 256, rtol=2 ** -6, name="grad")


def test_bad_labels_raise(triton_backend):
    hidden, weight, labels, _ = _inputs(6, 8, 50, ignore_frac=0.0)
    labels[2] = 50
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        fused_linear_cross_entropy(hidden, weight, labels)


# ----------------------------------------------------------------------------------------------- API, module, plan
def _bad_inputs():
    h, w, lab = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    return [
        (dict(hidden=h[None]), "hidden must be 2-D"),
        (dict(weight=torch.randn(10, 7)), "hidden size mismatch"),
        (dict(weight=w.double(), hidden=h.double()), "float32, float16 or bfloat16"),
        (dict(weight=w.half()), "weight dtype"),
        (dict(labels=lab.int()), "labels must be torch.int64"),
        (dict(labels=lab[:3]), r"labels must have shape \(N,\)"),
        (dict(weight=w.to("meta")), "same device"),
        (dict(labels=lab.to("meta")), "labels are on meta"),
        (dict(bias=torch.randn(9)), "bias must be a"),
        (dict(bias=torch.randn(10).half()), "bias must match"),
        (dict(reduction="none"), "reduction must be"),
        (dict(num_items=torch.tensor([1, 2])), "num_items must be"),
        (dict(chunk_size=0), "chunk_size must be"),
        (dict(schedule="vocabulary"), "schedule must be"),
        (dict(vocab_block=0), "vocab_block must be"),
        (dict(grad_weight_accum="bf16"), "grad_weight_accum must be"),
    ], dict(hidden=h, weight=w, labels=lab)


@pytest.mark.parametrize("case", range(len(_bad_inputs()[0])))
def test_bad_inputs_raise_value_error(case):
    cases, base = _bad_inputs()
    override, msg = cases[case]
    kw = {**base, **override}
    with pytest.raises(ValueError, match=msg):
        fused_linear_cross_entropy(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)


def test_backend_registration_and_cpu_default():
    assert backend.OPS["cross_entropy"] == "triton"
    assert not backend.use_fast("cross_entropy", "cpu")
    assert backend.use_fast("cross_entropy", "cuda")


@pytest.mark.parametrize("fast", [False, True])
def test_module_flattens_and_matches_reference(fast):
    if fast:
        backend.set_backend("cross_entropy", "triton")
    try:
        b, t, h, v = 2, 7, 16, 300
        hidden = torch.randn(b, t, h, requires_grad=True)
        weight = (torch.randn(v, h) * 0.4).requires_grad_()
        labels = torch.randint(0, v, (b, t))
        labels[0, :3] = -100
        mod = FusedLinearCrossEntropyLoss(reduction="sum")
        loss = mod(hidden, weight, labels, num_items=5)
        ref = cross_entropy_ref(hidden.reshape(-1, h), weight, labels.reshape(-1), num_items=5)
        assert_close_verbose(loss, ref, name="module loss", **FP32_TOL)
        g = torch.autograd.grad(loss, (hidden, weight))
        g_ref = torch.autograd.grad(ref, (hidden, weight))
        for a, r in zip(g, g_ref):
            assert_close_verbose(a, r, name="module grad", **FP32_TOL)
        with pytest.raises(ValueError, match="labels shape"):
            mod(hidden, weight, labels[:, :-1])
    finally:
        backend.set_backend("cross_entropy", "auto")
    assert "reduction='sum'" in repr(mod)
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearCrossEntropyLoss(reduction="batchmean")


def test_compile_fullgraph_aot_eager(triton_backend):
    """torch.compile traces the custom op through its fake (fullgraph: no graph break) and the autograd.Function.
    aot_eager keeps the CPU run fast; Inductor is exercised on the GPU (test_cuda_compile)."""
    torch._dynamo.reset()
    hidden, weight, labels, b = _inputs(24, 16, 431, bias=True)
    mod = FusedLinearCrossEntropyLoss()

    def f(hh, ww, ll, bb):
        return mod(hh, ww, ll, bb)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    want = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, b)
    got = _loss_and_grads(compiled, hidden, weight, labels, b)
    _assert_all_close(got, want, FP32_TOL, "compiled")


def test_chunk_plan_memory_budget(monkeypatch):
    """The planner keeps logits chunk + accumulator within MEMORY_BUDGET_BYTES at the target shapes."""
    monkeypatch.setattr(ce, "_fused_fp32_addmm_ok", lambda device: True)
    dev = torch.device("cuda")
    for n, h, v, want_fp32 in [(8192, 896, 152064, True), (8192, 4096, 32064, True), (8192, 3584, 152064, False)]:
        chunk, fp32_acc, _ = ce._plan(n, v, h, torch.bfloat16, dev, True, "auto", 0)
        assert fp32_acc == want_fp32, (n, h, v)
        extra = chunk * v * 2 + (4 * v * h if fp32_acc else 0)
        assert extra <= ce.MEMORY_BUDGET_BYTES, (n, h, v, chunk, extra)
        assert chunk >= 1024, (n, h, v, chunk)   # big enough to keep the GEMMs efficient and the chunk count low
    assert ce._plan(100, 431, 16, torch.float32, dev, True, "auto", 0)[0] == 100
    assert ce._plan(100, 431, 16, torch.float32, dev, True, "auto", 33)[0] == 33
    # without the fused fp32 addmm the fp32 accumulator costs 6 VH: not chosen at 152064 x 896
    monkeypatch.setattr(ce, "_fused_fp32_addmm_ok", lambda device: False)
    assert not ce._plan(8192, 152064, 896, torch.bfloat16, dev, True, "auto", 0)[1]
    # the op body checks its string arguments whichever way it is reached (the public function names them first)
    h, w, lab = torch.randn(8, 4), torch.randn(10, 4), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match="grad_weight_accum"):
        ce.fused_linear_cross_entropy_fwd(h, w, lab, None, torch.ones(1), grad_weight_accum="bf16")
    with pytest.raises(ValueError, match="schedule"):
        ce.fused_linear_cross_entropy_fwd(h, w, lab, None, torch.ones(1), schedule="auto")


def test_function_direct_call(triton_backend):
    """The autograd.Function is usable directly (scale = 1 / n_supervised for the mean)."""
    hidden, weight, labels, _ = _inputs(12, 8, 64)
    scale = 1.0 / (labels != -100).sum().float()
    loss, logits = FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, None, scale)
    assert logits.numel() == 0
    assert_close_verbose(loss, cross_entropy_ref(hidden, weight, labels), name="loss", **FP32_TOL)


# ----------------------------------------------------------------------------------------------- GPU
def _flash_rule_case(n, h, v, dtype, bias=False, **kw):
    if n * v >= 2**28:  # fp32 reference logits of >= 1 GiB, and their gradient: one such test at a time
        with big_gpu_memory():
            return _flash_rule_case_(n, h, v, dtype, bias, **kw)
    return _flash_rule_case_(n, h, v, dtype, bias, **kw)


def _flash_rule_case_(n, h, v, dtype, bias=False, device="cuda", **kw):
    hidden, weight, labels, b = _inputs(n, h, v, dtype=dtype, device=device, ignore_frac=0.3, bias=bias)
    up = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
    ref32 = _loss_and_grads(cross_entropy_ref, up(hidden), up(weight), labels, up(b))
    ref_lp = _loss_and_grads(cross_entropy_ref, hidden, weight, labels, b)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, b, **kw)
    # The scalar loss: both sum the same bf16-rounded logits in fp32; allow 4 fp32 ulp of the loss (~12 -> 1e-6 each).
    assert_flash_rule(got[0], ref32[0], ref_lp[0], "loss", atol=4e-6)
    for i, name in enumerate(("grad_hidden", "grad_weight", "grad_bias")):
        if ref32[1][i] is not None:
            assert got[1][i].dtype == dtype
            assert_flash_rule(got[1][i], ref32[1][i], ref_lp[1][i], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,schedule", [(False, "token"), (True, "vocab")])
def test_low_precision_flash_rule(dtype, bias, schedule, triton_backend):
    """The cuda flash-rule cases at a small odd shape under the interpreter, both schedules (bf16 since session 36:
    _ext.interpreter_bf16)."""
    _flash_rule_case_(37, 24, 300 + 7, dtype, bias=bias, device="cpu", schedule=schedule)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,v", [(8192, 896, 152064), (8192, 4096, 32064), (8192, 3584, 152064),
                                   (1000, 896, 32064)])
def test_cuda_flash_rule(dtype, n, h, v):
    """(8192, 3584, 152064) accumulates d weight in the weight dtype over 2 chunks; the others in fp32."""
    _flash_rule_case(n, h, v, dtype)


@pytest.mark.cuda
def test_cuda_flash_rule_bias_and_odd_shape():
    _flash_rule_case(7 * 123, 130, 32000 + 7, torch.bfloat16, bias=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,v", [(8192, 896, 152064), (8192, 3584, 152064), (1000, 4096, 32064)])
def test_cuda_vocab_schedule_flash_rule(dtype, n, h, v):
    _flash_rule_case(n, h, v, dtype, schedule="vocab")


@pytest.mark.cuda
def test_cuda_vocab_schedule_bias_and_odd_shape():
    _flash_rule_case(7 * 123, 130, 32000 + 7, torch.bfloat16, bias=True, schedule="vocab", vocab_block=4096 + 256)


@pytest.mark.cuda
@pytest.mark.parametrize("h,schedule,limit", [(896, "token", 1e9), (3584, "token", 1e9), (896, "vocab", 0.25e9),
                                              (3584, "vocab", 0.35e9), (896, "vocab 20", 0.025e9)])
def test_cuda_peak_memory_under_1gb_extra(h, schedule, limit, monkeypatch):
    """8k tokens x 152064 vocab, bf16: peak memory beyond the inputs and the gradients any implementation returns
    (hidden.grad, weight.grad in bf16) stays below 1 GB (eager lm_head + fp32 CE needs ~13-20 GB here); the vocab
    schedule's plan is a 128 MiB logits block + the 8192 x H fp32 d-hidden accumulator (29 / 117 MB), i.e. ~0.16 /
    ~0.25 GB; with a 20 MiB budget ("vocab 20": chunks of tokens too) 21 MB + per-row vectors, Liger's footprint
    (0.02 GiB extra in the H100 table of session 4)."""
    if schedule == "vocab 20":
        monkeypatch.setenv("LLAVA_FAST_CE_VOCAB_BUDGET_MB", "20")
        schedule = "vocab"
    n, v = 8192, 152064
    hidden, weight, labels, _ = _inputs(n, h, v, dtype=torch.bfloat16, device="cuda", ignore_frac=0.0)
    # warm-up: kernels, cuBLAS workspace
    _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, None, schedule=schedule)
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(hidden, weight, labels, schedule=schedule)
    loss.backward()
    torch.cuda.synchronize()
    returned = hidden.grad.numel() * 2 + weight.grad.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - returned
    print(f"H={h} {schedule}: extra peak {extra / 1e9:.3f} GB (beyond {returned / 1e9:.3f} GB of returned gradients)")
    assert extra < limit, f"extra peak {extra / 1e9:.3f} GB >= {limit / 1e9:.2f} GB"


@pytest.mark.cuda
def test_cuda_compile_inductor():
    torch._dynamo.reset()
    hidden, weight, labels, b = _inputs(2048, 896, 32064, dtype=torch.bfloat16, device="cuda", bias=True)
    mod = FusedLinearCrossEntropyLoss()
    compiled = torch.compile(lambda hh, ww, ll, bb: mod(hh, ww, ll, bb) * 1.0, fullgraph=True)
    want = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, b)
    got = _loss_and_grads(compiled, hidden, weight, labels, b)
    # Same custom op on the same inputs. Only the 1/n_supervised scale is computed by Inductor's code (it may round
    # the reciprocal differently by an fp32 ulp), which can flip a bf16 rounding: allow 2 bf16 ulp (2^-7 relative).
    _assert_all_close(got, want, dict(atol=1e-6, rtol=2 ** -7), "inductor")


@pytest.mark.cuda
def test_cuda_tied_weight_and_hf_loss():
    """bf16 on the GPU: tied embedding + fused loss against HF's ForCausalLMLoss on the same graph."""
    v, h, b, t = 32064, 512, 4, 256
    weight = (torch.randn(v, h, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, v, (b, t), device="cuda")
    labels = ids.clone()
    labels[:, :64] = -100

    def run(use_fused):
        weight.grad = None
        hidden = F.embedding(ids, weight) * 4.0
        if use_fused:
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
            loss = fused_linear_cross_entropy(hidden.reshape(-1, h), weight, shifted)
        else:
            loss = ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=v)
        loss.backward()
        return loss.detach(), weight.grad.float()

    (l_hf, g_hf), (l_ours, g_ours) = run(False), run(True)
    assert_close_verbose(l_ours, l_hf, atol=2e-3, rtol=1e-3, name="loss vs HF")   # bf16 logits, fp32 sums
    # Per element the grads agree to bf16 rounding of dlogits (2^-8 relative) on the largest entries.
    assert_close_verbose(g_ours, g_hf, atol=2e-2 * g_hf.abs().max().item(), rtol=2e-2, name="tied grad vs HF")
