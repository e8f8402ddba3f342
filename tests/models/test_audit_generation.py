"""Generation audit: arguments given the way transformers takes them (one stop string as a str, eos_token_id as a tensor
or NumPy int), bad inputs refused with errors that name the argument, the packed path's KV cache under autocast, and
`llava-fast chat` once a conversation outgrows the model's context."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

import llava_fast

from test_generation import _gen_inputs
from test_generation_stop_strings import char_tokenizer
from test_llava_parity import hf_pixels
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory):
    hf, path = save_tiny(tmp_path_factory.mktemp("audit_gen"), "llava_next")
    return hf, path, llava_fast.from_pretrained(path)


@pytest.mark.parametrize("packed", [False, True])
def test_single_stop_string_as_str(tiny_next, packed):
    """``stop_strings="..."`` is one stop string, as in transformers (it was iterated character by character: any
    generated character of the string stopped the row)."""
    hf, _, m = tiny_next
    tok = char_tokenizer()
    ids = torch.tensor([tok("<s>Q: hi A:")["input_ids"]])
    n = ids.shape[1]
    free = m.generate(ids, max_new_tokens=8, packed=packed)
    g = tok.decode(free[0, n:])
    never = "~~~~" + g[1]                       # shares a character with the text, never occurs in it
    assert never not in tok.decode(free[0])
    got = m.generate(ids, max_new_tokens=8, stop_strings=never, tokenizer=tok, packed=packed)
    assert torch.equal(got, free), f"{never!r}: {got[0, n:].tolist()} vs {free[0, n:].tolist()}"
    ref = hf.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                      stop_strings=never, tokenizer=tok)
    assert torch.equal(got, ref)
    stop = g[2:4]                               # completed by the 4th generated token: stops there
    got = m.generate(ids, max_new_tokens=8, stop_strings=stop, tokenizer=tok, packed=packed)
    assert torch.equal(got, m.generate(ids, max_new_tokens=8, stop_strings=[stop], tokenizer=tok, packed=packed))
    assert got.shape[1] <= n + 4
    with pytest.raises(ValueError, match="stop_strings must be a string or a list of strings"):
        m.generate(ids, max_new_tokens=2, stop_strings=[1], tokenizer=tok, packed=packed)


@pytest.mark.parametrize("packed", [False, True])
def test_eos_token_id_as_tensor_or_numpy(tiny_next, packed):
    """eos_token_id as a 0-d / 1-d tensor or NumPy ints (transformers takes tensors) stops as the int does (a 0-d
    tensor or a NumPy int raised a TypeError: not iterable); a non-integer id raises a ValueError naming it."""
    _, _, m = tiny_next
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    n = ids.shape[1]
    free = m.generate(ids, max_new_tokens=6, packed=packed)
    # the first generated token after the first that did not come before it (random weights may repeat a token)
    gen = free[0, n:].tolist()
    j = next(j for j in range(1, len(gen)) if gen[j] not in gen[:j])
    eos = gen[j]
    want = m.generate(ids, max_new_tokens=6, eos_token_id=eos, packed=packed)
    assert int(want[0, n + j]) == eos and (want[0, n + j + 1:] == 0).all()
    assert torch.equal(want[0, :n + j], free[0, :n + j])
    for e in (torch.tensor(eos), torch.tensor([eos]), np.int64(eos), [np.int32(eos)], torch.tensor([eos, 127])[:1]):
        got = m.generate(ids, max_new_tokens=6, eos_token_id=e, packed=packed)
        assert torch.equal(got, want), repr(e)
    for bad in (2.5, "2", [2.0], torch.tensor(2.0)):
        with pytest.raises(ValueError, match="eos_token_id must be a token id"):
            m.generate(ids, max_new_tokens=2, eos_token_id=bad, packed=packed)


@pytest.mark.parametrize("packed", [False, True])
def test_bad_arguments_raise_value_errors_naming_them(tiny_next, packed):
    """Float / 3-D / empty input_ids and non-integer max_new_tokens or non-number temperature raise ValueErrors that
    name the argument (they were a slicing TypeError on the packed path, an unpacking error, an IndexError, a
    TypeError from range() or from a comparison)."""
    _, _, m = tiny_next
    ids = torch.tensor([[3, 4, 5, 6]])
    cases = [(dict(input_ids=ids.float()), "input_ids must hold integer token ids"),
             (dict(input_ids=ids[None]), r"input_ids must be \(batch, seq\)"),
             (dict(input_ids=ids[:, :0]), r"input_ids must be \(batch, seq\)"),
             (dict(input_ids=ids, max_new_tokens=2.5), "max_new_tokens must be an integer"),
             (dict(input_ids=ids, max_new_tokens=None), "max_new_tokens must be an integer"),
             (dict(input_ids=ids, do_sample=True, temperature="0.7"), "temperature must be a number"),
             (dict(input_ids=ids, do_sample=True, top_p=None), "top_p must be a number")]
    for kw, what in cases:
        kw.setdefault("max_new_tokens", 2)
        with pytest.raises(ValueError, match=what):
            m.generate(packed=packed, **kw)
    with pytest.raises(ValueError, match=r"input_ids\[1\] must hold integer token ids"):
        m.generate([ids[0], ids[0].float()], max_new_tokens=2)
    # still accepted: 1-D prompts, int32 ids, a 0-d tensor temperature
    assert m.generate(ids[0].int(), max_new_tokens=2, packed=packed).shape == (1, 6)
    assert m.generate(ids, max_new_tokens=2, do_sample=True, temperature=torch.tensor(0.5), packed=packed,
                      generator=torch.Generator().manual_seed(0)).shape == (1, 6)


def test_packed_cache_in_autocast_dtype(tiny_next, monkeypatch):
    """Under autocast with fp32 weights the packed path's VarlenKVCache holds the autocast dtype and the attention
    kernel runs in it, as the padded path's and transformers' eager matmuls do (the cache was fp32: twice the memory,
    the kernel in fp32). fp16 under the interpreter (its bf16 tl.dot is wrong, see tests/ops/test_attention.py)."""
    from llava_fast import generation
    from llava_fast.ops import attention as attn_op

    _, _, m = tiny_next
    batch, kw = _gen_inputs("llava_next")
    kw.update(pixel_values=batch["pixel_values"], max_new_tokens=3)
    caches, kernel = [], []
    base, kern = generation.VarlenKVCache, attn_op.flash_attn_varlen_func

    class Spy(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            caches.append(self)

    def spy(q, k, v, *a, **k2):
        kernel.append((q.dtype, k.dtype, v.dtype))
        return kern(q, k, v, *a, **k2)

    monkeypatch.setattr(generation, "VarlenKVCache", Spy)
    monkeypatch.setattr(attn_op, "flash_attn_varlen_func", spy)
    with torch.autocast("cpu", dtype=torch.float16):
        padded = m.generate(packed=False, **kw)
        llava_fast.set_backend("attention", "triton")
        try:
            packed = m.generate(packed=True, **kw)
        finally:
            llava_fast.set_backend("all", "auto")
    assert torch.equal(packed, padded)
    assert [c.k.dtype for c in caches] == [torch.float16] and caches[0].v.dtype == torch.float16
    assert kernel and set(kernel) == {(torch.float16,) * 3}, kernel
    # bf16 autocast, reference attention: the bf16 cache holds what the autocast matmuls round k and v to, so the
    # packed path's logits are the padded path's exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pp, lp = m.generate(packed=False, output_logits=True, **kw)
        pk, lk = m.generate(packed=True, output_logits=True, **kw)
    assert caches[-1].k.dtype == torch.bfloat16
    assert torch.equal(pk, pp) and torch.equal(lk, lp)
    pk = m.generate(packed=True, **kw)            # autocast off again: the model's dtype
    assert caches[-1].k.dtype == torch.float32


def test_greedy_under_autocast_equals_transformers(tiny_next):
    """bf16 autocast on the CPU with fp32 weights: both paths give transformers' greedy tokens under the same
    autocast (a batch of an image prompt, a two-image prompt and a text-only prompt of different lengths)."""
    hf, _, m = tiny_next
    batch, kw = _gen_inputs("llava_next")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = hf.generate(pixel_values=hf_pixels("llava_next", batch), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0, **kw)
        for packed in (False, True):
            got = m.generate(pixel_values=batch["pixel_values"], max_new_tokens=6, packed=packed, **kw)
            assert torch.equal(got, ref), packed


def test_chat_conversation_outgrowing_the_context(tmp_path):
    """Once prompt + max_new_tokens no longer fits the context, the chat drops its oldest turns (generate raised and
    the chat ended); a question that cannot fit even alone raises, naming max_new_tokens, and keeps the turns."""
    from llava_fast.chat import ChatSession, run_chat

    from test_chat import add_tokenizer

    _, path = save_tiny(tmp_path, "llava_next")
    add_tokenizer(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 40
    (path / "config.json").write_text(json.dumps(cfg))
    s = ChatSession(str(path), device="cpu")
    for _ in range(3):                             # 4 + 8, 17 + 8, 30 + 8 tokens: fits
        s.ask("w10 w11", max_new_tokens=8)
        assert s.dropped_turns == 0
    turns = list(s.turns)
    answer = s.ask("w10 w11", max_new_tokens=8)    # 43 + 8 > 40: the first turn goes
    assert s.dropped_turns == 1 and s.turns[:-1] == turns[1:]
    s2 = ChatSession(str(path), device="cpu")
    s2.turns = turns[1:]
    ids = s2._prompt_ids("w10 w11")
    assert ids.shape[1] + 8 <= 40
    assert answer == s2.ask("w10 w11", max_new_tokens=8)
    # generate's own check names the limit and the fix (it said "the context length (40)")
    with pytest.raises(ValueError, match=r"context length \(max_position_embeddings=40\).*lower max_new_tokens to "
                                         r"at most 5"):
        s.model.generate(torch.arange(3, 38)[None], max_new_tokens=8)
    with pytest.raises(ValueError, match=r"max_position_embeddings=40\).*shorten the prompt"):
        s.model.generate([torch.arange(3, 43)], max_new_tokens=1)
    turns = list(s.turns)
    with pytest.raises(ValueError, match=r"max_new_tokens \(40\).*max_position_embeddings=40"):
        s.ask("w10 w11", max_new_tokens=40)
    assert s.turns == turns
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_chat(str(path), None, device="cpu", max_new_tokens=8, stream=io.StringIO("w10 w11\n" * 5)) == 0
    assert out.getvalue().count("assistant:") == 5 and "oldest turn(s) were dropped" in out.getvalue()
