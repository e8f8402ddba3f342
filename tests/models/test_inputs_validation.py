"""Inputs of the forward that used to be accepted in silence (wrong results) or failed deep in torch: each gets a
ValueError that names the argument. Tiny random checkpoints, CPU."""
from __future__ import annotations

import pytest
import torch

import llava_fast
from llava_fast.ops.anyres import num_video_tokens

from test_llava_parity import SIZES, hf_pixels, make_batch
from tiny import IMAGE_TOKEN, TILE, VIDEO_TOKEN, save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for mt in ("llava_next", "llava_onevision"):
        _, path = save_tiny(tmp_path_factory.mktemp(mt), mt)
        out[mt] = llava_fast.from_pretrained(path)
    return out


def _packed(batch):
    lens = [len(s) for s in batch["seqs"]]
    return dict(input_ids=torch.tensor([t for s in batch["seqs"] for t in s])[None],
                cu_seqlens=torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
                position_ids=torch.cat([torch.arange(n) for n in lens])[None], max_seqlen=max(lens))


@torch.no_grad()
def test_placeholders_must_line_up_with_each_image(models):
    """Two samples, one image each, of different token counts: pixels and image_sizes given in the other order still
    add up to the right total (transformers' only check), but every image would take the other's placeholders."""
    m = models["llava_next"]
    batch = make_batch("llava_next", [[SIZES[0]], [SIZES[5]]], left_pad=False)
    t0 = batch["tiles"][0]
    swapped = dict(pixel_values=torch.cat([batch["pixel_values"][t0:], batch["pixel_values"][:t0]]),
                   image_sizes=batch["image_sizes"].flip(0))
    for form in (dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), _packed(batch)):
        m(**form, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
        with pytest.raises(ValueError, match="Image tokens do not line up with the images: image 0"):
            m(**form, **swapped)
    # transformers' padded 5-D layout is accepted and equals the flat tiles
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_sizes=batch["image_sizes"])
    assert torch.equal(m(pixel_values=hf_pixels("llava_next", batch), **kw).logits,
                       m(pixel_values=batch["pixel_values"], **kw).logits)


@torch.no_grad()
def test_batch_num_images_must_match_the_samples(models):
    m = models["llava_onevision"]
    imgs = [(40, 90), (70, 20), (28, 28), (50, 50), (30, 60)]
    batch = make_batch("llava_onevision", [imgs[:2], imgs[2:]], multi_image=True)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    m(**kw, batch_num_images=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"batch_num_images does not match input_ids.*\[10, 15\].*\[15, 10\]"):
        m(**kw, batch_num_images=torch.tensor([3, 2]))


@torch.no_grad()
def test_media_arguments(models):
    m, ov = models["llava_next"], models["llava_onevision"]
    batch = make_batch("llava_next", [[SIZES[1]]])
    ids, pv = batch["input_ids"], batch["pixel_values"]
    with pytest.raises(ValueError, match="need input_ids"):      # used to be ignored in silence
        m(inputs_embeds=m.get_input_embeddings()(ids), pixel_values=pv, image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match=r"inputs_embeds must be a float tensor of shape \(batch, seq, 64\)"):
        m(inputs_embeds=torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match=r"image_sizes must be \(num_images, 2\)"):
        m(input_ids=ids, pixel_values=pv, image_sizes=batch["image_sizes"][0])
    n = num_video_tokens(2, TILE // 14)
    with pytest.raises(ValueError, match="video tokens but no pixel_values_videos"):
        ov(input_ids=torch.tensor([[1] + [VIDEO_TOKEN] * n + [2]]))
    text = torch.tensor([[1, 2, 3]])    # no images at all (transformers skips the tower on empty pixel_values)
    assert torch.equal(m(input_ids=text, pixel_values=torch.zeros(0, 3, TILE, TILE),
                         image_sizes=torch.zeros(0, 2, dtype=torch.long)).logits, m(input_ids=text).logits)
    with pytest.raises(ValueError, match="do not match"):
        m(input_ids=torch.tensor([[1, IMAGE_TOKEN, 2]]), pixel_values=torch.zeros(0, 3, TILE, TILE),
          image_sizes=torch.zeros(0, 2, dtype=torch.long))


@torch.no_grad()
def test_labels_mask_and_positions(models):
    m = models["llava_next"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"labels must be integer token ids in \[0, 128\)"):
        m(input_ids=ids, labels=torch.tensor([[1, 2, 500, -100]]))
    with pytest.raises(ValueError, match="attention_mask must hold 1 .* and 0"):   # an additive mask was inverted
        m(input_ids=ids, attention_mask=torch.tensor([[0.0, 0.0, 0.0, float("-inf")]]))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(batch, seq\) = \(1, 4\)"):
        m(input_ids=ids, position_ids=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="position_ids reach 5000, past the context length"):
        m(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 5000]]))
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):  # (was a reshape error)
        with pytest.raises(ValueError, match=r"input_ids holds no tokens \(shape"):
            m(input_ids=empty)
    with pytest.raises(ValueError, match="inputs_embeds holds no tokens"):
        m(inputs_embeds=torch.zeros(1, 0, m.config.text_config.hidden_size))


