"""``llava-fast convert``: checkpoints of the original LLaVA training code -> llava-hf folders that compute what the
original computes (reference-spec.md 1.2, 1.3 and 4.3)."""
from __future__ import annotations

import json

import pytest
import torch

from llava_fast.cli import main
from llava_fast.train.original import convert, pinpoints_for, settings

V = 96  # the word tokenizer's words (w0..w95) + <unk>, </s>


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V)}
    vocab["<unk>"], vocab["</s>"] = V, V + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # the original LLaVA-1.5 code sets pad = unk and saves the tokenizer with its checkpoint
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(path)


def original_checkpoint(root, text="llama", tower="clip", aspect="pad", trained_tower=False, **mm):
    """An original checkpoint folder as the original code writes it (reference-spec.md 4.3), its tower folder, and
    the modules it was made of: (src, tower_dir, lm, tower_model, projector, newline)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=V + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    lm = (tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)) if text == "qwen2"
          else tf.LlamaForCausalLM(tf.LlamaConfig(**common))).eval()
    vkw = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=28,
               patch_size=14)
    tmodel = (tf.SiglipVisionModel(tf.SiglipVisionConfig(**vkw)) if tower == "siglip"
              else tf.CLIPVisionModel(tf.CLIPVisionConfig(**vkw))).eval()
    tower_dir = root / "tower"
    tmodel.save_pretrained(tower_dir)
    projector = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    newline = torch.randn(32)
    state = {k: v for k, v in lm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    if aspect != "pad":
        state["model.image_newline"] = newline
    if trained_tower:  # the tower trained in stage 2: its layers in the checkpoint (SigLIP: the last one deleted)
        with torch.no_grad():
            for p in tmodel.parameters():
                p.add_(0.01 * torch.randn_like(p))
        tstate = tmodel.state_dict()
        state.update({f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
                      for k, v in tstate.items() if not (tower == "siglip" and ".layers.2." in k)})
    src = root / "original"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    _word_tokenizer(src)
    cfg = lm.config.to_dict()
    cfg.update({"model_type": {"llama": "llava_llama", "qwen2": "llava_qwen"}[text],
                "architectures": [{"llama": "LlavaLlamaForCausalLM", "qwen2": "LlavaQwenForCausalLM"}[text]],
                "mm_vision_tower": "openai/clip-vit-large-patch14-336" if tower == "clip"
                else "google/siglip-so400m-patch14-384",
                "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                "mm_hidden_size": 24, "image_aspect_ratio": aspect, "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat" if aspect == "pad" else "spatial_unpad",
                "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False, "use_mm_proj": True, **mm})
    (src / "config.json").write_text(json.dumps(cfg))
    return src, tower_dir, lm, tmodel, projector, newline


def test_llava15_checkpoint_converts_to_what_the_original_computes(tmp_path):
    """LLaVA-1.5: the converted folder, loaded by transformers, gives the logits of the original's computation:
    CLIP hidden_states[-2] without CLS -> nn.Sequential projector -> spliced at the <image> position (the original's
    IMAGE_TOKEN_INDEX) -> the language model on inputs_embeds."""
    import transformers as tf

    src, tower_dir, lm, tmodel, projector, _ = original_checkpoint(tmp_path)
    out = tmp_path / "hf"
    assert convert(str(src), str(tower_dir), str(out), log=lambda *_: None) == str(out)
    hf = tf.LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    tok = tf.AutoTokenizer.from_pretrained(out)
    image_id = hf.config.image_token_id
    assert tok.convert_tokens_to_ids("<image>") == image_id and hf.config.vision_feature_layer == -2
    assert hf.config.vision_feature_select_strategy == "default" and len(tok) <= hf.config.text_config.vocab_size
    px = torch.randn(1, 3, 28, 28)
    before, after = torch.tensor([[3, 7, 11]]), torch.tensor([[5, 9]])
    with torch.no_grad():
        feats = projector(tmodel(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])  # (1, 4, 32)
        emb = lm.get_input_embeddings()
        ref = lm(inputs_embeds=torch.cat([emb(before), feats, emb(after)], 1)).logits
        ids = torch.cat([before, torch.full((1, feats.shape[1]), image_id), after], 1)
        got = hf(input_ids=ids, pixel_values=px).logits[..., : V + 2]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and through our loader and the processor files
    import llava_fast

    ours = llava_fast.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, pixel_values=px).logits[..., : V + 2], ref, rtol=1e-5,
                                   atol=1e-5)
    assert tf.AutoProcessor.from_pretrained(out) is not None


def test_onevision_checkpoint_keeps_its_trained_tower_newline_and_pinpoints(tmp_path):
    """OneVision (SigLIP, Qwen2, anyres_max_9, pinpoints as NXT's '(1x1),...,(3x3)' string, tower trained): the
    converted tower is the checkpoint's, one layer shorter than the folder's (the original deletes the last one) and
    read at -1, every token; image_newline and the projector are the checkpoint's."""
    import transformers as tf

    src, tower_dir, lm, tmodel, projector, newline = original_checkpoint(
        tmp_path, text="qwen2", tower="siglip", aspect="anyres_max_9", trained_tower=True,
        image_grid_pinpoints="(1x1),...,(3x3)", mm_spatial_pool_mode="bilinear", mm_newline_position="one_token")
    out = tmp_path / "hf"
    rc = main(["convert", "--original", str(src), "--vision-tower", str(tower_dir), "--out", str(out)])
    assert rc == 0
    hf = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    c = hf.config
    assert (c.vision_config.num_hidden_layers, c.vision_feature_layer, c.vision_feature_select_strategy) == (2, -1,
                                                                                                            "full")
    assert c.image_grid_pinpoints == [[28 * i, 28 * j] for i in range(1, 4) for j in range(1, 4)]
    assert c.vision_aspect_ratio == "anyres_max_9"
    torch.testing.assert_close(hf.model.image_newline.detach(), newline, rtol=0, atol=0)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        # the original: the trained tower without its last layer, hidden_states[-1] (all 4 tokens), the projector
        ref = projector(tmodel(pixel_values=px, output_hidden_states=True).hidden_states[-2])
        got = hf.model.multi_modal_projector(hf.model.vision_tower(px, output_hidden_states=True).hidden_states[-1])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        ids = torch.tensor([[3, 7, 11, 5]])
        torch.testing.assert_close(hf(input_ids=ids).logits[..., : V + 2], lm(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<video>") == c.video_token_id


def test_settings_llava_hf_cannot_hold_are_refused_naming_them(tmp_path, capsys):
    base = {"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "mm_projector_type": "mlp2x_gelu"}
    for extra, msg in [({"mm_projector_type": "linear"}, "mm_projector_type='linear'"),
                       ({"mm_use_im_start_end": True}, "mm_use_im_start_end=True"),
                       ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "flat"}, "mm_patch_merge_type='flat'"),
                       ({"image_aspect_ratio": "crop"}, "image_aspect_ratio='crop'"),
                       ({"image_aspect_ratio": "anyres_max_9", "mm_newline_position": "grid"},
                        "mm_newline_position='grid'"),
                       ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not an original LLaVA")]:
        with pytest.raises(ValueError, match=msg):
            settings({**base, **extra})
    assert settings({**base, "image_aspect_ratio": "anyres"}).model_type == "llava_next"
    assert pinpoints_for("(1x1),...,(2x3)", 10) == [[10, 10], [10, 20], [10, 30], [20, 10], [20, 20], [20, 30]]
    src, tower_dir, *_ = original_checkpoint(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for argv, msg in [(["--vision-tower", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       "--vision-tower .*nope: no such folder.*openai/clip-vit-large-patch14-336"),
                      (["--vision-tower", str(tower_dir), "--out", str(tmp_path / "full")], "--out .*full: exists")]:
        assert main(["convert", "--original", str(src), *argv]) == 2
        assert msg.split(".*")[0] in capsys.readouterr().err
    # loading the original folder directly says how to convert it
    import llava_fast

    with pytest.raises(ValueError, match="original LLaVA training code .*llava-fast convert --original"):
        llava_fast.from_pretrained(src)
    # a llava-hf folder needs no conversion
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {}}))
    with pytest.raises(ValueError, match="llava-hf folder already"):
        convert(str(tmp_path / "hfdir"), str(tower_dir), str(tmp_path / "o2"))


def test_llava_next_checkpoint_converts_with_its_pinpoints_and_newline(tmp_path):
    """LLaVA-NeXT (CLIP, anyres, pinpoints as a list): a llava_next folder with the checkpoint's pinpoints, newline,
    projector and feature layer; transformers computes the original's image features from it."""
    import transformers as tf

    pins = [[28, 56], [56, 28], [56, 56]]
    src, tower_dir, lm, tmodel, projector, newline = original_checkpoint(
        tmp_path, aspect="anyres", image_grid_pinpoints=pins, mm_vision_select_layer=-1)
    out = tmp_path / "hf"
    convert(str(src), str(tower_dir), str(out), log=lambda *_: None)
    hf = tf.LlavaNextForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    c = hf.config
    assert c.model_type == "llava_next" and c.image_grid_pinpoints == pins and c.vision_feature_layer == -1
    assert c.vision_config.num_hidden_layers == 3  # CLIP keeps every layer
    torch.testing.assert_close(hf.model.image_newline.detach(), newline, rtol=0, atol=0)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = projector(tmodel(pixel_values=px, output_hidden_states=True).hidden_states[-1][:, 1:])
        hs = hf.model.vision_tower(px, output_hidden_states=True).hidden_states  # at the config's layer (-1)
        got = hf.model.multi_modal_projector(hs[c.vision_feature_layer][:, 1:])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_lora_run_merges_into_its_base_model(tmp_path, fmt):
    """An original --lora_enable run (peft's adapter_model + adapter_config, non_lora_trainables.bin with the
    projector, the LLaVA config.json) + --model-base: the converted folder computes what the original's loader
    (PeftModel.from_pretrained(...).merge_and_unload()) computes."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    src, tower_dir, lm, tmodel, projector, _ = original_checkpoint(tmp_path)
    base = tmp_path / "vicuna"
    lm.save_pretrained(base)
    _word_tokenizer(base)
    peft_lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft_lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # peft starts B at zero: a merge would change nothing
    run = tmp_path / "lora_run"
    peft_lm.save_pretrained(run, safe_serialization=fmt == "safetensors")
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.state_dict().items()},
               run / "non_lora_trainables.bin")
    (run / "config.json").write_text((src / "config.json").read_text())
    merged = peft_lm.merge_and_unload().eval()
    out = tmp_path / "hf"
    main(["convert", "--original", str(run), "--vision-tower", str(tower_dir), "--model-base", str(base), "--out",
          str(out)])
    hf = tf.LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    px = torch.randn(1, 3, 28, 28)
    before, after = torch.tensor([[3, 7, 11]]), torch.tensor([[5, 9]])
    with torch.no_grad():
        feats = projector(tmodel(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])
        emb = merged.get_input_embeddings()
        ref = merged(inputs_embeds=torch.cat([emb(before), feats, emb(after)], 1)).logits
        ids = torch.cat([before, torch.full((1, feats.shape[1]), hf.config.image_token_id), after], 1)
        got = hf(input_ids=ids, pixel_values=px).logits[..., : V + 2]
        unmerged = tf.LlamaForCausalLM.from_pretrained(base).eval()(
            inputs_embeds=torch.cat([emb(before), feats, emb(after)], 1)).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - unmerged).abs().max() > 1e-2  # the adapters change the logits: a merge left out would fail


def test_lora_run_needs_its_base_and_a_base_needs_a_lora_run(tmp_path, capsys):
    src, tower_dir, *_ = original_checkpoint(tmp_path)
    assert main(["convert", "--original", str(src), "--vision-tower", str(tower_dir), "--model-base", str(tower_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "is not a LoRA run (no adapter_config.json)" in capsys.readouterr().err
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    assert main(["convert", "--original", str(src), "--vision-tower", str(tower_dir), "--out",
                 str(tmp_path / "o")]) == 2
    assert "is a LoRA run (adapter_config.json): give --model-base" in capsys.readouterr().err
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
    assert main(["convert", "--original", str(src), "--vision-tower", str(tower_dir), "--model-base", str(src),
                 "--out", str(tmp_path / "o")]) == 2
    assert "use_dora=True is not supported" in capsys.readouterr().err
