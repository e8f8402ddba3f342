"""The last decoder layer on the rows that are needed only (models/language.py ``rows``, models/llava.py
``keep_rows`` and the supervised rows of a loss without logits).

After its attention, a decoder layer is row-wise, and the last layer's output at a row only feeds that row's logits.
A training step that asks for the loss alone (``labels``, ``logits=False``) therefore keeps the rows whose shifted
label is supervised: the loss and every gradient equal the whole computation's (``LLAVA_FAST_LAST_LAYER_ROWS=all``),
and the last layer's output projection and MLP see those rows only. ``keep_rows`` gives the same to generation."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llava_fast
from llava_fast.models.llava import shift_labels

from test_llava_parity import make_batch
from test_model_kernels import packed_inputs
from tiny import save_tiny


class _MatmulRows(TorchDispatchMode):
    """The (M, K) of every 2-D matmul in the block (the linears' GEMMs)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a = args[0] if func is torch.ops.aten.mm.default else args[1]
            self.shapes.append(tuple(a.shape))
        return func(*args, **(kwargs or {}))


def _padded(model_type):
    b = make_batch(model_type, [[(20, 50)], [], [(60, 30)]], left_pad=False)
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes")}


def _step(m, kw, **extra):
    m.zero_grad(set_to_none=True)
    out = m(**kw, logits=False, **extra)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_same_step(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == want_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], atol=1e-6, rtol=1e-5, msg=lambda s: f"{n}: {s}")


def _supervised(kw) -> int:
    return int((shift_labels(kw["labels"], kw.get("cu_seqlens")) != -100).sum())


@pytest.mark.parametrize("model_type,form", [("llava", "padded"), ("llava_next", "packed"),
                                             ("llava_onevision", "packed"), ("llava_onevision", "padded")])
def test_loss_and_gradients_equal_every_row(tmp_path, monkeypatch, model_type, form):
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    kw = packed_inputs(model_type) if form == "packed" else _padded(model_type)
    n_rows, n_sup = kw["input_ids"].numel(), _supervised(kw)
    assert 0 < n_sup < n_rows
    inter = m.config.text_config.intermediate_size
    with _MatmulRows() as mm:
        got = _step(m, kw)
    down = [s[0] for s in mm.shapes if s[1] == inter]    # down_proj's GEMMs: forward and input gradient
    n_layers = m.config.text_config.num_hidden_layers
    # the last layer's down projection on the supervised rows alone, forward and backward; the others on every row
    assert sorted(down) == sorted([n_sup] * 2 + [n_rows] * 2 * (n_layers - 1)), down
    monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "all")
    with _MatmulRows() as mm:
        want = _step(m, kw)
    assert [s[0] for s in mm.shapes if s[1] == inter] == [n_rows] * 2 * n_layers
    _assert_same_step(got, want)
    # the loss with num_items_in_batch (sum / num_items), as the trainer computes it
    got = _step(m, kw, num_items_in_batch=torch.tensor(7.0))
    monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "supervised")
    _assert_same_step(_step(m, kw, num_items_in_batch=torch.tensor(7.0)), got)


def test_kernels_and_host_labels(tmp_path, forced, monkeypatch):
    """With the Triton kernels (interpreter) and the fused loss reading host labels, as a CUDA training step runs."""
    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    forced("rms_norm", "rope", "swiglu", "cross_entropy", "attention")
    kw = packed_inputs("llava_onevision")
    host = {k: kw[k].clone() for k in ("input_ids", "labels", "cu_seqlens", "position_ids")}
    got = _step(m, kw, host_inputs=host)
    monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "all")
    _assert_same_step(got, _step(m, kw, host_inputs=host))


def test_checkpointed_and_hooked_last_layer(tmp_path, monkeypatch):
    """Gradient checkpointing passes the rows into the checkpointed last layer; a hooked last layer sees every row
    (its hook gets its usual output) and the rows are selected after it. Both give the whole computation's step."""
    _, path = save_tiny(tmp_path, "llava_next")
    m = llava_fast.from_pretrained(path)
    kw = packed_inputs("llava_next")
    monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "all")
    want = _step(m, kw)
    monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "supervised")
    lm = m.model.language_model
    lm.gradient_checkpointing = True
    m.train()
    _assert_same_step(_step(m, kw), want)
    lm.gradient_checkpointing = False
    seen = []
    h = lm.layers[-1].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    try:
        _assert_same_step(_step(m, kw), want)
    finally:
        h.remove()
    assert seen == [(1, kw["input_ids"].shape[1], m.config.text_config.hidden_size)]


