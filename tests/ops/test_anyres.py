"""AnyRes geometry and image preprocessing vs transformers' image processors (built in code, nothing downloaded).

Pixel tests compare against the torchvision backend (the transformers 5.x default) and must agree within one grey
level before normalization (they are in fact bit-identical on CPU: same torch kernel). The PIL backend is compared
for documentation only (docs/preprocessing.md), it differs by a few grey levels.
"""
import random

import pytest
import torch

from llava_fast import _ext
from llava_fast.ops import anyres
from llava_fast.ops.anyres import (
    NEXT_PINPOINTS,
    OV_PINPOINTS,
    ImageProcessorConfig,
    normalize_u8_ref,
    preprocess_images,
    preprocess_video,
    select_best_resolution_ref,
)

hf_utils = pytest.importorskip("transformers.image_processing_utils")

NEXT = ImageProcessorConfig.for_variant("llava_next")
OV = ImageProcessorConfig.for_variant("llava_onevision")
L15 = ImageProcessorConfig.for_variant("llava")
L15_PAD = ImageProcessorConfig.for_variant("llava", do_pad=True)


def _sizes(n, seed, lo=1, hi=4000):
    rng = random.Random(seed)
    out = {(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(n)}
    # ties (<= 336x336 in NeXT), smaller than a tile, exact pinpoints, strips, 4k, portrait/landscape 4:3 and 16:9
    out |= {(336, 336), (335, 335), (200, 300), (300, 200), (1, 1), (14, 14), (384, 384), (672, 672), (336, 1008),
            (2304, 2304), (1, 700), (700, 1), (2, 3000), (3000, 2), (2160, 3840), (3840, 2160), (750, 1000),
            (1000, 750), (820, 369), (656, 205), (1080, 1920), (899, 1024)}
    return sorted(out)


def _smooth_noisy(h, w, gen):
    """Photo-like test image: gradients plus noise (pure noise exaggerates resampling differences)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx * 255, yy * 255, (1 - xx * yy) * 255])
    return (base + torch.randn(3, h, w, generator=gen) * 30).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------- geometry
def _hf_next_processor():
    from transformers import LlavaNextProcessor

    p = LlavaNextProcessor.__new__(LlavaNextProcessor)
    p.image_processor = type("IP", (), {"image_grid_pinpoints": NEXT_PINPOINTS})()
    p.patch_size, p.num_additional_image_tokens, p.vision_feature_select_strategy = 14, 1, "default"
    return p


def _hf_ov_processor():
    from transformers import LlavaOnevisionProcessor

    p = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    p.image_processor = type("IP", (), {"image_grid_pinpoints": OV_PINPOINTS})()
    p.num_image_tokens, p.vision_aspect_ratio, p.vision_feature_select_strategy = 729, "anyres_max_9", "full"
    return p


def _hf_best(size, pins):
    try:
        return tuple(hf_utils.select_best_resolution(size, pins))
    except TypeError:  # transformers returns None for strips too thin for every candidate
        return None


@pytest.mark.parametrize("variant", ["llava_next", "llava_onevision"])
def test_geometry_tiles_tokens_match_hf(variant):
    """Grid, tile count and LLM token count for ~600 sizes against transformers' functions."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = NEXT if variant == "llava_next" else OV
    proc = _hf_next_processor() if variant == "llava_next" else _hf_ov_processor()
    sizes = _sizes(600, seed=1 if variant == "llava_next" else 2)
    checked = thin = 0
    for h, w in sizes:
        best = _hf_best((h, w), cfg.image_grid_pinpoints)
        if best is None:
            with pytest.raises(ValueError, match="too thin"):
                anyres.select_best_resolution((h, w), cfg.image_grid_pinpoints)
            thin += 1
            continue
        assert anyres.select_best_resolution((h, w), cfg.image_grid_pinpoints) == best, (h, w)
        assert select_best_resolution_ref((h, w), cfg.image_grid_pinpoints) == best, (h, w)
        assert anyres.grid_shape((h, w), cfg.image_grid_pinpoints, cfg.tile) == (best[0] // cfg.tile,
                                                                                  best[1] // cfg.tile)
        hf_tiles = image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, cfg.tile)
        assert cfg.num_tiles((h, w)) == hf_tiles, (h, w)
        hf_tok = proc._get_number_of_features(h, w, cfg.tile, cfg.tile)
        if proc.vision_feature_select_strategy == "default":
            hf_tok -= 1
        assert cfg.num_image_tokens((h, w)) == hf_tok, (h, w)
        checked += 1
    assert checked > 500
    print(f"{variant}: {checked} sizes match, {thin} too-thin strips raise ValueError")


def test_thin_strips_follow_hf():
    """transformers never finds 'no candidate': when every grid keeps 0 pixels of a strip, the first candidate with
    the least waste still wins (0 == 0 and waste < inf), the strip is resized to 1 pixel and padded, and unpadding
    keeps 0 feature rows (or 0 columns), so the image becomes (about) its base tokens only. We do the same (pixels
    are tested in test_pixels_match_hf_torchvision_backend)."""
    assert anyres.select_best_resolution((1, 5000), NEXT_PINPOINTS) == (336, 672)
    assert NEXT.num_image_tokens((1, 5000)) == 576 and NEXT.num_tiles((1, 5000)) == 3
    # a tall 1-px strip keeps its rows but 0 columns: only the newline tokens of those rows remain
    assert OV.num_image_tokens((9000, 1)) == _hf_ov_processor()._get_number_of_features(9000, 1, 384, 384) == 783
    assert _hf_best((1, 5000), NEXT_PINPOINTS) == (336, 672)


def test_token_counts_worked_examples():
    """reference-spec.md section 3.2."""
    for (h, w), nxt, ov in [((672, 672), 2928, 3699), ((500, 1000), 1752, 4009), ((1000, 500), 1776, 4050),
                            ((899, 1024), 2634, 6551), ((1080, 1920), 1948, 7269), ((200, 300), 1464, 1261)]:
        assert NEXT.num_image_tokens((h, w)) == nxt
        assert OV.num_image_tokens((h, w)) == ov
    assert L15.num_image_tokens((123, 456)) == 576
    assert OV.num_image_tokens((123, 456), single_tile=True) == 730
    assert anyres.num_video_tokens(8) == 8 * 196 + 1


@pytest.mark.skipif(not _ext.HAS_EXT, reason="llava_fast._C not built")
@pytest.mark.parametrize("pins", [NEXT_PINPOINTS, OV_PINPOINTS], ids=["next", "ov"])
def test_cpp_select_best_resolution_matches_python(pins):
    rng = random.Random(3)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(3000)]
    sizes += [(h, w) for h in range(1, 40) for w in (1, 2, 7, 335, 336, 337, 1000, 4000)]
    for h, w in sizes:
        got = _ext._C.select_best_resolution(h, w, [tuple(p) for p in pins])
        assert got == select_best_resolution_ref((h, w), pins), (h, w)


