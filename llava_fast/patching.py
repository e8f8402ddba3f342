"""``llava_fast.patch_hf(model)``: swap the modules of a transformers Llava / LlavaNext / LlavaOnevision model in place
for llava_fast's kernels, the way users apply Liger-Kernel.

What is swapped (each can be turned off):
- ``rms_norm``: every Llama/Qwen2/Mistral RMSNorm runs ``llava_fast.ops.rms_norm``;
- ``swiglu``: every Llama/Qwen2/Mistral MLP with SiLU runs ``llava_fast.ops.swiglu``;
- ``attention``: the language model (backend op ``"attention"``) and the vision tower (``"vision_attention"``, whose
  "auto" is SDPA on CUDA: measured faster) use the varlen FlashAttention kernel through transformers'
  AttentionInterface (registered as ``"llava_fast"``); calls it cannot serve (a KV cache with a mask, queries and
  keys of different lengths, ``output_attentions``, unsupported head dims) fall back to transformers'
  SDPA path; padded rows (their real tokens, as flash_attention_2 unpads them) and rows of packed documents in
  transformers' padding-free format (position ids that restart at each document, no padding mask,
  ``use_cache=False``; DataCollatorWithFlattening) run the varlen kernel per document (``_masks``, ``_documents``);
- ``rope``: transformers' ``apply_rotary_pos_emb`` runs ``llava_fast.ops.rope``'s kernel on q and k in one launch (the
  module-level function of modeling_llama / qwen2 / mistral is swapped, as Liger-Kernel does, and takes the kernel
  only for the cos / sin tables of a patched model's rotary embedding, which ``_tag_rotary`` marks; anything else
  gets transformers' function);
- ``quick_gelu``: CLIP's MLP activation (``QuickGELUActivation``, LLaVA-1.5 / NeXT towers) runs
  ``llava_fast.ops.quick_gelu`` (one kernel instead of three);
- ``projector``: the multimodal projector runs the fused GEMM+GELU kernel (when ``llava_fast.ops.projector`` exists;
  a projector_hidden_act other than GELU is a ValueError);
- ``cross_entropy`` (off by default: it changes the output): in training with labels the loss comes from the fused
  linear cross-entropy kernel and ``logits`` is None, as with Liger-Kernel's fused loss (``_fused_loss_forward``).
Each op still follows ``llava_fast.set_backend``: on the CPU the patched modules compute the reference.
Adapters and hooks keep working: a projector whose linears are not plain ``nn.Linear`` (peft's LoRA, quantized
linears) or whose linears / activation carry forward or backward hooks, and an MLP whose ``act_fn`` carries hooks,
call those modules instead of the fused op (``llava_fast.ops.act_linear.plain_linears``); hooks on the swapped modules
themselves run as before. patch_hf may be called before or after peft injects adapters, and on a ``PeftModel``.
"""
from __future__ import annotations

import logging
import sys
import types

import torch


_SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
              "LlavaOnevisionForConditionalGeneration", "LlavaModel", "LlavaNextModel", "LlavaOnevisionModel")
_TEXT = ("llama", "qwen2", "mistral")
_ROTARY = ("LlamaRotaryEmbedding", "Qwen2RotaryEmbedding", "MistralRotaryEmbedding")
_ATTENTION = ("LlamaAttention", "Qwen2Attention", "MistralAttention")


def _rms_forward(self, hidden_states):
    from llava_fast.ops.rms_norm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    from llava_fast.ops.act_linear import unhooked
    from llava_fast.ops.swiglu import swiglu

    if not unhooked(self.act_fn):  # a hook on the activation module: call it (transformers' forward)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _quick_gelu_forward(self, x):
    from llava_fast.ops.quick_gelu import quick_gelu

    return quick_gelu(x)


