"""patch_hf: a transformers model patched with our kernels (forced on, interpreter on CPU) gives its own outputs."""
from __future__ import annotations

import contextlib
import copy
import types
import warnings

import pytest
import torch

import llava_fast
from llava_fast.patching import patch_hf

from test_llava_parity import hf_pixels, make_batch
from tiny import IMAGE_TOKEN, hf_model

_OPS = ("rms_norm", "swiglu", "attention", "vision_attention", "projector", "rope", "quick_gelu")


def _inputs(model_type):
    batch = make_batch(model_type, [[(20, 50) if model_type != "llava" else (28, 28)]], left_pad=False)
    kw = dict(input_ids=batch["input_ids"], pixel_values=hf_pixels(model_type, batch), labels=batch["labels"])
    if model_type != "llava":
        kw["image_sizes"] = batch["image_sizes"]
    return kw


@contextlib.contextmanager
def _forced(*ops):
    try:
        for op in ops:
            llava_fast.set_backend(op, "triton")
        yield
    finally:
        llava_fast.set_backend("all", "auto")


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_patched_equals_unpatched(model_type):
    hf = hf_model(model_type)
    kw = _inputs(model_type)
    ref = hf(**kw)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    patch_hf(hf)
    assert hf._llava_fast_patched["rms_norm"] > 0 and hf._llava_fast_patched["swiglu"] > 0
    # CLIP's MLP activation (LLaVA-1.5 / NeXT): one QuickGELU per tower layer; SigLIP's is a GELU (not swapped)
    clip = hf.config.vision_config.model_type == "clip_vision_model"
    assert hf._llava_fast_patched["quick_gelu"] == (hf.config.vision_config.num_hidden_layers if clip else 0)
    try:
        for op in _OPS:
            llava_fast.set_backend(op, "triton")
        out = hf(**kw)
        out.loss.backward()
    finally:
        llava_fast.set_backend("all", "auto")
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    for n, p in hf.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_patch_errors(monkeypatch):
    with pytest.raises(ValueError, match="supports transformers"):
        patch_hf(torch.nn.Linear(2, 2))
    # a transformers version whose attention module has no apply_rotary_pos_emb to swap: said, before any swap
    import transformers.models.llama.modeling_llama as ml

    hf = hf_model("llava_next")
    monkeypatch.delattr(ml, "apply_rotary_pos_emb")
    with pytest.raises(ValueError, match="rope=False"):
        patch_hf(hf)
    assert not any("forward" in vars(m) or m._forward_hooks for m in hf.modules())
    assert patch_hf(hf, rope=False)._llava_fast_patched["rope"] == 0


def _grads(model, which=lambda n: True):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and which(n)}


