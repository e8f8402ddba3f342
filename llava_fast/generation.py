"""Text generation with a KV cache: greedy or sampled (temperature, top-p), stop tokens and stop strings, batched
prompts with different image sizes and counts.

Two paths give the same greedy tokens:

* padded (the reference, default on CPU): left-padded batch, a ``KVCache`` grown by concatenation, masked attention,
  positions ``cumsum(mask) - 1`` as transformers' ``generate``;
* packed (default when the fast attention kernel is in use, i.e. on CUDA): the prompts are prefilled as ONE packed
  sequence (``cu_seqlens``, per-sample positions, no padding) into a preallocated ``VarlenKVCache``; each decode step
  feeds one token per unfinished sequence, packed, at position = that sequence's length. The attention reads the
  cache in place (Triton varlen kernel with ``seqused_k``); finished sequences are dropped without copying.
"""
from __future__ import annotations

import functools
import math
import operator
import warnings

import torch

from llava_fast.models.language import KVCache, VarlenKVCache


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator, top_k: int = 0) -> torch.Tensor:
    """One token per row: temperature, then top-k, then top-p (transformers' order), then a multinomial draw."""
    return torch.multinomial(_sample_probs(logits, temperature, top_p, top_k), 1, generator=generator)[:, 0]


def _sample_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """The distribution ``_sample`` draws from, (B, vocab) fp32."""
    logits = logits.float()
    # the row's max subtracted before dividing: a temperature near 0 gives large negative logits, never inf - inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < logits.shape[-1]:
        # the k most likely tokens stay (ties with the k-th too, as transformers' `logits < kth` mask keeps them)
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[..., 0] = True                                  # the most likely token always stays (as transformers)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def use_packed(model, device: torch.device | str) -> bool:
    """Whether ``generate`` takes the packed path by default: when the fast (Triton varlen) attention is selected
    for ``device`` and accepts the language model's head dim and dtype."""
    from llava_fast.models import dispatch

    device = torch.device(device)
    return dispatch._fast_attention(device.type, model.config.text_config.head_dim, model.dtype) is not None


class _Stopper:
    """Next-token choice and stop conditions shared by both paths."""

    def __init__(self, b, device, prompts, do_sample, temperature, top_p, generator, eos, pad_token_id,
                 stop_strings, tokenizer, top_k=0):
        """``prompts``: each row's prompt tokens (1-D, no padding)."""
        self.b, self.device = b, device
        self.do_sample, self.temperature, self.top_p, self.generator = do_sample, temperature, top_p, generator
        self.top_k = top_k
        self.eos = torch.tensor(sorted(eos), device=device) if eos else None
        self.pad, self.stop_strings, self.tokenizer = pad_token_id, stop_strings, tokenizer
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        if stop_strings:
            # as transformers (which matches the end of the whole sequence), a stop string may begin in the prompt
            # and be completed by the generated tokens: the end of each prompt is decoded with them. Up to 4 tokens
            # per character (byte-fallback tokens), + 1 as a tokenizer may drop the first token's leading space
            k = 4 * max(len(s) for s in stop_strings) + 1
            self.tails = [p[-k:].tolist() for p in prompts]
            self.tail_chars = [len(tokenizer.decode(t, skip_special_tokens=False)) for t in self.tails]

    @property
    def can_stop(self) -> bool:
        return self.eos is not None or bool(self.stop_strings)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.do_sample:
            return _sample(logits, self.temperature, self.top_p, self.generator, self.top_k)
        return logits.argmax(-1)

    def update(self, nxt: torch.Tensor, generated: torch.Tensor) -> None:
        """``nxt`` (B,) this step's tokens (pad for finished rows), ``generated`` (B, steps) so far."""
        if self.eos is not None:
            self.done = self.done | torch.isin(nxt, self.eos)
        if self.stop_strings:
            for i in range(self.b):
                if not self.done[i]:
                    # special tokens kept: a stop string may be one (``<|im_end|>``), as in transformers
                    text = self.tokenizer.decode(self.tails[i] + generated[i].tolist(), skip_special_tokens=False)
                    # a match must end after the prompt: one wholly inside it does not stop (nor in transformers)
                    if any(text.find(s, max(0, self.tail_chars[i] - len(s) + 1)) >= 0 for s in self.stop_strings):
                        self.done[i] = True