def _projector_forward(self, image_features):
    from llava_fast.ops.act_linear import plain_linears, unhooked
    from llava_fast.ops.projector import projector

    l1, l2 = self.linear_1, self.linear_2
    # the fused kernel takes the weights: adapters or wrappers (peft's LoRA, quantized linears) and hooks on the
    # linears or the activation would be silently skipped, so such modules are called (act_linear.plain_linears)
    if not (plain_linears(l1, l2) and unhooked(l1, l2, self.act)):
        return l2(self.act(l1(image_features)))
    # (under autocast the op casts its arguments as nn.Linear would)
    return projector(image_features, l1.weight, l1.bias, l2.weight, l2.bias, approximate=self._lf_approximate)


def _documents(mask, position_ids, padding, batch: int, length: int):
    """How the varlen kernel runs a causal mask that ``_masks`` tagged: ``(rows, cu_seqlens, longest)``, where
    ``rows`` (None: every token) are the flattened ``batch * length`` tokens it computes, in order, and ``cu_seqlens``
    (int32, on the mask's device) delimits their documents. Two kinds of mask:

    * packed rows (``padding`` None): documents split where transformers' ``find_packed_sequence_indices`` splits the
      rows (a position id that is not its predecessor's + 1) and at each row's start; every token computed;
    * padded rows (``padding``, the (batch, length) 2-D mask): each row's tokens one document, the padding left out
      (as flash_attention_2 unpads): its outputs are zeros, where SDPA's are values nothing reads (no real token
      attends to padding).

    None when the mask is not exactly that (causal within the documents, over real keys) for every real query (then
    SDPA runs it: a mask function of a transformers version ``_masks`` does not know of, say). Made once per mask (a
    few host waits) and kept on it for the other layers."""
    plan = getattr(mask, "_lf_plan", False)
    if plan is not False:
        return plan
    dev = mask.device
    start = torch.zeros((batch, length), dtype=torch.bool, device=dev)
    start[:, 0] = True
    if padding is None:
        pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
        start[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).to(dev)
        real = torch.ones((batch, length), dtype=torch.bool, device=dev)
    else:
        real = padding.to(dev, torch.bool).expand(batch, -1)
    # the mask must be what these documents give (read in blocks of query rows: no second L x L tensor)
    doc = start.cumsum(1) + torch.arange(batch, device=dev)[:, None] * length   # ids unique over the batch
    keys = torch.arange(length, device=dev)
    same = torch.ones((), dtype=torch.bool, device=dev)
    for q0 in range(0, length, 1024):
        q = keys[q0:q0 + 1024]
        want = (doc[:, q0:q0 + 1024, None] == doc[:, None, :]) & (q[:, None] >= keys[None, :]) & real[:, None, :]
        same &= ((mask[:, 0, q0:q0 + 1024].expand_as(want) == want) | ~real[:, q0:q0 + 1024, None]).all()
    kept = real.reshape(-1)
    rows = None if padding is None else kept.nonzero().squeeze(1)
    ids = doc.reshape(-1) if rows is None else doc.reshape(-1).index_select(0, rows)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[1:] = ids[1:] != ids[:-1]
    starts = new.nonzero().squeeze(1).to("cpu", torch.int32)
    plan = None
    if bool(same) and ids.numel():
        cu = torch.cat([starts, starts.new_tensor([ids.numel()])])
        plan = (rows, cu.to(dev, non_blocking=True), int((cu[1:] - cu[:-1]).max()))
    mask._lf_plan = plan
    return plan


