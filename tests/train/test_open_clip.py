"""open_clip tower: our tower with open_clip's (random) weights mapped by name gives open_clip's features."""
import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (pip install llava_fast[openclip])")


def test_open_clip_name_map_same_features(tmp_path):
    from safetensors.torch import save_file

    from llava_fast.models.config import VisionConfig
    from llava_fast.models.vision import VisionTower
    from llava_fast.train.open_clip_tower import open_clip_to_hf

    name = "ViT-B-32-quickgelu"
    ref = open_clip.create_model(name, pretrained=None).eval()
    path = str(tmp_path / "oc.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    cfg, sd = open_clip_to_hf(name, path)
    tower = VisionTower(VisionConfig.from_dict(cfg)).eval()
    missing, unexpected = tower.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    v = ref.visual
    with torch.no_grad():
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([v.class_embedding.expand(2, 1, -1), h], 1) + v.positional_embedding
        h = v.ln_pre(h)
        h = v.transformer(h if getattr(v.transformer, "batch_first", True) else h.transpose(0, 1))
        h = h if getattr(v.transformer, "batch_first", True) else h.transpose(0, 1)
        ours = tower(x, [-1])
    torch.testing.assert_close(ours, h, rtol=1e-4, atol=1e-4)


def test_tower_without_ln_pre_is_refused_by_name():
    """CLIPA-style towers (no_ln_pre) have no pre_layrnorm to convert: a clear error, not 'tensors not found'."""
    open_clip = pytest.importorskip("open_clip")
    from llava_fast.train.open_clip_tower import open_clip_vision_config

    names = [n for n in open_clip.list_models() if (open_clip.get_model_config(n) or {}).get("vision_cfg", {})
             .get("no_ln_pre")]
    if not names:
        pytest.skip("this open_clip has no architecture without ln_pre")
    with pytest.raises(ValueError, match="has no ln_pre"):
        open_clip_vision_config(names[0])
