"""Llama / Qwen2 / Mistral decoder in plain PyTorch, with transformers 5.x parameter names.

Runs padded batches (B, L) with an attention mask, or one packed sequence of several samples (``cu_seqlens``,
per-sample ``position_ids``) where each sample attends only to itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llava_fast import _ext, backend

from llava_fast.models.config import TextConfig
from llava_fast.models.layers import RMSNorm, RotaryEmbedding, apply_rope, get_activation


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=cfg.o_bias)

    def forward(self, x, cos, sin, attn, cache=None, layer_idx=0, position_ids=None, rope_inv_freq=None, norm=None,
                residual=None, rows=None):
        """With ``norm`` (the layer's input RMSNorm) the attention runs on ``norm(x)``, which q, k and v share and
        which is recomputed in the backward instead of kept (ops/act_linear.py); without, on ``x`` as given. With
        ``residual`` the input is ``s = x + residual`` (the add fused into the norm where possible) and the result is
        ``(attention output, s)``. With ``rows`` (int64, flattened ``b * n`` token rows) the output projection runs
        on those rows only and the output is ``(1, len(rows), D)`` (``s`` stays whole): the last layer's
        unsupervised rows (``LanguageModel.forward``)."""
        b, n, _ = x.shape
        (q, k, v), s = norm_linears(norm, x, residual, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, n, self.num_heads, self.head_dim)
        k = k.view(b, n, self.num_kv_heads, self.head_dim)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos is None:  # fused RoPE kernel on (B, S, H, D), positions per token
            from llava_fast.ops.rope import rope

            q, k = rope(q, k, position_ids, inv_freq=rope_inv_freq)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        o = attn(q, k, v, self.scale)
        o = o.transpose(1, 2).reshape(b, n, -1)
        if rows is not None:
            o = select_rows(o, rows)
        o = self.o_proj(o)
        return o if residual is None else (o, s)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.act = get_activation(cfg.hidden_act)

    def _gated(self, g, u):
        return self.act(g) * u

    def forward(self, x, norm=None, residual=None):
        # down_proj's input (the gated product) is recomputed in the backward instead of kept (ops/act_linear.py:
        # -30% of the Llama-7B MLP's saved activations), and with ``norm`` (the layer's post-attention RMSNorm) so is
        # the normalized input that gate and up share
        # (adapters or wrappers on a projection, such as LoRA: that module is called instead; act_linear.plain_linears)
        # With ``residual``: the input is s = x + residual, the result (mlp output, s)
        from llava_fast.ops.act_linear import act_linear, plain_linears

        if self.act is F.silu and backend.use_fast("swiglu", x.device.type):
            from llava_fast.ops.swiglu import SwiGLUAct

            act = SwiGLUAct()
        else:
            act = self._gated
        (g, u), s = norm_linears(norm, x, residual, (self.gate_proj, self.up_proj))
        if plain_linears(self.down_proj):
            out = act_linear(act, (g, u), self.down_proj.weight, self.down_proj.bias)
        else:
            out = self.down_proj(act(g, u))
        return out if residual is None else (out, s)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn, cache=None, layer_idx=0, position_ids=None, rope_inv_freq=None,
                residual=None, defer=False, rows=None):
        """The layer on ``x`` (plus ``residual``, the previous layer's deferred MLP output, when given). With
        ``defer`` it returns ``(s, m)``, its output ``s + m`` left unadded for the next norm to add in its kernel
        (``LanguageModel.forward``); otherwise the output itself. Each residual add that meets a norm is fused into
        the norm's kernel where the fast RMSNorm runs (``norm_linears``).

        ``rows`` (int64 tensor of flattened ``b * n`` token rows): the output holds those rows only, ``(1, len(rows),
        D)``. Attention still runs over every token (the rows attend to all of them, and the keys and values of
        every token reach a KV cache), but the output projection, the residual adds and the MLP run on the kept
        rows: everything after the attention is row-wise. The last layer of a training step keeps the rows whose
        next token is supervised (``LlavaForConditionalGeneration.forward``)."""
        if rows is not None:
            return self._forward_rows(x, cos, sin, attn, cache, layer_idx, position_ids, rope_inv_freq, residual,
                                      defer, rows)
        # hooked attention / MLP modules keep their usual input and output (a tensor each): the add runs before
        # (so do wrapped ones, torch.compile's or checkpoint_wrapper's: the wrapped module's hooks would get the pair)
        if residual is not None and _own_unhooked(self.self_attn, Attention):
            a, s = self.self_attn(x, cos, sin, attn, cache, layer_idx, position_ids, rope_inv_freq,
                                  norm=self.input_layernorm, residual=residual)
        else:
            s = x if residual is None else x + residual
            a = self.self_attn(s, cos, sin, attn, cache, layer_idx, position_ids, rope_inv_freq,
                               norm=self.input_layernorm)
        if _own_unhooked(self.mlp, MLP):
            m, s = self.mlp(a, norm=self.post_attention_layernorm, residual=s)
        else:
            s = s + a
            m = self.mlp(s, norm=self.post_attention_layernorm)
        return (s, m) if defer else s + m

    def _forward_rows(self, x, cos, sin, attn, cache, layer_idx, position_ids, rope_inv_freq, residual, defer, rows):
        if _own_unhooked(self.self_attn, Attention) and _own_unhooked(self.mlp, MLP):
            a = self.self_attn(x, cos, sin, attn, cache, layer_idx, position_ids, rope_inv_freq,
                               norm=self.input_layernorm, residual=residual, rows=rows)
            a, s = a if residual is not None else (a, x)
            m, s = self.mlp(a, norm=self.post_attention_layernorm, residual=select_rows(s, rows))
            return (s, m) if defer else s + m
        # hooked or replaced attention / MLP modules see their usual whole input and output: rows selected after
        out = self.forward(x, cos, sin, attn, cache, layer_idx, position_ids, rope_inv_freq, residual, defer)
        return tuple(select_rows(t, rows) for t in out) if defer else select_rows(out, rows)


def select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of the flattened tokens of ``x`` (B, L, D), as ``(1, len(rows), D)``."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows)[None]


def _own_unhooked(module, cls) -> bool:
    """``module`` is a ``cls`` with ``cls``'s forward and no hooks: it may be called with ``residual`` and return the
    pair ``(output, s)``."""
    from llava_fast.ops.act_linear import unhooked

    return type(module).forward is cls.forward and unhooked(module)


def norm_linears(norm, x, residual, projs):
    """``(tuple(p(norm(s)) for p in projs), s)`` with ``s = x + residual`` (``residual`` None: ``s = x``; ``norm``
    None: no norm). The norm's output is recomputed in the backward instead of kept (ops/act_linear.py) where the
    projections are plain linears and the norm unhooked; the add runs inside the fused RMSNorm's kernel where that
    norm is selected (``residual_act_linears``). Otherwise (LoRA or wrapped projections, hooked norms, the reference
    backend) the modules are called, after a plain add."""
    from llava_fast.ops.act_linear import (act_linears, fuse_residual_enabled, plain_linears, residual_act_linears,
                                           unhooked)

    if norm is not None and plain_linears(*projs) and unhooked(norm):
        act = norm.functional()
        ws, bs = [p.weight for p in projs], [p.bias for p in projs]
        if residual is not None and getattr(act, "fusable", None) is not None and act.fusable(x, residual) \
                and fuse_residual_enabled():
            out = residual_act_linears(act, x, residual, norm.weight, ws, bs)
            return out[:-1], out[-1]
        s = x if residual is None else x + residual
        return act_linears(act, (s, norm.weight), ws, bs), s
    s = x if residual is None else x + residual
    h = s if norm is None else norm(s)
    return tuple(p(h) for p in projs), s


class KVCache:
    """Keys and values of past tokens per layer, (B, Hkv, S, D), grown by concatenation (reference path)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished sequences dropped)."""
        self.k = [None if t is None else t[rows] for t in self.k]
        self.v = [None if t is None else t[rows] for t in self.v]


class VarlenKVCache:
    """Preallocated per-sequence KV cache for packed (unpadded) batched inference (use under torch.no_grad()).

    Per layer, keys and values live in ``(B, max_len, Hkv, D)`` buffers (zeros at first); ``lengths`` (int32, (B,),
    on the device) counts the tokens stored per sequence. Every forward of the language model with this cache is in
    packed form: ``cu_seqlens`` delimits the new tokens of each *active* sequence (document ``i`` continues cache row
    ``rows[i]``; all rows at first, :meth:`select` drops finished ones without copying anything), ``position_ids``
    are each sequence's own positions. :meth:`update` writes the new tokens of every sequence at its own offset with
    one ``index_copy_`` per tensor (no host synchronisation) and returns the whole buffers; the attention then reads
    them in place: the Triton varlen kernel with ``seqused_k`` (``cu_seqlens_k = rows * max_len``) when the fast
    attention is selected, else an equivalent masked eager attention (the CPU reference). The prefill (several tokens
    per sequence), chunked prefill and decode (one token per sequence) are the same call.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device=None):
        if batch < 1 or max_len < 1:
            raise ValueError(f"VarlenKVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        self.rows = torch.arange(batch, device=self.k.device)       # cache row of each document of the next forward
        self._bound = 0                                              # host-side upper bound of max(lengths)
        self._plan = None

    @property
    def length(self) -> int:
        """Upper bound of the longest stored sequence, known on the host without synchronising (0 when empty)."""
        return self._bound

    @property
    def num_active(self) -> int:
        return self.rows.numel()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the active sequences ``rows`` (indices into the current active ones, as ``KVCache.select``);
        nothing is copied: the next forward's documents map to the kept cache rows."""
        self.rows = self.rows[rows.to(self.rows.device)]

    def begin(self, cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None) -> None:
        """Plan one forward of ``total`` new tokens packed by ``cu_seqlens`` (one document per active row): where
        each token is written, and each document's key count after the write. Device arithmetic only."""
        nd = cu_seqlens.numel() - 1
        if nd != self.num_active:
            raise ValueError(f"cu_seqlens holds {nd} sequences but the VarlenKVCache has {self.num_active} active "
                             f"rows; pass one document per active sequence (cache.select drops finished ones)")
        mq = int(max_seqlen) if max_seqlen is not None else total
        if self._bound + mq > self.max_len:
            raise ValueError(f"VarlenKVCache overflow: up to {self._bound} stored + {mq} new tokens > max_len "
                             f"{self.max_len}; allocate the cache with a larger max_len")
        dev = self.k.device
        cu = cu_seqlens.to(device=dev, dtype=torch.int32)
        t = torch.arange(total, device=dev, dtype=torch.int32)
        doc = torch.searchsorted(cu[1:].contiguous(), t, right=True)          # document of each new token
        start = self.lengths.index_select(0, self.rows)                       # tokens already stored, (nd,)
        pos = start.index_select(0, doc) + (t - cu.index_select(0, doc))      # position of each token in its row
        used = (start + (cu[1:] - cu[:-1])).to(torch.int32)                   # keys per document after the write
        cu_k = torch.cat([self.rows * self.max_len,
                          torch.full((1,), self.batch * self.max_len, device=dev, dtype=self.rows.dtype)])
        self._plan = dict(cu_q=cu, max_q=mq, doc=doc, pos=pos, start=start, used=used, rows=self.rows,
                          max_len=self.max_len,
                          dest=self.rows.index_select(0, doc) * self.max_len + pos,
                          cu_k=cu_k.to(torch.int32).contiguous())

    @property
    def plan(self) -> dict:
        if self._plan is None:
            raise RuntimeError("VarlenKVCache.begin(cu_seqlens, ...) must be called before the forward")
        return self._plan

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (1, Hkv, T, D) of the new tokens -> the whole buffers of layer ``i``, (B, max_len, Hkv, D)."""
        dest = self.plan["dest"]
        b, m, h, d = self.k.shape[1:]
        self.k[i].view(b * m, h, d).index_copy_(0, dest, k[0].transpose(0, 1).to(self.k.dtype))
        self.v[i].view(b * m, h, d).index_copy_(0, dest, v[0].transpose(0, 1).to(self.v.dtype))
        return self.k[i], self.v[i]

    def end(self) -> None:
        """Commit the forward: the active sequences' lengths grow by their new tokens."""
        p = self.plan
        self.lengths.index_copy_(0, self.rows, p["used"])
        self._bound += p["max_q"]
        self._plan = None


class LanguageModel(nn.Module):
    """The decoder stack (``model.language_model`` in transformers 5.x); the lm_head lives on the LLaVA class."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                cache: KVCache | VarlenKVCache | None = None, rows: torch.Tensor | None = None):
        """inputs_embeds (B, L, D). Padded form: ``attention_mask`` (B, L) of 1/0 (or None). Packed form: B == 1,
        ``cu_seqlens`` int32 (n+1,), ``position_ids`` (1, L) restarting per sample. With a ``KVCache`` (padded form
        only), the new tokens attend to the cached ones too and ``attention_mask`` covers past + new tokens. With a
        ``VarlenKVCache`` (packed form only), document ``i`` of ``cu_seqlens`` holds the new tokens of the cache's
        ``i``-th active sequence, ``position_ids`` their positions in that sequence.

        ``rows`` (int64 tensor on the model's device, flattened ``B * L`` token rows, each at most once): the result
        holds those rows only, ``(1, len(rows), D)``, and the last layer computes everything after its attention on
        them alone (``DecoderLayer.forward``)."""
        from llava_fast.models import dispatch

        b, n, _ = inputs_embeds.shape
        if position_ids is None:
            if cu_seqlens is not None:
                raise ValueError("position_ids is required with cu_seqlens (positions restart at each sample)")
            past = cache.length if cache is not None else 0
            position_ids = torch.arange(past, past + n, device=inputs_embeds.device)[None].expand(b, n)
        if position_ids.dim() == 1:  # (L,): one row shared by the batch, as (1, L)
            position_ids = position_ids[None]
        fused_rope = backend.use_fast("rope", inputs_embeds.device.type)
        if fused_rope and position_ids.shape[0] != b:
            # (1, L) shared by a batch of B rows (accepted by the forward, broadcast by the reference cos/sin): the
            # kernel takes one position per token
            position_ids = position_ids.expand(b, n)
        if fused_rope and not position_ids.is_contiguous():
            position_ids = position_ids.contiguous()  # once here, not in every layer's RoPE forward and backward
        n_real, pad = n, token_padding(b, n, cu_seqlens, attention_mask, cache)
        if pad:   # LLAVA_FAST_PAD_TOKENS: the GEMMs' M = b * n rounded up (docs/perf-notes.md, "GEMM rate against M")
            inputs_embeds, position_ids, cu_seqlens, max_seqlen, rows = pad_tokens(
                inputs_embeds, position_ids, cu_seqlens, max_seqlen, rows, pad)
            n = inputs_embeds.shape[1]
        cos, sin = (None, None) if fused_rope else self.rotary_emb(position_ids, inputs_embeds.dtype)
        varlen = isinstance(cache, VarlenKVCache)
        if varlen:
            if cu_seqlens is None or b != 1:
                raise ValueError("a VarlenKVCache needs the packed form: input of batch 1 with cu_seqlens (one "
                                 "document per active sequence) and position_ids")
            cache.begin(cu_seqlens, n, max_seqlen)
        elif cache is not None and cu_seqlens is not None:
            raise ValueError("a KVCache is supported with the padded form only (no cu_seqlens); use a VarlenKVCache "
                             "for packed inputs")
        lk = n + (cache.length if cache is not None and not varlen else 0)
        attn = dispatch.text_attention(b, n, inputs_embeds.dtype, inputs_embeds.device, attention_mask, cu_seqlens,
                                       max_seqlen, lk=lk, head_dim=self.cfg.head_dim,
                                       kv_cache=cache if varlen else None, pad_doc=pad if cu_seqlens is not None else 0)
        x, pending = inputs_embeds, None
        # checkpointed layers keep only their input: deferring the residual add would double what they keep
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        # the residual add after each MLP deferred into the next norm's kernel (ops/act_linear.residual_act_linears)
        from llava_fast.ops.act_linear import fuse_residual_enabled

        defer = backend.use_fast("rms_norm", inputs_embeds.device.type) and not ckpt and fuse_residual_enabled()
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # the last layer takes ``rows`` where it is a DecoderLayer's own forward without hooks but FSDP2's;
            # any other module (its hooks) sees every row, and they are selected after it
            kw = dict(rows=rows) if rows is not None and i == last and type(layer).forward is DecoderLayer.forward \
                and _plain_layer(layer) else {}
            # (not with a cache: the checkpointed layer would neither fill it, nor, recomputed, fill it only once)
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn, None, i, position_ids,
                                                      self.rotary_emb.inv_freq, use_reentrant=False, **kw)
            elif defer and type(layer).forward is DecoderLayer.forward and _plain_layer(layer):
                # (a DecoderLayer itself, FSDP2's subclass included: a wrapper such as torch.compile's or
                # checkpoint_wrapper would hand the pair to the wrapped layer's hooks, and keep both addends)
                x, pending = layer(x, cos, sin, attn, cache, i, position_ids, self.rotary_emb.inv_freq, pending, True,
                                   **kw)
            else:  # a hooked layer sees its whole input and returns its output, as without the deferral
                x = x if pending is None else x + pending
                x, pending = layer(x, cos, sin, attn, cache, i, position_ids, self.rotary_emb.inv_freq, **kw), None
            if rows is not None and i == last and not kw:
                x = select_rows(x, rows)
                pending = None if pending is None else select_rows(pending, rows)
        if rows is not None and not self.layers:
            x = select_rows(x, rows)
        if varlen:
            cache.end()
        if pad and rows is None:   # the padding's rows dropped before the final norm
            x = x[:, :n_real]
            pending = None if pending is None else pending[:, :n_real]
        if pending is None:
            return self.norm(x)
        return final_norm(self.norm, x, pending)


def token_padding(b: int, n: int, cu_seqlens, attention_mask, cache) -> int:
    """Tokens to append (``LLAVA_FAST_PAD_TOKENS=P``, default 0: none) so that the linears' M = ``b * n`` becomes a
    multiple of P: the packed form gets a trailing padding document of that many tokens, an unmasked padded batch
    that many more positions per sequence (causal: no real token sees them). Not with an attention mask or a KV cache.
    Layer hooks see the padded tokens (the result is sliced back after the last layer). With the model's test suite
    run under ``LLAVA_FAST_PAD_TOKENS=64`` only the tests that count GEMM rows or hooked shapes differ.
    Why: cuBLAS ran the NeXT prefill's GEMMs at M = 19984 at 616-720 TFLOP/s where stage 1's M = 10240 ran 785-793
    (H200, session 19; docs/perf-notes.md, "GEMM rate against M"); opt-in until ``bench_gemm.py`` and bench_model's
    ``llava_fast_pad256`` row measure it."""
    raw = _ext.env_str("LLAVA_FAST_PAD_TOKENS", "0")
    if not raw.isdigit():
        raise ValueError(f"LLAVA_FAST_PAD_TOKENS={raw!r}: must be a whole number of tokens (0: no padding)")
    mult = int(raw)
    if mult <= 1 or cache is not None or attention_mask is not None:
        return 0
    if cu_seqlens is not None:
        return -n % mult
    step = mult // math.gcd(mult, b)   # b * (n + pad) is a multiple of mult
    return -n % step


def pad_tokens(x, position_ids, cu_seqlens, max_seqlen, rows, pad: int):
    """``pad`` more tokens (:func:`token_padding`): zero embeddings (finite through every layer: a zero row's RMSNorm
    is zero, and a non-finite padding row would reach the weight gradients through ``dy^T x`` even with ``dy = 0``),
    positions that go on from each sequence's last (the packed form: ``0..pad-1``, a document of their own), and
    ``rows`` (flattened ``b * n`` indices) moved to the longer rows. Everything on the device: no upload, no sync."""
    b, n = x.shape[:2]
    x = F.pad(x, (0, 0, 0, pad))
    if cu_seqlens is not None:
        position_ids = torch.cat([position_ids, torch.arange(pad, device=position_ids.device,
                                                             dtype=position_ids.dtype)[None]], 1)
        cu_seqlens = F.pad(cu_seqlens, (0, 1), value=n + pad)
        max_seqlen = max(int(max_seqlen) if max_seqlen is not None else n, pad)
    else:
        more = torch.arange(1, pad + 1, device=position_ids.device, dtype=position_ids.dtype)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + more], 1)
        if rows is not None and b > 1:
            rows = rows // n * (n + pad) + rows % n
    return x, position_ids, cu_seqlens, max_seqlen, rows


def _plain_layer(layer) -> bool:
    """True when ``layer`` has no hooks but FSDP2's (which take the ``(s, m)`` pair of a deferred residual add as
    they take any output): a user's hook must see the layer's usual input and output (hooks registered for every
    module too)."""
    from llava_fast.ops.act_linear import _global_hooks

    if _global_hooks() or layer._backward_hooks or layer._backward_pre_hooks:
        return False
    hooks = (*layer._forward_pre_hooks.values(), *layer._forward_hooks.values())
    return all(type(getattr(h, "__self__", None)).__name__ == "FSDPState" for h in hooks)


def final_norm(norm, x, pending):
    """``norm(x + pending)``, the add inside the fused RMSNorm's kernel where it runs."""
    from llava_fast.ops.act_linear import unhooked

    if unhooked(norm) and isinstance(norm, RMSNorm):
        act = norm.functional()
        if getattr(act, "fusable", None) is not None and act.fusable(x, pending):
            return act.add_forward_autograd(x, pending, norm.weight)[0]
    return norm(x + pending)