@pytest.mark.parametrize("order", ["patch_then_lora", "lora_then_patch", "peft_model"])
def test_patch_keeps_lora_adapters(order):
    """The fused projector took linear_1/linear_2.weight: peft's LoRA layers there (whose .weight is the frozen base)
    were silently skipped, whether injected before or after patch_hf; a PeftModel was refused."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    cfg = LoraConfig(r=4, target_modules=["linear_1", "linear_2", "gate_proj", "down_proj", "q_proj"],
                     init_lora_weights=False)  # random B: the adapters change the output
    hf = hf_model("llava")
    if order == "patch_then_lora":
        patch_hf(hf)
    hf = get_peft_model(hf, cfg) if order == "peft_model" else inject_adapter_in_model(cfg, hf)
    ref = copy.deepcopy(hf)
    if order != "patch_then_lora":
        patch_hf(hf)
    else:  # ref: the same adapters on an unpatched model
        ref = inject_adapter_in_model(cfg, hf_model("llava"))
        ref.load_state_dict(hf.state_dict())
    kw = _inputs("llava")
    r = ref(**kw)
    r.loss.backward()
    with _forced("rms_norm", "swiglu", "projector"):
        out = hf(**kw)
        out.loss.backward()
    torch.testing.assert_close(out.logits, r.logits, atol=1e-4, rtol=0)
    lora = _grads(hf, lambda n: "lora_" in n)
    ref_lora = _grads(ref, lambda n: "lora_" in n)
    assert any("multi_modal_projector.linear_1" in n for n in ref_lora)
    assert lora.keys() == ref_lora.keys()
    for n, g in lora.items():
        torch.testing.assert_close(g, ref_lora[n], atol=1e-4, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


def test_patch_keeps_hooks():
    """Forward and backward hooks on modules that the fused ops bypass (the projector's linears and activation, the
    MLP's act_fn) were silently not run: they run, and a hook that changes an output changes the model's output as
    before."""
    names = ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.act",
             "model.multi_modal_projector.linear_2", "model.language_model.layers.0.mlp.act_fn",
             "model.language_model.layers.1.mlp", "model.language_model.norm"]
    bwd_names = ["model.language_model.layers.1.mlp.act_fn"]  # a backward hook only (the projector's: below)

    def hooked(model, calls):
        mods = dict(model.named_modules())
        for n in names:
            mods[n].register_forward_hook(lambda m, i, o, n=n: calls.append(n) or o * 2)
        for n in bwd_names:
            mods[n].register_full_backward_hook(lambda m, gi, go, n=n: calls.append("bwd " + n))
        return model

    kw = _inputs("llava")
    ref_calls, calls = [], []
    ref = hooked(hf_model("llava"), ref_calls)(**kw)
    ref.loss.backward()
    hf = patch_hf(hooked(hf_model("llava"), calls))
    with _forced("rms_norm", "swiglu", "projector"):
        out = hf(**kw)
        out.loss.backward()
    assert sorted(calls) == sorted(ref_calls) and set(calls) == set(names) | {"bwd " + n for n in bwd_names}
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_patch_projector_backward_hook():
    """A backward hook alone on a projector linear: the fused projector never called it, so it never fired."""
    hf = hf_model("llava")
    proj = hf.model.multi_modal_projector
    calls = []
    proj.linear_2.register_full_backward_hook(lambda m, gi, go: calls.append(go[0].shape))
    x = torch.randn(2, 9, proj.linear_1.in_features)
    proj(x).sum().backward()
    ref_grad, proj.linear_1.weight.grad = proj.linear_1.weight.grad, None
    patch_hf(hf)
    with _forced("projector"):
        proj(x).sum().backward()
    assert len(calls) == 2 and calls[0] == calls[1]
    torch.testing.assert_close(proj.linear_1.weight.grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_patch_static_cache_prefill():
    """A prefill into an empty StaticCache passes no mask and more keys than queries (transformers means SDPA's
    top-left causal mask); our kernel's bottom-right alignment let the queries see the empty cache slots."""
    from transformers import StaticCache

    hf = hf_model("llava")
    ids = torch.randint(0, 100, (2, 12))

    def prefill(model):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    ref = prefill(hf)
    patch_hf(hf)
    with _forced("attention"):
        out = prefill(hf)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_patch_output_attentions_falls_back(monkeypatch):
    """output_attentions=True: our kernel returns no weights; the call goes to transformers' SDPA path, which says so
    (as for attn_implementation="sdpa"), instead of the weights silently missing."""
    import transformers.integrations.sdpa_attention as sdpa

    seen = []
    orig = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: seen.append(1) or orig(*a, **k))
    hf = patch_hf(hf_model("llava"))
    ids = torch.randint(0, 100, (1, 12))
    with _forced("attention"), torch.no_grad():
        hf(input_ids=ids)
        assert not seen  # the kernel serves the plain call
        hf(input_ids=ids, output_attentions=True)
    assert len(seen) == hf.config.text_config.num_hidden_layers


def _unpatched_then_patched(model_type, kw):
    """A tiny transformers model run on ``kw`` (forward and backward), then patched: (model, its output, its
    gradients), the gradients cleared."""
    hf = hf_model(model_type)
    ref = hf(**kw)
    ref.loss.backward()
    ref_grads = _grads(hf)
    hf.zero_grad(set_to_none=True)
    return patch_hf(hf), ref, ref_grads


def _assert_grads(model, ref_grads):
    assert ref_grads
    for n, g in ref_grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, atol=1e-4, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