def llava_fast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> ((B, Lq, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llava_fast.models.dispatch import _fast_attention, _same_dtype

    b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True))) and lq > 1
    # non-causal calls are the vision towers': they follow the "vision_attention" backend (auto: SDPA on CUDA)
    op = _fast_attention(query.device.type, query.shape[-1], query.dtype,
                         "attention" if causal else "vision_attention")
    # a mask that _masks tagged: documents packed into rows (position ids that restart, no padding mask:
    # transformers' padding-free format, DataCollatorWithFlattening) or padded rows. The varlen kernel runs their
    # documents (cu_seqlens from the position ids or the padding mask), as flash_attention_2 does, and spends nothing
    # on the masked blocks
    mask, plan = attention_mask, None
    if (causal and op is not None and mask is not None and getattr(mask, "_lf_tagged", False) and lq == lk
            and mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[-2:] == (lq, lk)
            and (mask._lf_padding is not None or kwargs.get("position_ids") is not None)):
        plan = _documents(mask, kwargs.get("position_ids"), mask._lf_padding, b, lq)
    # lq != lk without a mask: a prefill into an empty static cache, where transformers means SDPA's top-left causal
    # mask (our kernel aligns bottom-right: the queries would see the empty cache slots). Attention weights asked for:
    # SDPA warns that it does not return them, as for attn_implementation="sdpa"
    if (op is None or (mask is not None and plan is None) or dropout or lq != lk
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if plan is not None:
        rows, cu, longest = plan
        query, key, value = _same_dtype(query, key, value)
        flat = [t.transpose(1, 2).reshape(b * lq, t.shape[1], t.shape[3]) for t in (query, key, value)]
        if rows is not None:
            flat = [t.index_select(0, rows) for t in flat]
        out = op.flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True, softmax_scale=scaling)
        if rows is not None:
            out = out.new_zeros(b * lq, *out.shape[1:]).index_copy(0, rows, out)
        return out.view(b, lq, *out.shape[1:]), None
    # under autocast transformers' RoPE returns fp32 q/k (fp32 cos/sin) next to v in the autocast dtype: its eager and
    # SDPA paths run the attention in the autocast dtype, the kernel (which refuses mixed dtypes) does the same
    query, key, value = _same_dtype(query, key, value)
    out = op.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                             softmax_scale=scaling)
    return out, None


def _masks(**kwargs):
    """The mask interface registered for "llava_fast": SDPA's mask (None when there is neither padding nor packing:
    then our kernel runs the rows as they are; a tensor otherwise), tagged ``_lf_tagged`` where it can only be causal
    within documents that the varlen kernel can run, with ``_lf_padding`` the 2-D padding mask (None: documents
    delimited by the position ids). That is where transformers built it without a cache offset (both offsets 0,
    queries as long as keys) or a sliding window shorter than the keys: with a padding mask it is causal over each
    row's real tokens; without one it is the packed-sequence mask of ``find_packed_sequence_indices`` (or, while
    exporting, the plain causal mask of a row whose positions run on: one document, the same thing). The text models
    patch_hf accepts (_TEXT) add no other mask functions, and ``_documents`` checks the mask before the kernel takes
    it. transformers 5.0-5.3, before the ``q_length`` / ``q_offset`` arguments (they pass ``cache_position``), get no
    tag: SDPA runs those masks, as before (5.4 and later: tagged; tested on 5.17, the GPU box's, and 5.24)."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(**kwargs)
    q_length, q_offset, kv_length = kwargs.get("q_length"), kwargs.get("q_offset"), kwargs.get("kv_length")
    local, padding = kwargs.get("local_size"), kwargs.get("attention_mask")
    if (mask is not None and isinstance(q_offset, int) and q_offset == 0 and kwargs.get("kv_offset", 0) == 0
            and q_length is not None and q_length == kv_length and (local is None or local >= kv_length)
            and (padding is None or (padding.dim() == 2 and padding.shape[-1] == kv_length))
            and not torch.compiler.is_compiling()):
        mask._lf_tagged, mask._lf_padding = True, padding
    return mask


def _register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("llava_fast", llava_fast_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("llava_fast", _masks)


def _identity(x):
    return x


def _fused_loss_forward(forward):
    """``patch_hf(cross_entropy=True)``: the model's ``forward`` (transformers' own, ``forward``) that, in training with
    ``labels``, computes the loss by the fused linear cross-entropy (``llava_fast.ops.cross_entropy``) from the last
    hidden states, never holding the (tokens x vocab) logits, and returns ``logits=None``, as Liger-Kernel's fused
    loss does. The loss is transformers' (labels shifted by one, -100 ignored, the mean over supervised tokens, or
    their sum over ``num_items_in_batch`` when the trainer passes it). Anything else (eval mode, no labels, the
    backend's reference, an lm_head with adapters or hooks or still sharded by FSDP, ``logits_to_keep``,
    ``shift_labels``, ``return_dict=False``, positional arguments) runs the original forward. The wrapper keeps the
    original signature (``inspect.signature``: transformers' Trainer keeps the dataset columns it names)."""
    import functools

    @functools.wraps(forward)
    def fused(self, *args, **kwargs):  # (marked below for unpatch_hf)
        from llava_fast import backend
        from llava_fast.ops.act_linear import plain_linears

        head, labels, keep = self.lm_head, kwargs.get("labels"), kwargs.get("logits_to_keep")
        if (args or labels is None or not self.training or not plain_linears(head)
                or not backend.use_fast("cross_entropy", head.weight.device.type)
                or type(head.weight).__name__ == "DTensor" or kwargs.get("shift_labels") is not None
                or not (keep is None or (isinstance(keep, int) and keep == 0)) or kwargs.get("return_dict") is False):
            return forward(self, *args, **kwargs)
        from llava_fast.models.llava import shift_labels
        from llava_fast.ops.cross_entropy import fused_linear_cross_entropy

        kwargs["labels"] = None
        head.forward = _identity   # the "logits" come back as the last hidden states
        try:
            out = forward(self, **kwargs)
        finally:
            del head.forward
        hidden = out.logits
        shift = shift_labels(labels.to(hidden.device, torch.long))   # transformers' shift: the same
        # the GEMM in the dtype lm_head would run in: autocast's where it is on (transformers then upcasts the
        # logits for the loss; the kernel accumulates in fp32), else the hidden states'
        dev = hidden.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        hidden, weight = hidden.to(dt), head.weight.to(dt)
        bias = head.bias.to(dt) if head.bias is not None else None
        num_items = kwargs.get("num_items_in_batch")
        loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shift.reshape(-1), bias,
                                          num_items=num_items, reduction="mean" if num_items is None else "sum")
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})
    fused._lf_fused_loss = True
    return fused


