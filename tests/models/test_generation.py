"""Generation against transformers' generate (greedy) on tiny random models: the same tokens."""
from __future__ import annotations

import pytest
import torch

import llava_fast

from test_llava_parity import SIZES, hf_pixels, make_batch
from tiny import save_tiny


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_greedy_equals_transformers(tmp_path, model_type):
    hf, path = save_tiny(tmp_path, model_type)
    ours = llava_fast.from_pretrained(path)
    sizes = [SIZES[1], SIZES[3], SIZES[6]] if model_type != "llava" else [(28, 28)] * 3
    batch = make_batch(model_type, [[sizes[0]], [sizes[1], sizes[2]], []], left_pad=True)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if model_type != "llava":
        kw["image_sizes"] = batch["image_sizes"]
    ref = hf.generate(pixel_values=hf_pixels(model_type, batch), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0, **kw)
    got = ours.generate(pixel_values=batch["pixel_values"], max_new_tokens=12, **kw)
    assert torch.equal(got, ref), f"\nours {got[:, -12:]}\nhf   {ref[:, -12:]}"


def test_eos_pads_and_sampling(tmp_path):
    _, path = save_tiny(tmp_path, "llava_next")
    m = llava_fast.from_pretrained(path)
    ids = torch.tensor([[3, 4, 5, 6]])
    greedy = m.generate(ids, max_new_tokens=6)
    first = int(greedy[0, 4])
    stopped = m.generate(ids, max_new_tokens=6, eos_token_id=first)
    assert stopped.shape[1] == 5 and int(stopped[0, 4]) == first
    g = torch.Generator().manual_seed(0)
    s1 = m.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, generator=g)
    g = torch.Generator().manual_seed(0)
    s2 = m.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, generator=g)
    assert torch.equal(s1, s2)
    with pytest.raises(ValueError, match="left padding"):
        m.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 0]]))