# ---------------------------------------------------------------------------------------------------------- config
def test_config_from_dict_and_hf_processor():
    d = {"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": 384, "width": 384},
         "image_grid_pinpoints": OV_PINPOINTS, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    c = ImageProcessorConfig.from_dict(d)
    assert (c.variant, c.tile, c.max_tiles, c.image_mean) == ("llava_onevision", 384, 9, (0.5, 0.5, 0.5))
    c = ImageProcessorConfig.from_dict({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
                                        "crop_size": {"height": 336, "width": 336}})
    assert (c.variant, c.tile, c.shortest_edge, c.do_pad, c.image_grid_pinpoints) == ("llava", 336, 336, False, None)
    c = ImageProcessorConfig.from_dict({"image_processor_type": "LlavaNextImageProcessor",
                                        "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                                        "image_grid_pinpoints": NEXT_PINPOINTS})
    assert c == NEXT
    pytest.importorskip("torchvision")
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor, LlavaOnevisionImageProcessor

    assert ImageProcessorConfig.from_hf_processor(_hf_ip(LlavaNextImageProcessor)) == NEXT
    assert ImageProcessorConfig.from_hf_processor(_hf_ip(LlavaOnevisionImageProcessor)) == OV
    assert ImageProcessorConfig.from_hf_processor(_hf_ip(LlavaImageProcessor, do_pad=True)) == L15_PAD
    with pytest.raises(ValueError, match="variant"):
        ImageProcessorConfig(variant="llava2")
    with pytest.raises(ValueError, match="multiple of tile"):
        ImageProcessorConfig.for_variant("llava_next", image_grid_pinpoints=[[300, 600]])


# ---------------------------------------------------------------------------------------------------------- pixels
def _hf_ip(cls, **kw):
    name = cls.__name__
    if "Onevision" in name:
        base = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        base = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    if "LlavaNext" in name:
        base["image_grid_pinpoints"] = NEXT_PINPOINTS
    base.update(kw)
    return cls(**base)


PIXEL_SIZES = [(500, 1000), (1000, 500), (336, 336), (200, 300), (300, 200), (100, 90), (384, 384), (673, 671),
               (1, 700), (700, 1), (3, 250), (1, 5000), (899, 1024), (750, 1000), (2160, 3840)]


def _hf_pixels(proc, images, **kw):
    out = proc(images, return_tensors="pt", **kw)
    pv = out["pixel_values"]
    return pv.reshape(-1, *pv.shape[-3:]), out


def _grey_err(a, b, std):
    """Max difference in grey levels (normalized values times 255*std)."""
    s = torch.tensor(std, dtype=torch.float64)[:, None, None] * 255
    return ((a.double() - b.double()) * s).abs().max().item()


@pytest.mark.parametrize("variant", ["llava", "llava_pad", "llava_next", "llava_onevision"])
def test_pixels_match_hf_torchvision_backend(variant):
    pytest.importorskip("torchvision")
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaNextImageProcessor, \
        LlavaOnevisionImageProcessor

    proc, cfg = {
        "llava": (_hf_ip(CLIPImageProcessor), L15),
        "llava_pad": (_hf_ip(LlavaImageProcessor, do_pad=True), L15_PAD),
        "llava_next": (_hf_ip(LlavaNextImageProcessor), NEXT),
        "llava_onevision": (_hf_ip(LlavaOnevisionImageProcessor), OV),
    }[variant]
    gen = torch.Generator().manual_seed(0)
    # llava (no pad) resizes the short side of a 1-px strip to 336 (a 336 x 235200 intermediate): strips skipped there
    sizes = PIXEL_SIZES if variant in ("llava_next", "llava_onevision") else \
        [s for s in PIXEL_SIZES[:12] if min(s) > 3 or variant == "llava_pad"]
    worst = 0.0
    for h, w in sizes:
        x = _smooth_noisy(h, w, gen)
        ref, hf_out = _hf_pixels(proc, [x])
        ours = preprocess_images([x], cfg)
        assert ours["pixel_values"].shape == ref.shape, (h, w)
        assert ours["num_tiles"] == [ref.shape[0]]
        assert ours["image_sizes"].tolist() == [[h, w]]
        if "image_sizes" in hf_out:
            assert hf_out["image_sizes"].tolist() == [[h, w]]
        err = _grey_err(ours["pixel_values"], ref, cfg.image_std)
        worst = max(worst, err)
        assert err <= 1.0 + 1e-3, f"{variant} {h}x{w}: {err} grey levels"
    print(f"{variant}: max difference to the torchvision backend {worst:.3g} grey levels over {len(sizes)} sizes")


def test_onevision_multi_image_and_batches_match_hf():
    pytest.importorskip("torchvision")
    from transformers import LlavaOnevisionImageProcessor

    proc = _hf_ip(LlavaOnevisionImageProcessor)
    gen = torch.Generator().manual_seed(1)
    samples = [[_smooth_noisy(300, 500, gen), _smooth_noisy(640, 480, gen)], [_smooth_noisy(200, 900, gen)]]
    ref = proc(samples, return_tensors="pt")
    ours = preprocess_images(samples, OV)
    assert ours["batch_num_images"] == list(ref["batch_num_images"]) == [2, 1]
    assert ours["num_tiles"][:2] == [1, 1]
    # a text-only sample in the batch gets no entry in either (the model counts samples with images only)
    with_empty = [samples[0], [], samples[1]]
    assert preprocess_images(with_empty, OV)["batch_num_images"] == \
        list(proc(with_empty, return_tensors="pt")["batch_num_images"]) == [2, 1]
    # HF pads every image to the max tile count: slice the real tiles out per image
    pv = torch.cat([ref["pixel_values"][i, :n] for i, n in enumerate(ours["num_tiles"])])
    assert _grey_err(ours["pixel_values"], pv, OV.image_std) <= 1.0 + 1e-3
    assert ours["num_image_tokens"][:2] == [730, 730]
    # forcing the single-tile path on a flat list
    flat = preprocess_images(samples[0], OV, multi_image=True)
    assert torch.equal(flat["pixel_values"], ours["pixel_values"][:2])


def test_video_frames_match_hf():
    pytest.importorskip("torchvision")
    LlavaOnevisionVideoProcessor = getattr(pytest.importorskip("transformers"), "LlavaOnevisionVideoProcessor", None)
    if LlavaOnevisionVideoProcessor is None:
        pytest.skip("this transformers has no LlavaOnevisionVideoProcessor")

    proc = LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    gen = torch.Generator().manual_seed(2)
    video = torch.stack([_smooth_noisy(240, 320, gen) for _ in range(3)])  # (F, C, H, W)
    ref = proc(videos=[video], return_tensors="pt")["pixel_values_videos"][0]
    ours = preprocess_video(video, OV)
    assert ours.shape == ref.shape == (3, 3, 384, 384)
    assert _grey_err(ours, ref, OV.image_std) <= 1.0 + 1e-3


def test_pil_inputs_modes_match_hf():
    """PIL grayscale, RGBA (composited onto white), CMYK, palette: converted as transformers does."""
    pytest.importorskip("torchvision")
    import numpy as np
    from PIL import Image
    from transformers import LlavaNextImageProcessor

    proc = _hf_ip(LlavaNextImageProcessor)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (120, 200, 4), dtype=np.uint8), "RGBA")
    imgs = [rgba, rgba.convert("L"), rgba.convert("RGB").convert("CMYK"), rgba.convert("RGB").convert("P"),
            Image.fromarray(rng.integers(0, 256, (50, 80), dtype=np.uint8))]
    for i, im in enumerate(imgs):
        ref, _ = _hf_pixels(proc, [im])
        ours = preprocess_images([im], NEXT)["pixel_values"]
        assert _grey_err(ours, ref, NEXT.image_std) <= 1.0 + 1e-3, im.mode


