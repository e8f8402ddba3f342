"""Generation arguments that must not be silently dropped or ignored: train mode (LoRA dropout), the attention mask
transformers infers from pad_token_id, special-token stop strings, sampling edge values, pad/video checks; and
OneVision multi-image / video batches and the context limit against transformers' generate, on both paths."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import llava_fast
from llava_fast.generation import _sample

from test_llava_parity import hf_pixels, make_batch
from tiny import TILE, VIDEO_TOKEN, save_tiny


def test_train_mode_generates_in_eval_mode(tmp_path):
    """A model left in training mode with LoRA adapters (lora_dropout 0.5) generates the eval-mode greedy tokens,
    and its modules are back in training mode afterwards (dropout used to run during generation)."""
    from llava_fast.train.lora import apply_lora

    _, path = save_tiny(tmp_path, "llava_next")
    m = apply_lora(llava_fast.from_pretrained(path), SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.5))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    want = m.generate(ids, max_new_tokens=8)
    m.train()
    for packed in (False, True):
        assert torch.equal(m.generate(ids, max_new_tokens=8, packed=packed), want), f"packed={packed}"
    assert all(mod.training for mod in m.modules())


@pytest.mark.parametrize("packed", [False, True])
def test_mask_inferred_from_pad_as_transformers(tmp_path, packed):
    """Left-padded input_ids without attention_mask and with pad_token_id given: the pad tokens are masked out as
    transformers' generate does (they were attended to); with pad_token_id an eos token nothing is inferred, as in
    transformers; without pad_token_id nothing is inferred either (no generation config to take it from: a default
    pad id would mask a real token, Qwen2's id 0 is "!")."""
    hf, path = save_tiny(tmp_path, "llava_next")
    m = llava_fast.from_pretrained(path)
    ids = torch.tensor([[0, 0, 3, 4, 5], [7, 8, 9, 10, 11]])
    ref = hf.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(m.generate(ids, max_new_tokens=5, pad_token_id=0, packed=packed), ref)
    ref = hf.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=[0])
    got = m.generate(ids, max_new_tokens=5, eos_token_id=[0], pad_token_id=0, packed=packed)
    assert torch.equal(got[:, :ref.shape[1]], ref)
    with pytest.raises(ValueError, match="inferred as input_ids != pad_token_id=0"):
        m.generate(torch.tensor([[3, 4, 0]]), max_new_tokens=2, pad_token_id=0, packed=packed)
    # no pad_token_id: every token attended, a 0 inside the prompt included (transformers with a pad id it was not
    # given: the same tokens)
    ids = torch.tensor([[3, 0, 4, 5]])
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                      pad_token_id=99, eos_token_id=None)
    assert torch.equal(m.generate(ids, max_new_tokens=4, packed=packed), ref)


def test_stop_strings_special_token_and_multi_token(tmp_path):
    """A stop string that is a special token stops the row (it was decoded away and never matched); a stop string
    spanning two tokens stops one row while the other goes on (its later tokens pad), on both paths."""
    from transformers import AutoTokenizer

    from test_chat import add_tokenizer

    _, path = save_tiny(tmp_path, "llava_next")
    add_tokenizer(path)
    m = llava_fast.from_pretrained(path)
    ids = torch.tensor([[1, 3, 10, 11, 4], [1, 3, 20, 21, 4]])
    n = ids.shape[1]
    free = m.generate(ids, max_new_tokens=8, packed=False)
    gen = free[0, n:].tolist()
    t = next(i for i in range(2, 8) if gen[i] not in gen[:i] and gen[i] not in free[1, n:].tolist())
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", f"w{gen[t]}"]})
    assert gen[t] in tok.all_special_ids
    two = tok.decode(gen[t - 1:t + 1])                  # "wA wB": two tokens of row 0 only
    for stop in (f"w{gen[t]}", two):
        for packed in (False, True):
            out = m.generate(ids, max_new_tokens=8, stop_strings=[stop], tokenizer=tok, packed=packed)
            assert torch.equal(out[0, n:n + t + 1], free[0, n:n + t + 1]) and (out[0, n + t + 1:] == 0).all(), \
                f"{stop!r} packed={packed}: {out[0, n:].tolist()} vs {gen}"
            assert torch.equal(out[1], free[1]), f"{stop!r} packed={packed}"


