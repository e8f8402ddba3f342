"""Which attention implementation the model calls: the fast kernel on CUDA when available, else the reference.

The reference path reproduces transformers' eager numerics on the CPU; on CUDA without the kernel it uses SDPA.
"""
from __future__ import annotations

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


def _prefer_cudnn(device: torch.device) -> bool:
    """Whether the vision towers' SDPA should try cuDNN first: on Hopper (compute capability 9.x) only. Measured on
    an H100 (benchmarks/results, 2026-11-26, bf16, fwd+bwd TFLOP/s): SigLIP 32 x 729 D72 cuDNN 214.1 vs the flash
    backend 134.9 (1.59x), CLIP 64 x 577 D64 230.2 vs 150.6 (1.53x); SDPA's fixed priority runs flash. Elsewhere
    (transformers PR 48163's measurements) cuDNN was slower (A100 0.82x, Blackwell 0.88x)."""
    if _ext.env_choice("LLAVA_FAST_SDPA_CUDNN", ("0", "1"), "1") == "0" or torch.compiler.is_compiling():
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(idx)[0] == 9  # torch caches the device properties


def vision_attention(q, k, v, scale):
    """Non-causal attention over tiles: q/k/v (tiles, H, N, D). With ``vision_attention`` on "triton" every tile of
    every image is one document of a single varlen batch; its "auto" on CUDA is SDPA (the tiles all have the same
    length, so nothing is padded), measured faster on an H200 until the kernel catches up (docs/perf-notes.md)."""
    if (op := _fast_attention(q.device.type, q.shape[-1], q.dtype, "vision_attention")) is not None:
        b, h, n, d = q.shape
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
        flat = [t.transpose(1, 2).reshape(b * n, h, d) for t in (q, k, v)]
        o = op.flash_attn_varlen_func(*flat, cu, cu, n, n, softmax_scale=scale, causal=False)
        return o.view(b, n, h, d).transpose(1, 2)
    if q.is_cuda:
        if _prefer_cudnn(q.device):  # a preference, not a restriction: shapes cuDNN cannot take fall through
            with _sdpa_backends():
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
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

    - ``"auto"`` (default): SDPA (cuDNN first) for bf16/fp16 attention over documents of one length with no padding
      (an unpadded batch, or a packed sequence whose documents all have the longest length): in a forward without
      autograd (a prefill, an evaluation pass) always, in a training step when every query head has its own key head
      (no GQA; LLaVA-1.5's Vicuna), unless a CUDA graph is being captured or torch.compile is tracing; our Triton
      kernels otherwise. Why, on an H200 (bench_model, paired, 4 LLM layers): the NeXT-7B prefill (8 x 2498) ran
      1.02x and 1.026x faster through SDPA (session 17); the LLaVA-1.5-7B stage-1 step (16 x 640, MHA, D128) 1.02x /
      1.006x (session 17) and 1.016x / 1.020x (session 18); the OneVision step (Qwen2, GQA 14/2, D64) 0.97x and
      1.00x against our kernels with their GQA split of dK/dV (the `gqa` op: 1.27x fwd+bwd over the unsplit kernel).
      A captured or compiled training step keeps our kernels: SDPA's cuDNN backward there has not run on a GPU here.
    - ``"sdpa"``: SDPA always, packed sequences of unequal documents included (scattered to a padded batch).
    - ``"triton"``: our kernels always (the default before session 17)."""
    return _ext.env_choice(_TEXT_ENV, ("auto", "sdpa", "triton"), "auto")


def _sdpa_mode(choice: str, kernel_built: bool, dtype, device, equal_lengths: bool) -> str:
    """Which attention one forward of the language model runs (:func:`text_attention_choice` ``choice``): ``"all"``
    (SDPA), ``"mha"`` (SDPA for attention without GQA, decided per call from the head counts: :func:`_mha_or`), or
    ``"none"`` (our kernels, or the reference where ``kernel_built`` is False)."""
    if choice == "sdpa":
        return "all"
    if choice == "triton" or not kernel_built:
        return "none"
    if not (equal_lengths and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)):
        return "none"
    if not torch.is_grad_enabled():
        return "all"
    # a captured or compiled training step keeps the kernels its tests ran (the Triton ops are custom ops, traced
    # and captured in tests/models/test_model_cuda.py); SDPA's cuDNN backward there has not run on a GPU here
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "none"
    return "mha"


def _mha_or(sdpa, kernel):
    """attn(q, k, v, scale): ``sdpa`` where every query head has its own key head, ``kernel`` under GQA and inside
    a torch.compile trace (a decoder layer compiled on its own, ``train.compile``: the closure runs there)."""
    def attn(q, k, v, scale):
        use_sdpa = k.shape[1] == q.shape[1] and not torch.compiler.is_compiling()
        return (sdpa if use_sdpa else kernel)(q, k, v, scale)
    return attn


def _sdpa_backends():
    """SDPA with cuDNN first where torch lets us order the backends (torch >= 2.6: set_priority), else torch's order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priorities
        return sdpa_kernel(order)


def packed_sdpa_attention(cu_seqlens: torch.Tensor, max_seqlen: int, device):
    """attn(q, k, v, scale) for a packed causal sequence (q (1, H, T, D), k/v (1, Hkv, T, D)) through SDPA on a
    right-padded (docs, max_seqlen) batch: each document's tokens scattered to row d, SDPA causal (a document's
    queries never see the padding, which comes after its keys), the outputs gathered back. No host sync (the token ->
    (document, position) map is built on the device). Opt-in with LLAVA_FAST_TEXT_ATTENTION=sdpa: on an H200 the
    padded cuDNN batch ran 284 useful TFLOP/s fwd+bwd on 8 documents of 600-3500 tokens where the Triton varlen kernel
    ran 204 (benchmarks/results, run 3); this lets bench_model measure whether that holds end to end. Also the
    default for inference over one-length documents (:func:`text_attention_choice`)."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    docs = cu.numel() - 1

    def attn(q, k, v, scale):
        t = q.shape[2]
        if t == docs * int(max_seqlen):
            # every document has the maximum length (each is at most that long): the packed sequence is already a
            # (docs, max_seqlen) batch, a view; no scatter, no gather (the OneVision benchmark's two documents)
            def fold(x):  # (1, H, T, D) -> (docs, H, max_seqlen, D)
                return x.squeeze(0).unflatten(1, (docs, int(max_seqlen))).transpose(0, 1)
            with _sdpa_backends():
                o = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, scale=scale,
                                                   enable_gqa=k.shape[1] != q.shape[1])
            return o.transpose(0, 1).flatten(1, 2)[None]               # (1, H, T, D)
        lens = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(docs, device=device), lens, output_size=t)
        pos = torch.arange(t, device=device) - cu[doc]

        def pad(x):  # (1, H, T, D) -> (docs, H, max_seqlen, D)
            xt = x.squeeze(0).transpose(0, 1)                            # (T, H, D)
            out = xt.new_zeros(docs, int(max_seqlen), xt.shape[1], xt.shape[2])
            out = out.index_put((doc, pos), xt)
            return out.transpose(1, 2)

        qp, kp, vp = pad(q), pad(k), pad(v)
        with _sdpa_backends():
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                               enable_gqa=kp.shape[1] != qp.shape[1])
        return o.transpose(1, 2)[doc, pos].transpose(0, 1)[None]    # (1, H, T, D)
    return attn


def dense_sdpa_attention():
    """attn(q, k, v, scale) for an equal-length unpadded causal batch: SDPA as is (cuDNN first where torch allows)."""
    def attn(q, k, v, scale):
        with _sdpa_backends():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
    return attn


def text_attention(b, n, dtype, device, attention_mask, cu_seqlens, max_seqlen, lk=None, head_dim=None,
                   kv_cache=None):
    """Returns attn(q, k, v, scale) for one forward of the language model; q (B, H, L, D), k/v (B, Hkv, Lk, D).
    ``lk`` > ``n`` when a KV cache holds earlier tokens (causal mask aligned bottom-right). With ``kv_cache`` (a
    ``VarlenKVCache`` planned for this forward) see :func:`varlen_cache_attention`."""
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
        sdpa = _sdpa_mode(choice, fast is not None, dtype, device, n == (cu_seqlens.numel() - 1) * ms)
        if sdpa == "all":
            return packed_sdpa_attention(cu_seqlens, ms, device)
        if fast is not None:
            def attn(q, k, v, scale):
                q, k, v = _same_dtype(q, k, v)
                # squeeze(0), not [0]: select's backward is a zero fill plus a copy of each whole gradient (two
                # launches and ~3 passes per tensor per layer); squeeze's is a view
                o = fast.flash_attn_varlen_func(*(t.squeeze(0).transpose(0, 1) for t in (q, k, v)),
                                                cu_seqlens, cu_seqlens, ms, ms, softmax_scale=scale, causal=True)
                return o.transpose(0, 1)[None]
            return _mha_or(packed_sdpa_attention(cu_seqlens, ms, device), attn) if sdpa == "mha" else attn

        def attn(q, k, v, scale):
            o = varlen_attention_ref(*(t.squeeze(0).transpose(0, 1) for t in (q, k, v)), cu_seqlens,
                                     scale, causal=True)
            return o.transpose(0, 1)[None]
        return attn

    sdpa = _sdpa_mode(choice, fast is not None, dtype, device, True) if attention_mask is None and lk == n else "none"
    if sdpa == "all":
        return dense_sdpa_attention()

    if fast is not None and attention_mask is None and lk == n:
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=device)

        def attn(q, k, v, scale):
            flat = [t.transpose(1, 2).reshape(b * t.shape[2], t.shape[1], t.shape[3]) for t in _same_dtype(q, k, v)]
            o = fast.flash_attn_varlen_func(*flat, cu, cu, n, n, softmax_scale=scale, causal=True)
            return o.view(b, n, q.shape[1], q.shape[3]).transpose(1, 2)
        return _mha_or(dense_sdpa_attention(), attn) if sdpa == "mha" else attn

    if attention_mask is not None and attention_mask.shape[-1] != lk:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but the keys are {lk} "
                         f"(cached + new); pass the mask of the whole sequence so far")
    mask = causal_mask(n, lk, dtype, device, attention_mask)
    if device.type == "cuda":
        def attn(q, k, v, scale):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        return attn
    return lambda q, k, v, scale: eager_attention(q, k, v, scale, mask)