def test_tensor_layouts_and_channels():
    gen = torch.Generator().manual_seed(3)
    x = _smooth_noisy(90, 130, gen)
    chw = preprocess_images([x], NEXT)["pixel_values"]
    hwc = preprocess_images([x.permute(1, 2, 0).contiguous()], NEXT)["pixel_values"]
    npy = preprocess_images([x.permute(1, 2, 0).numpy()], NEXT)["pixel_values"]
    assert torch.equal(chw, hwc) and torch.equal(chw, npy)
    g = x[:1]
    assert torch.equal(preprocess_images([g], NEXT)["pixel_values"],
                       preprocess_images([g.expand(3, -1, -1)], NEXT)["pixel_values"])
    assert torch.equal(preprocess_images([g[0]], NEXT)["pixel_values"],  # 2-D grayscale
                       preprocess_images([g], NEXT)["pixel_values"])
    rgba = torch.cat([x, torch.full_like(x[:1], 255)])  # opaque alpha: same as RGB
    assert torch.equal(preprocess_images([rgba], NEXT)["pixel_values"], chw)
    out = preprocess_images([x], NEXT, dtype=torch.bfloat16)["pixel_values"]
    assert out.dtype == torch.bfloat16 and torch.equal(out, chw.to(torch.bfloat16))


