"""Image preprocessing throughput (images/s): uint8 images -> normalized tiles, LLaVA-NeXT and OneVision.

Providers (each measured in this run, same images):
  hf_pil            transformers' PIL backend (LlavaNextImageProcessorPil / LlavaOnevisionImageProcessorPil),
                    HWC numpy in
  hf_torchvision    transformers' default torchvision backend on CPU (torch intra-op threads), CHW uint8 tensors in
  hf_torchvision_cuda  the same with device="cuda" (only with a GPU; includes the host->device copy of the uint8 images)
  reference         llava_fast.ops.anyres.preprocess_images (torch ops, CPU)
  llava_fast_1t     llava_fast C++ tile encoder (encode_tiles), 1 thread
  llava_fast        llava_fast C++ tile encoder, all cores
Workloads: 32 random images of 400-1200 px per side, 64 photo-sized images ~1000x750 (random gradients + noise).
Bytes per image = uint8 input + fp32 output tiles (reported as GB/s in the note).

GPU section (mode "gpu", only with a GPU; a batch of photo-sized images already on the GPU, or as JPEG bytes):
  hf_torchvision_cuda   transformers' torchvision backend, device="cuda", uint8 CUDA tensors in
  reference_cuda        llava_fast.ops.anyres.preprocess_images on the CUDA tensors (torch ops)
  llava_fast_cuda       llava_fast CUDA tile encoder (encode_tiles on CUDA tensors, resample="uint8")
  llava_fast_cuda_float the same with resample="float" (torch's fp32 arithmetic)
  nvjpeg_decode         torchvision.io.decode_jpeg(list, device="cuda") alone (the decode part of the next row)
  llava_fast_cuda_jpeg  JPEG bytes -> decode on the GPU -> CUDA tile encoder (encode_tiles(bytes, device="cuda"))
GB/s for the GPU rows = (uint8 pixels read + output tiles written) / time: the bytes the encoder must move. GPU rows
are timed with batches back to back (``--gpu-timing loop``, the default since session 4) or one batch on an idle GPU
(``eager``, what the 2026-11-26 H200 and H100 runs used).
Targets (docs/perf-notes.md, anyres section): >= 20x hf_torchvision_cuda (> 20,000 images/s on an H200) and >= 50% of the
copy bandwidth for those bytes.

Preprocessing runs in data-loader workers (CPU rows) or next to the model (GPU rows); the script runs on CPU-only
machines too. Usage: python benchmarks/bench_anyres.py [--quick] [--dtype bf16] [--no-pil] [--gpu-batch N]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import Row, add_ratios, bench, peak_memory, save, to_markdown  # noqa: E402

from llava_fast import _ext  # noqa: E402
from llava_fast.ops import anyres  # noqa: E402


def make_images(kind: str, n: int, seed: int) -> list[torch.Tensor]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "random":
            h, w = rng.randint(400, 1200), rng.randint(400, 1200)
        else:
            h, w = rng.randint(720, 780), rng.randint(960, 1040)
            if rng.random() < 0.25:
                h, w = w, h
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([xx * 255, yy * 255, (1 - xx * yy) * 255], -1)
        out.append((base + torch.randn(h, w, 3, generator=gen) * 20).clamp(0, 255).to(torch.uint8))  # HWC
    return out


def hf_processors(variant: str):
    try:
        from transformers import LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil
    except ImportError:  # older transformers: no PIL-backend classes
        LlavaNextImageProcessorPil = LlavaOnevisionImageProcessorPil = None

    if variant == "llava_next":
        kw = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                  image_grid_pinpoints=anyres.NEXT_PINPOINTS)
        pil_cls, tv_name = LlavaNextImageProcessorPil, "LlavaNextImageProcessor"
    else:
        kw = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        pil_cls, tv_name = LlavaOnevisionImageProcessorPil, "LlavaOnevisionImageProcessor"
    pil = pil_cls(**kw) if pil_cls is not None else None
    try:
        import torchvision  # noqa: F401
        import transformers

        tv = getattr(transformers, tv_name)(**kw)
    except Exception as e:  # torchvision missing
        print(f"hf_torchvision skipped: {type(e).__name__}: {e}")
        tv = None
    return pil, tv


def _jpeg_bytes(imgs: list[torch.Tensor], quality: int = 90) -> list[bytes]:
    import io

    import PIL.Image

    out = []
    for x in imgs:
        buf = io.BytesIO()
        PIL.Image.fromarray(x.numpy(), "RGB").save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def gpu_section(args, dtype) -> list[Row]:
    """Throughput of the GPU paths on one batch of photo-sized images (uint8 on the GPU, or JPEG bytes)."""
    n = args.gpu_batch or (128 if args.quick else 256)
    rep, warm = (3, 1) if args.quick else (10, 2)
    imgs = make_images("photo", n, 2)
    gpu = [x.permute(2, 0, 1).contiguous().cuda() for x in imgs]
    jpegs = _jpeg_bytes(imgs)
    jpeg_mb = sum(len(b) for b in jpegs) / 1e6
    rows: list[Row] = []
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
        jpeg_t = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    except Exception as e:
        print(f"nvjpeg rows skipped: {type(e).__name__}: {e}")
        decode_jpeg = None
    for variant in ("llava_next", "llava_onevision"):
        cfg = anyres.ImageProcessorConfig.for_variant(variant)
        _, tv = hf_processors(variant)
        ntiles = sum(cfg.num_tiles(tuple(x.shape[:2])) for x in imgs)
        out_bytes = ntiles * 3 * cfg.tile ** 2 * (4 if dtype == torch.float32 else 2)
        in_bytes = sum(x.numel() for x in imgs)
        providers = {}
        if tv is not None:
            providers["hf_torchvision_cuda"] = lambda: tv(gpu, return_tensors="pt", device="cuda")
        if not args.quick:
            providers["reference_cuda"] = lambda: anyres.preprocess_images(gpu, cfg, dtype=dtype)
        if anyres._cuda_encoder_available():
            def encoder(version, passes=3, smem_kb=None, cache_mb=None, cold=False, **kw):
                """The CUDA encoder with kernels `version`; passes 1 / 2: one pass alone, for timing only (where
                the time goes, METHOD.md: leave a stage out; the output is then garbage). smem_kb: v4's shared
                memory budget (LLAVA_FAST_GPU_ENCODER_SMEM_KB; it picks the band height). cache_mb: the weight
                tables cached on the device (LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB); cold: the cache emptied
                before every call (every table uploaded: a batch of sizes never seen)."""
                env = {"LLAVA_FAST_GPU_ENCODER": f"v{version}",
                       "LLAVA_FAST_GPU_ENCODER_SMEM_KB": None if smem_kb is None else str(smem_kb),
                       "LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB": None if cache_mb is None else str(cache_mb)}

                def fn():
                    if cold:
                        anyres._TABLE_CACHES.clear()
                    old = {k: os.environ.get(k) for k in env}
                    for k, v in env.items():
                        if v is not None:
                            os.environ[k] = v
                    anyres._CUDA_PASSES = passes
                    try:
                        return anyres.encode_tiles(gpu, cfg, **{"dtype": dtype, **kw})
                    finally:
                        anyres._CUDA_PASSES = 3
                        for k, v in old.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v
                return fn
            default = anyres.gpu_encoder_version()
            providers["llava_fast_cuda"] = encoder(default)  # the default kernels (LLAVA_FAST_GPU_ENCODER)
            if default != 4:  # v4 is one fused launch: no pass to leave out
                providers["llava_fast_cuda_pass1_only"] = encoder(default, 1)
                providers["llava_fast_cuda_pass2_only"] = encoder(default, 2)
            for v in anyres.GPU_ENCODER_VERSIONS:
                if v != default:
                    providers[f"llava_fast_cuda_v{v}"] = encoder(v)
                    if v != 4:
                        providers[f"llava_fast_cuda_v{v}_pass1_only"] = encoder(v, 1)
                        providers[f"llava_fast_cuda_v{v}_pass2_only"] = encoder(v, 2)
            # v4's band height comes from its shared-memory budget (1000x750 photos, uint8 arithmetic: 48 KB -> 32
            # rows, 26.5 KB staged for NeXT; 16 KB -> 16 rows, 14.4 KB): the smaller band trades halo work (rows
            # filtered by both neighbouring bands) for more resident blocks
            providers["llava_fast_cuda_v4_smem16"] = encoder(4, smem_kb=16)
            if dtype != torch.bfloat16:  # bf16 out: what the model consumes (half the bytes written)
                providers["llava_fast_cuda_v4_bf16"] = encoder(4, dtype=torch.bfloat16)
            # the weight tables kept on the device (session 15, opt-in): this benchmark repeats one batch, so every
            # table hits after the first call (a dataset's repeated sizes); "_cold" empties the cache before each
            # call (a batch of sizes never seen: every table uploaded, as without the cache, in its own copy)
            providers["llava_fast_cuda_table_cache"] = encoder(default, cache_mb=64)
            providers["llava_fast_cuda_table_cache_cold"] = encoder(default, cache_mb=64, cold=True)
            u8 = [anyres.to_uint8_chw(x, i, contiguous=False) for i, x in enumerate(gpu)]
            plan_host = torch.empty(anyres._encoder_plan(u8, [False] * len(u8), cfg, "uint8", "tiles").nbytes,
                                    dtype=torch.uint8, pin_memory=True)

            def host_plan(u8=u8, cfg=cfg, plan_host=plan_host):
                """the encoder's host work: the plan and its copy into pinned memory (the upload source)"""
                anyres._encoder_plan(u8, [False] * len(u8), cfg, "uint8", "tiles").copy_to(plan_host.data_ptr())
            providers["llava_fast_cuda_host_plan"] = host_plan
            # where the whole call's time goes (session 15): the kernel alone (plan built and uploaded once, then
            # only the launch; 2.24 ms for the whole call, 0.71 of host plan on the H200 in session 14: if the kernel
            # is ~1.5 ms the rest is host work in series with it, e.g. the per-image Python before the launch)
            plan_k = anyres._encoder_plan(u8, [False] * len(u8), cfg, "uint8", "tiles")
            plan_dev = anyres._upload_plan(plan_k, gpu[0].device, None, [])
            ver, band = anyres._resolve_version(plan_k, anyres.gpu_encoder_version(), gpu[0].device)
            scr = torch.empty(max(plan_k.scratch_bytes if ver != 4 else 0, 1), dtype=torch.uint8, device="cuda")
            out_k = torch.empty(anyres._out_shape(cfg, "tiles", plan_k.total_tiles), dtype=dtype, device="cuda")

            def kernel_only(plan_k=plan_k, plan_dev=plan_dev, scr=scr, out_k=out_k, ver=ver, band=band):
                """the encoder's kernel launch alone (plan and upload done once, outside the timing)"""
                _ext._C.encode_tiles_cuda(plan_k, plan_dev.data_ptr(), scr.data_ptr(), out_k.data_ptr(),
                                          _ext.dtype_code(dtype), int(out_k.shape[0]),
                                          torch.cuda.current_stream().cuda_stream, 3, ver, band)
            providers["llava_fast_cuda_kernel_only"] = kernel_only
            providers["llava_fast_cuda_float"] = lambda: anyres.encode_tiles(gpu, cfg, dtype=dtype, resample="float")
            if decode_jpeg is not None:
                providers["nvjpeg_decode"] = lambda: decode_jpeg(jpeg_t, mode=ImageReadMode.RGB, device="cuda")
                providers["llava_fast_cuda_jpeg"] = lambda: anyres.encode_tiles(jpegs, cfg, dtype=dtype,
                                                                                device="cuda")
        else:
            print(f"llava_fast_cuda rows skipped: llava_fast._C has no CUDA encoder ({_ext.EXT_ERROR or 'CPU build'})")
        for name, fn in providers.items():
            t = bench(fn, warmup=warm, rep=rep, sync=True, timing=args.gpu_timing)
            ips = n / (t["ms"] / 1e3)
            ob = out_bytes // 2 if name.endswith("_bf16") and dtype == torch.float32 else out_bytes
            moved = (in_bytes + (0 if name == "nvjpeg_decode" else ob))
            note = f"{n} imgs, {ntiles} tiles, {moved / (t['ms'] / 1e3) / 1e9:.1f} GB/s of {moved / 1e6:.0f} MB"
            if "jpeg" in name:
                note += f" (+{jpeg_mb:.1f} MB JPEG in)"
            if name.startswith("hf_"):
                note += ", fp32 out"
            rows.append(Row(bench=f"anyres_{variant}", provider=name, shape=f"{n} photos ~1000x750 on GPU",
                            dtype=args.dtype, mode="gpu", ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"],
                            metric=ips, unit="img/s", peak_gib=peak_memory(fn), note=note, timing=t["timing"]))
            print(f"{variant:16s} {'GPU batch':24s} {name:22s} {t['ms']:9.2f} ms {ips:9.1f} img/s  {note}",
                  flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8 + 16 images, fewer repetitions (~1 min)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-pil", action="store_true", help="skip the (slow) PIL backend")
    ap.add_argument("--gpu-batch", type=int, default=None, help="images in the GPU workload (default 256, quick 128)")
    ap.add_argument("--gpu-timing", default="loop", choices=["loop", "eager"],
                    help="GPU rows: loop (default: batches back to back, the steady state of a data pipeline: a "
                         "batch's host work, e.g. our 1 ms plan for 128 images, overlaps the previous batch's "
                         "kernels) or eager (one batch on an idle GPU, host work included: what runs 1-2 used)")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    cuda = torch.cuda.is_available()
    ncpu = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"CPU cores: {ncpu}, torch threads: {torch.get_num_threads()}, GPU: {gpu}, "
          f"_C: {'yes' if _ext.HAS_EXT else 'no (' + str(_ext.EXT_ERROR) + ')'}"
          f"{', CPU encoder ' + _ext._C.encoder_isa() if hasattr(_ext._C, 'encoder_isa') else ''}")
    if not cuda:
        print("no CUDA GPU: CPU rows only (the hf_torchvision_cuda row needs a GPU)")
    n_rand, n_photo = (8, 16) if args.quick else (32, 64)
    rep, warm = (2, 1) if args.quick else (5, 1)
    workloads = {f"{n_rand} random 400-1200px": make_images("random", n_rand, 0),
                 f"{n_photo} photos ~1000x750": make_images("photo", n_photo, 1)}
    rows: list[Row] = []
    for variant in ("llava_next", "llava_onevision"):
        cfg = anyres.ImageProcessorConfig.for_variant(variant)
        pil, tv = hf_processors(variant)
        for wname, imgs in workloads.items():
            chw = [x.permute(2, 0, 1).contiguous() for x in imgs]
            npy = [x.numpy() for x in imgs]
            ntiles = sum(cfg.num_tiles(tuple(x.shape[:2])) for x in imgs)
            nbytes = sum(x.numel() for x in imgs) + ntiles * 3 * cfg.tile ** 2 * (4 if dtype == torch.float32 else 2)
            providers = {}
            if pil is not None and not args.no_pil:
                providers["hf_pil"] = lambda: pil(npy, return_tensors="pt")
            if tv is not None:
                providers["hf_torchvision"] = lambda: tv(chw, return_tensors="pt")
                if cuda:
                    providers["hf_torchvision_cuda"] = lambda: tv(chw, return_tensors="pt", device="cuda")
            providers["reference"] = lambda: anyres.preprocess_images(imgs, cfg, dtype=dtype)
            if _ext.HAS_EXT:
                providers["llava_fast_1t"] = lambda: anyres.encode_tiles(imgs, cfg, dtype=dtype, num_threads=1)
                providers["llava_fast"] = lambda: anyres.encode_tiles(imgs, cfg, dtype=dtype, num_threads=ncpu)
            for name, fn in providers.items():
                t = bench(fn, warmup=warm, rep=rep, sync=name.endswith("cuda"))
                ips = len(imgs) / (t["ms"] / 1e3)
                note = f"{ntiles} tiles, {nbytes / (t['ms'] / 1e3) / 1e9:.2f} GB/s"
                if name in ("hf_pil", "hf_torchvision", "hf_torchvision_cuda"):
                    note += ", fp32 out"
                rows.append(Row(bench=f"anyres_{variant}", provider=name, shape=wname, dtype=args.dtype, mode="cpu",
                                ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=ips, unit="img/s",
                                note=note))
                print(f"{variant:16s} {wname:24s} {name:20s} {t['ms']:9.1f} ms {ips:8.1f} img/s  {note}", flush=True)
    if cuda:
        rows += gpu_section(args, dtype)
    add_ratios(rows, ours="llava_fast")
    add_ratios(rows, ours="llava_fast_1t")  # per core: HF's PIL backend runs on one thread too
    add_ratios(rows, ours="llava_fast_cuda")
    print(to_markdown(rows))
    for r in rows:
        if r.provider == "llava_fast_1t" and "hf_pil" in r.ratio:
            print(f"per core (1 thread) vs hf_pil: {r.bench} {r.shape}: {r.ratio['hf_pil']:.1f}x (target >= 10x)")
    print("saved", save(rows, "bench_anyres"))


if __name__ == "__main__":
    main()
