"""Which attention implementation the model calls: the fast kernel on CUDA when available, else the reference.

The reference path reproduces transformers' eager numerics on the CPU; on CUDA without the kernel it uses SDPA.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llava_fast import _ext, backend
from llava_fast.models.layers import causal_mask, eager_attention, varlen_attention_ref


def _fast_attention(device_type: str, head_dim: int, dtype, op: str = "attention"):
    """The Triton varlen kernel module when ``op`` ("attention": the language model, "vision_attention": the vision
    towers) selects it for this device and it can take this head dim, else None."""
    if not backend.use_fast(op, device_type):
        return None
    from llava_fast.ops import attention as attn_op

    if head_dim % 8 or head_dim > attn_op.MAX_HEAD_DIM or dtype not in attn_op.SUPPORTED_DTYPES:
        return None
    return attn_op


def _same_dtype(q, k, v):
    """q, k, v in one dtype for the kernels, which refuse mixed ones. Under autocast the reference RoPE returns fp32
    q/k (its fp32 cos/sin promote them, as in transformers) next to v in the autocast dtype; transformers' eager
    attention then runs both of its matmuls in the autocast dtype, so the kernel gets q, k, v in that dtype."""
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    dev = q.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else v.dtype
    return tuple(t if t.dtype == dt else t.to(dt) for t in (q, k, v))


def _deterministic_backward(q, k, v) -> bool:
    """``torch.use_deterministic_algorithms(True)`` (``train.deterministic`` sets it for the run) with a backward to
    come. Our kernels have no atomics (their backward repeats bit for bit), and neither does SDPA's math backend;
    SDPA's flash, efficient and cuDNN backwards, and ``ops.cudnn_attention``'s, make no such promise. So such a call
    takes our kernels (the language model's always do in training; a vision tower's do instead of SDPA), else SDPA's
    math backend (:func:`_sdpa_backends`)."""
    return (torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v)))


def _hopper(device: torch.device) -> bool:
    """Compute capability 9.x (H100 / H200): where the cuDNN choices below were measured."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(idx)[0] == 9  # torch caches the device properties


def _cudnn_auto(device: torch.device) -> bool:
    """Where the "auto" rules take ``ops.cudnn_attention``: Hopper with cuDNN >= 9.19 (the GPU and version they were
    measured on, session 28; ``cudnn_attention.CUDNN_MIN_AUTO``)."""
    from llava_fast.ops import cudnn_attention as ca

    return _hopper(device) and (torch.backends.cudnn.version() or 0) >= ca.CUDNN_MIN_AUTO


def vision_cudnn_choice() -> str:
    """LLAVA_FAST_SDPA_CUDNN: "auto" (default), "0" or "1" (:func:`_prefer_cudnn`)."""
    return _ext.env_choice("LLAVA_FAST_SDPA_CUDNN", ("auto", "0", "1"), "auto")


def _prefer_cudnn(q, k, v) -> bool:
    """LLAVA_FAST_SDPA_CUDNN: whether a vision tower's attention on these q/k/v goes through ``ops.cudnn_attention``
    (Hopper only: the forward alone where no backward follows; in training its backward on a thread of our own, out
    of reach of torch's shared backward-graph cache: :func:`_sdpa_backends`) instead of SDPA in its own order.

    - ``auto`` (default since session 28): a **trained** tower (autograd on, q/k/v requiring grad: the OneVision
      step) on Hopper with cuDNN >= 9.19 (:func:`_cudnn_auto`) takes it, a frozen one (stage 1, a prefill) keeps
      SDPA's order. Why: recent torch puts cuDNN first in SDPA's order on Hopper and Blackwell with cuDNN >= 9.9
      (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, ``check_prefer_cudnn_attention``), so a trained tower
      ran cuDNN's backward through torch's shared graph cache, which can return wrong gradients when another caller
      left a graph with another dO layout. Ours runs the same kernels safely, at the same speed: the OneVision step
      (4 LLM layers, paired, H200, session 28) measured SDPA's order 0.997x of it [0.983, 1.007]. A frozen tower
      has no backward to protect, and an explicit cuDNN context there measured 0.94x / 0.95x (sessions 18-19; this
      path 0.99-1.00x in session 28).
    - ``1``: every tower on Hopper (frozen ones: the cuDNN forward alone).
    - ``0``: SDPA's own order always (the default of sessions 19-27)."""
    choice = vision_cudnn_choice()
    if choice == "0" or torch.compiler.is_compiling():
        return False
    if choice == "auto":
        return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and _cudnn_auto(q.device)
    return _hopper(q.device)