@torch.no_grad()
def test_packed_form_consistency(models):
    m = models["llava_next"]
    ids, pos, cu = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 1, 0, 1]]), [0, 2, 4]

    def run(cu=cu, pos=pos, max_seqlen=None, ids=ids):
        return m(input_ids=ids, cu_seqlens=torch.tensor(cu, dtype=torch.int32), position_ids=pos,
                 max_seqlen=max_seqlen)
    run(max_seqlen=2)
    for bad in ([0, 2, 3], [1, 2, 4], [0, 3, 2, 4]):   # last tokens outside every sample, or not rising
        with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the packed sequence length 4"):
            run(cu=bad)
    with pytest.raises(ValueError, match="position_ids must restart at 0 for each sample"):
        run(pos=torch.arange(4)[None])
    with pytest.raises(ValueError, match=r"max_seqlen \(1\) is below the longest sample"):
        run(max_seqlen=1)
    long = torch.zeros(1, 4100, dtype=torch.long)
    with pytest.raises(ValueError, match="packed sample of 4100 tokens is longer than the context length"):
        run(ids=long, cu=[0, 4100], pos=torch.arange(4100)[None])


@torch.no_grad()
def test_positions_restarting_without_cu_seqlens(models, tmp_path):
    """transformers' padding-free rows (position ids restarting at each sample, no attention mask) without cu_seqlens
    ran as one sequence: its samples attended to each other, in silence. They are refused, naming the helper that
    gives the packed form; that form equals transformers on the same row with use_cache=False (where it splits the
    row by position) and each sample alone."""
    import transformers as tf

    from llava_fast.data import cu_seqlens_from_position_ids

    m = models["llava_next"]
    batch = make_batch("llava_next", [[], [SIZES[0]], []], left_pad=False)
    kw = _packed(batch)
    ids, pos = kw["input_ids"], kw["position_ids"]
    media = dict(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match=r"position_ids restart at 0 inside a row \(row 0, token 7\) .*"
                                         r"cu_seqlens_from_position_ids"):
        m(input_ids=ids, position_ids=pos, **media)
    with pytest.raises(ValueError, match=r"\(row 1, token 2\)"):
        m(input_ids=ids[:, :4].repeat(2, 1), position_ids=torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]]))
    cu, longest = cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == kw["cu_seqlens"].tolist() and longest == kw["max_seqlen"]
    out = m(input_ids=ids, position_ids=pos, cu_seqlens=cu, max_seqlen=longest, **media).logits
    m.save_pretrained(tmp_path)
    hf = tf.LlavaNextForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ref = hf(input_ids=ids, position_ids=pos, use_cache=False, pixel_values=hf_pixels("llava_next", batch),
             image_sizes=batch["image_sizes"]).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    first = len(batch["seqs"][0])
    torch.testing.assert_close(out[:, :first], m(input_ids=ids[:, :first]).logits, atol=1e-5, rtol=0)
    for bad in (torch.tensor([[1, 2, 0]]), torch.zeros(2, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match="position_ids must"):
            cu_seqlens_from_position_ids(bad)
