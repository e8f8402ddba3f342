"""Tiny random llava-hf checkpoints made with transformers (no downloads), shared by the model tests."""
from __future__ import annotations

import torch

TILE = 28          # vision image_size: 2x2 patches of 14 px, so tests stay fast
NEXT_PINS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
OV_PINS = [[TILE * i, TILE * j] for i in range(1, 7) for j in range(1, 7)]
VOCAB = 128
IMAGE_TOKEN = 120
VIDEO_TOKEN = 121


def hf_config(model_type: str, text: str | None = None, vision_feature_layer=None, strategy=None, kv_heads: int = 2,
              **extra):
    import transformers as tf

    text = text or ("qwen2" if model_type == "llava_onevision" else "llama")
    if model_type == "llava_onevision":
        vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                   image_size=TILE, patch_size=14, vision_use_head=False)
    else:
        vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=TILE, patch_size=14, projection_dim=16)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=4096)
    if text == "qwen2":
        tc = tf.Qwen2Config(num_key_value_heads=kv_heads, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
    elif text == "mistral":
        tc = tf.MistralConfig(num_key_value_heads=kv_heads, sliding_window=None, **common)
    else:
        tc = tf.LlamaConfig(num_key_value_heads=kv_heads, **common)
    kw = dict(extra)
    if vision_feature_layer is not None:
        kw["vision_feature_layer"] = vision_feature_layer
    if strategy is not None:
        kw["vision_feature_select_strategy"] = strategy
    if model_type == "llava":
        return tf.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, **kw)
    if model_type == "llava_next":
        return tf.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                                  image_grid_pinpoints=NEXT_PINS, **kw)
    return tf.LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                                   video_token_id=VIDEO_TOKEN, image_grid_pinpoints=OV_PINS,
                                   tie_word_embeddings=True, **kw)


def hf_model(model_type: str, seed: int = 0, **kw):
    import transformers as tf

    cls = {"llava": tf.LlavaForConditionalGeneration, "llava_next": tf.LlavaNextForConditionalGeneration,
           "llava_onevision": tf.LlavaOnevisionForConditionalGeneration}[model_type]
    torch.manual_seed(seed)
    cfg = hf_config(model_type, **kw)
    cfg._attn_implementation = "eager"
    m = cls(cfg).float().eval()
    with torch.no_grad():  # make image_newline and biases non-trivial
        for name, p in m.named_parameters():
            if name.endswith("bias") or "newline" in name:
                p.normal_(0, 0.1)
    return m


def save_tiny(tmp_path, model_type: str, **kw):
    m = hf_model(model_type, **kw)
    path = tmp_path / model_type
    m.save_pretrained(path)
    return m, path
