"""anyres input handling: settings that would be silently ignored are refused, unusual layouts (ambiguous channel
dimension, negative strides, PIL modes) give the same tiles through preprocess_images and encode_tiles."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from llava_fast.ops.anyres import ImageProcessorConfig, encode_tiles, preprocess_images

NEXT = ImageProcessorConfig.for_variant("llava_next")
CLIP = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336}}


@pytest.mark.parametrize("key,value", [("resample", 2), ("resample", 0), ("do_normalize", False),
                                       ("do_rescale", False), ("do_resize", False), ("rescale_factor", 1.0),
                                       ("do_center_crop", False)])
def test_from_dict_refuses_unsupported_settings(key, value):
    """These used to be dropped without a word (bilinear resampling, no normalization... gave bicubic normalized
    tiles)."""
    with pytest.raises(ValueError, match=f"unsupported {key}="):
        ImageProcessorConfig.from_dict(dict(CLIP, **{key: value}))


def test_from_dict_accepts_released_settings():
    d = dict(CLIP, resample=3, do_normalize=True, do_rescale=True, do_resize=True, do_center_crop=True,
             rescale_factor=0.00392156862745098, do_convert_rgb=True)
    assert ImageProcessorConfig.from_dict(d) == ImageProcessorConfig.for_variant("llava")
    # OneVision / NeXT configs ship do_center_crop without a crop (it does nothing there)
    ov = {"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": 384, "width": 384},
          "image_grid_pinpoints": [[384, 384]], "do_center_crop": False, "image_mean": [0.5] * 3,
          "image_std": [0.5] * 3, "vision_aspect_ratio": "anyres_max_9"}
    assert ImageProcessorConfig.from_dict(ov).variant == "llava_onevision"


def test_from_hf_processor_refuses_unsupported_resample():
    transformers = pytest.importorskip("transformers")
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           resample=2)
    with pytest.raises(ValueError, match="unsupported resample="):
        ImageProcessorConfig.from_hf_processor(proc)


@pytest.mark.parametrize("max_pixels", [0, -5, "1e8", 1.5, True])
def test_max_pixels_must_be_positive(max_pixels):
    # 0 / -5 refused every image with a misleading "exceeds max_pixels" message; "1e8" failed with a TypeError
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        ImageProcessorConfig.for_variant("llava_next", max_pixels=max_pixels)
    assert ImageProcessorConfig.for_variant("llava_next", max_pixels=1e8).max_pixels == 100_000_000


def test_bytes_in_preprocess_images_say_how_to_decode():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buf, "PNG")
    ok = torch.zeros(3, 20, 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images\[1\]: encoded image bytes need decoding.*decode_images"):
        preprocess_images([ok, buf.getvalue()], NEXT)


def _same(image):
    ref = preprocess_images(image, NEXT)
    enc = encode_tiles(image, NEXT)
    assert torch.equal(ref["pixel_values"], enc["pixel_values"])
    assert torch.equal(ref["image_sizes"], enc["image_sizes"])
    return ref


def test_ambiguous_layout_is_channels_first():
    """(4, 5, 3) could be an RGBA 5x3 image (CHW) or an RGB 4x5 one (HWC): channels first, as transformers'
    infer_channel_dimension_format (docs/preprocessing.md)."""
    x = torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert _same(x)["image_sizes"].tolist() == [[5, 3]]
    assert _same(x.numpy())["image_sizes"].tolist() == [[5, 3]]
    assert _same(x[:3])["image_sizes"].tolist() == [[5, 3]]  # (3, 5, 3)
    hwc = x.permute(1, 2, 0).contiguous()[:4]  # (4, 3, 4): both ends could be channels -> CHW, 3x4
    assert _same(hwc)["image_sizes"].tolist() == [[3, 4]]


def test_negative_strides_and_views():
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for view in (img[::-1], img[..., ::-1], img[:, ::-2], img.transpose(2, 0, 1)[:, ::-1]):
        want = preprocess_images(np.ascontiguousarray(view), NEXT)["pixel_values"]
        assert torch.equal(_same(view)["pixel_values"], want)
        t = torch.from_numpy(np.ascontiguousarray(view))
        assert torch.equal(_same(t.flip(0).flip(0))["pixel_values"], want)


@pytest.mark.parametrize("mode", ["P", "PA", "LA", "1", "I", "I;16", "F", "CMYK", "YCbCr"])
def test_pil_modes_agree(mode):
    from PIL import Image

    arr = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    im = Image.fromarray(arr[..., 0].astype(np.uint16) * 200) if mode == "I;16" else im.convert(mode)
    assert im.mode == mode
    if mode in ("I", "I;16", "F"):  # clipped to 8 bits as transformers does; training scales: said once per call
        with pytest.warns(UserWarning, match="clips it to 8 bits.*to_rgb"):
            _same(im)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _same(im)


def _slow_u8(image, max_pixels):
    """to_uint8_chw with its fast path turned off (the full checks), for the comparisons below."""
    from llava_fast.ops import anyres

    real = anyres._rgb_u8_view
    anyres._rgb_u8_view = lambda *a: None
    try:
        return anyres.to_uint8_chw(image, 0, max_pixels, contiguous=False)
    except ValueError as e:
        return e
    finally:
        anyres._rgb_u8_view = real


@pytest.mark.parametrize("shape", [(3, 5, 7), (5, 7, 3), (3, 4, 3), (1, 5, 3), (4, 5, 3), (3, 1, 1), (7, 1, 3),
                                   (3, 0, 4), (0, 4, 3), (2, 5, 7), (5, 7, 4), (5, 7), (3, 5, 7, 1), (6, 9, 3)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("max_pixels", [None, 30])
def test_fast_rgb_view_is_the_full_path(shape, dtype, max_pixels):
    """anyres._rgb_u8_view (session 15: the common input's checks in ~0.3 us, before the GPU encoder's launch) takes
    only inputs the full to_uint8_chw accepts unchanged, and returns the same view (values, shape and strides);
    everything else (grey, RGBA, ambiguous or empty shapes, other dtypes, over max_pixels) it leaves to the full path
    and its errors."""
    from llava_fast.ops import anyres

    x = (torch.arange(int(np.prod(shape))) % 251).reshape(shape).to(dtype)
    fast = anyres._rgb_u8_view(x, max_pixels)
    slow = _slow_u8(x, max_pixels)
    if fast is None:
        if isinstance(slow, torch.Tensor):   # accepted by the full path: only by a conversion the fast one skips
            assert x.dim() != 3 or x.shape[0] in (1, 4) or x.shape[-1] in (1, 4) or x.dtype != torch.uint8
        return
    assert isinstance(slow, torch.Tensor), slow
    assert fast.shape == slow.shape and fast.stride() == slow.stride() and fast.data_ptr() == slow.data_ptr()
    assert torch.equal(fast, slow)


def test_check_work_all_names_the_same_image():
    """check_work_all (the GPU encoder's batch check, session 15) passes and fails exactly where the per-image
    check_work does, naming the same image, for every variant and OneVision's single-tile flag."""
    from llava_fast.ops import anyres

    sizes = [(100, 200), (1, 90000), (5000, 5000), (90000, 1), (336, 336), (3, 20000), (20000, 3)]
    for variant in ("llava", "llava_next", "llava_onevision"):
        cfg = ImageProcessorConfig.for_variant(variant, max_pixels=10_000_000)
        for flag in (False, True):
            for i in range(len(sizes)):
                one = [sizes[i]]
                try:
                    anyres.check_work(sizes[i], cfg, flag, 0)
                    want = None
                except ValueError as e:
                    want = str(e)
                try:
                    anyres.check_work_all(one, cfg, [flag])
                    got = None
                except ValueError as e:
                    got = str(e)
                assert got == want, (variant, flag, sizes[i])
        bad = [k for k, s in enumerate(sizes) if _raises(anyres.check_work, s, cfg, True, k)]
        if bad:
            with pytest.raises(ValueError, match=rf"images\[{bad[0]}\]"):
                anyres.check_work_all(sizes, cfg, [True] * len(sizes))


def _raises(fn, *args) -> bool:
    try:
        fn(*args)
    except ValueError:
        return True
    return False
