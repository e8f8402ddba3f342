"""The token counts the dataset and packer use (known from image headers, before decoding) are the ones the model
produces, for every image path: LLaVA-1.5 (with and without the CLS token), LLaVA-NeXT AnyRes (odd sizes, unpad)
and OneVision (anyres_max, multi-image samples, text-only samples). Preprocessing is ``llava_fast.ops.anyres``."""
import numpy as np
import pytest
import torch
from PIL import Image

from llava_fast.data import (ImageProcessorConfig, LlavaDataset, PackedBatchSampler, collate_packed, image_config,
                             image_tokens)
from llava_fast.data.word_tokenizer import build_word_tokenizer
from llava_fast.models import CLASSES_BY_TYPE, LlavaConfig
from llava_fast.ops import anyres

TILE = 28
SIZES = [(40, 70), (29, 30), (90, 20), (13, 100), (56, 56)]  # (h, w)


def _hf_dict(model_type, image_token_id, strategy="default"):
    vision = {"model_type": "siglip_vision_model" if model_type == "llava_onevision" else "clip_vision_model",
              "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": TILE, "patch_size": 14}
    d = {"model_type": model_type, "image_token_id": image_token_id, "vision_feature_layer": -1,
         "vision_feature_select_strategy": strategy, "vision_config": vision,
         "text_config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}}
    if model_type == "llava_next":
        d["image_grid_pinpoints"] = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE]]
    if model_type == "llava_onevision":
        d["image_grid_pinpoints"] = [[TILE * i, TILE * j] for i in range(1, 5) for j in range(1, 5)]
        d["vision_aspect_ratio"] = "anyres_max_2"  # small, so that the downsampling path is exercised
        d["video_token_id"] = image_token_id + 1
    return d


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer("what colour is it red blue".split())


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"{h}x{w}.png")
    return d


def _records(multi: bool):
    q = "<image>\nwhat colour is it ?"
    recs = [{"id": f"{h}x{w}", "image": f"{h}x{w}.png",
             "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]} for h, w in SIZES]
    recs.insert(2, {"id": "text", "conversations": [{"from": "human", "value": "what colour ?"},
                                                    {"from": "gpt", "value": "blue"}]})
    if multi:
        recs.append({"id": "multi", "image": ["40x70.png", "90x20.png", "13x100.png"],
                     "conversations": [{"from": "human", "value": "<image> <image> <image>\nwhat colour ?"},
                                       {"from": "gpt", "value": "red"}]})
    return recs


@pytest.mark.parametrize("model_type,strategy", [("llava", "default"), ("llava", "full"), ("llava_next", "default"),
                                                 ("llava_onevision", "full")])
def test_packer_counts_equal_model_features(model_type, strategy, tok, image_dir):
    img_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig.from_hf_dict(_hf_dict(model_type, img_id, strategy))
    torch.manual_seed(0)
    model = CLASSES_BY_TYPE[model_type](cfg).eval()
    multi = model_type == "llava_onevision"
    ds = LlavaDataset.for_model(cfg, _records(multi), str(image_dir), tok, "vicuna_v1", max_len=4096)
    assert len(ds) == len(_records(multi)) and ds.drops.total == 0
    sampler = PackedBatchSampler(ds.lengths, max_tokens=4096, seed=0)
    batches = sampler.micro_batches(0)
    assert sorted(i for mb in batches for i in mb) == list(range(len(ds)))
    for mb in batches:
        b = collate_packed([ds[i] for i in mb])
        assert b["num_tokens"] == sum(ds.lengths[i] for i in mb)  # what the packer planned with
        n_img = int((b["input_ids"] == img_id).sum())
        with torch.no_grad():
            feats = model.image_features(b["pixel_values"], b["image_sizes"], b.get("batch_num_images"))
            assert feats.shape[0] == n_img, (model_type, strategy)
            out = model(b["input_ids"], pixel_values=b["pixel_values"], image_sizes=b["image_sizes"],
                        batch_num_images=b.get("batch_num_images"), position_ids=b["position_ids"],
                        cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"])
        assert out.logits.shape[1] == b["num_tokens"]
        # per sample: the header-based count is the count of the preprocessed pixels (ops.anyres)
        for i in mb:
            it = ds.items[i]
            if it.images:
                imgs = [Image.open(p).convert("RGB") for p in it.images]
                pp = anyres.preprocess_images(imgs, ds.image_config, multi_image=len(imgs) > 1)
                extra = 1 if ds.cls_token else 0
                assert [n + extra for n in pp["num_image_tokens"]] == it.image_tokens
                assert sum(pp["num_tiles"]) == it.n_tiles


def test_image_config_from_model_config():
    cfg = LlavaConfig.from_hf_dict(_hf_dict("llava_next", 5))
    ic = image_config(cfg)
    assert isinstance(ic, ImageProcessorConfig) and ic.variant == "llava_next" and ic.tile == TILE
    assert ic.image_grid_pinpoints == cfg.image_grid_pinpoints and ic.image_mean == anyres.CLIP_MEAN
    ov = image_config(LlavaConfig.from_hf_dict(_hf_dict("llava_onevision", 5)))
    assert ov.max_tiles == 2 and ov.image_mean == anyres.SIGLIP_MEAN
    l15 = image_config(LlavaConfig.from_hf_dict(_hf_dict("llava", 5)), do_pad=True)
    assert l15.variant == "llava" and l15.do_pad and l15.image_grid_pinpoints is None
    # same as a config dict
    assert image_config(_hf_dict("llava_next", 5)) == ic
    assert image_tokens(ov, (40, 70), multi_image=True) == (TILE // 14) ** 2 + 1
    assert image_tokens(l15, (40, 70), cls_token=True) == (TILE // 14) ** 2 + 1


def test_dataset_rejects_old_spec(tok, image_dir):
    with pytest.raises(ValueError, match="ImageProcessorConfig"):
        LlavaDataset(_records(False), str(image_dir), tok, object(), "vicuna_v1", 4)


def test_max_len_beyond_context_refused(tok, image_dir):
    """Packed samples carry no attention-mask length check: max_len above the model's max_position_embeddings must
    raise (naming max_len) instead of training positions the model has none for."""
    cfg = LlavaConfig.from_hf_dict(_hf_dict("llava_next", tok.convert_tokens_to_ids("<image>")))
    with pytest.raises(ValueError, match=r"max_len=8192 is longer than the model's context "
                                         r"\(max_position_embeddings=4096\); set max_len \(data.max_len\) <= 4096"):
        LlavaDataset.for_model(cfg, _records(False), str(image_dir), tok, "vicuna_v1", max_len=8192)
    ds = LlavaDataset.for_model(cfg, _records(False), str(image_dir), tok, "vicuna_v1", max_len=4096)
    assert len(ds) == len(_records(False))