def test_rgba_tensor_matches_hf():
    pytest.importorskip("torchvision")
    from transformers import LlavaNextImageProcessor

    x = torch.randint(0, 256, (4, 60, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    ref, _ = _hf_pixels(_hf_ip(LlavaNextImageProcessor), [x])
    assert _grey_err(preprocess_images([x], NEXT)["pixel_values"], ref, NEXT.image_std) <= 1.0 + 1e-3


# ---------------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_image():
    ok = torch.zeros(3, 20, 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images\[1\].*torch.uint8"):
        preprocess_images([ok, torch.rand(3, 20, 20)], NEXT)
    with pytest.raises(ValueError, match=r"images\[1\].*zero size"):
        preprocess_images([ok, torch.zeros(3, 0, 20, dtype=torch.uint8)], NEXT)
    with pytest.raises(ValueError, match=r"images\[0\].*channel"):
        preprocess_images([torch.zeros(5, 20, 20, dtype=torch.uint8)], NEXT)
    with pytest.raises(ValueError, match=r"images\[0\].*shape"):
        preprocess_images([torch.zeros(1, 3, 20, 20, dtype=torch.uint8)], NEXT)
    cfg = ImageProcessorConfig.for_variant("llava_next", max_pixels=10_000)
    with pytest.raises(ValueError, match=r"images\[2\].*max_pixels"):
        preprocess_images([ok, ok, torch.zeros(3, 101, 100, dtype=torch.uint8)], cfg)
    with pytest.raises(ValueError, match="empty"):
        preprocess_images([], NEXT)


def test_pil_bomb_guard():
    from PIL import Image

    cfg = ImageProcessorConfig.for_variant("llava", max_pixels=1000)
    with pytest.raises(ValueError, match=r"images\[0\].*max_pixels"):
        preprocess_images([Image.new("RGB", (50, 50))], cfg)


# ---------------------------------------------------------------------------------------------------------- normalize
@pytest.mark.skipif(not _ext.HAS_EXT, reason="llava_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mean,std", [(anyres.CLIP_MEAN, anyres.CLIP_STD), (anyres.SIGLIP_MEAN, anyres.SIGLIP_STD)])
def test_cpp_normalize_matches_torch(dtype, mean, std):
    n, h, w = 3, 17, 23
    x = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)
    x[0, 0, :, :] = torch.arange(256)[:w * 3].reshape(w, 3).to(torch.uint8)
    out = torch.empty(n, 3, h, w, dtype=dtype)
    for threads in (1, 2):
        _ext._C.normalize_u8_cpu(x.data_ptr(), out.data_ptr(), _ext.dtype_code(dtype), n, h, w, list(mean), list(std),
                                 threads)
        ref = normalize_u8_ref(x.permute(0, 3, 1, 2), mean, std, torch.float32).to(dtype)
        assert torch.equal(out, ref), f"max diff {(out.float() - ref.float()).abs().max()}"
    # all 256 values per channel, fp32 bit-exact
    allv = torch.arange(256, dtype=torch.uint8).repeat_interleave(3).reshape(1, 1, 256, 3)
    out = torch.empty(1, 3, 1, 256, dtype=dtype)
    _ext._C.normalize_u8_cpu(allv.data_ptr(), out.data_ptr(), _ext.dtype_code(dtype), 1, 1, 256, list(mean),
                             list(std), 1)
    assert torch.equal(out, normalize_u8_ref(allv.permute(0, 3, 1, 2), mean, std, torch.float32).to(dtype))


# ---------------------------------------------------------------------------------------------------------- encoder
needs_ext = pytest.mark.skipif(not (_ext.HAS_EXT and hasattr(_ext._C, "encode_tiles_cpu")),
                               reason="llava_fast._C (with the tile encoder) not built")


@needs_ext
def test_cpp_resize_bit_exact_vs_torch_uint8_kernel():
    """The encoder's resampler against torch's CPU uint8 antialiased bicubic kernel (what torchvision calls)."""
    import torch.nn.functional as F

    rng = random.Random(7)
    pairs = [(rng.randint(1, 700), rng.randint(1, 700), rng.randint(1, 700), rng.randint(1, 700)) for _ in range(60)]
    pairs += [(1, 5, 336, 336), (4000, 3, 384, 1), (13, 17, 13, 40), (500, 500, 500, 500)]
    for h, w, oh, ow in pairs:
        x = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)
        out = torch.empty(oh, ow, 3, dtype=torch.uint8)
        _ext._C.resize_bicubic_aa_u8_cpu(x.data_ptr(), h, w, out.data_ptr(), oh, ow)
        ref = F.interpolate(x.permute(2, 0, 1)[None].contiguous(), size=(oh, ow), mode="bicubic", antialias=True,
                            align_corners=False)[0].permute(1, 2, 0)
        assert (out.int() - ref.int()).abs().max().item() <= 1, (h, w, oh, ow)
        assert torch.equal(out, ref), (h, w, oh, ow)  # bit-exact here; <= 1 grey level is the contract


ENC_SIZES = [(500, 1000), (1000, 500), (200, 300), (1, 700), (700, 1), (1, 5000), (899, 1024), (336, 336),
             (385, 383), (1316, 640)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [L15, L15_PAD, NEXT, OV], ids=["llava", "llava_pad", "next", "ov"])
def test_encode_tiles_matches_reference(cfg, dtype):
    gen = torch.Generator().manual_seed(8)
    sizes = [s for s in ENC_SIZES if min(s) > 1] if cfg is L15 else ENC_SIZES
    if dtype != torch.float32:  # only the final rounding differs from fp32: fewer sizes
        sizes = sizes[:4]
    imgs = [_smooth_noisy(h, w, gen).permute(1, 2, 0).contiguous() for h, w in sizes]  # HWC, read in place
    imgs[0] = imgs[0].permute(2, 0, 1).contiguous()  # and one CHW (copied to HWC)
    ref = preprocess_images(imgs, cfg, dtype=dtype)
    for threads in (1, 3):
        got = anyres.encode_tiles(imgs, cfg, dtype=dtype, num_threads=threads)
        assert got["num_tiles"] == ref["num_tiles"] and got["num_image_tokens"] == ref["num_image_tokens"]
        assert torch.equal(got["image_sizes"], ref["image_sizes"])
        assert got["pixel_values"].dtype == dtype
        err = _grey_err(got["pixel_values"].float(), ref["pixel_values"].float(), cfg.image_std)
        assert err <= 1.0 + 1e-3, err
        assert torch.equal(got["pixel_values"], ref["pixel_values"])  # bit-exact on CPU (same arithmetic)


@needs_ext
def test_encode_tiles_multi_image_out_buffer_and_errors():
    gen = torch.Generator().manual_seed(9)
    samples = [[_smooth_noisy(300, 500, gen), _smooth_noisy(640, 480, gen)], [_smooth_noisy(200, 900, gen)]]
    ref = preprocess_images(samples, OV)
    total = sum(ref["num_tiles"])
    buf = torch.full((total + 2, 3, 384, 384), 7.0)
    got = anyres.encode_tiles(samples, OV, out=buf)
    assert got["pixel_values"].data_ptr() == buf.data_ptr()
    assert torch.equal(got["pixel_values"], ref["pixel_values"]) and (buf[total:] == 7).all()
    with pytest.raises(ValueError, match="out must be"):
        anyres.encode_tiles(samples, OV, out=torch.empty(total - 1, 3, 384, 384))
    with pytest.raises(ValueError, match=r"images\[1\].*torch.uint8"):
        anyres.encode_tiles([samples[0][0], torch.rand(3, 8, 8)], OV)
    with pytest.raises(ValueError, match="mode"):
        _ext._C.encode_tile_counts([10], [10], [7], 384, [(384, 384)])


# ---------------------------------------------------------------------------------------------------------- PIL report
def test_report_pil_backend_difference():
    """Not an assertion on PIL: prints the difference to the PIL backend (recorded in docs/preprocessing.md)."""
    import numpy as np

    try:  # the *Pil classes are the transformers 5.x backend split
        from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil
    except ImportError as e:
        pytest.skip(f"this transformers has no PIL-backend classes ({e})")

    gen = torch.Generator().manual_seed(5)
    for name, proc, cfg in [("llava_pad", _hf_ip(LlavaImageProcessorPil, do_pad=True), L15_PAD),
                            ("llava_next", _hf_ip(LlavaNextImageProcessorPil), NEXT),
                            ("llava_onevision", _hf_ip(LlavaOnevisionImageProcessorPil), OV)]:
        for kind in ("photo-like", "uniform noise"):
            errs, frac = [], []
            for h, w in [(500, 1000), (750, 1000)]:
                x = _smooth_noisy(h, w, gen) if kind == "photo-like" else \
                    torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
                ref, _ = _hf_pixels(proc, [x.permute(1, 2, 0).numpy()])
                ours = preprocess_images([x], cfg)["pixel_values"]
                s = torch.tensor(cfg.image_std, dtype=torch.float64)[:, None, None] * 255
                d = ((ours.double() - ref.double()) * s).abs()
                errs.append(d.max().item())
                frac.append((d > 0.5).double().mean().item())
            print(f"PIL backend vs ours, {name}, {kind}: max {max(errs):.2f} grey levels, "
                  f"{100 * float(np.mean(frac)):.2f}% of values differ")


# ---------------------------------------------------------------------------------------------------------- cuda
@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [L15_PAD, NEXT, OV], ids=["llava_pad", "next", "ov"])
def test_cuda_reference_matches_hf_on_cuda_within_one_grey_level(cfg):
    """On CUDA, torch resizes uint8 images with fp32 arithmetic (no clamp between the two bicubic passes), which
    differs from its CPU uint8 kernel by up to ~20 grey levels next to saturated pixels (docs/preprocessing.md).
    The oracle on the GPU is therefore transformers' torchvision backend run on the GPU; the GPU encoder's
    resample="uint8" mode is tested bit-exact against the CPU path in tests/ops/test_anyres_cuda.py."""
    import transformers

    if cfg.variant == "llava_onevision":
        proc = transformers.LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                                         image_std=[0.5] * 3)
    elif cfg.variant == "llava_next":
        proc = transformers.LlavaNextImageProcessor(size={"shortest_edge": 336},
                                                    crop_size={"height": 336, "width": 336},
                                                    image_grid_pinpoints=cfg.image_grid_pinpoints)
    else:
        proc = transformers.LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                do_pad=True)
    gen = torch.Generator().manual_seed(6)
    for h, w in [(500, 1000), (899, 1024), (2160, 3840), (200, 300)]:
        x = _smooth_noisy(h, w, gen).cuda()
        ref = proc([x], return_tensors="pt", device="cuda")["pixel_values"]
        ref = ref.reshape(-1, *ref.shape[-3:]).cpu()
        gpu = preprocess_images([x], cfg)["pixel_values"].cpu()
        assert gpu.shape == ref.shape
        assert _grey_err(gpu, ref, cfg.image_std) <= 1.0 + 1e-3