def vision_attention(q, k, v, scale):
    """Non-causal attention over tiles: q/k/v (tiles, H, N, D). With ``vision_attention`` on "triton" every tile of
    every image is one document of a single varlen batch; its "auto" on CUDA is SDPA (the tiles all have the same
    length, so nothing is padded), measured faster on an H200 until the kernel catches up (docs/perf-notes.md)."""
    op = _fast_attention(q.device.type, q.shape[-1], q.dtype, "vision_attention")
    deterministic = op is None and q.is_cuda and _deterministic_backward(q, k, v)   # train.deterministic
    if deterministic:   # our kernels
        op = _fast_attention(q.device.type, q.shape[-1], q.dtype, "attention")
    if op is not None:
        b, h, n, d = q.shape
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
        flat = [t.transpose(1, 2).reshape(b * n, h, d) for t in (q, k, v)]
        o = op.flash_attn_varlen_func(*flat, cu, cu, n, n, softmax_scale=scale, causal=False)
        return o.view(b, n, h, d).transpose(1, 2)
    if q.is_cuda:
        if deterministic:   # no kernel of ours for it: SDPA's math backend
            with _sdpa_backends(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if _prefer_cudnn(q, k, v):  # a preference, not a restriction: what cuDNN cannot take falls through
            from llava_fast.ops import cudnn_attention as ca

            if (o := ca.try_cudnn_attention(q, k, v, scale, causal=False)) is not None:
                return o
        # SDPA's own order: cuDNN first in recent torch on Hopper / Blackwell (see _prefer_cudnn), training included,
        # where torch's shared backward-graph cache applies (_sdpa_backends); our model's calls keep one dO layout per
        # call site, so only another caller in the process with the same shapes and another dO layout can meet it
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return eager_attention(q, k, v, scale)


def varlen_cache_attention(plan: dict, dtype, device, head_dim: int):
    """attn(q, k, v, scale) over a ``VarlenKVCache``: q (1, H, T, D) the new tokens packed by ``plan["cu_q"]``,
    k/v the layer's whole cache buffers (B, max_len, Hkv, D) with the new tokens already written; document ``i``
    reads cache row ``rows[i]``, its first ``plan["used"][i]`` keys, causal bottom-right.

    Fast path: the Triton varlen kernel reads the buffers in place (``seqused_k``). Reference: the documents' queries
    are scattered into a (docs, H, max_q, D) block and run through eager attention against their cache rows with an
    additive mask (the finfo.min mask of transformers' eager path), so CPU numerics are those of the padded path."""
    cu_q, max_q, used, cu_k = plan["cu_q"], plan["max_q"], plan["used"], plan["cu_k"]
    if (fast := _fast_attention(device.type, head_dim, dtype)) is not None:
        def attn(q, k, v, scale):
            b, m, h, d = k.shape
            q = q if q.dtype == k.dtype else q.to(k.dtype)   # (autocast: fp32 q from the reference RoPE)
            o = fast.flash_attn_varlen_func(q.squeeze(0).transpose(0, 1), k.view(b * m, h, d), v.view(b * m, h, d),
                                            cu_q,
                                            cu_k, max_q, m, softmax_scale=scale, causal=True, seqused_k=used)
            return o.transpose(0, 1)[None]
        return attn

    doc, start, rows, m = plan["doc"], plan["start"], plan["rows"], plan["max_len"]
    j = plan["pos"] - start[doc]                                     # query index inside its document
    qi = torch.arange(max_q, device=device)
    allowed = torch.arange(m, device=device)[None, None, :] <= (start[:, None, None] + qi[None, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    mask = mask[:, None]                                             # (docs, 1, max_q, max_len)

    def attn(q, k, v, scale):
        qd = q.new_zeros(start.numel(), q.shape[1], max_q, q.shape[3])
        qd[doc, :, j] = q.squeeze(0).transpose(0, 1)
        o = eager_attention(qd, k[rows].transpose(1, 2), v[rows].transpose(1, 2), scale, mask)
        return o[doc, :, j].transpose(0, 1)[None]                    # (docs, H, max_q, D) -> (1, H, T, D)
    return attn


_TEXT_ENV = "LLAVA_FAST_TEXT_ATTENTION"


def text_attention_choice() -> str:
    """LLAVA_FAST_TEXT_ATTENTION: which kernel runs the language model's attention on CUDA.

    - ``"auto"`` (default): over documents of one length with no padding (an unpadded batch, or a packed sequence
      whose documents all have the longest length), bf16/fp16 on CUDA: SDPA (cuDNN first) in a forward without
      autograd (a prefill, an evaluation pass); on Hopper with cuDNN >= 9.19, ``ops/cudnn_attention`` in training
      (since session 28, :func:`_cudnn_text`; a call cuDNN refuses falls back to our kernels, with a warning); our
      Triton kernels otherwise (documents of several lengths, other GPUs). Why, on an H200
      (bench_model, paired, 4 LLM layers): the NeXT-7B prefill (8 x 2498) ran 1.02x and 1.026x faster through SDPA
      (session 17), 1.01x / 0.99x (session 19), 1.00x / 1.01x (session 28). In training, ops/cudnn_attention ran
      the OneVision step 1.021x [1.009, 1.063] and stage 1 1.007x / 1.016x (every round of the latter's five
      ahead) against our kernels (session 28); SDPA itself in training would run flash, not cuDNN, whose
      backward through SDPA can return wrong gradients (:func:`_sdpa_backends`); flash measured 1.00x.
    - ``"sdpa"``: SDPA always, packed sequences of unequal documents included (scattered to a padded batch); in a
      training step without cuDNN.
    - ``"triton"``: our kernels always (the default before session 17; training's until session 28).
    - ``"cudnn"``: documents of one length (GQA included) through cuDNN's fused attention with its backward on a
      thread of our own (``ops/cudnn_attention.py``: safe from torch's backward-graph cache) on any GPU, no-grad
      forwards included; our kernels otherwise."""
    return _ext.env_choice(_TEXT_ENV, ("auto", "sdpa", "triton", "cudnn"), "auto")


def _cudnn_text(choice: str, device) -> bool:
    """Whether the language model's one-length documents go through ``ops.cudnn_attention`` (where
    :func:`_use_sdpa` did not take them first): "cudnn" always, "auto" where :func:`_cudnn_auto` says so."""
    if torch.compiler.is_compiling():   # ops.cudnn_attention takes no traced call (its worker thread): the kernel
        return False
    if torch.are_deterministic_algorithms_enabled():   # train.deterministic: our kernels (_deterministic_backward)
        return False
    return choice == "cudnn" or (choice == "auto" and device.type == "cuda" and _cudnn_auto(device))


def _use_sdpa(choice: str, kernel_built: bool, dtype, device, equal_lengths: bool) -> bool:
    """Whether one forward of the language model runs SDPA (:func:`text_attention_choice` ``choice``) rather than
    our kernels (or the reference where ``kernel_built`` is False)."""
    if choice == "sdpa":
        return True
    if choice in ("triton", "cudnn") or not kernel_built:
        return False
    return (equal_lengths and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and not torch.is_grad_enabled())


# SDPA's backends without cuDNN: where autograd will run the backward (see _sdpa_backends)
_NO_CUDNN = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _sdpa_backends(*tensors):
    """The SDPA backends for one call of the language model's on ``tensors`` (q, k, v): cuDNN first (torch >= 2.6
    orders them with set_priority, older torch keeps its own order) when no backward will run, never cuDNN when one
    will.

    Why never in training: torch caches the cuDNN backward graph by the shapes and strides of q, k and v only
    (aten/src/ATen/native/cudnn/MHA.cpp, ``MHAParams``), not by those of the output gradient, which with cuDNN >=
    9.5.1 it passes as it comes. A graph built for one dO layout then runs on another dO layout with the same q/k/v
    and returns wrong gradients, without an error. Measured on an H200 in session 19 (torch 2.11): the packed form
    after the dense one at the stage-1 shape, dq max error 5.0 against fp32 where PyTorch's own bf16 error is 0.016
    (tests/models/test_dispatch.py::test_cuda_text_sdpa_training_at_stage1_shape). Any other cuDNN SDPA caller in
    the process (a reference model, user code) can leave such a graph behind, so a canonical dO layout on our side
    would not be enough."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.compiler.is_compiling():
        # SDPA's own order (cuDNN first in recent torch on Hopper / Blackwell: _prefer_cudnn), as before session 19
        return contextlib.nullcontext()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    order = [getattr(SDPBackend, b) for b in _NO_CUDNN]
    if not grad:
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    elif torch.are_deterministic_algorithms_enabled():   # train.deterministic: a backward without atomics
        order = [SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priorities
        return sdpa_kernel(order)


def _fold(x, docs: int, max_seqlen: int):
    """(1, H, docs * max_seqlen, D) -> (docs, H, max_seqlen, D): a packed sequence of equal documents as a batch (a
    view, no copy); :func:`_unfold` undoes it."""
    return x.squeeze(0).unflatten(1, (docs, max_seqlen)).transpose(0, 1)


def _unfold(o):
    """(docs, H, max_seqlen, D) -> (1, H, docs * max_seqlen, D)."""
    return o.transpose(0, 1).flatten(1, 2)[None]


def packed_sdpa_attention(cu_seqlens: torch.Tensor, max_seqlen: int, device, pad_doc: int = 0):
    """attn(q, k, v, scale) for a packed causal sequence (q (1, H, T, D), k/v (1, Hkv, T, D)) through SDPA on a
    right-padded (docs, max_seqlen) batch: each document's tokens scattered to row d, SDPA causal (a document's
    queries never see the padding, which comes after its keys), the outputs gathered back. No host sync (the token ->
    (document, position) map is built on the device). Opt-in with LLAVA_FAST_TEXT_ATTENTION=sdpa: on an H200 the
    padded cuDNN batch ran 284 useful TFLOP/s fwd+bwd on 8 documents of 600-3500 tokens where the Triton varlen kernel
    ran 204 (benchmarks/results, run 3; cuDNN runs only where no backward follows: :func:`_sdpa_backends`). Also the
    default for inference over one-length documents (:func:`text_attention_choice`). ``pad_doc``: the last document
    is ``pad_doc`` padding tokens (``language.pad_tokens``): with the others all of one length, they run as that batch
    and the padding's outputs are zeros."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    docs = cu.numel() - 1

    def folded(q, k, v, scale, n_docs):
        # the first n_docs documents, all of the maximum length: a (n_docs, max_seqlen) batch, a view; no scatter, no
        # gather (the OneVision benchmark's two documents, the prefill's eight)
        with _sdpa_backends(q, k, v):
            o = F.scaled_dot_product_attention(*(_fold(x[:, :, :n_docs * int(max_seqlen)], n_docs, int(max_seqlen))
                                                 for x in (q, k, v)),
                                               is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return _unfold(o)

    def attn(q, k, v, scale):
        t = q.shape[2]
        if t == docs * int(max_seqlen):   # every document has the maximum length (each is at most that long)
            return folded(q, k, v, scale, docs)
        if pad_doc and t - pad_doc == (docs - 1) * int(max_seqlen):   # so have all but the padding
            return F.pad(folded(q, k, v, scale, docs - 1), (0, 0, 0, pad_doc))
        lens = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(docs, device=device), lens, output_size=t)
        pos = torch.arange(t, device=device) - cu[doc]

        def pad(x):  # (1, H, T, D) -> (docs, H, max_seqlen, D)
            xt = x.squeeze(0).transpose(0, 1)                            # (T, H, D)
            out = xt.new_zeros(docs, int(max_seqlen), xt.shape[1], xt.shape[2])
            out = out.index_put((doc, pos), xt)
            return out.transpose(1, 2)

        qp, kp, vp = pad(q), pad(k), pad(v)
        with _sdpa_backends(q, k, v):
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                               enable_gqa=kp.shape[1] != qp.shape[1])
        return o.transpose(1, 2)[doc, pos].transpose(0, 1)[None]    # (1, H, T, D)
    return attn


def _cudnn_or(kernel, docs: int | None = None, max_seqlen: int | None = None):
    """attn(q, k, v, scale): ``ops.cudnn_attention`` where it takes the call
    (:func:`cudnn_attention.try_cudnn_attention`: bf16/fp16, key heads dividing the query heads, not captured or
    traced, and not refused by cuDNN), else ``kernel``. ``docs``: a packed (1, H, docs * max_seqlen, D) sequence of
    equal documents, viewed as a (docs, H, max_seqlen, D) batch (no copy); None: a dense (B, H, L, D) batch."""
    from llava_fast.ops import cudnn_attention as ca

    def attn(q, k, v, scale):
        q, k, v = _same_dtype(q, k, v)
        if docs is None:
            o = ca.try_cudnn_attention(q, k, v, scale, causal=True)
        else:
            o = ca.try_cudnn_attention(*(_fold(x, docs, max_seqlen) for x in (q, k, v)), scale, causal=True)
            o = None if o is None else _unfold(o)
        return o if o is not None else kernel(q, k, v, scale)   # what cuDNN does not take here, or refused once
    return attn


def dense_sdpa_attention():
    """attn(q, k, v, scale) for an equal-length unpadded causal batch: SDPA as is (cuDNN first where no backward
    follows and torch allows: :func:`_sdpa_backends`)."""
    def attn(q, k, v, scale):
        with _sdpa_backends(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
    return attn


def text_attention(b, n, dtype, device, attention_mask, cu_seqlens, max_seqlen, lk=None, head_dim=None,
                   kv_cache=None, pad_doc: int = 0):
    """Returns attn(q, k, v, scale) for one forward of the language model; q (B, H, L, D), k/v (B, Hkv, Lk, D).
    ``lk`` > ``n`` when a KV cache holds earlier tokens (causal mask aligned bottom-right). With ``kv_cache`` (a
    ``VarlenKVCache`` planned for this forward) see :func:`varlen_cache_attention`. ``pad_doc``: the packed
    sequence's last document is that many padding tokens (``language.pad_tokens``), not counted when asking whether
    the documents have one length."""
    if kv_cache is not None:
        return varlen_cache_attention(kv_cache.plan, dtype, device, head_dim)
    lk = n if lk is None else lk
    choice = text_attention_choice()
    fast = None
    if cu_seqlens is not None or (attention_mask is None and lk == n):
        fast = _fast_attention(device.type, head_dim, dtype) if head_dim else None
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"packed form (cu_seqlens given) needs a batch of 1 sequence, got batch {b}")
        ms = int(max_seqlen) if max_seqlen is not None else n
        docs = cu_seqlens.numel() - 1
        equal = n == docs * ms                                  # every document has the longest length
        real_equal = equal or (pad_doc and n - pad_doc == (docs - 1) * ms)    # the same, the padding aside
        if _use_sdpa(choice, fast is not None, dtype, device, real_equal):
            return packed_sdpa_attention(cu_seqlens, ms, device, pad_doc)
        if fast is not None:
            def attn(q, k, v, scale):
                q, k, v = _same_dtype(q, k, v)
                # squeeze(0), not [0]: select's backward is a zero fill plus a copy of each whole gradient (two
                # launches and ~3 passes per tensor per layer); squeeze's is a view
                o = fast.flash_attn_varlen_func(*(t.squeeze(0).transpose(0, 1) for t in (q, k, v)),
                                                cu_seqlens, cu_seqlens, ms, ms, softmax_scale=scale, causal=True)
                return o.transpose(0, 1)[None]
            if equal and _cudnn_text(choice, device):
                return _cudnn_or(attn, docs, ms)
            return attn

        def attn(q, k, v, scale):
            o = varlen_attention_ref(*(t.squeeze(0).transpose(0, 1) for t in (q, k, v)), cu_seqlens,
                                     scale, causal=True)
            return o.transpose(0, 1)[None]
        return attn

    if attention_mask is None and lk == n and _use_sdpa(choice, fast is not None, dtype, device, True):
        return dense_sdpa_attention()

    if fast is not None and attention_mask is None and lk == n:
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=device)

        def attn(q, k, v, scale):
            flat = [t.transpose(1, 2).reshape(b * t.shape[2], t.shape[1], t.shape[3]) for t in _same_dtype(q, k, v)]
            o = fast.flash_attn_varlen_func(*flat, cu, cu, n, n, softmax_scale=scale, causal=True)
            return o.view(b, n, q.shape[1], q.shape[3]).transpose(1, 2)
        return _cudnn_or(attn) if _cudnn_text(choice, device) else attn

    if attention_mask is not None and attention_mask.shape[-1] != lk:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but the keys are {lk} "
                         f"(cached + new); pass the mask of the whole sequence so far")
    mask = causal_mask(n, lk, dtype, device, attention_mask)
    if device.type == "cuda":
        def attn(q, k, v, scale):
            with _sdpa_backends(q, k, v) if _deterministic_backward(q, k, v) else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                      enable_gqa=k.shape[1] != q.shape[1])
        return attn
    return lambda q, k, v, scale: eager_attention(q, k, v, scale, mask)