def test_no_row_supervised_computes_every_row(tmp_path, monkeypatch):
    """No pruning when no row is supervised (the loss's own all-ignored behaviour stays); text-only labels keep every
    row but each sample's last (no next token)."""
    _, path = save_tiny(tmp_path, "llava")
    m = llava_fast.from_pretrained(path)
    ids = torch.randint(0, 100, (2, 9))
    inter = m.config.text_config.intermediate_size
    for labels, kept in ((torch.full_like(ids, -100), 18), (ids.clone(), 16)):
        with torch.no_grad(), _MatmulRows() as mm:
            got = m(input_ids=ids, labels=labels, logits=False).loss
        assert [s[0] for s in mm.shapes if s[1] == inter] == [18, kept]
        monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "all")
        with torch.no_grad():
            want = m(input_ids=ids, labels=labels, logits=False).loss
        monkeypatch.delenv("LLAVA_FAST_LAST_LAYER_ROWS")
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("form", ["padded", "packed"])
def test_keep_rows(tmp_path, form):
    """``keep_rows``: the logits and hidden states of those rows, equal to the whole forward's, in the given order."""
    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    kw = packed_inputs("llava_onevision") if form == "packed" else _padded("llava_onevision")
    kw.pop("labels")
    n = kw["input_ids"].numel()
    rows = torch.tensor([n - 1, 0, 5, n // 2])
    with torch.no_grad():
        full = m(**kw, return_hidden=True)
        part = m(**kw, return_hidden=True, keep_rows=rows)
    d = full.logits.shape[-1]
    torch.testing.assert_close(part.logits, full.logits.reshape(-1, d)[rows][None], atol=1e-5, rtol=1e-5)
    h = full.hidden_states
    torch.testing.assert_close(part.hidden_states, h.reshape(-1, h.shape[-1])[rows][None], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        empty = m(**kw, keep_rows=torch.zeros(0, dtype=torch.long))
    assert empty.logits.shape == (1, 0, d)


def test_keep_rows_errors(tmp_path):
    _, path = save_tiny(tmp_path, "llava")
    m = llava_fast.from_pretrained(path)
    ids = torch.randint(0, 100, (2, 5))
    with pytest.raises(ValueError, match="keep_rows .*cannot be combined with labels"):
        m(input_ids=ids, labels=ids, keep_rows=torch.tensor([1]))
    with pytest.raises(ValueError, match="keep_rows must be a 1-D int64 tensor"):
        m(input_ids=ids, keep_rows=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="keep_rows must be a 1-D int64 tensor"):
        m(input_ids=ids, keep_rows=[1, 2])
    with pytest.raises(ValueError, match=r"keep_rows must lie in \[0, 10\)"):
        m(input_ids=ids, keep_rows=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="keep_rows holds a row twice"):
        m(input_ids=ids, keep_rows=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="LLAVA_FAST_LAST_LAYER_ROWS"):
        import os

        os.environ["LLAVA_FAST_LAST_LAYER_ROWS"] = "some"
        try:
            m(input_ids=ids, labels=ids, logits=False)
        finally:
            del os.environ["LLAVA_FAST_LAST_LAYER_ROWS"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_cuda_training_step_by_flash_rule(tmp_path, monkeypatch, model_type, dtype):
    """bf16/fp16 training step with every kernel and the host labels, as the trainer runs it: the supervised-rows
    step's loss and gradients against the fp32 step (every row) within twice the error of the low-precision step
    on every row."""
    from utils import assert_flash_rule

    _, path = save_tiny(tmp_path, model_type)
    kw = packed_inputs(model_type)
    host = {k: kw[k].clone() for k in ("input_ids", "labels", "cu_seqlens", "position_ids")}
    dev = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}

    def run(dt, rows, device="cuda"):
        monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", rows)
        m = llava_fast.from_pretrained(path, dtype=dt, device=device)
        args = dict(dev if device == "cuda" else kw)
        args["pixel_values"] = args["pixel_values"].to(dt)
        loss, grads = _step(m, args, host_inputs=host)
        return loss.cpu(), {n: g.cpu() for n, g in grads.items()}
    # the fp32 reference on the CPU (the reference path: no TF32 anywhere)
    ref, low, got = run(torch.float32, "all", "cpu"), run(dtype, "all"), run(dtype, "supervised")
    assert_flash_rule(got[0].float(), ref[0], low[0].float(), name="loss", atol=1e-6)
    for n in ref[1]:
        assert_flash_rule(got[1][n].float(), ref[1][n], low[1][n].float(), name=n, atol=1e-6)
