"""The GPU tile encoder (csrc/anyres/encode_kernel.cu), the patch-major layout and encoded-image inputs.

CPU-runnable: the kernels' element code emulated on the CPU (`_C.encode_tiles_emulate` runs the same functions of
csrc/anyres/encode_gpu.h over the same plan) against the C++ CPU encoder (uint8 arithmetic, bit-exact) and torch's
fp32 antialiased kernel (float arithmetic, <= 1 grey level); the patch layout against conv2d / unfold; decode_images
(JPEG, PNG, grey, RGBA, CMYK, corrupt, truncated, header over the pixel limit) through PIL.
`@pytest.mark.cuda`: the real kernels against the CPU encoder and transformers' torchvision backend with
device="cuda", the nvJPEG path, all dtypes, and no host synchronization.
"""
import dataclasses
import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_fast import _ext, backend
from llava_fast.ops import anyres
from llava_fast.ops.anyres import NEXT_PINPOINTS, ImageProcessorConfig, encode_tiles, preprocess_images

NEXT = ImageProcessorConfig.for_variant("llava_next")
OV = ImageProcessorConfig.for_variant("llava_onevision")
L15 = ImageProcessorConfig.for_variant("llava")
L15_PAD = ImageProcessorConfig.for_variant("llava", do_pad=True)
CFGS = {"llava": L15, "llava_pad": L15_PAD, "next": NEXT, "ov": OV}

needs_plan = pytest.mark.skipif(not (_ext.HAS_EXT and hasattr(_ext._C, "encode_tiles_emulate")),
                                reason="llava_fast._C (with the GPU encoder plan) not built")
needs_cuda_ext = pytest.mark.skipif(not anyres._cuda_encoder_available(),
                                    reason="llava_fast._C built without CUDA (nvcc missing at build time)")