def _packed(model_type, rows):
    """transformers' padding-free format (DataCollatorWithFlattening): each row the samples' tokens back to back,
    position_ids restarting at each sample, no attention mask. ``rows``: per row, its samples (lists of image sizes;
    [] = text only); rows must come out equally long. Returns (kwargs, the rows' document lengths, the batch)."""
    size = (28, 28) if model_type == "llava" else (20, 50)
    flat = [[size] * n for row in rows for n in row]
    b = make_batch(model_type, flat, left_pad=False)
    ids, pos, lengths, k = [], [], [], 0
    for row in rows:
        seqs = b["seqs"][k:k + len(row)]
        k += len(row)
        ids.append(torch.tensor([t for s in seqs for t in s]))
        pos.append(torch.cat([torch.arange(len(s)) for s in seqs]))
        lengths.append([len(s) for s in seqs])
    ids, pos = torch.stack(ids), torch.stack(pos)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    kw = dict(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
    if b["image_sizes"] is not None:
        kw["pixel_values"] = hf_pixels(model_type, b)
        if model_type != "llava":
            kw["image_sizes"] = b["image_sizes"]
    return kw, lengths, b


@pytest.fixture
def varlen_calls(monkeypatch):
    """The language model's (causal) calls of the varlen kernel: their cu_seqlens as lists."""
    from llava_fast.ops import attention as attn_op

    calls = []
    orig = attn_op.flash_attn_varlen_func

    def spy(q, k, v, cu_q, cu_k, *a, **kw):
        if kw.get("causal"):
            calls.append(cu_q.tolist())
        return orig(q, k, v, cu_q, cu_k, *a, **kw)
    monkeypatch.setattr(attn_op, "flash_attn_varlen_func", spy)
    return calls


@pytest.mark.parametrize("rows", [[[1, 0, 1]], [[1, 0], [0, 1]]], ids=["one_row_3_docs", "two_rows_2_docs"])
@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_patched_packed_rows_run_by_document(model_type, rows, varlen_calls):
    """Documents packed into a row (position ids that restart, no attention mask, no cache) reach the attention as
    transformers' block-causal mask, which sent every patched layer to SDPA with that mask (all of its L x L work).
    The varlen kernel runs them now, split at the same places as transformers' find_packed_sequence_indices: the
    logits and every gradient equal the unpatched model's on the same rows, and each document's logits equal the
    document run alone."""
    kw, lengths, _ = _packed(model_type, rows)
    hf, ref, ref_grads = _unpatched_then_patched(model_type, kw)
    text_docs = []  # (row, start, end) of the text-only documents, which run alone without pixels
    for r, (row, lens) in enumerate(zip(rows, lengths)):
        starts = torch.tensor([0] + lens).cumsum(0).tolist()
        text_docs += [(r, starts[i], starts[i + 1]) for i, n in enumerate(row) if n == 0]
    with _forced(*_OPS):
        out = hf(**kw)
        out.loss.backward()
        with torch.no_grad():
            alone = [(r, a, e, hf(input_ids=kw["input_ids"][r:r + 1, a:e], use_cache=False).logits)
                     for r, a, e in text_docs]
    cu = torch.tensor([0] + [n for lens in lengths for n in lens]).cumsum(0).tolist()
    assert varlen_calls[:hf.config.text_config.num_hidden_layers] == [cu] * hf.config.text_config.num_hidden_layers
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    _assert_grads(hf, ref_grads)
    assert alone
    for r, a, e, logits in alone:
        torch.testing.assert_close(out.logits[r:r + 1, a:e], logits, atol=1e-4, rtol=0)


def _padded(model_type, side):
    """Three rows of different lengths (image, text only, image), padded on ``side``, with their attention mask."""
    size = (28, 28) if model_type == "llava" else (20, 50)
    batch = make_batch(model_type, [[size], [], [size]], left_pad=side == "left")
    labels = batch["labels"].clone()
    # a label on a left-padded row's first real token is predicted from the padding position before it: transformers'
    # SDPA output there is a value of its own, ours zeros (as flash_attention_2's); no prompt supervises that token
    labels[:, 1:][(batch["attention_mask"][:, 1:] == 1) & (batch["attention_mask"][:, :-1] == 0)] = -100
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
              pixel_values=hf_pixels(model_type, batch))
    if model_type != "llava":
        kw["image_sizes"] = batch["image_sizes"]
    return kw


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_patched_padded_rows_run_unpadded(model_type, side, varlen_calls):
    """Padded rows (a padding mask) went to SDPA with transformers' L x L mask. The varlen kernel runs each row's
    real tokens now (unpadded, as flash_attention_2 does): the logits of the real tokens, the loss and every gradient
    equal the unpatched model's; greedy generation from left-padded prompts gives its tokens."""
    kw = _padded(model_type, side)
    hf, ref, ref_grads = _unpatched_then_patched(model_type, kw)
    with _forced(*_OPS):
        out = hf(**kw)
        out.loss.backward()
    real = kw["attention_mask"].bool()
    cu = torch.tensor([0] + real.sum(1).tolist()).cumsum(0).tolist()
    layers = hf.config.text_config.num_hidden_layers
    assert varlen_calls == [cu] * layers
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    _assert_grads(hf, ref_grads)
    if side == "left":
        gen = dict(kw)
        gen.pop("labels")
        unpatched = hf_model(model_type)
        with torch.no_grad():
            want = unpatched.generate(**gen, max_new_tokens=6, do_sample=False, pad_token_id=0)
            with _forced("attention", "rope"):
                got = hf.generate(**gen, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["padding_mask", "cache", "sliding_window"])
