"""Host time of a GPU op's Python path, measured on a machine without a GPU (session 15).

Several of our ops are timed with calls back to back (``bench_utils`` "loop"), where a call costs max(its host
time, its GPU time): the H200 run of session 14 put the AnyRes GPU encoder at its host floor (its pass-only rows
cost as much as the whole call, and bf16 output as much as fp32). This script runs the CUDA branch of an op on CPU
tensors with the CUDA-only calls stubbed out (the stream, the CUDA extension's launch, pinned memory), so the
Python and C++ host work before and after the launch can be profiled and shortened here, then checked on a GPU.
The numbers are this machine's: the GPU boxes' hosts were ~2-3x slower per thread in session 14.

Usage: python benchmarks/host_path.py [anyres|pack_features] [--images 128] [--profile]
  anyres: encode_tiles' CUDA branch (to_uint8_chw, check_work_all, the plan, its upload, the result dict) for
          128 photo-sized images, NeXT and OneVision, with and without LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB.
  pack_features: pack_and_scatter's Triton branch (checks, plan, token index) with the kernel launches stubbed:
          the forward without grad, the forward recording autograd, and forward + torch.autograd.grad (the backward's
          host path is the last minus the second).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _time(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def _profile(fn, n: int, top: int = 12) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


@contextlib.contextmanager
def _anyres_cuda_branch_on_cpu():
    """encode_tiles_cuda runnable on CPU tensors: no extension check, a fake stream, the launch a no-op."""
    from llava_fast import _ext

    real = _ext._C

    class _C:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def encode_tiles_cuda(*args, **kwargs):
            pass

    stream = mock.Mock(cuda_stream=0)
    with mock.patch.object(_ext, "require_ext", lambda *a, **k: None), \
            mock.patch.object(_ext, "_C", _C()), \
            mock.patch.object(_ext, "device_guard", lambda d: contextlib.nullcontext()), \
            mock.patch.object(torch.cuda, "current_stream", lambda *a: stream):
        yield


def anyres_host(n_images: int, reps: int, profile: bool) -> list[tuple[str, float]]:
    from bench_anyres import make_images

    from llava_fast.ops import anyres

    imgs = [x.permute(2, 0, 1).contiguous() for x in make_images("photo", n_images, 2)]
    out = []
    for variant in ("llava_next", "llava_onevision"):
        cfg = anyres.ImageProcessorConfig.for_variant(variant)

        def call():
            # encode_tiles' steps for CUDA tensors (its CPU-tensor branch would run the C++ CPU encoder instead)
            flat, flags, counts = anyres._flatten_samples(imgs, None)
            if cfg.variant != "llava_onevision":
                flags = [False] * len(flat)
            u8s = [anyres.to_uint8_chw(im, i, cfg.max_pixels, contiguous=False) for i, im in enumerate(flat)]
            anyres.check_work_all([u.shape[-2:] for u in u8s], cfg, flags)
            return anyres.encode_tiles_cuda(u8s, flags, counts, cfg, torch.float32, None, "tiles", "uint8")

        for mb in ("0", "64"):
            with mock.patch.dict(os.environ, {"LLAVA_FAST_GPU_ENCODER_TABLE_CACHE_MB": mb}), \
                    _anyres_cuda_branch_on_cpu():
                anyres._TABLE_CACHES.clear()
                ms = _time(call, reps)
                name = f"anyres {variant}, {n_images} images" + (", table cache" if mb != "0" else "")
                out.append((name, ms))
                if profile:
                    print(f"--- {name}\n{_profile(call, max(1, reps // 2))}")
            anyres._TABLE_CACHES.clear()
    return out


def pack_features_host(reps: int, profile: bool, smoke: bool = False) -> list[tuple[str, float]]:
    import triton

    import bench_pack_features as B
    import llava_fast.ops.pack_features as P
    from llava_fast import _ext, backend

    out = []
    noop = lambda *a, **k: None  # noqa: E731
    with mock.patch.dict(backend._overrides, {"pack_features": "triton"}), \
            mock.patch.object(_ext, "launch", noop), mock.patch.object(P._ext, "launch", noop), \
            mock.patch.object(triton.runtime.jit.JITFunction, "__getitem__", lambda self, grid: noop):
        for case in ("next8_7b", "ov05_single", "ov05_multi4", "ov05_video32"):
            kw = B.make_case(case, "cpu", torch.float32, smoke=smoke)[0]
            # autograd leaves, as bench_pack_features' fwd+bwd rows have them
            names = ("inputs_embeds", "image_features", "image_newline", "video_features")
            lkw = dict(kw, **{k: kw[k].detach().clone().requires_grad_() for k in names if kw[k] is not None})
            leaves = [lkw[k] for k in names if kw[k] is not None]

            def fwd():
                with torch.no_grad():
                    return P.pack_and_scatter(**kw)

            def fwd_grad():
                return P.pack_and_scatter(**lkw)

            def fwd_bwd():
                o = P.pack_and_scatter(**lkw)
                return torch.autograd.grad(o, leaves, torch.ones_like(o))
            for mode, call in (("fwd, no grad", fwd), ("fwd with autograd", fwd_grad), ("fwd+bwd", fwd_bwd)):
                name = f"pack_features {case} {mode} (CPU tensors: the token index's torch ops run on the CPU)"
                out.append((name, _time(call, reps)))
                if profile:
                    print(f"--- {name}\n{_profile(call, reps)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", default="anyres", choices=["anyres", "pack_features", "all"])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--profile", action="store_true", help="also a cProfile of each case, by own time")
    p.add_argument("--smoke", action="store_true", help="toy pack_features sizes (a check of the script)")
    a = p.parse_args(argv)
    rows = []
    if a.op in ("anyres", "all"):
        rows += anyres_host(a.images, a.reps, a.profile)
    if a.op in ("pack_features", "all"):
        rows += pack_features_host(a.reps, a.profile, a.smoke)
    print("| host path (this CPU, launches stubbed) | ms per call |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