@needs_ext
@pytest.mark.parametrize("cfg", [L15, L15_PAD, NEXT, OV], ids=["llava", "llava_pad", "next", "ov"])
def test_encode_tiles_reads_any_layout_in_place(cfg):
    """The C++ encoder reads CHW, HWC, cropped views and channel-expanded grey images in place (no HWC copy; CHW rows
    go straight into its int16 planes): bit-identical to the reference for each layout, 1-pixel strips included."""
    gen = torch.Generator().manual_seed(9)
    sizes = [(300, 500), (517, 211), (1, 64), (64, 1), (2, 3)] if cfg is not L15 else [(300, 500), (517, 211)]
    imgs = []
    for h, w in sizes:
        chw = _smooth_noisy(h, w, gen)
        big = _smooth_noisy(h + 7, w + 5, gen)
        big[:, 3:3 + h, 2:2 + w] = chw
        grey = chw[:1].expand(3, h, w)                          # channel stride 0
        imgs += [chw, chw.permute(1, 2, 0).contiguous(), big[:, 3:3 + h, 2:2 + w], grey]
    ref = preprocess_images(imgs, cfg)
    for threads in (1, 2):
        got = anyres.encode_tiles(imgs, cfg, num_threads=threads)
        assert got["num_tiles"] == ref["num_tiles"]
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
    with pytest.raises(ValueError, match="negative strides|one per image"):
        _ext._C.encode_tiles_cpu([imgs[0].data_ptr()], [300], [500], [500], [0], 0, 0, 1, 336, 336, False, [],
                                 [0, 0, 0], [0.5] * 3, [0.5] * 3, 1, [-1], [1])


