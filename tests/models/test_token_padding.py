"""``LLAVA_FAST_PAD_TOKENS`` (models/language.py ``token_padding`` / ``pad_tokens``): the language model's tokens padded
so that the linears' M = batch x tokens is a multiple of P (docs/perf-notes.md, "GEMM rate against M").

The padding never reaches a real token: a packed sequence gets a padding document of its own, an unmasked batch more
positions after each sequence's last (causal: nothing before sees them). Logits, loss and every gradient equal the
unpadded computation's, and the GEMMs do run on the padded M."""
from __future__ import annotations

import pytest
import torch

import llava_fast
from llava_fast.models.dispatch import packed_sdpa_attention
from llava_fast.models.language import token_padding
from llava_fast.models.layers import varlen_attention_ref

from test_last_layer_rows import _MatmulRows, _assert_same_step, _step
from test_model_kernels import packed_inputs
from tiny import save_tiny


@pytest.mark.parametrize("env,b,n,packed,want", [
    ("256", 1, 19984, True, 240),     # a packed sequence: a padding document of 240 tokens
    ("256", 8, 2498, False, 30),      # 8 x 2498 -> 8 x 2528 = 20224 = 79 x 256
    ("256", 16, 640, False, 0),       # 10240 already a multiple
    ("8", 3, 9, False, 7),            # 3 x 16 = 48
    ("0", 8, 2498, False, 0), ("1", 8, 2498, False, 0), ("", 8, 2498, False, 0)])
def test_padding_counts(monkeypatch, env, b, n, packed, want):
    monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", env)
    cu = torch.tensor([0, n], dtype=torch.int32) if packed else None
    pad = token_padding(b, n, cu, None, None)
    assert pad == want and (b * (n + pad)) % max(int(env or 0), 1) == 0


def test_no_padding_with_a_mask_or_a_cache_and_bad_values(monkeypatch):
    monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", "256")
    assert token_padding(2, 9, None, torch.ones(2, 9), None) == 0
    assert token_padding(2, 9, None, None, object()) == 0
    for bad in ("-8", "abc", "2.5"):
        monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", bad)
        with pytest.raises(ValueError, match="LLAVA_FAST_PAD_TOKENS"):
            token_padding(2, 9, None, None, None)


def test_packed_sdpa_with_a_padding_document():
    """The no-grad SDPA path over documents of one length keeps its batch view when a padding document follows
    them: the real rows equal the per-document reference, the padding's rows are zeros."""
    torch.manual_seed(0)
    lens, pad, h, d = [7, 7, 7], 5, 4, 16
    cu = torch.tensor([0, 7, 14, 21, 26], dtype=torch.int32)
    q, k, v = (torch.randn(1, h, 26, d) for _ in range(3))
    out = packed_sdpa_attention(cu, max(lens), q.device, pad_doc=pad)(q, k, v, d ** -0.5)
    ref = varlen_attention_ref(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, d ** -0.5, causal=True)
    torch.testing.assert_close(out[:, :, :21], ref.transpose(0, 1)[None][:, :, :21], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :, 21:], torch.zeros_like(out[:, :, 21:]))


def _text_batch(b=3, n=9):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (b, n))
    labels = ids.clone()
    labels[:, :4] = -100
    return dict(input_ids=ids, labels=labels)


@pytest.mark.parametrize("model_type,form", [("llava_next", "packed"), ("llava_onevision", "padded")])
def test_padded_step_equals_unpadded(tmp_path, monkeypatch, model_type, form):
    """A training step (the last layer on the supervised rows, moved to the longer rows in the padded form): the same
    loss and gradients, and the earlier layers' down projection runs on the padded M."""
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    kw = packed_inputs(model_type) if form == "packed" else _text_batch()
    want = _step(m, kw)
    b, n = kw["input_ids"].shape
    monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", "8")
    m_rows = b * (n + token_padding(b, n, kw.get("cu_seqlens"), None, None))
    assert m_rows % 8 == 0 and m_rows > b * n
    inter = m.config.text_config.intermediate_size
    with _MatmulRows() as mm:
        got = _step(m, kw)
    assert m_rows in [s[0] for s in mm.shapes if s[1] == inter]
    _assert_same_step(got, want)
    with torch.no_grad():   # logits of every real row, no labels
        kw.pop("labels")
        padded = m(**kw).logits
        monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", "0")
        torch.testing.assert_close(padded, m(**kw).logits, atol=1e-5, rtol=1e-5)