def test_patched_rows_not_split_without_packing(case, varlen_calls):
    """Where transformers' mask is not its packed-sequence mask, the rows are not split into documents, even with
    position ids that restart: a padding mask (the positions of a right-padded row restart in the padding), a cache
    (use_cache defaults to True, also in training: transformers then looks for no packed documents and a row attends
    across them, its SDPA and eager paths alike; the patched model does the same) and a sliding window shorter than
    the row (its mask is more than causal). Each gives the unpatched model's logits; the kernel runs the padded row as
    one document of its real tokens, the cached one whole, the sliding window not at all."""
    import transformers as tf

    from tiny import hf_config

    kw, lengths, _ = _packed("llava", [[0, 0, 0]])
    if case == "padding_mask":
        kw["attention_mask"] = torch.ones_like(kw["input_ids"])
        kw["attention_mask"][:, -lengths[0][-1]:] = 0
    if case == "cache":
        kw.pop("use_cache")
    torch.manual_seed(0)
    cfg = hf_config("llava", text="mistral")
    cfg.text_config.sliding_window = 8 if case == "sliding_window" else None
    hf = tf.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        ref = hf(**kw).logits
        patch_hf(hf)
        with _forced("attention"):
            out = hf(**kw).logits
    valid = kw.get("attention_mask", torch.ones_like(kw["input_ids"])).bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=0)
    layers = hf.config.text_config.num_hidden_layers
    # a padded row is one document of its real tokens; a cache leaves the row whole
    whole = {"cache": kw["input_ids"].shape[1], "padding_mask": int(valid.sum())}
    assert varlen_calls == ([[0, whole[case]]] * layers if case in whole else [])