def _contiguous_output(module, args, output):
    return output.contiguous()


def _tag_rotary(module, args, output):
    """Forward hook of a patched model's rotary embedding (``patch_hf(rope=True)``): tags the ``(cos, sin)`` it returns
    (``_lf_rope`` on both) so that ``_rotary_for``'s ``apply_rotary_pos_emb`` runs the kernel on them; an unpatched
    model's tables carry no tag and get transformers' computation. Checked once per module: the two halves of the
    last dim equal (the kernel reads the first); not while compiling (dynamo and attributes on tensors)."""
    if torch.compiler.is_compiling() or not (isinstance(output, tuple) and len(output) == 2):
        return output
    cos, sin = output
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 3
            and cos.shape == sin.shape and cos.shape[-1] % 2 == 0):
        return output
    ok = getattr(module, "_lf_rope_ok", None)
    if ok is None:
        h = cos.shape[-1] // 2
        ok = bool(torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:]))
        module._lf_rope_ok = ok
        if not ok:
            import warnings

            warnings.warn(f"patch_hf(rope=True): {type(module).__name__} returns cos / sin whose halves differ; "
                          f"transformers' RoPE runs instead of the kernel", stacklevel=2)
    if ok:   # (a flag, no reference: a tensor attribute holding a view of cos would be a cycle the GC cannot free)
        cos._lf_rope = sin._lf_rope = True
    return output