def test_packed_equal_documents_through_sdpa(tmp_path, monkeypatch):
    """LLAVA_FAST_TEXT_ATTENTION=sdpa on a packed sequence of equal documents (the prefill's case): padded or not,
    the same logits."""
    _, path = save_tiny(tmp_path, "llava")
    m = llava_fast.from_pretrained(path)
    ids = torch.randint(3, 100, (1, 18))
    kw = dict(input_ids=ids, cu_seqlens=torch.tensor([0, 9, 18], dtype=torch.int32),
              position_ids=torch.arange(9).repeat(2)[None], max_seqlen=9)
    monkeypatch.setenv("LLAVA_FAST_TEXT_ATTENTION", "sdpa")
    with torch.no_grad():
        want = m(**kw).logits
        monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", "16")
        got = m(**kw).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padded_step_with_the_kernels(tmp_path, forced, monkeypatch):
    """The Triton kernels (interpreter) with padding: the same training step on the packed form; the same logits of a
    no-grad forward (the last residual add deferred into the final norm's kernel, the padding's rows sliced off
    before it) on the packed form and on an unmasked batch (RoPE's positions going on into the padding)."""
    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    forced("rms_norm", "rope", "swiglu", "cross_entropy", "attention")
    kw = packed_inputs("llava_onevision")
    want = _step(m, kw)
    monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", "16")
    _assert_same_step(_step(m, kw), want)
    kw.pop("labels")
    for inputs in (kw, dict(input_ids=_text_batch()["input_ids"])):
        with torch.no_grad():
            monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", "16")
            got = m(**inputs).logits
            monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", "0")
            torch.testing.assert_close(got, m(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_padded_forward_by_flash_rule(monkeypatch, tmp_path, dtype):
    """On the GPU (the prefill's path: SDPA over one-length documents, the padding document apart; an unmasked batch
    padded per sequence) and for a training step's loss: padded, the error against the fp32 CPU model is at most twice
    the unpadded run's."""
    _, path = save_tiny(tmp_path, "llava")
    ref_m = llava_fast.from_pretrained(path)
    m = llava_fast.from_pretrained(path, dtype=dtype).cuda()
    ids = torch.randint(3, 100, (3, 61))
    cu = torch.tensor([0, 61, 122, 183], dtype=torch.int32)
    pos = torch.arange(61).repeat(3)[None]
    with torch.no_grad():
        ref = ref_m(input_ids=ids).logits.float()
        runs = {}
        for pad in ("0", "64"):
            monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", pad)
            runs[pad] = (m(input_ids=ids.cuda()).logits.float().cpu(),
                         m(input_ids=ids.reshape(1, -1).cuda(), cu_seqlens=cu.cuda(), position_ids=pos.cuda(),
                           max_seqlen=61).logits.float().cpu().reshape(3, 61, -1))
    for padded, plain in zip(runs["64"], runs["0"]):
        err_pad, err_plain = (padded - ref).abs().max(), (plain - ref).abs().max()
        assert err_pad <= 2 * err_plain + 1e-3, (err_pad, err_plain)
    labels = ids.clone()
    labels[:, :8] = -100
    want = ref_m(input_ids=ids, labels=labels).loss
    losses = {}
    for pad in ("0", "64"):
        monkeypatch.setenv("LLAVA_FAST_PAD_TOKENS", pad)
        losses[pad] = m(input_ids=ids.cuda(), labels=labels.cuda(), logits=False).loss.float().cpu()
    assert (losses["64"] - want).abs() <= 2 * (losses["0"] - want).abs() + 1e-3, (losses, want)
