"""Audit of the AnyRes preprocessing entry points on inputs users give: EXIF-rotated photos as bytes (upright, as
transformers' loaders), lazily opened PIL images with truncated data (ValueError naming the image), non-uint8 arrays
(advice that fits their range), numpy videos, thin strips whose resampling buffers dwarf the image (a clear error
instead of tens of GB or hours), NeXT/OneVision configs whose resize differs from the tile (refused), image_sizes
rows as tensors in the geometry helpers, and pinpoint configurations other than the released ones (tiles, tokens and
pixels equal to transformers, token counts equal to the real processors)."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from llava_fast import _ext
from llava_fast.ops import anyres
from llava_fast.ops.anyres import (
    ImageProcessorConfig,
    decode_images,
    encode_tiles,
    preprocess_images,
    preprocess_video,
)

Image = pytest.importorskip("PIL.Image")

NEXT = ImageProcessorConfig.for_variant("llava_next")
OV = ImageProcessorConfig.for_variant("llava_onevision")
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason="llava_fast._C not built")


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _exif_tiff(orientation, big_endian=False, typ=3):
    """Raw EXIF APP1 payload (b"Exif\\0\\0" + TIFF) with one IFD0 entry: Orientation."""
    e = ">" if big_endian else "<"
    value = struct.pack(e + "H", orientation) + b"\0\0" if typ == 3 else struct.pack(e + "I", orientation)
    entry = struct.pack(e + "HHI", 0x0112, typ, 1) + value
    return b"Exif\0\0" + (b"MM\0*" if big_endian else b"II*\0") + struct.pack(e + "I", 8) + \
        struct.pack(e + "H", 1) + entry + struct.pack(e + "I", 0)


def _jpeg(arr, exif=None, xmp=None):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=93, **({"exif": exif} if exif is not None else {}))
    data = buf.getvalue()
    if xmp is not None:   # an APP1 XMP packet after JFIF's APP0, written here: Pillow < 11 cannot save one
        payload = b"http://ns.adobe.com/xap/1.0/\x00" + xmp
        at = 4 + int.from_bytes(data[4:6], "big") if data[2:4] == b"\xff\xe0" else 2
        data = data[:at] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[at:]
    return data


# ------------------------------------------------------------------------------------------------------- EXIF
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_bytes_are_upright_as_transformers_loads_them(orientation, tmp_path):
    """A phone photo is stored sideways with an EXIF orientation; transformers' load_image (PIL exif_transpose) and
    load_image_as_tensor (torchvision, apply_exif_orientation=True: what the torchvision processors run on paths and
    URLs) hand the model the upright image. decode_images / encode_tiles on the same bytes used to ignore the tag:
    sideways pixels and (height, width) swapped in image_sizes, tiles and token counts."""
    load_image = pytest.importorskip("transformers.image_utils").load_image

    arr = _photo(40, 70, orientation)
    data = _jpeg(arr, _exif_tiff(orientation))
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    want = torch.from_numpy(np.array(load_image(str(path)))).permute(2, 0, 1)
    assert want.shape[1:] == ((70, 40) if orientation >= 5 else (40, 70))
    got = decode_images([data])[0]
    assert torch.equal(got, want)
    try:  # the torchvision backend's own loader gives the same pixels (both are libjpeg-turbo)
        from transformers.image_utils import load_image_as_tensor

        tv = load_image_as_tensor(str(path))
    except Exception:  # noqa: BLE001 - no torchvision image ops here
        tv = None
    if tv is not None:
        assert torch.equal(got, tv)
    enc = encode_tiles([data], NEXT)
    assert enc["image_sizes"].tolist() == [list(want.shape[1:])]
    assert torch.equal(enc["pixel_values"], encode_tiles([want], NEXT)["pixel_values"])
    assert enc["num_image_tokens"] == [NEXT.num_image_tokens(tuple(want.shape[1:]))]


def test_exif_rotated_png_bytes_are_upright():
    arr = _photo(30, 50, 3)
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", exif=exif)
    got = decode_images([buf.getvalue()])[0]
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(np.rot90(arr))).permute(2, 0, 1))


def test_jpeg_orientation_parser_agrees_with_pil():
    """The GPU route reads the orientation without PIL; where it is unsure it returns None (PIL decodes). Never a
    wrong answer, never an exception, on little/big-endian EXIF, LONG-typed tags, EXIF without the tag, XMP and
    every truncation of the header."""
    arr = _photo(16, 24, 1)
    exif_no_tag = Image.Exif()
    exif_no_tag[0x010F] = "maker"
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    cases = [_jpeg(arr), _jpeg(arr, exif_no_tag.tobytes())]
    cases += [_jpeg(arr, _exif_tiff(o, big, typ)) for o in (1, 3, 6, 8, 0, 9) for big in (False, True)
              for typ in (3, 4)]
    cases.append(_jpeg(arr, xmp=xmp))
    for k, data in enumerate(cases):
        pil = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
        got = anyres._jpeg_orientation(data)
        assert got is None or got == pil, (k, got, pil)
        if k < len(cases) - 1:
            assert got == pil, k  # the plain cases are answered without PIL
    assert anyres._jpeg_orientation(cases[-1]) is None  # XMP orientation: PIL decides (it says 6)
    rich = cases[2 + 2 * 2 * 2 + 1]  # orientation 6, little-endian, LONG
    assert anyres._jpeg_orientation(rich) == 6
    for cut in range(len(rich)):  # every truncation: None (unsure) or the right answer
        assert anyres._jpeg_orientation(rich[:cut]) in (None, 6), cut
    # garbled headers (PIL stops reading an IFD at a bad out-of-line value, skips odd markers...): None or PIL's answer
    import random
    import warnings

    rng = random.Random(0)
    answered = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data"
        for _ in range(1500):
            d = bytearray(rng.choice(cases[2:-1]))
            for _ in range(rng.randint(1, 3)):
                d[rng.randint(2, 120)] = rng.choice([0, 1, 0xFF, rng.randint(0, 255)])
            got = anyres._jpeg_orientation(bytes(d))
            try:
                pil = Image.open(io.BytesIO(bytes(d))).getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001, S112 - PIL refuses it: the decode raises ValueError later
                continue
            assert got is None or got == pil, bytes(d[:120])
            answered += got is not None
    assert answered > 500


def test_gpu_jpeg_route_applies_orientation(monkeypatch):
    """nvJPEG ignores EXIF: decode_images' GPU route must turn its output upright as PIL's exif_transpose does. The
    GPU decoder is replaced by torchvision's CPU decoder (same pixels as PIL here), as in test_anyres_cuda.py."""
    tv = pytest.importorskip("torchvision.io")
    datas = [_jpeg(_photo(24, 36, o), _exif_tiff(o, big_endian=o % 2 == 0)) for o in range(1, 9)]
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    datas.append(_jpeg(_photo(24, 36, 9), xmp=xmp))
    seen = []

    def fake(tensors, dev):
        seen.extend(tensors)
        return [tv.decode_jpeg(t, mode=tv.ImageReadMode.RGB) for t in tensors]

    monkeypatch.setattr(anyres, "_gpu_jpeg_decoder", lambda: fake)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    out = decode_images(datas, device="cuda:0")
    monkeypatch.undo()
    assert len(seen) == 8  # the XMP one went to PIL
    ref = decode_images(datas)
    import PIL
    from PIL import ImageOps

    w, h = ImageOps.exif_transpose(Image.open(io.BytesIO(datas[8]))).size
    assert (h, w) == (36, 24) or PIL.__version__.startswith("10.0.")   # Pillow 10.0 ignores a JPEG's XMP orientation
    for k, (o, r) in enumerate(zip(out, ref)):
        assert r.shape[1:] == ((36, 24) if k + 1 in (5, 6, 7, 8) else (24, 36) if k < 8 else (h, w)), k
        assert torch.equal(o, r), k