def _rotary_for(apply):
    """transformers' module-level ``apply_rotary_pos_emb`` (``apply``) that runs ``llava_fast.ops.rope``'s kernel on
    the tables of a model patched with ``rope=True`` (tagged by ``_tag_rotary``) and ``apply`` on anything else (other
    models in the process, other arguments), the way Liger-Kernel swaps the same function. Each token's table row
    (``ops.rope.rotary_rows``) is made once per forward and kept on cos for the other layers."""
    import functools

    @functools.wraps(apply)
    def rotary(q, k, cos, sin, *args, **kwargs):
        # (plain tensors only: a DTensor of tensor parallelism, say, gets transformers' function)
        if (getattr(cos, "_lf_rope", False) and getattr(sin, "_lf_rope", False) and not args and not kwargs
                and type(q) is torch.Tensor and type(k) is torch.Tensor and q.dim() == 4
                and not torch.compiler.is_compiling()):
            from llava_fast import backend
            from llava_fast.ops.rope import apply_rotary_pos_emb, rotary_rows

            if backend.use_fast("rope", q.device.type):
                # (never a view of cos kept on cos: a cycle through C++ that the garbage collector cannot free)
                rows = getattr(cos, "_lf_rows", None)
                if rows is None or rows.numel() != q.shape[0] * q.shape[2]:
                    rows = cos._lf_rows = rotary_rows(cos, q.shape[0])
                return apply_rotary_pos_emb(q, k, cos, sin, rows=rows)
        return apply(q, k, cos, sin, *args, **kwargs)
    rotary._lf_apply = apply
    return rotary


