"""Audit of assembling a new LLaVA from separate parts (train/build.py, train/open_clip_tower.py).

Each test failed before its fix:
* the image features were picked by model type instead of by vision tower: a SigLIP tower under LLaVA-1.5/NeXT lost
  a patch ("default" drops a CLS token SigLIP does not have), a CLIP tower under OneVision kept its CLS ("full") and
  OneVision took SigLIP's last layer where the original deletes it and takes the penultimate (reference-spec 1.1/1.2);
* the projector started from the model's N(0, 0.02) / zero-bias init, not nn.Linear's defaults (build.py's docstring,
  reference-spec 5.6);
* a language model with more embedding rows than tokenizer entries (Qwen2) had rows cut off, where llava-hf's
  conversion grows to rows + added tokens rounded to 64 (reference-spec 1.4: Qwen2-0.5B 151936 -> 152000);
* open_clip's LayerScale (``ls_init_value``) was silently dropped (the tower gave other features than open_clip's).
"""
from __future__ import annotations

import pytest
import torch


def _word_tokenizer(path, n=96):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n)}
    vocab["<unk>"], vocab["</s>"] = n, n + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def _lm(path, text="llama", vocab=98):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    m = (tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **common)) if text == "qwen2"
         else tf.LlamaForCausalLM(tf.LlamaConfig(**common))).eval()
    m.save_pretrained(path)
    _word_tokenizer(path)
    return m


def _tower(path, vision):
    import transformers as tf

    torch.manual_seed(1)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
              patch_size=14)
    m = (tf.SiglipVisionModel(tf.SiglipVisionConfig(**kw)) if vision == "siglip"
         else tf.CLIPVisionModel(tf.CLIPVisionConfig(**kw))).eval()
    m.save_pretrained(path)
    return m


def _quiet(*_):
    pass


@pytest.mark.parametrize("model_type,vision", [("llava", "siglip"), ("llava_next", "siglip"),
                                               ("llava_onevision", "clip"), ("llava_onevision", "siglip")])
def test_features_follow_the_vision_tower(tmp_path, model_type, vision):
    """CLIP: penultimate layer, CLS dropped; SigLIP: penultimate layer, every token (the original deletes the last
    layer) - under every model type. The exported model then takes the data pipeline's image-token count and gives
    transformers' logits."""
    import transformers as tf

    import llava_fast
    from llava_fast.data.images import cls_token_kept, image_config, image_tokens
    from llava_fast.models.io import save_pretrained
    from llava_fast.train.build import assemble

    _lm(tmp_path / "lm")
    tower = _tower(tmp_path / "tower", vision)
    model, tok = assemble(str(tmp_path / "lm"), str(tmp_path / "tower"), model_type=model_type, log=_quiet)
    model.eval()
    assert model.config.vision_feature_select_strategy == ("full" if vision == "siglip" else "default")
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hs = tower(pixel_values=px, output_hidden_states=True).hidden_states
        want = hs[-2] if vision == "siglip" else hs[-2][:, 1:]
        torch.testing.assert_close(model.encode_tiles(px), model.model.multi_modal_projector(want), atol=1e-5, rtol=0)
    # export, then the same image through transformers and llava_fast with the data pipeline's token count
    out = tmp_path / "out"
    save_pretrained(model, out)
    tok.save_pretrained(out)
    ours = llava_fast.from_pretrained(out, dtype=torch.float32)
    cls = {"llava": tf.LlavaForConditionalGeneration, "llava_next": tf.LlavaNextForConditionalGeneration,
           "llava_onevision": tf.LlavaOnevisionForConditionalGeneration}[model_type]
    hf = cls.from_pretrained(out, attn_implementation="eager").float().eval()
    size = (40, 70)
    spec = image_config(ours.config)
    n = image_tokens(spec, size, cls_token=cls_token_kept(ours.config))
    pv = torch.randn(spec.num_tiles(size), 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 2] + [ours.config.image_token_id] * n + [3, 4, 5]])
    with torch.no_grad():
        if model_type == "llava":
            ref, got = hf(input_ids=ids, pixel_values=pv).logits, ours(input_ids=ids, pixel_values=pv).logits
        else:
            isz = torch.tensor([size])
            ref = hf(input_ids=ids, pixel_values=pv[None], image_sizes=isz).logits
            got = ours(input_ids=ids, pixel_values=pv, image_sizes=isz).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_projector_starts_from_nn_linear_defaults(tmp_path):
    """Stage-1 projector init = nn.Linear's (kaiming-uniform weights U(+-1/sqrt(in)), uniform biases)."""
    from llava_fast.train.build import assemble

    _lm(tmp_path / "lm")
    _tower(tmp_path / "tower", "clip")
    model, _ = assemble(str(tmp_path / "lm"), str(tmp_path / "tower"), model_type="llava_next", log=_quiet)
    for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        bound = lin.in_features ** -0.5
        w, b = lin.weight.detach(), lin.bias.detach()
        assert w.abs().max() <= bound and b.abs().max() <= bound
        # U(-bound, bound) has std bound / sqrt(3); N(0, 0.02) is far below it
        assert w.std() > 0.8 * bound / 3 ** 0.5, f"weight std {w.std():.4f}, nn.Linear's {bound / 3 ** 0.5:.4f}"
        assert b.abs().min() > 0, "projector biases start at zero, nn.Linear's are uniform"


def test_embeddings_keep_every_row_and_grow_as_llava_hf(tmp_path):
    """A Qwen2-like model with 200 rows and a 98-token tokenizer: 200 + the tokens added (<image>, <video>, and the
    pad token the Qwen2 tokenizer class brings) -> 256 rows (before: 128, rows cut), the 200 rows unchanged, the
    text logits those of the language model."""
    from llava_fast.train.build import assemble

    lm = _lm(tmp_path / "lm", text="qwen2", vocab=200)
    _tower(tmp_path / "tower", "siglip")
    model, tok = assemble(str(tmp_path / "lm"), str(tmp_path / "tower"), model_type="llava_onevision", log=_quiet)
    model.eval()
    assert len(tok) < 200
    emb = model.model.language_model.embed_tokens.weight
    assert emb.shape[0] == 256 and model.config.text_config.vocab_size == 256
    torch.testing.assert_close(emb[:200], lm.model.embed_tokens.weight, atol=0, rtol=0)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :200], lm(input_ids=ids).logits, atol=1e-5,
                                   rtol=0)


def test_open_clip_layer_scale_is_kept(tmp_path):
    """open_clip's LayerScale (ViT-M-16-alt, ls_init_value) folded into out_proj / fc2: the assembled tower gives
    open_clip's features."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed")
    from safetensors.torch import save_file

    from llava_fast.train.build import assemble

    name = "ViT-M-16-alt"
    torch.manual_seed(0)
    ref = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():  # gammas far from their 1e-4 init, so that dropping them shows
        for n, p in ref.visual.named_parameters():
            if ".ls_" in n:
                p.uniform_(0.5, 1.5)
    path = str(tmp_path / "oc.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    _lm(tmp_path / "lm")
    model, _ = assemble(str(tmp_path / "lm"), name, model_type="llava", vision_weights=path, log=_quiet)
    v = ref.visual
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = v.ln_pre(torch.cat([v.class_embedding.expand(1, 1, -1), h], 1) + v.positional_embedding)
        first = getattr(v.transformer, "batch_first", True)
        h = v.transformer(h if first else h.transpose(0, 1))
        h = h if first else h.transpose(0, 1)
        ours = model.model.vision_tower(x, [-1])
    torch.testing.assert_close(ours, h, rtol=1e-4, atol=1e-4)