def _smooth_noisy(h, w, gen):
    """Photo-like test image: gradients plus noise, (3, H, W) uint8."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx * 255, yy * 255, (1 - xx * yy) * 255])
    return (base + torch.randn(3, h, w, generator=gen) * 30).clamp(0, 255).to(torch.uint8)


def _grey_err(a, b, std):
    """Max difference in grey levels (normalized values times 255*std) of (..., 3, H, W) tensors."""
    s = torch.tensor(std, dtype=torch.float64)[:, None, None] * 255
    return ((a.double().cpu() - b.double().cpu()) * s).abs().max().item()


def _variety(gen):
    """Small images in every input form the encoder reads in place: CHW, HWC view, crop view, grey, RGBA."""
    a = _smooth_noisy(120, 250, gen)                       # CHW contiguous
    b = _smooth_noisy(90, 60, gen).permute(1, 2, 0).contiguous()   # HWC
    c = _smooth_noisy(200, 310, gen)[:, 13:170, 7:301]     # strided crop view
    d = torch.randint(0, 256, (77, 41), dtype=torch.uint8, generator=gen)  # grey HW (expanded, stride 0)
    e = torch.randint(0, 256, (50, 70, 4), dtype=torch.uint8, generator=gen)  # RGBA HWC
    f = _smooth_noisy(1, 300, gen)                         # strip
    g = _smooth_noisy(336, 336, gen)                       # exact tile (identity axes)
    return [a, b, c, d, e, f, g]


def _emulate(images, cfg, dtype=torch.float32, layout="tiles", resample="uint8", multi_image=None, version=1,
             band_rows=None, table_cache=None):
    flat, flags, counts = anyres._flatten_samples(images, multi_image)
    if cfg.variant != "llava_onevision":
        flags = [False] * len(flat)
    u8s = [anyres.to_uint8_chw(x, i, contiguous=False) for i, x in enumerate(flat)]
    return anyres.encode_tiles_emulated(u8s, flags, counts, cfg, dtype, layout, resample, version=version,
                                        band_rows=band_rows, table_cache=table_cache)


VERSIONS = pytest.mark.parametrize("version", anyres.GPU_ENCODER_VERSIONS, ids=lambda v: f"v{v}")


def _resize_f32(image, size):
    """torch's fp32 antialiased bicubic + clamp + round half to even: torchvision's non-CPU path, here on CPU."""
    h, w = int(size[0]), int(size[1])
    if tuple(image.shape[-2:]) == (h, w):
        return image
    x = image if image.dim() == 4 else image[None]
    y = F.interpolate(x.contiguous().float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    y = y.clamp_(0, 255).round_().to(torch.uint8)
    return y if image.dim() == 4 else y[0]


# ---------------------------------------------------------------------------------------------------------- emulation
@needs_plan
@pytest.mark.parametrize("name", ["llava", "llava_pad", "next", "ov"])
@VERSIONS
def test_emulated_kernels_uint8_bit_exact_vs_cpu_encoder(version, name):
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(1)
    imgs = _variety(gen)
    if cfg is L15:  # a 1-px strip makes a 336 x 100800 intermediate there: keep it out of the fast test
        imgs = [x for x in imgs if min(x.shape[-2:]) > 1 and min(x.shape[:2]) > 1]
    ref = encode_tiles(imgs, cfg)
    got = _emulate(imgs, cfg, version=version)
    assert got["num_tiles"] == ref["num_tiles"] and got["num_image_tokens"] == ref["num_image_tokens"]
    assert torch.equal(got["image_sizes"], ref["image_sizes"])
    assert _grey_err(got["pixel_values"], ref["pixel_values"], cfg.image_std) <= 1.0 + 1e-3
    assert torch.equal(got["pixel_values"], ref["pixel_values"])  # same arithmetic as the CPU encoder


@needs_plan
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@VERSIONS
def test_emulated_kernels_dtypes_and_multi_image(version, dtype):
    gen = torch.Generator().manual_seed(2)
    samples = [[_smooth_noisy(300, 500, gen), _smooth_noisy(64, 48, gen)], [_smooth_noisy(200, 90, gen)]]
    ref = encode_tiles(samples, OV, dtype=dtype)
    got = _emulate(samples, OV, dtype=dtype, version=version)
    assert got["num_tiles"] == ref["num_tiles"] and got["num_tiles"][:2] == [1, 1]
    assert got["pixel_values"].dtype == dtype
    assert torch.equal(got["pixel_values"], ref["pixel_values"])


@needs_plan
@pytest.mark.parametrize("name", ["llava_pad", "next", "ov"])
@VERSIONS
def test_emulated_kernels_float_match_torch_fp32_kernel(version, name, monkeypatch):
    """resample="float" is torch's fp32 kernel + clamp + round (torchvision on CUDA): compare with the reference
    whose resize is switched to that arithmetic on the CPU."""
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(3)
    imgs = _variety(gen)
    got = _emulate(imgs, cfg, resample="float", version=version)
    monkeypatch.setattr(anyres, "resize_bicubic_u8", _resize_f32)
    ref = preprocess_images(imgs, cfg)
    assert got["num_tiles"] == ref["num_tiles"]
    s = torch.tensor(cfg.image_std, dtype=torch.float64)[:, None, None] * 255
    d = ((got["pixel_values"].double() - ref["pixel_values"].double()) * s).abs()
    assert d.max().item() <= 1.0 + 1e-3
    # CPU and CUDA fp32 kernels sum in the same order; only float rounding of weights can flip a .5 tie
    assert (d > 0.5).double().mean().item() < 1e-3


@needs_plan
@pytest.mark.parametrize("resample", ["uint8", "float"])
@pytest.mark.parametrize("name", ["llava_pad", "next", "ov"])
def test_emulated_v2_v3_v4_equal_v1(name, resample):
    """v2's kernels (row staged in shared memory, four outputs per thread), v3's (v2 with four source rows per
    pass-1 block) and v4's (one launch, bands of output rows staged in shared memory) compute v1's expressions in
    v1's order: the same bits for every input layout (HWC rows, planar rows, padded canvases, strided views), both
    arithmetics, output rows whose length is not a multiple of four (tile 30), jobs whose source row count is not a
    multiple of four (the last v3 block of a job is partial), and v4 bands of 1, 3, 7 and 32 rows (bands that do not
    divide the tile, the last one short). Each power-of-two band is also checked against the plan's shared-memory
    bound (the emulation raises when a band needs more intermediate rows than `band_need` promised)."""
    gen = torch.Generator().manual_seed(6)
    imgs = _variety(gen) + [_smooth_noisy(40, 900, gen), _smooth_noisy(1400, 60, gen)]  # 1:22 and 23:1 downscales
    cfg = CFGS[name]
    small = dict(tile=30, patch_size=10, image_grid_pinpoints=None if cfg.variant == "llava" else
                 [(30, 60), (60, 30), (60, 60)], shortest_edge=30 if cfg.variant == "llava" else None)
    for c in (cfg, dataclasses.replace(cfg, **small)):
        for dtype in (torch.float32, torch.bfloat16):
            a = _emulate(imgs, c, dtype=dtype, resample=resample, version=1)["pixel_values"]
            for version, bands in ((2, [None]), (3, [None]), (4, [1, 3, 7, 32])):
                for bh in bands:
                    b = _emulate(imgs, c, dtype=dtype, resample=resample, version=version,
                                 band_rows=bh)["pixel_values"]
                    assert torch.equal(a, b), (name, resample, c.tile, dtype, version, bh)


@needs_plan
@pytest.mark.parametrize("name", ["next", "ov"])
def test_emulated_v4_patch_layout_with_a_tile_not_a_multiple_of_the_patch(name):
    """v4 writes the patch-major layout itself (one output per thread); rows and columns past (T // p) * p are not
    part of that layout and must not be written (they would land in the next tile)."""
    gen = torch.Generator().manual_seed(7)
    imgs = [_smooth_noisy(150, 260, gen), _smooth_noisy(90, 40, gen)]
    c = dataclasses.replace(CFGS[name], tile=32, patch_size=10, image_grid_pinpoints=[(32, 64), (64, 32), (64, 64)])
    a = _emulate(imgs, c, layout="patches", version=1)["pixel_values"]
    for bh in (1, 5, 32):
        b = _emulate(imgs, c, layout="patches", version=4, band_rows=bh)["pixel_values"]
        assert torch.equal(a, b), bh


@needs_plan
def test_v4_band_choice_and_fallback(monkeypatch):
    """The band is the tallest power of two whose staged intermediate (band_need rows x tile columns, one byte per
    value in the uint8 arithmetic, four in the float one) fits the shared-memory budget; none fitting runs v3."""
    gen = torch.Generator().manual_seed(8)
    u8s = [anyres.to_uint8_chw(_smooth_noisy(750, 1000, gen), 0, contiguous=False)]
    plans = {r: anyres._encoder_plan(u8s, [False], NEXT, r, "tiles") for r in ("uint8", "float")}
    need = plans["uint8"].band_need
    assert need == sorted(need) and need[0] >= 1
    assert need[5] >= 32 and need[5] <= 32 * 3 + 16, need  # ~3x downscale for the base tile: 31 x 3 + taps
    for r, esize in (("uint8", 1), ("float", 4)):
        for kb in (48, 16, 8):
            monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_SMEM_KB", str(kb))
            fits = [1 << k for k in range(6) if plans[r].band_need[k] * NEXT.tile * esize <= kb * 1024]
            assert anyres._resolve_version(plans[r], 4) == ((4, max(fits)) if fits else (3, 0)), (r, kb)
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_SMEM_KB", "48")
    assert anyres._resolve_version(plans["uint8"], 4) == (4, 32)  # the default budget holds the tallest band
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_SMEM_KB", "1")
    assert anyres._resolve_version(plans["float"], 4) == (3, 0)  # 1 KB holds no band of 336 fp32 columns
    assert anyres._resolve_version(plans["float"], 2) == (2, 0)
    for bad in ("0", "228", "lots"):
        monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_SMEM_KB", bad)
        with pytest.raises(ValueError, match="LLAVA_FAST_GPU_ENCODER_SMEM_KB must be an integer in"):
            anyres.gpu_encoder_smem_bytes()
    with pytest.raises(ValueError, match="band_rows"):
        anyres.encode_tiles_emulated(u8s, [False], [1], NEXT, version=2, band_rows=4)


@needs_plan
def test_uint8_and_float_arithmetic_differ_as_documented():
    """Not a bound we want, a fact we document: the uint8 kernel clamps the intermediate of the separable passes,
    the fp32 one does not, so next to saturated pixels they differ by several grey levels."""
    gen = torch.Generator().manual_seed(4)
    x = _smooth_noisy(500, 1000, gen)
    a = _emulate([x], NEXT)["pixel_values"]
    b = _emulate([x], NEXT, resample="float")["pixel_values"]
    err = _grey_err(a, b, NEXT.image_std)
    assert 1 < err < 64, err
    print(f"uint8 vs float arithmetic, NeXT 500x1000 photo-like: max {err:.1f} grey levels")


@needs_plan
@pytest.mark.parametrize("name", ["next", "ov"])
@VERSIONS
def test_emulated_patch_layout(version, name):
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(5)
    imgs = [_smooth_noisy(150, 260, gen), _smooth_noisy(90, 40, gen)]
    tiles = _emulate(imgs, cfg)["pixel_values"]
    patches = _emulate(imgs, cfg, layout="patches", version=version)["pixel_values"]
    g, p = cfg.tile // cfg.patch_size, cfg.patch_size
    assert patches.shape == (tiles.shape[0], g * g, 3 * p * p)
    assert torch.equal(patches, anyres.tiles_to_patches(tiles, p))


def test_gpu_encoder_version_switch(monkeypatch):
    monkeypatch.delenv("LLAVA_FAST_GPU_ENCODER", raising=False)
    assert anyres.gpu_encoder_version() == 4  # since session 10 (H200: 1.37x / 1.33x v2, its cuda tests passed)
    for v, want in (("v2", 2), ("2", 2), ("V1", 1)):
        monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", v)
        assert anyres.gpu_encoder_version() == want
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", "v5")
    with pytest.raises(ValueError, match="LLAVA_FAST_GPU_ENCODER must be one of v1, v2, v3, v4"):
        anyres.gpu_encoder_version()


@needs_plan
def test_plan_errors():
    C = _ext._C
    x = torch.zeros(3, 10, 10, dtype=torch.uint8)
    args = dict(ptrs=[x.data_ptr()], heights=[10], widths=[10], sy=[10], sx=[1], sc=[100], tile=384,
                shortest_edge=384, llava_pad=False, pinpoints=[(384, 384)], fill=[0, 0, 0], mean=[0.5] * 3,
                std=[0.5] * 3)
    with pytest.raises(ValueError, match="mode"):
        C.encode_plan(modes=[7], **args)
    with pytest.raises(ValueError, match="zero size"):
        C.encode_plan(modes=[0], **{**args, "heights": [0]})
    with pytest.raises(ValueError, match="multiple of tile"):
        C.encode_plan(modes=[0], **{**args, "pinpoints": [(300, 384)]})
    plan = C.encode_plan(modes=[0], **args)
    assert plan.total_tiles == 2 and list(plan.num_tiles) == [2] and plan.nbytes % 8 == 0
    out = torch.empty(plan.total_tiles * plan.tile_elems)
    with pytest.raises(ValueError, match="tiles but the images need 2"):
        C.encode_tiles_emulate(plan, 0, out.data_ptr(), 0, 1)


def test_plan_bytes_are_deterministic():
    """copy_to writes every plan byte (header, records and the weight tables taken from the cache) over whatever
    the destination held, padding included; two plans of the same batch are the same bytes, and the table cache
    does not change them (first call builds the tables, second reuses them)."""
    from llava_fast.ops import anyres

    imgs = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in ((750, 1000), (733, 1017), (40, 900), (1000, 750))]
    dumps = []
    for fill in (0x00, 0xFF):
        plan = anyres._encoder_plan(imgs, [False] * len(imgs), NEXT, "uint8", "tiles")
        buf = torch.full((plan.nbytes,), fill, dtype=torch.uint8)
        plan.copy_to(buf.data_ptr())
        dumps.append(buf)
    assert torch.equal(dumps[0], dumps[1])
    assert dumps[0].numel() > 100_000   # the tables are in there (tens of KB per image)


# ---------------------------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize("name", ["next", "ov"])
def test_patch_layout_is_the_patch_embedding_input(name):
    """layout="patches" == conv2d's input order: conv2d(tiles, W, stride=p) == patches @ W.view(D, -1).T,
    and == F.unfold(tiles, p, stride=p).transpose(1, 2) exactly (T=384, p=14 drops the last 6 rows/cols)."""
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(6)
    imgs = [_smooth_noisy(200, 333, gen), _smooth_noisy(80, 50, gen)]
    tiles = encode_tiles(imgs, cfg)["pixel_values"]
    patches = encode_tiles(imgs, cfg, layout="patches")["pixel_values"]
    p, g = cfg.patch_size, cfg.tile // cfg.patch_size
    assert patches.shape == (tiles.shape[0], g * g, 3 * p * p)
    assert torch.equal(patches, F.unfold(tiles, p, stride=p).transpose(1, 2))
    w = torch.randn(32, 3, p, p, generator=gen)
    conv = F.conv2d(tiles.double(), w.double(), stride=p).flatten(2).transpose(1, 2)  # (N, G*G, D)
    gemm = patches.double() @ w.double().view(32, -1).T
    torch.testing.assert_close(gemm, conv, rtol=1e-10, atol=1e-10)
    # reference path (no extension needed) gives the same layout
    ref = anyres._with_layout(preprocess_images(imgs, cfg), cfg, "patches", None, torch.device("cpu"))
    assert torch.equal(ref["pixel_values"], patches)


def test_patch_layout_out_buffer_and_argument_errors():
    gen = torch.Generator().manual_seed(7)
    imgs = [_smooth_noisy(100, 150, gen)]
    ref = encode_tiles(imgs, NEXT, layout="patches")["pixel_values"]
    buf = torch.full((ref.shape[0] + 1, 576, 588), 5.0)
    got = encode_tiles(imgs, NEXT, layout="patches", out=buf)["pixel_values"]
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, ref) and (buf[ref.shape[0]:] == 5).all()
    with pytest.raises(ValueError, match="out must be"):
        encode_tiles(imgs, NEXT, layout="patches", out=torch.empty(ref.shape[0], 3, 336, 336))
    with pytest.raises(ValueError, match="layout must be one of"):
        encode_tiles(imgs, NEXT, layout="nhwc")
    with pytest.raises(ValueError, match="resample must be one of"):
        encode_tiles(imgs, NEXT, resample="bilinear")


@needs_plan
def test_float_resample_on_cpu_uses_the_emulated_kernels():
    gen = torch.Generator().manual_seed(8)
    imgs = [_smooth_noisy(70, 120, gen)]
    a = encode_tiles(imgs, NEXT, resample="float")
    b = _emulate(imgs, NEXT, resample="float")
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_backend_registration():
    if anyres._cuda_encoder_available():
        assert backend.OPS["anyres_encode"] == "cuda"
    else:
        assert backend.OPS["anyres_encode"] is None
    assert not backend.use_fast("anyres_encode", "cpu")


# ---------------------------------------------------------------------------------------------------------- bytes
def _encode(img_chw, fmt, mode="RGB", **kw):
    import PIL.Image

    arr = img_chw.permute(1, 2, 0).numpy()
    im = PIL.Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pil_reference(data):
    import PIL.Image

    return anyres.to_uint8_chw(PIL.Image.open(io.BytesIO(data)))


def _png_header(w, h):
    """A PNG whose IHDR claims (w, h), followed by a tiny bogus IDAT: PIL reads the size without decoding."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", b"\x78\x9c\x00") + chunk(b"IEND", b"")