def patch_hf(model, rms_norm: bool = True, swiglu: bool = True, attention: bool = True, projector: bool = True,
             rope: bool = True, cross_entropy: bool = False, vision_layout: bool = True, quick_gelu: bool = True):
    """Patch a transformers LLaVA model in place; returns the model. Raises ValueError for what it cannot patch.
    A peft ``PeftModel`` is patched through its base model; adapters on patched modules keep working. What was
    swapped is ``model._llava_fast_patched`` (module counts per kind; also logged at INFO by the ``llava_fast``
    logger), and patching twice is patching once.

    ``vision_layout``: SigLIP's embeddings (a transposed view of the patch conv's output) are made contiguous, so the
    tower's residual stream is no longer carried transposed through every layer (strided copies and adds in each
    layer, llava_fast/models/vision.py). The tower's layers give the same bits; the projector's first linear may round
    once less (F.linear fuses the bias into the GEMM only for a contiguous input; torch's CPU bf16 GEMM also rounds
    differently by layout)."""
    if hasattr(model, "get_base_model"):  # peft's PeftModel (get_peft_model): patch the transformers model inside
        patch_hf(model.get_base_model(), rms_norm, swiglu, attention, projector, rope, cross_entropy, vision_layout,
                 quick_gelu)
        return model
    name = type(model).__name__
    if name not in _SUPPORTED:
        raise ValueError(f"patch_hf supports transformers' {', '.join(_SUPPORTED[:3])} models, got {name}")
    if cross_entropy and not hasattr(model, "lm_head"):
        raise ValueError(f"patch_hf(cross_entropy=True) needs a model with its lm_head (the "
                         f"*ForConditionalGeneration classes), got {name}")
    cfg = model.config
    text_type = cfg.text_config.model_type
    if text_type not in _TEXT:
        raise ValueError(f"patch_hf: language model type {text_type!r} is not supported (supported: {_TEXT})")
    # every check before the first swap: an error leaves the model as it was
    if swiglu and getattr(cfg.text_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"patch_hf(swiglu=True) needs hidden_act='silu', got {cfg.text_config.hidden_act!r}")
    if projector:
        try:
            from llava_fast.ops.projector import normalize_act
        except ImportError:
            projector = False
        else:
            try:  # the kernel computes GELU only (erf or tanh): any other activation must not be swapped for it
                approximate = normalize_act(cfg.projector_hidden_act)
            except ValueError:
                raise ValueError(f"patch_hf(projector=True) needs a GELU projector_hidden_act, got "
                                 f"{cfg.projector_hidden_act!r}; pass projector=False") from None
    # the modeling files whose module-level apply_rotary_pos_emb the attention layers call (swapped below, once)
    rotary_files = ({sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__ in _ATTENTION}
                    if rope else set())
    for mod in rotary_files:
        if not hasattr(mod, "apply_rotary_pos_emb"):
            raise ValueError(f"patch_hf(rope=True): {mod.__name__} has no apply_rotary_pos_emb to swap (a transformers "
                             f"version this patch_hf does not know); pass rope=False")
    patched = {"rms_norm": 0, "swiglu": 0, "projector": 0, "attention": False, "vision_layout": 0,
               "cross_entropy": False, "rope": 0, "quick_gelu": 0}
    for m in model.modules():
        cls = type(m).__name__
        if vision_layout and cls == "SiglipVisionEmbeddings":
            if getattr(m, "_lf_contiguous", None) is None:  # patching twice must not stack hooks
                m._lf_contiguous = m.register_forward_hook(_contiguous_output)
            patched["vision_layout"] += 1
        if rms_norm and cls.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rms_forward, m)
            patched["rms_norm"] += 1
        elif swiglu and cls in ("LlamaMLP", "Qwen2MLP", "MistralMLP"):
            m.forward = types.MethodType(_mlp_forward, m)
            patched["swiglu"] += 1
        elif quick_gelu and cls == "QuickGELUActivation":
            m.forward = types.MethodType(_quick_gelu_forward, m)
            patched["quick_gelu"] += 1
        elif rope and cls in _ROTARY:
            if getattr(m, "_lf_rope_hook", None) is None:
                m._lf_rope_hook = m.register_forward_hook(_tag_rotary)
            patched["rope"] += 1
        elif projector and cls.endswith("MultiModalProjector"):
            m._lf_approximate = approximate
            m.forward = types.MethodType(_projector_forward, m)
            patched["projector"] += 1
    for mod in rotary_files:   # (a second patch keeps the first wrapper)
        if not hasattr(mod.apply_rotary_pos_emb, "_lf_apply"):
            mod.apply_rotary_pos_emb = _rotary_for(mod.apply_rotary_pos_emb)
    if attention:
        _register_attention()
        if not hasattr(model, "_lf_attn_before"):   # what unpatch_hf restores (not "llava_fast" on a second patch)
            model._lf_attn_before = model.config._attn_implementation
        model.set_attn_implementation("llava_fast")
        patched["attention"] = True
    if cross_entropy:
        model.forward = types.MethodType(_fused_loss_forward(type(model).forward), model)
        patched["cross_entropy"] = True
    model._llava_fast_patched = patched
    logging.getLogger("llava_fast").info(
        "patch_hf(%s): %s", name, ", ".join(k if v is True else f"{k} x{v}" for k, v in patched.items() if v))
    return model


_OURS = (_rms_forward, _mlp_forward, _projector_forward, _quick_gelu_forward)


def unpatch_hf(model):
    """Undo :func:`patch_hf` in place (a ``PeftModel`` through its base model); returns the model. The modules get
    transformers' forwards back, SigLIP's embeddings lose the contiguity hook, the attention implementation is the
    one the model had before ``patch_hf`` (the ``"llava_fast"`` registration stays, unused). A model that was not
    patched is returned as it is. For A/B comparisons of the same weights with and without the kernels."""
    if hasattr(model, "get_base_model"):
        unpatch_hf(model.get_base_model())
        return model
    for m in model.modules():
        fwd = vars(m).get("forward")
        if fwd is not None and (getattr(fwd, "__func__", None) in _OURS
                                or getattr(getattr(fwd, "__func__", None), "_lf_fused_loss", False)):
            del m.forward
        for key in ("_lf_contiguous", "_lf_rope_hook"):
            handle = vars(m).pop(key, None)
            if handle is not None:
                handle.remove()
        vars(m).pop("_lf_rope_ok", None)
    before = vars(model).pop("_lf_attn_before", None)
    if before is not None:
        model.set_attn_implementation(before)
    vars(model).pop("_llava_fast_patched", None)
    return model
