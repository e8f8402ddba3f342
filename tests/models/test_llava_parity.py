"""Our model against transformers' eager reference on tiny random checkpoints (CPU, fp32).

Tolerances (from the Foundation issue): logits 1e-4 absolute, loss 1e-5 relative, every parameter gradient 1e-4.
The tiny models run the same fp32 arithmetic in the same order as transformers, so the observed error is ~0; the
bounds leave room for BLAS differences between machines only.
"""
from __future__ import annotations

import pytest
import torch

import llava_fast
from llava_fast.ops.anyres import num_image_tokens, num_tiles, num_video_tokens

from tiny import IMAGE_TOKEN, NEXT_PINS, OV_PINS, TILE, VIDEO_TOKEN, save_tiny

# image sizes (height, width) that exercise the AnyRes traps: NeXT ties (both sides <= tile), smaller than one tile,
# very wide, very tall, exact multiples, large (OneVision anyres_max downsampling), unpad rounding
SIZES = [(20, 20), (10, 27), (28, 56), (9, 200), (300, 12), (60, 84), (170, 170), (85, 31), (33, 67)]
PINS = {"llava_next": NEXT_PINS, "llava_onevision": OV_PINS}


def image_tokens(model_type, size, single_tile=False):
    if model_type == "llava":
        return (TILE // 14) ** 2
    return num_image_tokens(size, PINS[model_type], TILE, TILE // 14,
                            9 if model_type == "llava_onevision" else None, single_tile=single_tile)


def tiles_of(model_type, size, single_tile=False):
    return 1 if model_type == "llava" or single_tile else num_tiles(size, PINS[model_type], TILE)


def make_batch(model_type, samples, left_pad=True, gen=None, multi_image=False):
    """samples: list of lists of image sizes (an empty list = text-only sample). Returns HF-style padded inputs plus
    our flat pixel_values."""
    gen = gen or torch.Generator().manual_seed(1)
    seqs, tiles, sizes = [], [], []
    bni = []
    for imgs in samples:
        single = multi_image and len(imgs) > 1   # OneVision multi-image: one tile per image
        ids = torch.randint(0, 100, (3,), generator=gen).tolist()
        for s in imgs:
            ids += [IMAGE_TOKEN] * image_tokens(model_type, s, single) + torch.randint(0, 100, (2,), generator=gen).tolist()
            tiles.append(tiles_of(model_type, s, single))
            sizes.append(s)
        ids += torch.randint(0, 100, (4,), generator=gen).tolist()
        seqs.append(ids)
        bni.append(len(imgs))
    L = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left_pad:
            input_ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
        else:
            input_ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    pv = torch.randn(sum(tiles), 3, TILE, TILE, generator=gen)
    labels = input_ids.clone()
    labels[(input_ids == IMAGE_TOKEN) | (mask == 0)] = -100
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=pv, tiles=tiles,
                image_sizes=torch.tensor(sizes, dtype=torch.long) if sizes else None, seqs=seqs, bni=bni)


def hf_pixels(model_type, batch):
    """transformers wants NeXT/OneVision pixel_values as (images, max_tiles, 3, T, T), zero-padded."""
    pv, tiles = batch["pixel_values"], batch["tiles"]
    if model_type == "llava":
        return pv
    out = torch.zeros(len(tiles), max(tiles), 3, TILE, TILE)
    o = 0
    for i, t in enumerate(tiles):
        out[i, :t] = pv[o:o + t]
        o += t
    return out


def compare(hf, ours, model_type, batch, grads=True, **extra):
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], **extra)
    if batch["image_sizes"] is not None:
        if model_type != "llava":
            kw["image_sizes"] = batch["image_sizes"]
        ref = hf(pixel_values=hf_pixels(model_type, batch), **kw)
        out = ours(pixel_values=batch["pixel_values"], **kw)
    else:
        ref, out = hf(**kw), ours(**kw)
    valid = batch["attention_mask"].bool()
    print(f"logits max err {(ref.logits - out.logits)[valid].abs().max().item():.2e}, "
          f"loss {ref.loss.item():.6f} vs {out.loss.item():.6f}")
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    if not grads:
        return
    ref.loss.backward()
    out.loss.backward()
    hf_params = {llava_fast.models.io.to_runtime_key(k): p for k, p in hf.named_parameters()}
    checked = 0
    for name, p in ours.named_parameters():
        q = hf_params[name]
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{name}: we have a gradient, transformers has none"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=0, msg=lambda m: f"grad {name}: {m}")
        checked += 1
    assert checked > 10


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = {}
    for mt in ("llava", "llava_next", "llava_onevision"):
        hf, path = save_tiny(tmp_path_factory.mktemp(mt), mt)
        out[mt] = (hf, path)
    return out


def load_pair(tiny_models, mt):
    hf, path = tiny_models[mt]
    hf.zero_grad(set_to_none=True)
    return hf, llava_fast.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_mixed_batch_left_padding(tiny_models, model_type):
    hf, ours = load_pair(tiny_models, model_type)
    sizes = SIZES[:4] if model_type != "llava" else [(TILE, TILE)] * 4
    # one sample with two images (OneVision: AnyRes still, as transformers without batch_num_images), one text-only
    samples = [[sizes[0]], [sizes[1], sizes[2]], [], [sizes[3]]]
    compare(hf, ours, model_type, make_batch(model_type, samples))


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_every_size(tiny_models, model_type):
    hf, ours = load_pair(tiny_models, model_type)
    compare(hf, ours, model_type, make_batch(model_type, [[s] for s in SIZES], left_pad=False), grads=False)