def test_decode_images_formats_match_pil():
    pytest.importorskip("PIL")
    gen = torch.Generator().manual_seed(9)
    x = _smooth_noisy(60, 90, gen)
    rgba = torch.cat([x, torch.randint(0, 256, (1, 60, 90), dtype=torch.uint8, generator=gen)])
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(rgba.permute(1, 2, 0).numpy(), "RGBA").save(buf, format="PNG")
    datas = [_encode(x, "JPEG", quality=90), _encode(x, "PNG"), _encode(x, "JPEG", "L"), _encode(x, "PNG", "L"),
             buf.getvalue(), _encode(x, "JPEG", "CMYK"), _encode(x, "PNG", "P"), bytearray(_encode(x, "WEBP"))]
    got = anyres.decode_images(datas)
    for k, (d, u) in enumerate(zip(datas, got)):
        assert u.dtype == torch.uint8 and u.shape == (3, 60, 90), k
        assert torch.equal(u, _pil_reference(bytes(d))), k
    assert torch.equal(got[1], x)  # PNG is lossless
    assert torch.equal(got[2][0], got[2][1]) and torch.equal(got[2][1], got[2][2])  # grey -> RGB
    # RGBA composited onto white as transformers does for PIL images (PIL's integer alpha_composite, which is
    # within 1 grey level of its float formula for tensors)
    assert (got[4].int() - anyres.to_uint8_chw(rgba).int()).abs().max().item() <= 1
    # encode_tiles takes bytes (mixed with tensors) and decodes them the same way
    mixed = encode_tiles([datas[0], x, datas[1]], NEXT)
    assert torch.equal(mixed["pixel_values"], encode_tiles([got[0], x, got[1]], NEXT)["pixel_values"])


