"""Text generation with a KV cache: greedy or sampled (temperature, top-p), stop tokens and stop strings, batched
prompts with different image sizes and counts (left padding, as transformers' ``generate``)."""
from __future__ import annotations

import torch

from llava_fast.models.language import KVCache


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    logits = logits.float() / max(temperature, 1e-5)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p       # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, pixel_values=None, image_sizes=None, attention_mask=None,
             pixel_values_videos=None, batch_num_images=None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int = 0, stop_strings: list[str] | None = None, tokenizer=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns (B, L + new) token ids: the prompt followed by the generated tokens (``pad_token_id`` after a row
    finished). Prompts are left-padded (``attention_mask`` 0 on the left); positions are ``cumsum(mask) - 1`` as in
    transformers, so greedy decoding gives transformers' tokens."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer (pass tokenizer=...) to decode the generated text")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, n = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("generation needs left padding: the last column of attention_mask must be 1 for every row")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    max_len = model.config.text_config.max_position_embeddings
    if n + max_new_tokens > max_len:
        raise ValueError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds the context length ({max_len})")
    cache = KVCache(model.config.text_config.num_hidden_layers)
    pos = mask.cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    out = model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=mask,
                position_ids=pos, pixel_values_videos=pixel_values_videos, batch_num_images=batch_num_images,
                cache=cache)
    logits = out.logits[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens = []
    texts_start = n
    seq = input_ids
    for step in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_p, generator) if do_sample else logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos:
            done = done | torch.isin(nxt, torch.tensor(sorted(eos), device=device))
        if stop_strings:
            for i in range(b):
                if not done[i]:
                    text = tokenizer.decode(seq[i, texts_start:].tolist(), skip_special_tokens=True)
                    if any(s in text for s in stop_strings):
                        done[i] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = (mask.sum(-1, keepdim=True) - 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache)
        logits = out.logits[:, -1]
    return seq