def _eval_mode(fn):
    """Runs ``fn(model, ...)`` with every module of ``model`` in eval mode (dropout off, e.g. a LoRA adapter's
    ``lora_dropout``), then puts the modules that were training back in training mode."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        training = [m for m in model.modules() if m.training]
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            for m in training:
                m.training = True
    return wrapper


@torch.no_grad()
@_eval_mode
def generate(model, input_ids, pixel_values=None, image_sizes=None, attention_mask=None,
             pixel_values_videos=None, batch_num_images=None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | torch.Tensor | None = None,
             pad_token_id: int | None = None, stop_strings: str | list[str] | None = None, tokenizer=None,
             generator: torch.Generator | None = None, packed: bool | None = None, output_logits: bool = False,
             top_k: int = 0):
    """Generates up to ``max_new_tokens`` tokens per prompt, greedy or sampled.

    The model runs in eval mode (dropout off; modules that were training are put back in training mode after).

    Args:
        input_ids: (B, L) prompts with image placeholders expanded, left-padded (``attention_mask`` 0 on the left;
            without ``attention_mask`` and with a ``pad_token_id`` given, that token is masked out, as in
            transformers, unless it is an eos token), or a list of B 1-D tensors of different lengths (no padding at all;
            packed path only).
        pixel_values, image_sizes, pixel_values_videos, batch_num_images: the images/videos of all prompts, in
            placeholder order (as for the model's forward).
        packed: ``None`` (default) takes the packed path when the fast attention kernel is in use (CUDA, see
            :func:`use_packed`), else the left-padded reference path; ``True``/``False`` force one. Packed: the
            prompts are prefilled as one packed sequence (no padding, per-sample positions) into a ``VarlenKVCache``
            and each step decodes one token per unfinished sequence; greedy tokens equal the padded path's.
        eos_token_id, stop_strings (with ``tokenizer``): a row is finished after producing one of these (stop
            strings are matched in the decoded text with special tokens kept; as in transformers, a stop string
            that begins at the end of the prompt and is completed by the generated tokens counts too). As in
            transformers, ``eos_token_id`` may be an int, a list of ints or a tensor, ``stop_strings`` one string or
            a list of strings.
        pad_token_id: fills the rows already finished (a token id of the model: the padded path feeds it; 0 when
            not given, and then no attention mask is inferred: with no generation config to take it from, a default
            pad id would mask a real token, e.g. Qwen2's id 0 is "!").
        do_sample, temperature, top_k, top_p, generator: sampling (temperature > 0; top_k >= 0, 0 = off, else only
            the k most likely tokens; 0 <= top_p <= 1, the most likely token is always kept; applied in
            transformers' order: temperature, top-k, top-p). transformers' GenerationConfig defaults to top_k=50
            when a checkpoint's generation_config.json does not say otherwise: pass ``top_k=50`` to sample as it
            does. The packed path samples the unfinished rows only, so once a row has finished the random stream
            differs from the padded path's. Greedy decoding (``do_sample=False``) warns when any of these is set,
            as it ignores them.
        output_logits: also return the logits of every step, (B, steps, vocab) fp32 (packed path: NaN for rows
            already finished at that step).

    Returns:
        (B, L + steps) token ids: the prompt followed by the generated tokens (``pad_token_id`` after a row
        finished), or for list input a list of 1-D tensors (prompt + generated tokens up to and including the stop
        token). With ``output_logits``, ``(ids, logits)``. Positions are those of transformers (``cumsum(mask) - 1``
        in the padded path), so greedy decoding gives transformers' tokens.
    """
    if isinstance(stop_strings, str):  # one stop string, as transformers accepts (was matched per character)
        stop_strings = [stop_strings]
    if stop_strings is not None:
        stop_strings = list(stop_strings)
        if not all(isinstance(s, str) for s in stop_strings):
            raise ValueError(f"stop_strings must be a string or a list of strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer (pass tokenizer=...) to decode the generated text")
    max_new_tokens = _integer(max_new_tokens, "max_new_tokens", 1)
    temperature, top_p = _number(temperature, "temperature"), _number(top_p, "top_p")
    top_k = _integer(top_k, "top_k", 0, " (0 = no top-k; k keeps the k most likely tokens)")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (the probability mass kept; 1 = no top-p), got {top_p}")
    if do_sample and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number when sampling, got {temperature}; for greedy "
                         f"decoding pass do_sample=False")
    if not do_sample:
        ignored = [f"{k}={v}" for k, v, d in (("temperature", temperature, 1.0), ("top_p", top_p, 1.0),
                                              ("top_k", top_k, 0), ("generator", generator, None)) if v != d]
        if ignored:
            warnings.warn(f"do_sample=False (greedy decoding) ignores {', '.join(ignored)}; pass do_sample=True to "
                          f"sample")
    vocab = model.config.text_config.vocab_size
    infer_mask = pad_token_id is not None
    try:
        pad_token_id = 0 if pad_token_id is None else operator.index(pad_token_id)
    except TypeError:
        pad_token_id = None
    if pad_token_id is None or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}) (it fills the finished rows and the padded "
                         f"path feeds it to the model); pass the tokenizer's pad_token_id (or eos_token_id)")
    eos = _token_ids(eos_token_id, "eos_token_id")
    max_len = model.config.text_config.max_position_embeddings
    media = dict(pixel_values=pixel_values, image_sizes=image_sizes, pixel_values_videos=pixel_values_videos,
                 batch_num_images=batch_num_images)
    stop_kw = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                   eos=eos, pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer)

    _check_input_ids(input_ids)
    if isinstance(input_ids, (list, tuple)):  # ragged prompts: packed path
        if packed is False:
            raise ValueError("a list of prompts (no padding) needs the packed path; pass packed=None or True, or a "
                             "left-padded (B, L) tensor with attention_mask")
        if attention_mask is not None:
            raise ValueError("attention_mask is for a padded (B, L) input_ids tensor; a list of prompts has none")
        prompts = [p.reshape(-1) for p in input_ids]
        if not prompts or any(p.numel() == 0 for p in prompts):
            raise ValueError("input_ids: the list must hold B >= 1 non-empty 1-D prompts")
        if any(p.device != prompts[0].device for p in prompts):
            raise ValueError("input_ids: all prompts must be on one device (the model's)")
        lens = [p.numel() for p in prompts]
        _check_context(max(lens), max_new_tokens, max_len)
        gen, logits, n_gen = _generate_packed(model, prompts, media, max_new_tokens, stop_kw, output_logits)
        out = [torch.cat([p, g[:k]]) for p, g, k in zip(prompts, gen, n_gen)]
        return (out, logits) if output_logits else out

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, n = input_ids.shape
    device = input_ids.device
    if attention_mask is None:  # as transformers: pad tokens masked out, unless pad is an eos token
        how = f" (attention_mask not given: inferred as input_ids != pad_token_id={pad_token_id}, as transformers " \
              f"does; pass attention_mask)"
        mask = (input_ids != pad_token_id).long() if infer_mask and pad_token_id not in eos \
            else torch.ones_like(input_ids)
    else:
        how = ""
        mask = attention_mask.to(device).long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("generation needs left padding: the last column of attention_mask must be 1 for every "
                         "row" + how)
    _check_context(n, max_new_tokens, max_len)
    if packed is None:
        packed = use_packed(model, device)
    if packed:
        lens = mask.sum(-1)
        if not bool((mask.flip(1).cumprod(1).sum(1) == lens).all()):
            raise ValueError("the packed path needs plain left padding: attention_mask must be 0...0 1...1 per "
                             "row" + how)
        lens = lens.tolist()
        prompts = [input_ids[i, n - k:] for i, k in enumerate(lens)]
        gen, logits, _ = _generate_packed(model, prompts, media, max_new_tokens, stop_kw, output_logits)
        seq = torch.cat([input_ids, gen], dim=1)
        return (seq, logits) if output_logits else seq
    seq, logits = _generate_padded(model, input_ids, mask, media, max_new_tokens, stop_kw, output_logits)
    return (seq, logits) if output_logits else seq


def _token_ids(ids, name: str) -> set[int]:
    """``ids`` (None, a token id: int, NumPy or 0-d tensor, or a list / 1-D tensor of them, as transformers takes
    ``eos_token_id``) as a set of ints."""
    if ids is None:
        return set()
    if hasattr(ids, "tolist"):          # tensor, NumPy array or scalar
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple, set)):
        ids = [ids]
    try:
        if any(isinstance(i, bool) for i in ids):
            raise TypeError
        return {operator.index(i) for i in ids}
    except TypeError:
        raise ValueError(f"{name} must be a token id or a list of token ids (int), got {ids!r}") from None


def _integer(v, name: str, minimum: int, hint: str = "") -> int:
    """An integer argument (``operator.index``: no floats or strings) of at least ``minimum``; a ValueError naming
    it otherwise."""
    try:
        v = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {v!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, got {v}")
    return v


def _number(v, name: str) -> float:
    """A sampling parameter as a float (Python, NumPy or 1-element tensor number); a ValueError naming it otherwise
    (a string or None gave a TypeError from a comparison)."""
    if isinstance(v, (str, bytes, bool)) or v is None:
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


def _check_context(n: int, max_new_tokens: int, max_len: int) -> None:
    if n + max_new_tokens > max_len:
        fix = "shorten the prompt (image tokens must not be cut)" if n >= max_len else \
            f"lower max_new_tokens to at most {max_len - n} or shorten the prompt"
        raise ValueError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds the context length "
                         f"(max_position_embeddings={max_len}) of the language model; {fix}")


def _check_input_ids(input_ids) -> None:
    """A (B, L) or (L,) integer tensor with L >= 1, or a list of 1-D ones: clear errors instead of an IndexError
    (empty prompt), an unpacking error (3-D) or a slicing error (float ids on the packed path)."""
    rows = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
    for i, t in enumerate(rows):
        what = f"input_ids[{i}]" if isinstance(input_ids, (list, tuple)) else "input_ids"
        if not torch.is_tensor(t):
            raise ValueError(f"{what} must be a torch.Tensor of token ids, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must hold integer token ids (int64 or int32), got {t.dtype}")
        if isinstance(input_ids, (list, tuple)):
            if t.dim() > 1 and t.numel() != t.shape[-1]:
                raise ValueError(f"{what} must be one prompt (1-D), got shape {tuple(t.shape)}")
        elif t.dim() not in (1, 2) or t.shape[-1] == 0 or t.numel() == 0:
            raise ValueError(f"input_ids must be (batch, seq) or (seq,) with seq >= 1 (left-padded prompts), got "
                             f"shape {tuple(t.shape)}")


def _generate_padded(model, input_ids, mask, media, max_new_tokens, stop_kw, output_logits):
    """The reference path: left-padded batch, concatenating KV cache, masked attention."""
    b, n = input_ids.shape
    stop = _Stopper(b, input_ids.device, [row[m.bool()] for row, m in zip(input_ids, mask)], **stop_kw)
    cache = KVCache(model.config.text_config.num_hidden_layers)
    pos = mask.cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    # the logits of each (left-padded) prompt's last token only: the last layer computes nothing else after its
    # attention, and there is no (tokens x vocab) tensor for the whole prompt
    last = torch.arange(1, b + 1, device=input_ids.device) * n - 1
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache, keep_rows=last, **media)
    logits = out.logits[0]
    all_logits = []
    seq = input_ids
    for step in range(max_new_tokens):
        if output_logits:
            all_logits.append(logits.float())
        nxt = stop.choose(logits)
        nxt = torch.where(stop.done, torch.full_like(nxt, stop.pad), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        stop.update(nxt, seq[:, n:])
        if (stop.can_stop and bool(stop.done.all())) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = (mask.sum(-1, keepdim=True) - 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache)
        logits = out.logits[:, -1]
    return seq, (torch.stack(all_logits, dim=1) if output_logits else None)


def _cache_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype of the packed path's KV cache: under autocast the autocast dtype (the keys and values are produced
    by autocast linears, and transformers' eager attention, as our padded path, runs its matmuls in that dtype: the
    cache in the model's fp32 ran the attention kernel in fp32 with twice the memory), else the model's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.dtype


def _generate_packed(model, prompts, media, max_new_tokens, stop_kw, output_logits):
    """The packed path. Returns (generated (B, steps) with pad after a row finished, logits or None, the number of
    tokens each row generated including its stop token)."""
    device = prompts[0].device
    b = len(prompts)
    lens = [p.numel() for p in prompts]
    tc = model.config.text_config
    cache = VarlenKVCache(tc.num_hidden_layers, b, max(lens) + max_new_tokens, tc.num_key_value_heads, tc.head_dim,
                          dtype=_cache_dtype(model, device), device=device)
    stop = _Stopper(b, device, prompts, **stop_kw)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(k, device=device) for k in lens])[None]
    flat = torch.cat(prompts)[None]
    # logits of the last prompt token of each sample only: no (tokens x vocab) tensor for the whole prompt, and the
    # last layer computes nothing else after its attention
    last = torch.tensor(lens).cumsum(0).sub_(1).to(device, non_blocking=True)
    logits = model(input_ids=flat, cu_seqlens=cu, position_ids=pos, max_seqlen=max(lens), cache=cache,
                   keep_rows=last, **media).logits[0]
    active = torch.arange(b, device=device)          # batch row of each document of the next decode step
    n_gen = torch.zeros(b, dtype=torch.long, device=device)
    gen, all_logits = [], []
    cu1 = torch.arange(b + 1, dtype=torch.int32, device=device)
    for step in range(max_new_tokens):
        if output_logits:
            full = torch.full((b, logits.shape[-1]), float("nan"), device=device)
            all_logits.append(full.index_copy(0, active, logits.float()))
        tok = stop.choose(logits)                     # (active,)
        nxt = torch.full((b,), stop.pad, dtype=tok.dtype, device=device).index_copy(0, active, tok)
        n_gen[active] += 1
        gen.append(nxt)
        stop.update(nxt, torch.stack(gen, dim=1))
        if step == max_new_tokens - 1:
            break
        if stop.can_stop:  # drop finished sequences (one host sync per step, as the padded path's done.all())
            keep = ~stop.done[active]
            n_keep = int(keep.sum())
            if n_keep == 0:
                break
            if n_keep < active.numel():
                idx = keep.nonzero()[:, 0]
                cache.select(idx)
                active, tok = active[idx], tok[idx]
        a = active.numel()
        pos = cache.lengths[cache.rows].long()[None]  # each sequence's length = the new token's position
        hidden = model(input_ids=tok[None], cu_seqlens=cu1[:a + 1], position_ids=pos, max_seqlen=1, cache=cache,
                       logits=False, return_hidden=True).hidden_states
        logits = model.lm_head(hidden[0])
    return torch.stack(gen, dim=1), (torch.stack(all_logits, dim=1) if output_logits else None), n_gen.tolist()