def test_decode_images_errors_name_the_image():
    pytest.importorskip("PIL")
    gen = torch.Generator().manual_seed(10)
    x = _smooth_noisy(64, 64, gen)
    jpg, png = _encode(x, "JPEG"), _encode(x, "PNG")
    with pytest.raises(ValueError, match=r"images\[1\].*(corrupt|truncated)"):
        anyres.decode_images([jpg, b"this is not an image at all"])
    with pytest.raises(ValueError, match=r"images\[0\].*(corrupt|truncated)"):
        anyres.decode_images([jpg[: len(jpg) // 2]])
    with pytest.raises(ValueError, match=r"images\[2\].*(corrupt|truncated)"):
        anyres.decode_images([jpg, png, png[: len(png) - 30]])
    with pytest.raises(ValueError, match=r"images\[0\]: expected encoded image bytes"):
        anyres.decode_images([12])
    # the pixel guard reads the header only: a 12000 x 12000 PNG of 60 bytes is refused before any decoding
    with pytest.raises(ValueError, match=r"images\[1\]: 12000x12000 = 144000000 pixels exceeds max_pixels"):
        anyres.decode_images([png, _png_header(12000, 12000)])
    with pytest.raises(ValueError, match=r"images\[0\].*(max_pixels|decompression-bomb)"):
        anyres.decode_images([_png_header(40000, 40000)])
    with pytest.raises(ValueError, match=r"images\[0\]: 64x64 = 4096 pixels exceeds max_pixels=1000"):
        anyres.decode_images([png], max_pixels=1000)
    # through encode_tiles the index is the image's position in the batch
    with pytest.raises(ValueError, match=r"images\[2\]"):
        encode_tiles([x, png, _png_header(12000, 12000)], NEXT)


# ---------------------------------------------------------------------------------------------------------- cuda
@pytest.fixture(params=anyres.GPU_ENCODER_VERSIONS, ids=lambda v: f"gpu_v{v}")
def gpu_version(request, monkeypatch):
    """Runs a CUDA test once per GPU encoder version (LLAVA_FAST_GPU_ENCODER)."""
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", f"v{request.param}")
    return request.param


def _cuda_sizes():
    rng = random.Random(11)
    out = {(rng.randint(2, 2500), rng.randint(2, 2500)) for _ in range(24)}
    out |= {(336, 336), (335, 335), (200, 300), (300, 200), (1, 1), (14, 14), (384, 384), (672, 672), (336, 1008),
            (1, 700), (700, 1), (3, 250), (1, 5000), (2160, 3840), (3840, 2160), (750, 1000), (1000, 750),
            (820, 369), (656, 205), (1080, 1920), (899, 1024), (500, 1000), (1000, 500), (385, 383), (2304, 2304)}
    return sorted(out)


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("name", ["llava", "llava_pad", "next", "ov"])
def test_cuda_encoder_matches_cpu_encoder(name, gpu_version):
    """uint8 arithmetic on the GPU == the C++ CPU encoder (== transformers' torchvision backend on CPU), ~50 sizes
    (ties, strips, 4k), in two batches and in every input form."""
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(12)
    sizes = _cuda_sizes()
    if cfg is L15:  # 1-px strips: the shortest-edge resize makes a 336 x 1.7M intermediate (see preprocessing.md)
        sizes = [s for s in sizes if min(s) > 3]
    imgs = [_smooth_noisy(h, w, gen) for h, w in sizes]
    for batch in (imgs[: len(imgs) // 2], imgs[len(imgs) // 2:], _variety(gen)):
        cpu = encode_tiles(batch, cfg)
        gpu = encode_tiles([x.cuda() for x in batch], cfg)
        assert gpu["pixel_values"].is_cuda and gpu["num_tiles"] == cpu["num_tiles"]
        assert gpu["num_image_tokens"] == cpu["num_image_tokens"]
        assert torch.equal(gpu["image_sizes"].cpu(), cpu["image_sizes"])
        assert _grey_err(gpu["pixel_values"], cpu["pixel_values"], cfg.image_std) <= 1.0 + 1e-3
        assert torch.equal(gpu["pixel_values"].cpu(), cpu["pixel_values"])


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("resample", ["uint8", "float"])
def test_cuda_encoder_dtypes(dtype, resample, gpu_version):
    gen = torch.Generator().manual_seed(13)
    samples = [[_smooth_noisy(300, 500, gen), _smooth_noisy(640, 480, gen)], [_smooth_noisy(1080, 1920, gen)]]
    gpu = encode_tiles([[x.cuda() for x in s] for s in samples], OV, dtype=dtype, resample=resample)
    cpu = encode_tiles(samples, OV, dtype=dtype, resample=resample)  # float on CPU: the emulated kernels
    assert gpu["pixel_values"].dtype == dtype and gpu["num_tiles"] == cpu["num_tiles"]
    err = _grey_err(gpu["pixel_values"].float(), cpu["pixel_values"].float(), OV.image_std)
    assert err <= 1.0 + 1e-3
    if resample == "uint8":
        assert torch.equal(gpu["pixel_values"].cpu(), cpu["pixel_values"])


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("resample", ["uint8", "float"])
def test_cuda_v4_shared_memory_budgets(resample, monkeypatch):
    """v4 at several shared-memory budgets (this batch's band_need is [24, 30, 42, 66, 114, 210] rows for bands of
    1..32): 2 KB (no band fits: v3 runs), 12 KB (uint8 2-row bands; float v3), 48 KB (uint8 16 rows, float 2) and 150
    KB (the opt-in above 48 KB: uint8 32 rows, float 8): the same bits as v2 on the GPU (the same per-value code, so
    the same FMA contractions), and uint8 equal to the C++ CPU encoder."""
    gen = torch.Generator().manual_seed(16)
    imgs = [_smooth_noisy(h, w, gen) for h, w in ((750, 1000), (1080, 1920), (200, 90), (1, 700), (2304, 2304))]
    cfg = OV
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", "v2")
    ref = encode_tiles([x.cuda() for x in imgs], cfg, resample=resample)["pixel_values"]
    if resample == "uint8":
        assert torch.equal(ref.cpu(), encode_tiles(imgs, cfg)["pixel_values"])
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", "v4")
    for kb in (2, 12, 48, 150):
        monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_SMEM_KB", str(kb))
        got = encode_tiles([x.cuda() for x in imgs], cfg, resample=resample)["pixel_values"]
        assert torch.equal(got, ref), kb


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("name", ["llava", "llava_pad", "next", "ov"])
def test_cuda_encoder_float_matches_hf_torchvision_cuda(name, gpu_version):
    """resample="float" vs transformers' torchvision backend with device="cuda": within 1 grey level."""
    pytest.importorskip("torchvision")
    import transformers

    cls = {"llava": "CLIPImageProcessor", "llava_pad": "LlavaImageProcessor", "next": "LlavaNextImageProcessor",
           "ov": "LlavaOnevisionImageProcessor"}[name]
    cfg = CFGS[name]
    if name == "ov":
        kw = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        kw = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    if name == "next":
        kw["image_grid_pinpoints"] = NEXT_PINPOINTS
    if name == "llava_pad":
        kw["do_pad"] = True
    proc = getattr(transformers, cls)(**kw)
    gen = torch.Generator().manual_seed(14)
    sizes = [s for s in _cuda_sizes() if min(s) > 3][::2]
    worst = 0.0
    for h, w in sizes:
        x = _smooth_noisy(h, w, gen).cuda()
        ref = proc([x], return_tensors="pt", device="cuda")["pixel_values"]
        ref = ref.reshape(-1, *ref.shape[-3:])
        ours = encode_tiles([x], cfg, resample="float")["pixel_values"]
        assert ours.shape == ref.shape, (h, w)
        err = _grey_err(ours, ref, cfg.image_std)
        worst = max(worst, err)
        assert err <= 1.0 + 1e-3, f"{name} {h}x{w}: {err} grey levels"
    print(f"{name}: max difference to HF torchvision device='cuda' {worst:.3g} grey levels over {len(sizes)} sizes")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("name", ["next", "ov"])
def test_cuda_patch_layout(name, gpu_version):
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(15)
    imgs = [_smooth_noisy(500, 1000, gen).cuda(), _smooth_noisy(2160, 3840, gen).cuda()]
    tiles = encode_tiles(imgs, cfg)["pixel_values"]
    patches = encode_tiles(imgs, cfg, layout="patches")["pixel_values"]
    assert torch.equal(patches, anyres.tiles_to_patches(tiles, cfg.patch_size))
    w = torch.randn(64, 3, cfg.patch_size, cfg.patch_size, device="cuda", dtype=torch.float64)
    conv = F.conv2d(tiles.double(), w, stride=cfg.patch_size).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches.double() @ w.view(64, -1).T, conv, rtol=1e-10, atol=1e-10)
    cpu = encode_tiles([x.cpu() for x in imgs], cfg, layout="patches")["pixel_values"]
    assert torch.equal(patches.cpu(), cpu)


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_encoder_no_host_sync_and_out_buffer(gpu_version):
    gen = torch.Generator().manual_seed(16)
    imgs = [_smooth_noisy(h, w, gen).cuda() for h, w in [(500, 1000), (750, 1000), (1, 700), (1080, 1920)]]
    ref = encode_tiles(imgs, NEXT, dtype=torch.bfloat16)  # warm-up: pinned pool, caches
    total = sum(ref["num_tiles"])
    buf = torch.zeros(total + 1, 3, 336, 336, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = encode_tiles(imgs, NEXT, dtype=torch.bfloat16, out=buf)
        got_p = encode_tiles(imgs, NEXT, dtype=torch.bfloat16, layout="patches")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got["pixel_values"].data_ptr() == buf.data_ptr()
    assert torch.equal(got["pixel_values"], ref["pixel_values"]) and (buf[total:] == 0).all()
    assert torch.equal(got_p["pixel_values"], anyres.tiles_to_patches(ref["pixel_values"], 14))
    with pytest.raises(ValueError, match="out must be"):
        encode_tiles(imgs, NEXT, dtype=torch.float32, out=buf)


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_v2_wide_image_falls_back_to_v1_pass1(monkeypatch):
    """A source row wider than v2's shared-memory staging (kV2MaxSpan = 16384 columns) runs v1's pass 1."""
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", "v2")
    gen = torch.Generator().manual_seed(18)
    imgs = [_smooth_noisy(40, 17000, gen), _smooth_noisy(300, 500, gen)]
    cpu = encode_tiles(imgs, NEXT)
    gpu = encode_tiles([x.cuda() for x in imgs], NEXT)
    assert torch.equal(gpu["pixel_values"].cpu(), cpu["pixel_values"])


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_backend_switch(monkeypatch):
    gen = torch.Generator().manual_seed(17)
    x = _smooth_noisy(500, 1000, gen).cuda()
    fast = encode_tiles([x], NEXT, resample="float")["pixel_values"]
    backend.set_backend("anyres_encode", "reference")
    try:
        ref = encode_tiles([x], NEXT)["pixel_values"]  # torch ops on the GPU (fp32 kernel)
    finally:
        backend.set_backend("anyres_encode", "auto")
    assert _grey_err(fast, ref, NEXT.image_std) <= 1.0 + 1e-3


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_jpeg_decode_path():
    pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(18)
    xs = [_smooth_noisy(480, 640, gen), _smooth_noisy(1000, 750, gen), _smooth_noisy(37, 91, gen)]
    datas = [_encode(xs[0], "JPEG", quality=92), _encode(xs[1], "JPEG", "L"), _encode(xs[2], "PNG"),
             _encode(xs[0], "JPEG", "CMYK")]
    gpu = anyres.decode_images(datas, device="cuda")
    cpu = anyres.decode_images(datas)
    sources = [xs[0], xs[1], xs[2], xs[0]]
    for k, (g, c, src) in enumerate(zip(gpu, cpu, sources)):
        assert g.is_cuda and g.dtype == torch.uint8 and g.shape == c.shape, k
        # nvJPEG and libjpeg-turbo are both lossy decoders of the same file: they differ by the IDCT and, with 4:2:0
        # chroma, by the upsampling (libjpeg's "fancy" triangle filter vs nvJPEG's): on this noisy image, 5.1 grey
        # levels on average and 43 at most (H200, torchvision 0.26; docs/preprocessing.md). The flash-attn rule on
        # the decoded pixels: nvJPEG's error against the source image is at most twice libjpeg's.
        if k == 1:  # saved as "L": the source is PIL's grey conversion of the image, as RGB
            import PIL.Image
            grey = PIL.Image.fromarray(src.permute(1, 2, 0).numpy(), "RGB").convert("L").convert("RGB")
            src = torch.from_numpy(np.asarray(grey).copy()).permute(2, 0, 1)
        e_gpu = (g.cpu().float() - src.float()).abs().mean().item()
        e_cpu = (c.float() - src.float()).abs().mean().item()
        print(f"image {k}: mean |gpu - source| {e_gpu:.2f}, |cpu - source| {e_cpu:.2f}, "
              f"|gpu - cpu| {(g.cpu().float() - c.float()).abs().mean().item():.2f}")
        assert e_gpu <= 2 * e_cpu, (k, e_gpu, e_cpu)
    assert torch.equal(gpu[2].cpu(), xs[2])  # PNG: lossless, CPU-decoded then copied
    enc = encode_tiles(datas, NEXT, device="cuda")
    assert torch.equal(enc["pixel_values"], encode_tiles(gpu, NEXT)["pixel_values"])
    with pytest.raises(ValueError, match=r"images\[1\].*(corrupt|truncated)"):
        anyres.decode_images([datas[0], datas[0][: len(datas[0]) // 2]], device="cuda")
    with pytest.raises(ValueError, match=r"images\[0\].*max_pixels"):
        anyres.decode_images([_png_header(12000, 12000)], device="cuda")


def test_jpeg_gpu_route_without_a_gpu(monkeypatch):
    """decode_images' GPU route, with the nvJPEG decoder replaced by torchvision's CPU decoder: the JPEGs reach the
    decoder as zero-copy uint8 views of the caller's bytes (no per-image copy), without a warning, and come back as
    the CPU path decodes them; other formats still go through PIL."""
    tv = pytest.importorskip("torchvision.io")
    import warnings

    gen = torch.Generator().manual_seed(19)
    xs = [_smooth_noisy(48, 64, gen), _smooth_noisy(30, 20, gen)]
    datas = [_encode(xs[0], "JPEG", quality=92), _encode(xs[1], "PNG")]
    seen = []

    def fake(tensors, dev):
        for t in tensors:
            seen.append(t)
        return [tv.decode_jpeg(t, mode=tv.ImageReadMode.RGB) for t in tensors]

    monkeypatch.setattr(anyres, "_gpu_jpeg_decoder", lambda: fake)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # "copy to the GPU" for the PIL-decoded PNG
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch.frombuffer's "not writable" warning would be one
        out = anyres.decode_images(datas, device="cuda:0")
    assert len(seen) == 1 and seen[0].dtype == torch.uint8 and seen[0].numel() == len(datas[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert seen[0].data_ptr() == torch.frombuffer(datas[0], dtype=torch.uint8).data_ptr()  # the same memory
    monkeypatch.undo()
    ref = anyres.decode_images(datas)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_jpeg_header_parser_agrees_with_pil():
    """The JPEG header fast path gives PIL's (height, width, mode) for baseline, progressive, grey, CMYK, optimized,
    restart-interval and EXIF-carrying files, and declines (None: PIL reads it) anything else, including truncated
    and garbled headers; it never reads past the data."""
    import PIL.Image

    gen = torch.Generator().manual_seed(21)
    x = _smooth_noisy(37, 91, gen)
    img = PIL.Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation
    cases = []
    for mode, kw in [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}),
                     ("RGB", {"optimize": True, "quality": 50}), ("RGB", {"restart_marker_blocks": 1}),
                     ("RGB", {"exif": exif.tobytes()}), ("RGB", {"subsampling": 0})]:
        buf = io.BytesIO()
        img.convert(mode).save(buf, format="JPEG", **kw)
        cases.append(buf.getvalue())
    for k, data in enumerate(cases):
        pil = PIL.Image.open(io.BytesIO(data))
        got = anyres._jpeg_header(data)
        assert got == (pil.size[1], pil.size[0], pil.mode), (k, got, pil.size, pil.mode)
        assert anyres._probe(data, k, None) == ("JPEG", (pil.size[1], pil.size[0]), pil.mode)
    good = cases[0]
    png = _encode(x, "PNG")
    for bad in [b"", b"\xff", b"\xff\xd8", good[:3], good[:20], b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\x00\x00",
                b"\xff\xd8\xff\xc0\x00\x01" + b"\x00" * 8, png, good[:2] + b"\xff\xc0\x00\x11\x0c" + good[7:]]:
        assert anyres._jpeg_header(bad) is None, bad[:12]
    with pytest.raises(ValueError, match=r"images\[3\].*max_pixels"):
        anyres._probe(good, 3, 100)


@needs_plan
@pytest.mark.parametrize("name", ["llava", "next", "ov"])
def test_token_counts_from_the_plan(name):
    """The encoders' result counts each image's LLM tokens from the AnyRes best resolution the plan already chose
    (anyres._tokens_from_best, session 15: no second grid search per image). Equal to config.num_image_tokens over
    ~700 sizes: random, squares, ties between pinpoints, images smaller than a tile, 1 x N and N x 1 strips, 4k photos,
    and OneVision's single-tile (multi-image) flag. The plan reads no pixels: a fake pointer stands in for them."""
    cfg = CFGS[name]
    rng = random.Random(7)
    sizes = [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(500)]
    sizes += [(s, s) for s in (1, 2, 13, 335, 336, 337, 671, 672, 673, 1008, 1344)]
    sizes += [(1, n) for n in (2, 50, 700, 4000)] + [(n, 1) for n in (2, 50, 700, 4000)]
    sizes += [(336 * a, 336 * b) for a in (1, 2, 3) for b in (1, 2, 3)] + [(2160, 3840), (3840, 2160), (3024, 4032)]
    sizes += [(rng.randint(700, 800), rng.randint(950, 1050)) for _ in range(150)]
    flags = [name == "ov" and i % 5 == 0 for i in range(len(sizes))]
    modes = anyres._modes(cfg, flags, len(sizes))
    pins = [tuple(p) for p in cfg.image_grid_pinpoints or []]
    n = len(sizes)
    plan = _ext._C.encode_plan(
        [1] * n, [h for h, _ in sizes], [w for _, w in sizes], [w * 3 for _, w in sizes], [3] * n, [1] * n, modes,
        cfg.tile, cfg.shortest_edge, bool(cfg.variant == "llava" and cfg.do_pad), pins,
        list(anyres.fill_colour(cfg.image_mean)), list(cfg.image_mean), list(cfg.image_std), 0, 0)
    got = anyres._tokens_from_best(sizes, flags, plan.best_h, plan.best_w, cfg)
    want = [cfg.num_image_tokens(hw, single_tile=f) for hw, f in zip(sizes, flags)]
    assert got == want
    if name != "llava":
        assert all((b > 0) == (not f) for b, f in zip(plan.best_h, flags))
        res = anyres._result(None, sizes, plan.num_tiles, flags, [n], cfg, torch.device("cpu"),
                             (plan.best_h, plan.best_w))
        assert res["num_image_tokens"] == want


@needs_plan
@pytest.mark.parametrize("resample", ["uint8", "float"])
@pytest.mark.parametrize("name", ["llava_pad", "next", "ov"])
def test_table_cache_reads_the_same_tables(name, resample):
    """LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB (anyres._TableCache, session 15): the plan's head with its axis records
    pointing at weight tables kept in blocks of their own (offsets from the head's address, negative for blocks
    below it) gives the kernels' element code the same bits as the whole plan, for every kernel version, both
    arithmetics, both layouts. A second call over a batch sharing some sizes uploads only the new tables (one block)
    and reuses the others in place; a budget below one batch's tables evicts, and the calls stay exact."""
    gen = torch.Generator().manual_seed(11)
    imgs = _variety(gen)
    more = [_smooth_noisy(120, 250, gen), _smooth_noisy(333, 500, gen)]   # one size seen before, one new
    cfg = CFGS[name]
    cache = anyres._TableCache(64 << 20)
    for version in anyres.GPU_ENCODER_VERSIONS:
        for layout in ("tiles", "patches"):
            want = _emulate(imgs, cfg, resample=resample, version=version, layout=layout)["pixel_values"]
            got = _emulate(imgs, cfg, resample=resample, version=version, layout=layout,
                           table_cache=cache)["pixel_values"]
            assert torch.equal(want, got), (version, layout)
    n_tables, blocks = len(cache.entries), {id(e[0]) for e in cache.entries.values()}
    assert n_tables > 0 and len(blocks) == 1    # the first call uploaded every table in one block
    addr = {k: e[0].data_ptr() + e[1] for k, e in cache.entries.items()}
    want = _emulate(more, cfg, resample=resample, version=4)["pixel_values"]
    got = _emulate(more, cfg, resample=resample, version=4, table_cache=cache)["pixel_values"]
    assert torch.equal(want, got)
    assert all(cache.entries[k][0].data_ptr() + cache.entries[k][1] == a for k, a in addr.items())  # reused
    assert len(cache.entries) > n_tables and len({id(e[0]) for e in cache.entries.values()}) == 2
    tiny = anyres._TableCache(1)                 # every table evicted at the end of each call
    for _ in range(2):
        got = _emulate(imgs, cfg, resample=resample, version=4, table_cache=tiny)["pixel_values"]
        assert torch.equal(_emulate(imgs, cfg, resample=resample, version=4)["pixel_values"], got)
        assert len(tiny.entries) == 0 and tiny.nbytes == 0


@needs_plan
def test_table_cache_setting(monkeypatch):
    """The cache is off by default (0 MB); a size in MB turns it on per (device, stream); a bad value names the
    variable."""
    monkeypatch.delenv("LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB", raising=False)
    assert anyres._table_cache(torch.device("cpu"), 0) is None
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB", "8")
    a = anyres._table_cache(torch.device("cpu"), 0)
    assert a is not None and a.budget == 8 << 20 and anyres._table_cache(torch.device("cpu"), 0) is a
    assert anyres._table_cache(torch.device("cpu"), 1) is not a
    for bad in ("-1", "x", "1.5"):
        monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB", bad)
        with pytest.raises(ValueError, match="LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB"):
            anyres._table_cache(torch.device("cpu"), 0)


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("name", ["next", "ov"])
def test_cuda_table_cache(name, monkeypatch):
    """On a GPU: the encoder with its weight tables cached on the device (records pointing outside the uploaded
    head) equals the encoder without, on the first call (every table uploaded) and on the next ones (tables read
    where the first call left them), and over a batch that adds sizes; eviction under a tiny budget too."""
    gen = torch.Generator().manual_seed(12)
    imgs = [x.cuda() for x in _variety(gen)]
    more = imgs[:3] + [_smooth_noisy(333, 500, gen).cuda()]
    cfg = CFGS[name]
    monkeypatch.delenv("LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB", raising=False)
    want = [encode_tiles(b, cfg, dtype=torch.bfloat16)["pixel_values"] for b in (imgs, more)]
    for mb in ("64", "1"):
        monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB", mb)
        anyres._TABLE_CACHES.clear()
        for _ in range(2):
            for w, b in zip(want, (imgs, more)):
                assert torch.equal(encode_tiles(b, cfg, dtype=torch.bfloat16)["pixel_values"], w), mb
    anyres._TABLE_CACHES.clear()