def test_sampling_edge_values(tmp_path):
    _, path = save_tiny(tmp_path, "llava_next")
    m = llava_fast.from_pretrained(path)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    greedy = m.generate(ids, max_new_tokens=5)
    for packed in (False, True):    # top_p = 0 keeps the most likely token only, as transformers (was a NaN error)
        got = m.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.0, packed=packed,
                         generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, greedy)
    # a temperature near 0 is used as given (was clamped to 1e-5: a 1e-5 logit gap then drew the lower token 27%)
    logits = torch.tensor([[0.0, 1e-5, float("-inf")]]).repeat(256, 1)
    got = _sample(logits, 1e-8, 1.0, torch.Generator().manual_seed(0))
    assert (got == 1).all()
    big = torch.tensor([[3e4, 2e4, float("-inf")]])
    assert int(_sample(big, 1e-37, 0.5, torch.Generator().manual_seed(0))) == 0    # no inf - inf = NaN
    for kw, what in [(dict(do_sample=True, temperature=0.0), "temperature"),
                     (dict(do_sample=True, temperature=-1.0), "temperature"),
                     (dict(do_sample=True, top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p")]:
        with pytest.raises(ValueError, match=what):
            m.generate(ids, max_new_tokens=2, **kw)
    with pytest.warns(UserWarning, match="ignores temperature=0.7, top_p=0.9"):
        m.generate(ids, max_new_tokens=2, temperature=0.7, top_p=0.9)


def test_top_k(tmp_path):
    """top_k keeps the k most likely tokens, applied after the temperature and before top-p as transformers' warpers
    (the same distribution, ties at the k-th kept); top_k=1 is greedy on both paths; bad values name the argument."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from llava_fast.generation import _sample_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[0, :4] = 20.0                                  # a tie at the k-th largest
    for temp, k, p in [(0.7, 3, 1.0), (1.3, 10, 0.8), (1.0, 1, 1.0), (0.5, 0, 0.9), (1.0, 50, 1.0), (1.0, 80, 0.5)]:
        want = logits.clone()
        for w in ([TemperatureLogitsWarper(temp)] + ([TopKLogitsWarper(k)] if k else [])
                  + ([TopPLogitsWarper(p)] if p < 1 else [])):
            want = w(None, want)
        # (row 0's four-way tie is split differently by the two sorts at a top-p boundary: compared without top-p)
        rows = slice(0, None) if p == 1 else slice(1, None)
        torch.testing.assert_close(_sample_probs(logits, temp, p, k)[rows], torch.softmax(want, -1)[rows], atol=1e-6,
                                   rtol=1e-5, msg=lambda m: f"temperature {temp} top_k {k} top_p {p}: {m}")
    assert (_sample_probs(logits, 1.0, 1.0, 3)[0] > 0).sum() == 4      # the tie kept, as transformers

    _, path = save_tiny(tmp_path, "llava_next")
    m = llava_fast.from_pretrained(path)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    greedy = m.generate(ids, max_new_tokens=5)
    for packed in (False, True):
        got = m.generate(ids, max_new_tokens=5, do_sample=True, temperature=2.0, top_k=1, packed=packed,
                         generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, greedy), packed
    for kw in (dict(do_sample=True, top_k=-1), dict(do_sample=True, top_k=2.5), dict(do_sample=True, top_k="3")):
        with pytest.raises(ValueError, match="top_k"):
            m.generate(ids, max_new_tokens=2, **kw)
    with pytest.warns(UserWarning, match="top_k=5"):
        m.generate(ids, max_new_tokens=2, top_k=5)


def test_pad_token_id_and_video_tokens_checked(tmp_path):
    """A pad_token_id the model cannot embed (fed for finished rows: an index error, a device assert on the GPU) and
    video tokens without pixel_values_videos (the model's forward) raise, naming the argument, on both paths."""
    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    ids = torch.tensor([[3, 4, 5, 6]])
    for pad in (-1, 128, "0"):
        with pytest.raises(ValueError, match="pad_token_id must be a token id in"):
            m.generate(ids, max_new_tokens=2, pad_token_id=pad)
    vid = torch.tensor([[1, 2] + [VIDEO_TOKEN] * 5 + [3]])
    for prompts, packed in ((vid, False), (vid, True), ([vid[0]], None)):
        with pytest.raises(ValueError, match="no pixel_values_videos"):
            m.generate(prompts, max_new_tokens=2, packed=packed)


def test_onevision_multi_image_and_video_equal_transformers(tmp_path):
    """A batch of a 3-image sample (batch_num_images: one tile per image), a 1-image AnyRes sample and a text-only
    sample; then a video and a text prompt: transformers' greedy tokens on both paths."""
    from llava_fast.ops.anyres import num_video_tokens

    hf, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    batch = make_batch("llava_onevision", [[(40, 90), (70, 20), (28, 28)], [(100, 60)], []], multi_image=True)
    bni = torch.tensor(batch["bni"])
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_sizes=batch["image_sizes"],
              batch_num_images=bni, max_new_tokens=6)
    ref = hf.generate(pixel_values=hf_pixels("llava_onevision", batch), do_sample=False, eos_token_id=None,
                      pad_token_id=0, **kw)
    for packed in (False, True):
        assert torch.equal(m.generate(pixel_values=batch["pixel_values"], packed=packed, **kw), ref), packed
    k = num_video_tokens(3, TILE // 14)
    ids = torch.tensor([[0, 0, 0, 1, 2] + [VIDEO_TOKEN] * k + [3, 4], [0, 0, 0] + [5] * (k + 4)])
    mask = (ids != 0).long()
    vids = torch.randn(1, 3, 3, TILE, TILE)
    ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=vids, max_new_tokens=6,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    for packed in (False, True):
        got = m.generate(ids, attention_mask=mask, pixel_values_videos=vids, max_new_tokens=6, packed=packed)
        assert torch.equal(got, ref), packed


def test_context_limit(tmp_path):
    """prompt + max_new_tokens == max_position_embeddings generates; one more token raises (both paths, lists)."""
    _, path = save_tiny(tmp_path, "llava_next")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    m = llava_fast.from_pretrained(path)
    ids = torch.arange(3, 15).reshape(1, 12).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for packed in (False, True):
        assert m.generate(ids, attention_mask=mask, max_new_tokens=4, packed=packed).shape == (2, 16)
        with pytest.raises(ValueError, match="exceeds the context length"):
            m.generate(ids, attention_mask=mask, max_new_tokens=5, packed=packed)
    assert [o.numel() for o in m.generate([ids[0, 2:], ids[1]], max_new_tokens=4)] == [14, 16]
    with pytest.raises(ValueError, match="exceeds the context length"):
        m.generate([ids[0, 2:], ids[1]], max_new_tokens=5)