# ------------------------------------------------------------------------------------------------------- PIL
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_lazily_opened_truncated_pil_image_names_the_image(fmt):
    """Image.open is lazy: a truncated file opens fine and fails when converted. That OSError ("image file is
    truncated") surfaced without saying which image of the batch it was."""
    buf = io.BytesIO()
    Image.fromarray(_photo(40, 60)).save(buf, fmt)
    data = buf.getvalue()
    ok = torch.zeros(3, 20, 20, dtype=torch.uint8)
    for fn in (preprocess_images, encode_tiles):
        bad = Image.open(io.BytesIO(data[: len(data) // 2]))
        with pytest.raises(ValueError, match=r"images\[1\].*(corrupt|truncated)"):
            fn([ok, bad], NEXT)


# ------------------------------------------------------------------------------------------------------- dtypes
def test_non_uint8_advice_fits_the_value_range():
    """Non-uint8 images are refused; the advice used to be "(x * 255).round().clamp(0, 255)" whatever the data, which
    turns a float image already in [0, 255] (what cv2 / float conversions of uint8 give) into a white one."""
    ok = torch.zeros(3, 8, 8, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    unit, full = torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g) * 255
    for fn in (preprocess_images, encode_tiles):
        with pytest.raises(ValueError, match=r"images\[1\].*float32.*\[0, 1\].*\(x \* 255\)"):
            fn([ok, unit], NEXT)
        with pytest.raises(ValueError, match=r"images\[1\].*float32.*x\.round\(\)\.clamp\(0, 255\)") as e:
            fn([ok, full], NEXT)
        assert "x * 255" not in str(e.value)
        with pytest.raises(ValueError, match=r"images\[0\].*uint16.*values reach 4000") as e:
            fn([np.full((8, 8, 3), 4000, np.uint16)], NEXT)
        assert "x * 255" not in str(e.value)


# ------------------------------------------------------------------------------------------------------- video
def test_numpy_video_is_accepted_and_matches_transformers():
    """Video decoders (decord, PyAV, cv2) return numpy (F, H, W, C) arrays; preprocess_video refused them although its
    docstring promises (F, H, W, C) and transformers' video processor takes them."""
    rng = np.random.default_rng(5)
    video = rng.integers(0, 256, (3, 30, 44, 3), dtype=np.uint8)
    got = preprocess_video(video, OV)
    assert torch.equal(got, preprocess_video(torch.from_numpy(video), OV))
    assert torch.equal(preprocess_video(video[:, ::-1], OV), preprocess_video(torch.from_numpy(video).flip(1), OV))
    tf = pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    proc_cls = getattr(tf, "LlavaOnevisionVideoProcessor", None)
    if proc_cls is None:
        pytest.skip("no LlavaOnevisionVideoProcessor")
    proc = proc_cls(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = proc(videos=[video], return_tensors="pt")["pixel_values_videos"][0]
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------------------- strips
def _strip(h, w):
    return torch.full((3, 1, 1), 90, dtype=torch.uint8).expand(3, h, w)  # no memory for the pixels


@pytest.mark.parametrize("entry", ["preprocess_images", "encode_tiles", "encode_tiles_float"])
def test_strips_whose_buffers_dwarf_the_image_are_refused(entry):
    """Thin strips pass max_pixels but make the resampling allocate many times more: OneVision's multi-image path
    pads a 1 x N strip to an N x N canvas (transformers and the reference materialize it: a 1 x 100000 strip, 100k
    pixels, is a 30 GB canvas; the C++ encoder walks its N rows instead: 12 s at N = 50000, hours at N = 10^6), and
    a tall N x 1 strip resized to a tile keeps an N x T intermediate (torch resizes horizontally first: 6 GB at
    N = 5 * 10^6). Now a ValueError naming the image when a buffer exceeds 4 x max(max_pixels, the largest tile
    canvas), a limit no image with an aspect ratio up to 4:1 reaches."""
    fn = {"preprocess_images": preprocess_images, "encode_tiles": encode_tiles,
          "encode_tiles_float": lambda *a, **k: encode_tiles(*a, resample="float", **k)}[entry]
    if entry != "preprocess_images" and not _ext.HAS_EXT:
        pytest.skip("llava_fast._C not built")
    ok = torch.zeros(3, 20, 20, dtype=torch.uint8)
    ov, nxt, l15 = (ImageProcessorConfig.for_variant(v, max_pixels=10_000)
                    for v in ("llava_onevision", "llava_next", "llava"))
    assert (anyres.work_limit(ov), anyres.work_limit(nxt), anyres.work_limit(l15)) == \
        (4 * 2304 ** 2, 4 * 672 ** 2, 4 * 336 ** 2)
    with pytest.raises(ValueError, match=r"images\[3\].*6000x6000 pad-to-square canvas.*limit of 21233664"):
        fn([[ok, ok], [ok, _strip(1, 6000)]], ov)  # 6000 pixels
    with pytest.raises(ValueError, match=r"images\[1\].*8000x1 image needs a 8000x336 resize intermediate"):
        fn([ok, _strip(8000, 1)], nxt)  # the base tile
    with pytest.raises(ValueError, match=r"images\[0\].*336x672000 resized image"):
        fn([_strip(1, 2000)], l15)  # before the centre crop
    # with the default limit (100M pixels): a 1 x 30000 strip in a multi-image sample, a 1.5M x 1 strip
    with pytest.raises(ValueError, match=r"images\[1\].*30000x30000 pad-to-square canvas"):
        fn([[ok, _strip(1, 30000)]], OV)
    with pytest.raises(ValueError, match=r"images\[0\].*1500000x1 image needs a 1500000x384 resize intermediate"):
        fn([_strip(1_500_000, 1)], OV)
    # what stays allowed: strips whose buffers fit, the same strips as single images, aspect ratios up to 4:1
    fine = [_strip(1, 200), _strip(200, 1), _strip(1, 5000), _strip(5000, 1), _strip(50, 200).contiguous(),
            _strip(200, 50)]
    for cfg in (ov, nxt):
        out = fn(fine, cfg)
        assert out["num_tiles"] == [cfg.num_tiles(tuple(x.shape[1:])) for x in fine]
    assert fn([[_strip(50, 200), _strip(200, 50), _strip(1, 4000)]], ov)["num_tiles"] == [1, 1, 1]
    assert fn([ok, _strip(20, 60), _strip(60, 20)], l15)["num_tiles"] == [1, 1, 1]
    for h, w in [(10000, 2500), (2500, 10000), (3000, 3333), (1, 1)]:
        for cfg, single in [(OV, True), (OV, False), (NEXT, False), (ImageProcessorConfig.for_variant("llava"), 0),
                            (ImageProcessorConfig.for_variant("llava", do_pad=True), 0)]:
            assert anyres.work_pixels((h, w), cfg, bool(single))[0] <= anyres.work_limit(cfg)
            anyres.check_work((h, w), cfg, bool(single))
    # no limit at all with max_pixels=None
    anyres.check_work((1, 10**7), ImageProcessorConfig.for_variant("llava_onevision", max_pixels=None), True)


def test_work_limit_never_refuses_moderate_aspect_ratios():
    """The second limit only bites on strips: every image with h * w <= max_pixels and an aspect ratio up to 4:1
    passes, for tiny and default max_pixels, every variant and path (AnyRes, multi-image, video frame)."""
    import math
    import random

    rng = random.Random(0)
    for mp in (100, 10_000, 10**6, 10**8):
        cfgs = [ImageProcessorConfig.for_variant(v, max_pixels=mp, **kw) for v, kw in
                [("llava_next", {}), ("llava_onevision", {}), ("llava", {}), ("llava", {"do_pad": True}),
                 ("llava_next", {"image_grid_pinpoints": [[336, 3360]]})]]
        for _ in range(300):
            r = math.exp(rng.uniform(-math.log(4), math.log(4)))
            area = rng.uniform(1, mp)
            h, w = max(1, int(math.sqrt(area * r))), max(1, int(math.sqrt(area / r)))
            if max(h, w) > 4 * min(h, w):  # rounding
                continue
            for cfg in cfgs:
                for single, frame in ((False, False), (True, False), (False, True)):
                    anyres.check_work((h, w), cfg, single, frame=frame)


def test_video_frames_with_huge_intermediates_are_refused():
    cfg = ImageProcessorConfig.for_variant("llava_onevision", max_pixels=1000)  # limit 4 * 2304^2
    with pytest.raises(ValueError, match=r"frames\[1\].*resize intermediate"):
        preprocess_video([torch.zeros(3, 20, 20, dtype=torch.uint8), _strip(1_000_000, 1)],
                         ImageProcessorConfig.for_variant("llava_onevision", max_pixels=10**6))
    assert preprocess_video([_strip(1000, 1), _strip(1, 1000)], cfg).shape == (2, 3, 384, 384)


# ------------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("size,crop", [({"shortest_edge": 384}, {"height": 336, "width": 336}),
                                       ({"height": 336, "width": 672}, {"height": 336, "width": 336}),
                                       ({"height": 384, "width": 384}, {"height": 336, "width": 336})])
def test_anyres_config_whose_resize_differs_from_the_tile_is_refused(size, crop):
    """transformers' NeXT/OneVision processors cut tiles of crop_size, then resize every tile (and the base image) to
    `size` and centre-crop it: with size != the tile the pixels are not the tiles we encode. Such configs were accepted
    with tile = crop_size and gave other pixels than transformers, without a word."""
    pytest.importorskip("torchvision")
    from transformers import LlavaNextImageProcessor

    hf = LlavaNextImageProcessor(image_grid_pinpoints=anyres.NEXT_PINPOINTS, size=size, crop_size=crop)
    x = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = hf([x], return_tensors="pt")["pixel_values"][0]
    assert not torch.equal(ref, preprocess_images([x], NEXT)["pixel_values"])  # what a tile-336 config gives
    with pytest.raises(ValueError, match=r"unsupported size="):
        ImageProcessorConfig.from_hf_processor(hf)
    with pytest.raises(ValueError, match=r"unsupported size="):
        ImageProcessorConfig.from_dict({"image_processor_type": "LlavaNextImageProcessor", "size": size,
                                        "crop_size": crop, "image_grid_pinpoints": anyres.NEXT_PINPOINTS})
    # the released layouts stay accepted, and give transformers' pixels
    for ok_size in ({"shortest_edge": 336}, {"height": 336, "width": 336}):
        hf = LlavaNextImageProcessor(image_grid_pinpoints=anyres.NEXT_PINPOINTS, size=ok_size, crop_size=crop)
        cfg = ImageProcessorConfig.from_hf_processor(hf)
        assert cfg.tile == 336
        assert torch.equal(preprocess_images([x], cfg)["pixel_values"], hf([x], return_tensors="pt")["pixel_values"][0])


# ------------------------------------------------------------------------------------------------------- pinpoints
@needs_ext
@pytest.mark.parametrize("variant,pins", [
    ("llava_next", [[336, 336]]),
    ("llava_next", [[336, 1344], [1008, 672], [672, 336], [336, 336]]),
    ("llava_onevision", [[384, 384]]),
    ("llava_onevision", [[384, 1152], [1152, 384], [768, 768], [1920, 1152]]),
], ids=["next_single", "next_odd", "ov_single", "ov_odd"])
def test_other_pinpoints_match_transformers(variant, pins):
    """Configs with one pinpoint or odd, unordered ones: tile counts (image_size_to_num_patches), token counts (the
    processors' _get_number_of_features) and pixels (torchvision backend, bit-exact) of the reference, the C++ encoder
    and the emulated GPU plan, on strips, tiny images and ordinary ones."""
    pytest.importorskip("torchvision")
    import transformers as tf
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = ImageProcessorConfig.for_variant(variant, image_grid_pinpoints=pins)
    t = cfg.tile
    if variant == "llava_next":
        hf = tf.LlavaNextImageProcessor(size={"shortest_edge": t}, crop_size={"height": t, "width": t},
                                        image_grid_pinpoints=pins)
        proc = tf.LlavaNextProcessor.__new__(tf.LlavaNextProcessor)
        proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    else:
        hf = tf.LlavaOnevisionImageProcessor(size={"height": t, "width": t}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, image_grid_pinpoints=pins)
        proc = tf.LlavaOnevisionProcessor.__new__(tf.LlavaOnevisionProcessor)
        proc.num_image_tokens, proc.vision_aspect_ratio, proc.vision_feature_select_strategy = 729, "anyres_max_9", \
            "full"
    proc.image_processor = hf
    gen = torch.Generator().manual_seed(len(pins))
    sizes = [(1, 1), (2, 1), (1, 700), (700, 1), (1, 3000), (5, 250), (20, 20), (335, 337), (500, 1000), (1234, 77)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    ours = preprocess_images(imgs, cfg)
    enc = encode_tiles(imgs, cfg, num_threads=2)
    emu = anyres.encode_tiles_emulated([anyres.to_uint8_chw(x, contiguous=False) for x in imgs], [False] * len(imgs),
                                       [1] * len(imgs), cfg, version=4)
    assert torch.equal(enc["pixel_values"], ours["pixel_values"])
    assert torch.equal(emu["pixel_values"], ours["pixel_values"])
    start = 0
    for (h, w), img, n, tok in zip(sizes, imgs, ours["num_tiles"], ours["num_image_tokens"]):
        ref = hf([img], return_tensors="pt", input_data_format="channels_first")["pixel_values"][0]
        assert n == ref.shape[0] == image_size_to_num_patches((h, w), pins, t), (h, w)
        assert torch.equal(ours["pixel_values"][start:start + n], ref), (h, w)
        hf_tok = proc._get_number_of_features(h, w, t, t) - (1 if variant == "llava_next" else 0)
        assert tok == hf_tok, (h, w)
        start += n
    assert enc["num_image_tokens"] == ours["num_image_tokens"] and enc["num_tiles"] == ours["num_tiles"]


def test_token_counts_match_the_real_processors():
    """End to end: the <image> placeholders transformers' LlavaNextProcessor / LlavaOnevisionProcessor expand a prompt
    to (tokenizer built in code) equal num_image_tokens, strips, tiny images and OneVision multi-image included."""
    pytest.importorskip("torchvision")
    tf = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 5, "<video>": 6, "hi": 7}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>",
                                      additional_special_tokens=["<image>", "<video>"])
    nxt = tf.LlavaNextProcessor(
        image_processor=tf.LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                   image_grid_pinpoints=anyres.NEXT_PINPOINTS),
        tokenizer=fast, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    ov = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                                        image_std=[0.5] * 3, image_grid_pinpoints=anyres.OV_PINPOINTS),
        video_processor=tf.LlavaOnevisionVideoProcessor(), tokenizer=fast, num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9", image_token="<image>", video_token="<video>",
        vision_feature_select_strategy="full")
    sizes = [(1, 1), (1, 3000), (3000, 1), (2, 3), (335, 337), (500, 1000), (820, 369), (1080, 1920), (77, 1234)]
    for proc, cfg in ((nxt, NEXT), (ov, OV)):
        for h, w in sizes:
            x = torch.zeros(3, 1, 1, dtype=torch.uint8).expand(3, h, w).contiguous()
            ids = proc(text=["hi <image>"], images=[x], return_tensors="pt")["input_ids"]
            assert int((ids == 5).sum()) == preprocess_images([x], cfg)["num_image_tokens"][0], (cfg.variant, h, w)
    xs = [torch.zeros(3, 300, 500, dtype=torch.uint8), torch.zeros(3, 1, 700, dtype=torch.uint8)]
    ids = ov(text=["<image> <image> hi"], images=[xs], return_tensors="pt")["input_ids"]
    assert int((ids == 5).sum()) == sum(preprocess_images([xs], OV)["num_image_tokens"]) == 1460