@pytest.mark.parametrize("mask", ["not_causal", "other_split"])
def test_packed_mask_checked_before_the_kernel(mask, varlen_calls):
    """A tagged mask that is not causal within the documents of the position ids (a mask function of another
    transformers version, say) is not taken for them: SDPA runs it as given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llava_fast.patching import llava_fast_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    m = {"not_causal": doc[:, None] == doc[None, :],
         "other_split": causal & ((doc[:, None] == doc[None, :]) | (torch.arange(9)[None, :] < 2))}[mask][None, None]
    ref = sdpa_attention_forward(module, q, k, v, m.clone(), scaling=0.25)[0]
    m._lf_tagged, m._lf_padding = True, None
    with _forced("attention"):
        out = llava_fast_attention(module, q, k, v, m, scaling=0.25, position_ids=pos)[0]
        assert not varlen_calls
        good = (causal & (doc[:, None] == doc[None, :]))[None, None]
        good._lf_tagged, good._lf_padding = True, None   # the mask these documents give: the kernel runs it
        llava_fast_attention(module, q, k, v, good, scaling=0.25, position_ids=pos)
    torch.testing.assert_close(out, ref)
    assert varlen_calls == [[0, 4, 9]]


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_patched_fused_loss(model_type):
    """patch_hf(cross_entropy=True): in training with labels the loss comes from the fused linear cross-entropy and
    logits is None (no tokens x vocab tensor); transformers' loss (the mean, and the sum over num_items_in_batch) and
    every gradient, lm_head's or the tied embedding's included, are the unpatched model's. Eval mode and a hooked
    lm_head run the original forward (logits given); the forward keeps transformers' signature (its Trainer keeps the
    dataset columns that the signature names)."""
    import inspect

    kw = _padded(model_type, "right")
    hf = hf_model(model_type).train()
    ref = hf(**kw)
    ref.loss.backward()
    ref_grads = _grads(hf)
    hf.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_sum = hf(**kw, num_items_in_batch=torch.tensor(7)).loss
    patch_hf(hf, cross_entropy=True)
    assert hf._llava_fast_patched["cross_entropy"]
    assert inspect.signature(hf.forward) == inspect.signature(types.MethodType(type(hf).forward, hf))
    calls = []
    with _forced(*_OPS, "cross_entropy"):
        import llava_fast.ops.cross_entropy as ce

        orig = ce.fused_linear_cross_entropy
        ce.fused_linear_cross_entropy = lambda *a, **k: calls.append(1) or orig(*a, **k)
        try:
            out = hf(**kw)
            out.loss.backward()
            with torch.no_grad():
                out_sum = hf(**kw, num_items_in_batch=torch.tensor(7)).loss
            hf.eval()
            with torch.no_grad():
                evaluated = hf(**kw)
            hf.train()
            handle = hf.lm_head.register_forward_hook(lambda m, i, o: o)
            with torch.no_grad():
                hooked = hf(**kw)
            handle.remove()
        finally:
            ce.fused_linear_cross_entropy = orig
    assert calls == [1, 1] and out.logits is None
    assert evaluated.logits is not None and hooked.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_sum, ref_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(evaluated.loss, ref.loss, atol=1e-5, rtol=0)
    if model_type == "llava_onevision":
        assert hf.lm_head.weight is hf.get_input_embeddings().weight   # tied: one gradient from both uses
    _assert_grads(hf, ref_grads)


def _trainer_run(out, patch, rows, steps=2, cuda=False, bf16=False, forced=()):
    """A OneVision tiny model trained by transformers' own Trainer as users run it: padding-free batches from
    DataCollatorWithFlattening, gradient accumulation (the Trainer passes num_items_in_batch), the dataset's columns
    kept by the forward's signature; ``patch``: patch_hf with the fused loss first. Returns the logged losses and
    the final weights (fp32, on the CPU)."""
    import transformers as tf

    model = hf_model("llava_onevision")
    args = tf.TrainingArguments(output_dir=str(out), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                                max_steps=steps, learning_rate=1e-3, report_to=[], use_cpu=not cuda, bf16=bf16,
                                logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = tf.Trainer(model=patch_hf(model, cross_entropy=True) if patch else model, args=args,
                         train_dataset=rows, data_collator=tf.DataCollatorWithFlattening())
    with _forced(*forced):
        trainer.train()
    weights = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters()}
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], weights


def _token_rows(lengths):
    torch.manual_seed(0)
    return [dict(input_ids=torch.randint(0, 100, (n,)).tolist(), labels=torch.randint(0, 100, (n,)).tolist())
            for n in lengths]


def test_patched_trains_under_transformers_trainer(tmp_path, monkeypatch):
    """The patched model (fused loss included) in transformers' own Trainer (``_trainer_run``): the logged losses
    equal the unpatched model's; the fused loss ran, with the step's token count."""
    import llava_fast.ops.cross_entropy as ce

    rows = _token_rows((7, 11, 5, 9, 6, 8))
    calls = []
    orig = ce.fused_linear_cross_entropy
    monkeypatch.setattr(ce, "fused_linear_cross_entropy", lambda *a, **k: calls.append(k["num_items"]) or orig(*a, **k))
    ref, _ = _trainer_run(tmp_path / "ref", False, rows)
    assert not calls
    ours, _ = _trainer_run(tmp_path / "ours", True, rows, forced=("rms_norm", "swiglu", "attention", "cross_entropy"))
    assert ours == pytest.approx(ref, abs=1e-5) and len(ref) == 2
    assert len(calls) == 4 and all(n is not None for n in calls)   # 2 steps x 2 micro-batches, summed over the step


@pytest.mark.cuda
def test_cuda_patched_trains_like_unpatched(tmp_path):
    """Twelve steps of transformers' Trainer with ``bf16=True`` (fp32 weights under autocast, as users train) on the
    GPU, the patched model (the kernels ``auto`` picks on CUDA, fused loss, RoPE on transformers' tables) against
    the unpatched one, both measured from an fp32 run on the CPU (no TF32): flash-attn's rule over a run, as
    tests/train/test_convergence.py applies it to our trainer. The patched run's losses and trained weights are at
    most twice as far from the fp32 run as the unpatched run's (floors 1e-4 and 1e-6 for a run that lands on the
    oracle by luck: tests/utils.assert_run_flash_rule) (session 36, not yet run on a GPU)."""
    from utils import assert_run_flash_rule

    rows = _token_rows([5 + (7 * i) % 13 for i in range(72)])   # 12 steps x 2 micro-batches x 3 rows
    steps = 12
    oracle = _trainer_run(tmp_path / "fp32", False, rows, steps)
    low = _trainer_run(tmp_path / "bf16", False, rows, steps, cuda=True, bf16=True)
    ours = _trainer_run(tmp_path / "ours", True, rows, steps, cuda=True, bf16=True)
    assert len(ours[0]) == len(oracle[0]) == steps
    as_hist = lambda run: ([{"loss": x} for x in run[0]], run[1])   # noqa: E731
    assert_run_flash_rule("test_cuda_patched_trains_like_unpatched", as_hist(ours), as_hist(low), as_hist(oracle),
                          ("patched", "unpatched_bf16"))


def test_unpatch_restores_transformers():
    """unpatch_hf undoes patch_hf (applied twice, fused loss included): transformers' forwards, no SigLIP hook, the
    attention implementation the model had, and bit for bit the outputs of a model never patched; a model never
    patched is left as it is, and patching again works."""
    from llava_fast import patching, unpatch_hf

    hf = hf_model("llava_onevision").train()
    never = copy.deepcopy(hf)
    kw = _padded("llava_onevision", "right")
    before = hf.config._attn_implementation
    patch_hf(patch_hf(hf, cross_entropy=True))
    assert hf.config._attn_implementation == "llava_fast" and "forward" in vars(hf)
    assert unpatch_hf(hf) is hf
    assert not any("forward" in vars(m) for m in hf.modules())
    # (transformers 5.0-5.3 add output-recording hooks of their own at the first forward: only ours must be gone)
    ours = (patching._contiguous_output, patching._tag_rotary)
    assert not any(h in ours for m in hf.modules() for h in m._forward_hooks.values())
    assert hf.config._attn_implementation == before and not hasattr(hf, "_llava_fast_patched")
    with _forced(*_OPS, "cross_entropy"):
        out, ref = hf(**kw), never(**kw)
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=0, rtol=0)
    own = [vars(m).get("forward") for m in never.modules()]   # (5.0-5.3 set some in their first forward)
    unpatch_hf(never)
    assert [vars(m).get("forward") for m in never.modules()] == own
    patch_hf(hf)
    assert hf._llava_fast_patched["rms_norm"] > 0 and hf.config._attn_implementation == "llava_fast"
    clip = patch_hf(hf_model("llava"))   # CLIP's QuickGELU modules too
    assert clip._llava_fast_patched["quick_gelu"] > 0
    assert not any("forward" in vars(m) for m in unpatch_hf(clip).modules())


@pytest.fixture
def rope_calls(monkeypatch):
    """The calls of the RoPE kernel on transformers' tables (patch_hf(rope=True)): q's (token-major) shapes."""
    from llava_fast.ops import rope as rope_op

    calls = []
    orig = rope_op.RoPETablesFunction.apply
    monkeypatch.setattr(rope_op.RoPETablesFunction, "apply", lambda *a: calls.append(tuple(a[0].shape)) or orig(*a))
    return calls


@pytest.mark.parametrize("model_type", ["llava", "llava_onevision"])
def test_patched_rope(model_type, rope_calls):
    """patch_hf(rope=True) (the default) swaps transformers' module-level apply_rotary_pos_emb, as Liger-Kernel does,
    but only a patched model's tables take the kernel: a second, unpatched model in the same process keeps
    transformers' computation bit for bit. The patched model's logits and gradients equal the unpatched ones (fp32:
    the kernel rounds once, as each of transformers' fp32 ops does), with gradient checkpointing too (the recompute
    runs the kernel again); its tables are freed after the step (no reference cycle through a tensor attribute)."""
    import gc
    import weakref

    kw = _inputs(model_type)
    hf, ref, ref_grads = _unpatched_then_patched(model_type, kw)
    other = hf_model(model_type)
    layers = hf.config.text_config.num_hidden_layers
    tables = []
    rotary = next(m for m in hf.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    rotary.register_forward_hook(lambda m, a, out: tables.append(weakref.ref(out[0])))
    with _forced("rope"):
        out = hf(**kw)
        out.loss.backward()
        assert len(rope_calls) == layers and rope_calls[0][:2] == tuple(kw["input_ids"].shape)
        other_out = other(**kw)
    assert len(rope_calls) == layers   # (the unpatched model did not take the kernel)
    torch.testing.assert_close(other_out.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    _assert_grads(hf, ref_grads)
    del out
    gc.collect()
    assert tables and tables[0]() is None
    hf.zero_grad(set_to_none=True)
    hf.train()
    with warnings.catch_warnings():   # (deprecated for activation_checkpointing_enable in transformers 5.2x)
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rope_calls.clear()
    with _forced("rope"):
        hf(**kw).loss.backward()
    assert len(rope_calls) == 2 * layers
    _assert_grads(hf, ref_grads)


def test_patched_rope_under_autocast(rope_calls):
    """Under autocast (a Trainer with bf16=True and fp32 weights) transformers' cos / sin stay fp32 next to bf16 q / k
    and its RoPE returns fp32: the kernel does the same (it multiplies by the fp32 tables as they are), so the
    forward is transformers' bit for bit. The backward rounds once where transformers rounds three times: each
    gradient of the language model by flash-attn's rule against the fp32 model (no autocast), in the relative L2
    norm: the two runs differ only by the rounding of dq / dk, but every bf16 GEMM upstream and downstream adds its
    own error, so the largest entry's error of a small tensor whose values are ~0 (a k bias: a shift of every key
    that softmax ignores) moves by 2.7x between the two runs by chance (seed 0), and over seeds 0-2 the L2 ratio is
    at most 1.51. The kernel's own rule, by the largest error, is tests/ops/test_rope.py's."""
    model_type = "llava_onevision"
    kw = _inputs(model_type)
    hf = hf_model(model_type)
    hf(**kw).loss.backward()
    ref32 = _grads(hf)
    hf.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = hf(**kw)
    low.loss.backward()
    low_grads = _grads(hf)
    hf.zero_grad(set_to_none=True)
    # only RoPE (the attention's SDPA fallback and SigLIP's layout round differently from eager in bf16)
    patch_hf(hf, rms_norm=False, swiglu=False, attention=False, projector=False, vision_layout=False)
    with _forced("rope"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = hf(**kw)
    out.loss.backward()
    assert rope_calls
    torch.testing.assert_close(out.logits, low.logits, atol=0, rtol=0)
    assert ref32.keys() == low_grads.keys() == _grads(hf).keys()
    checked = 0
    for n, g in ref32.items():
        if "language_model" in n:
            err = (hf.get_parameter(n).grad - g).norm() / g.norm()
            base = (low_grads[n] - g).norm() / g.norm()
            assert err <= 2 * base, f"d {n}: relative L2 error {err:.3e} > 2 x transformers' {base:.3e}"
            checked += 1
    assert checked >= 20


def test_patched_model_under_torch_compile():
    """A patched model compiled whole (aot_eager: dynamo, the custom ops' fakes, AOT autograd) gives the eager patched
    model's logits, loss and gradients on padded rows. While compiling, the mask tagging and the RoPE tables' tags
    are off (transformers' paths are traced, which inductor fuses on a GPU); the kernels' custom ops are traced.
    Checked by script in session 34, a test since session 35."""
    model_type = "llava_onevision"
    kw = _padded(model_type, "right")
    hf = patch_hf(hf_model(model_type))
    real = kw["attention_mask"].bool()
    with _forced(*_OPS):
        ref = hf(**kw)
        ref.loss.backward()
        ref_grads = _grads(hf)
        hf.zero_grad(set_to_none=True)
        out = torch.compile(hf, backend="aot_eager")(**kw)
        out.loss.backward()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    _assert_grads(hf, ref_grads)


@pytest.mark.parametrize("act", ["gelu_fast", "gelu_python", "gelu_pytorch_tanh"])
def test_patch_projector_act(act):
    """The projector's GELU flavour follows projector_hidden_act (gelu_fast is the tanh approximation)."""
    hf = hf_model("llava_next", projector_hidden_act=act)
    proj = hf.model.multi_modal_projector
    x = torch.randn(2, 9, proj.linear_1.in_features) * 3
    with torch.no_grad():
        ref = proj(x)
        patch_hf(hf)
        with _forced("projector"):
            out = proj(x)
    assert hf._llava_fast_patched["projector"] == 1
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_patch_logs_what_it_swapped(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="llava_fast"):
        patch_hf(hf_model("llava_onevision"))
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "llava_fast"]
    assert msg == ("patch_hf(LlavaOnevisionForConditionalGeneration): rms_norm x5, swiglu x2, projector x1, "
                   "attention, vision_layout x1, rope x1")


def test_patch_twice_bf16_no_grad():
    """patch_hf twice is patch_hf once; bf16 (CPU) in eval mode under no_grad (reference backends: bit-exact) and with
    gradients, rms_norm and swiglu forced (the interpreter's bf16 tl.dot is wrong, tests/ops/test_attention.py, so
    attention and the projector stay on the reference here)."""
    base = hf_model("llava_onevision").to(torch.bfloat16)
    base.set_attn_implementation("sdpa")
    kw = _inputs("llava_onevision")
    kw["pixel_values"] = kw["pixel_values"].to(torch.bfloat16)
    # the vision layout patch alone changes the rounding of the projector's first GEMM (its input is contiguous
    # now: see patch_hf's docstring): the reference has it too, so that every other patch is checked bit for bit
    patch_hf(base, rms_norm=False, swiglu=False, attention=False, projector=False)
    with torch.no_grad():
        ref_nograd = base(**kw).logits
    ref = base(**kw)
    ref.loss.backward()
    hf = copy.deepcopy(base)
    hf.zero_grad(set_to_none=True)
    patch_hf(patch_hf(hf))
    assert hf._llava_fast_patched == {"rms_norm": 5, "swiglu": 2, "projector": 1, "attention": True,
                                      "vision_layout": 1, "cross_entropy": False, "rope": 1, "quick_gelu": 0}
    hooks = next(m for m in hf.modules() if type(m).__name__ == "SiglipVisionEmbeddings")._forward_hooks
    assert len(hooks) == 1  # patched twice, hooked once
    with torch.no_grad():
        torch.testing.assert_close(hf(**kw).logits, ref_nograd, atol=0, rtol=0)
    with _forced("rms_norm", "swiglu"):
        out = hf(**kw)
        out.loss.backward()
    # the kernels' fp32 sums round differently from eager's: one bf16 ulp (2^-8 below magnitude 1: logits, grads)
    tol = {"atol": 2 ** -7, "rtol": 0}
    torch.testing.assert_close(out.logits, ref.logits, **tol)
    for n, g in _grads(base).items():
        torch.testing.assert_close(hf.get_parameter(n).grad, g, **tol, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("bad", ["projector_act", "hidden_act", "text_type"])
def test_patch_refuses_before_swapping(bad):
    """What patch_hf cannot patch is a ValueError, raised before any module is swapped (a quick_gelu projector was
    silently computed as GELU)."""
    hf = hf_model("llava", **({"projector_hidden_act": "quick_gelu"} if bad == "projector_act" else {}))
    if bad == "hidden_act":
        hf.config.text_config.hidden_act = "gelu"
    if bad == "text_type":
        hf.config.text_config.model_type = "gemma"
    match = {"projector_act": "projector_hidden_act", "hidden_act": "hidden_act='silu'", "text_type": "gemma"}[bad]
    with pytest.raises(ValueError, match=match):
        patch_hf(hf)
    assert not any("forward" in vars(m) for m in hf.modules())
    assert not hasattr(hf, "_llava_fast_patched")


def _patched_by_flash_rule(model_type, dtype, rows, dev):
    """The body of test_cuda_patched_by_flash_rule, on ``dev`` (its docstring says what it checks)."""
    from utils import assert_flash_rule, max_err

    ref = hf_model(model_type)   # the fp32 reference on the CPU: no TF32 anywhere (cuDNN's convolutions use it)
    low = copy.deepcopy(ref).to(dev, dtype)
    ours = patch_hf(copy.deepcopy(low), cross_entropy=rows == "fused_loss")
    if rows == "fused_loss":   # the fused loss runs in training (the tiny models have no dropout)
        for m in (ref, low, ours):
            m.train()
    kw = {"one_sample": lambda: _inputs(model_type), "packed": lambda: _packed(model_type, [[1, 0], [0, 1]])[0],
          "padded": lambda: _padded(model_type, "left"), "fused_loss": lambda: _padded(model_type, "right")}[rows]()
    real = kw["attention_mask"].bool() if "attention_mask" in kw else torch.ones(kw["input_ids"].shape, dtype=bool)
    outs = {}
    for name, m in (("ref", ref), ("low", low), ("ours", ours)):
        args = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in kw.items()} if name != "ref" else dict(kw)
        args["pixel_values"] = args["pixel_values"].to(torch.float32 if name == "ref" else dtype)
        out = m(**args)
        out.loss.backward()
        grads = {n: p.grad.float().cpu() for n, p in m.named_parameters()
                 if p.grad is not None and p.dim() == 2 and ("language_model" in n or "projector" in n
                                                             or "lm_head" in n)}
        logits = out.logits.detach().float().cpu()[real] if out.logits is not None else None
        outs[name] = (logits, out.loss.detach().float().cpu(), grads)
    assert ours._llava_fast_patched["rms_norm"] > 0
    (r_logits, r_loss, r_grads), (l_logits, l_loss, l_grads), (o_logits, o_loss, o_grads) = (
        outs["ref"], outs["low"], outs["ours"])
    if rows == "fused_loss":
        assert o_logits is None   # the fused loss computed no logits
    else:
        assert_flash_rule(o_logits, r_logits, l_logits, name=f"{model_type} logits")
    # a scalar: PyTorch's own error can be ~0 by luck. The floor: a mean of log-softmax entries moves by at most
    # twice the largest logit error (log-softmax is 2-Lipschitz in the max norm), taken at PyTorch's logit error
    assert_flash_rule(o_loss, r_loss, l_loss, name="loss", atol=2 * max_err(l_logits, r_logits))
    assert r_grads.keys() == o_grads.keys() == l_grads.keys() and r_grads
    for n in r_grads:   # atol: as the model's own training-step test (test_last_layer_rows), for ~0 entries
        assert_flash_rule(o_grads[n], r_grads[n], l_grads[n], name=f"d {n}", atol=1e-6)


@pytest.mark.parametrize("model_type,dtype,rows", [("llava_next", torch.bfloat16, "packed"),
                                                   ("llava_onevision", torch.bfloat16, "fused_loss"),
                                                   ("llava", torch.float16, "padded")])
def test_patched_by_flash_rule_interpreter(model_type, dtype, rows):
    """test_cuda_patched_by_flash_rule's check on the CPU, the kernels forced (the interpreter) in bf16 / fp16: the
    patched model against the fp32 model and the unpatched one in the same dtype, by flash-attn's rule on the logits,
    the loss and every weight gradient. Session 36: the interpreter could not run bf16 kernels before
    (``_ext.interpreter_bf16``)."""
    with _forced(*_OPS, "cross_entropy"):
        _patched_by_flash_rule(model_type, dtype, rows, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ["one_sample", "packed", "padded", "fused_loss"])
@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_cuda_patched_by_flash_rule(model_type, dtype, rows):
    """patch_hf on the GPU as users apply it (the kernels ``auto`` picks on CUDA; the CPU tests force them under the
    interpreter): a transformers model in bf16/fp16, patched, against the same model in fp32 (the reference) and
    unpatched in the same dtype (PyTorch's error), by flash-attn's rule on the logits, the loss and the gradients of
    every weight matrix of the language model and the projector (each on its own), a training step's
    backward included. ``packed``: two rows of two documents each in transformers' padding-free format; ``padded``:
    three left-padded rows (the logits of their real tokens); both through the varlen kernel over the documents;
    ``fused_loss``: ``cross_entropy=True`` in training on right-padded rows (no logits: the loss and the gradients,
    lm_head's too) (session 34, not yet run on a GPU). Every case runs RoPE through the kernel on transformers'
    tables too (patch_hf's rope=True, session 35, not yet run on a GPU)."""
    _patched_by_flash_rule(model_type, dtype, rows, "cuda")