def test_onevision_multi_image_and_video(tiny_models):
    hf, ours = load_pair(tiny_models, "llava_onevision")
    batch = make_batch("llava_onevision", [[(40, 90), (70, 20), (28, 28)], [(100, 60)]], multi_image=True)
    compare(hf, ours, "llava_onevision", batch, batch_num_images=torch.tensor(batch["bni"]))
    # video: 3 frames, one newline after the whole video
    frames = 3
    n = num_video_tokens(frames, TILE // 14)
    ids = torch.tensor([[1, 2] + [VIDEO_TOKEN] * n + [3, 4]])
    vids = torch.randn(1, frames, 3, TILE, TILE)
    labels = ids.clone()
    labels[ids == VIDEO_TOKEN] = -100
    hf.zero_grad(set_to_none=True)
    ref = hf(input_ids=ids, pixel_values_videos=vids, labels=labels)
    out = ours(input_ids=ids, pixel_values_videos=vids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)


def test_onevision_images_and_video_in_one_batch(tiny_models):
    """Images and a video in one batch equal transformers (which runs the vision tower twice), and our model runs the
    tower ONCE: under FSDP2 a rank running it twice while another runs it once would hang on its all-gathers."""
    hf, ours = load_pair(tiny_models, "llava_onevision")
    batch = make_batch("llava_onevision", [[(40, 90), (70, 20)], [(100, 60)]], multi_image=True, left_pad=False)
    frames = 2
    n = num_video_tokens(frames, TILE // 14)
    tail = torch.full((2, n + 1), VIDEO_TOKEN)
    tail[:, -1] = 5
    for k in ("input_ids", "labels"):
        batch[k] = torch.cat([batch[k], tail], dim=1)
    batch["labels"][batch["input_ids"] == VIDEO_TOKEN] = -100
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
    vids = torch.randn(2, frames, 3, TILE, TILE, generator=torch.Generator().manual_seed(3))
    calls = []
    h = ours.model.vision_tower.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        compare(hf, ours, "llava_onevision", batch, batch_num_images=torch.tensor(batch["bni"]),
                pixel_values_videos=vids)
    finally:
        h.remove()
    assert calls == [sum(batch["tiles"]) + 2 * frames]


@pytest.mark.parametrize("variant", [dict(text="mistral"), dict(text="qwen2"),
                                     dict(multimodal_projector_bias=False, projector_hidden_act="gelu_pytorch_tanh")])
def test_config_variants(tmp_path, variant):
    """Mistral and Qwen2 language models under LLaVA-NeXT, projector without bias and with tanh GELU."""
    hf, path = save_tiny(tmp_path, "llava_next", **variant)
    ours = llava_fast.from_pretrained(path, dtype=torch.float32)
    compare(hf, ours, "llava_next", make_batch("llava_next", [[SIZES[1]], [SIZES[5]]]))


def test_sliding_window_refused(tmp_path):
    import json

    _, path = save_tiny(tmp_path, "llava_next", text="mistral")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["sliding_window"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding-window"):
        llava_fast.from_pretrained(path)


def test_feature_layer_list_and_full_strategy(tmp_path):
    hf, path = save_tiny(tmp_path, "llava", vision_feature_layer=[-3, -1], strategy="full")
    ours = llava_fast.from_pretrained(path, dtype=torch.float32)
    n_full = (TILE // 14) ** 2 + 1   # CLS kept
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * n_full + [2, 3]])
    pv = torch.randn(1, 3, TILE, TILE)
    ref = hf(input_ids=ids, pixel_values=pv)
    out = ours(input_ids=ids, pixel_values=pv)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_packed_equals_padded(tiny_models, model_type):
    _, ours = load_pair(tiny_models, model_type)
    batch = make_batch(model_type, [[SIZES[0]], [], [SIZES[4], SIZES[5]]], left_pad=False)
    padded = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], labels=batch["labels"])
    flat = torch.tensor([t for s in batch["seqs"] for t in s])[None]
    lens = [len(s) for s in batch["seqs"]]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    labels = torch.cat([batch["labels"][i, :n] for i, n in enumerate(lens)])[None]
    packed = ours(input_ids=flat, cu_seqlens=cu, position_ids=pos, max_seqlen=max(lens),
                  pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], labels=labels)
    for i, n in enumerate(lens):
        torch.testing.assert_close(packed.logits[0, cu[i]:cu[i] + n], padded.logits[i, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_save_round_trip_with_transformers(tiny_models, tmp_path, model_type):
    hf, ours = load_pair(tiny_models, model_type)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=20_000)   # small shards: exercise the index
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    cls = type(hf)
    back = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager").eval()
    again = llava_fast.from_pretrained(tmp_path / "ours")
    batch = make_batch(model_type, [[SIZES[2] if model_type != "llava" else (TILE, TILE)]])
    kw = dict(input_ids=batch["input_ids"])
    if model_type != "llava":
        kw["image_sizes"] = batch["image_sizes"]
    a = back(pixel_values=hf_pixels(model_type, batch), **kw).logits
    b = ours(pixel_values=batch["pixel_values"], **kw).logits
    c = again(pixel_values=batch["pixel_values"], **kw).logits
    assert torch.equal(a, b) or (a - b).abs().max() < 1e-5
    assert torch.equal(b, c)


def test_half_precision_load(tiny_models):
    _, path = tiny_models["llava_next"]
    m = llava_fast.from_pretrained(path, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