_ISA_SCRIPT = r"""
import random, sys, torch
import torch.nn.functional as F
from llava_fast import _ext
from llava_fast.ops import anyres
from llava_fast.ops.anyres import ImageProcessorConfig, preprocess_images
print(_ext._C.encoder_isa())
rng = random.Random(11)
gen = torch.Generator().manual_seed(11)
# widths around the vector steps (8 outputs, 16/32 bytes, 16/32 pixels) and downscales of ~1.5x (7 taps), ~3x
# (13 taps: 16-wide dots) and ~8x (>16 taps: 32-wide dots)
pairs = [(rng.randint(1, 900), rng.randint(1, 900), rng.randint(1, 400), rng.randint(1, 400)) for _ in range(40)]
pairs += [(97, 1011, 97, 673), (31, 2700, 40, 336), (64, 3000, 21, 367), (200, 47, 33, 9), (8, 8, 3, 3)]
for h, w, oh, ow in pairs:
    x = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen)
    out = torch.empty(oh, ow, 3, dtype=torch.uint8)
    _ext._C.resize_bicubic_aa_u8_cpu(x.data_ptr(), h, w, out.data_ptr(), oh, ow)
    ref = F.interpolate(x.permute(2, 0, 1)[None].contiguous(), size=(oh, ow), mode="bicubic", antialias=True,
                        align_corners=False)[0].permute(1, 2, 0)
    assert torch.equal(out, ref), (h, w, oh, ow)
for variant in ("llava_next", "llava_onevision"):
    cfg = ImageProcessorConfig.for_variant(variant)
    imgs = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen)
            for h, w in [(750, 1000), (333, 1201), (1500, 97), (61, 59)]]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # the 16-bit outputs: vector rounding or table
        got = anyres.encode_tiles(imgs, cfg, dtype=dtype, num_threads=2)["pixel_values"]
        assert torch.equal(got, preprocess_images(imgs, cfg, dtype=dtype)["pixel_values"]), (variant, dtype)
# every byte value in every channel through the normalization (tiles the size of the image: no resize), CLIP and
# SigLIP constants: (3 i + c) * 7 % 256 takes all 256 values over 256 consecutive pixels
# and constants whose normalized values fall exactly halfway between two bf16 (channels 0, 1) or fp16 (channel 2)
# values: (v - 0.5), (v - 0.25), (v - 0.0625), so that round-to-nearest-even's tie rule is checked too
TIES = dict(image_mean=(0.5 / 255, 0.25 / 255, 0.0625 / 255), image_std=(1 / 255,) * 3)
for variant, kw in (("llava", {}), ("llava_onevision", {}), ("llava", TIES)):
    cfg = ImageProcessorConfig.for_variant(variant, **kw)
    t = cfg.tile
    x = ((torch.arange(t * t * 3) * 7) % 256).to(torch.uint8).reshape(t, t, 3)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = anyres.encode_tiles([x], cfg, dtype=dtype, num_threads=1)["pixel_values"]
        ref32 = preprocess_images([x], cfg, dtype=torch.float32)["pixel_values"]
        assert torch.equal(got, ref32.to(dtype)), (variant, kw, dtype)
    if kw:  # the ties are there (else the tie rule would go unchecked)
        bits = ref32.view(torch.int32)
        assert ((bits[:, :2] & 0xFFFF) == 0x8000).sum() > 100 and ((bits[:, 2] & 0x1FFF) == 0x1000).sum() > 100
print("ok")
"""


@needs_ext
@pytest.mark.parametrize("no_avx2", ["0", "1"], ids=["default_isa", "no_avx2"])
def test_encoder_isa_paths_bit_exact(no_avx2):
    """Every instruction-set path of the CPU resampler (AVX2 when the CPU has it, SSE2/SSSE3 with
    LLAVA_FAST_NO_AVX2=1) gives torch's uint8 bits, at widths around each vector step and at 7-, 13- and >16-tap
    downscales. A subprocess, since the switch is read once per process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, LLAVA_FAST_NO_AVX2=no_avx2)
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    isa, status = r.stdout.split()[:2]
    assert status == "ok"
    if no_avx2 == "1":
        assert isa in ("ssse3", "sse2", "scalar")