def test_geometry_helpers_take_image_sizes_rows():
    """`image_sizes` comes back as an int64 tensor (ours and transformers'): num_image_tokens(image_sizes[i]) raised
    TypeError ("type Tensor doesn't define __round__") in the unpadding step; numpy rows and int32 tensors too."""
    gen = torch.Generator().manual_seed(7)
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
            for h, w in [(500, 1000), (1000, 500), (37, 1201), (1, 900), (820, 369)]]
    for cfg in (NEXT, OV):
        out = preprocess_images(imgs, cfg)
        for i, row in enumerate(out["image_sizes"]):
            hw = tuple(row.tolist())
            for form in (row, row.to(torch.int32), row.numpy(), list(hw)):
                assert cfg.num_image_tokens(form) == out["num_image_tokens"][i] == cfg.num_image_tokens(hw)
                assert cfg.num_tiles(form) == out["num_tiles"][i]
                assert anyres.packed_feature_shape(form, cfg.image_grid_pinpoints, cfg.tile, cfg.tokens_per_side,
                                                   cfg.max_tiles) == \
                    anyres.packed_feature_shape(hw, cfg.image_grid_pinpoints, cfg.tile, cfg.tokens_per_side,
                                                cfg.max_tiles)
    with pytest.raises(ValueError, match=r"\(height, width\) pair"):
        NEXT.num_image_tokens(torch.tensor([3, 4, 5]))
