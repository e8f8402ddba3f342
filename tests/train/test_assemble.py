"""A new LLaVA assembled from a language-model folder and a vision-tower folder keeps both models' weights."""
from __future__ import annotations

import pytest
import torch


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    vocab["<unk>"], vocab["</s>"] = 96, 97
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


@pytest.mark.parametrize("model_type,text,vision", [("llava_next", "llama", "clip"), ("llava_onevision", "qwen2", "siglip")])
def test_assemble_keeps_weights(tmp_path, model_type, text, vision):
    import transformers as tf

    from llava_fast.train.build import assemble

    torch.manual_seed(0)
    common = dict(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    lm = (tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)) if text == "qwen2"
          else tf.LlamaForCausalLM(tf.LlamaConfig(**common))).eval()
    lm.save_pretrained(tmp_path / "lm")
    _word_tokenizer(tmp_path / "lm")
    vkw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
               patch_size=14)
    tower = (tf.SiglipVisionModel(tf.SiglipVisionConfig(**vkw)) if vision == "siglip"
             else tf.CLIPVisionModel(tf.CLIPVisionConfig(**vkw))).eval()
    tower.save_pretrained(tmp_path / "tower")
    model, tok = assemble(str(tmp_path / "lm"), str(tmp_path / "tower"), model_type=model_type, log=lambda *_: None)
    model.eval()
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        ours = model(input_ids=ids).logits[..., :98]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hs = tower(pixel_values=px, output_hidden_states=True).hidden_states
        feats = model.model.vision_tower(px, [-1])
    torch.testing.assert_close(feats, hs[-1], atol=1e-5, rtol=0)
