"""``llava_fast.env()`` and ``llava-fast env``: versions, GPU, and which backend each op uses."""
from __future__ import annotations

import platform


def _version(mod: str) -> str | None:
    try:
        import importlib

        m = importlib.import_module(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return None


# Dense bf16 tensor-core peak (FLOP/s) by GPU name, most specific names first (a name matches the first entry it
# contains): NVIDIA's data sheets. None: a variant whose peak is not published (no MFU rather than a wrong one).
PEAK_BF16_FLOPS = (("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12), ("H100", 989.4e12),
                   ("H800", 989.4e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
                   ("L40", 181e12), ("L4", 121e12), ("A10G", None), ("A10", 125e12), ("4090", 165.2e12))


def peak_bf16_flops(gpu_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``gpu_name`` (``torch.cuda.get_device_name``), None when unknown: the
    MFU denominators of the trainer and of benchmarks/bench_model.py."""
    return next((v for k, v in PEAK_BF16_FLOPS if k in gpu_name), None)


def env() -> dict:
    """Describe this environment. Queries the GPU only through torch.cuda's public calls (no kernel launch)."""
    import torch

    from llava_fast import __version__, _ext, backend

    info: dict = {
        "llava_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "torchvision": _version("torchvision"),
        "liger_kernel": _version("liger_kernel"),
        "flash_attn": _version("flash_attn"),
    }
    cuda = torch.cuda.is_available()
    info["gpu"] = torch.cuda.get_device_name(0) if cuda else None
    info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None
    info["ext"] = ("yes, with CUDA" if _ext.HAS_CUDA_EXT else "yes, C++ CPU functions only") if _ext.HAS_EXT \
        else f"no ({_ext.EXT_ERROR}); the reference path is used"
    if _ext.HAS_EXT and hasattr(_ext._C, "encoder_isa"):
        info["cpu_tile_encoder"] = f"C++, {_ext._C.encoder_isa()} (LLAVA_FAST_NO_AVX2=1 turns AVX2 off)"
    if _ext.HAS_CUDA_EXT:
        from llava_fast.ops import anyres

        try:
            v = anyres.gpu_encoder_version()
            info["gpu_tile_encoder"] = (f"v{v} (LLAVA_FAST_GPU_ENCODER=v1..v4" +
                                        (f"; shared memory {anyres.gpu_encoder_smem_bytes() >> 10} KB)" if v == 4
                                         else ")"))
        except ValueError as e:
            info["gpu_tile_encoder"] = f"invalid: {e}"
    lib = _ext.cutlass_lib()
    info["cutlass_lib"] = (("loaded: Hopper projector GEMMs (LLAVA_FAST_PROJECTOR_KERNEL=cutlass)"
                            + (", dense attention forward (LLAVA_FAST_ATTN_CUTLASS=1)"
                               if lib.llava_fast_cutlass_has_attn_fwd() else ""))
                           if lib is not None else f"no ({_ext.CUTLASS_ERROR}); optional, sm_90 only")
    ok, why = _ext.triton_usable()
    info["triton_usable"] = f"{'yes' if ok else 'no'}: {why}"
    info["backends"] = backend.describe("cuda" if cuda else "cpu")
    from llava_fast.ops.act_linear import recompute_enabled

    try:
        rc = recompute_enabled()
        if not rc:
            info["activation_recompute"] = "off (LLAVA_FAST_RECOMPUTE_ACT=0): kept for the backward"
        elif recompute_enabled("vision"):
            info["activation_recompute"] = ("everywhere (LLAVA_FAST_RECOMPUTE_ACT=1): MLP activations and norm "
                                            "outputs recomputed in the backward, the vision towers' too")
        else:
            info["activation_recompute"] = ("language model only (default; LLAVA_FAST_RECOMPUTE_ACT=1 also in the "
                                            "vision towers, 0 nowhere): the vision towers keep their LayerNorm and "
                                            "activation outputs for the backward")
        if rc:
            from llava_fast.ops.act_linear import fused_recompute_enabled

            info["activation_recompute"] += (
                " (SwiGLU / RMSNorm outputs written by their backward kernels)" if fused_recompute_enabled()
                else " (by forward launches: LLAVA_FAST_FUSED_RECOMPUTE=0)")
    except ValueError as e:
        info["activation_recompute"] = f"invalid: {e}"
    try:
        from llava_fast.models.llava import last_layer_rows_choice

        info["last_layer_rows"] = ("supervised: a loss-only call (labels, logits=False) runs the last decoder layer's "
                                   "output projection and MLP on the supervised rows (LLAVA_FAST_LAST_LAYER_ROWS=all "
                                   "for every row)" if last_layer_rows_choice() == "supervised" else
                                   "all (LLAVA_FAST_LAST_LAYER_ROWS=all): every row of the last layer")
    except ValueError as e:
        info["last_layer_rows"] = f"invalid: {e}"
    try:
        from llava_fast.models.dispatch import text_attention_choice

        info["text_attention"] = {
            "auto": "auto: over one-length documents on CUDA, SDPA (cuDNN first) for no-grad forwards (prefill, "
                    "evaluation) and ops/cudnn_attention in training on Hopper with cuDNN >= 9.19; our kernels "
                    "otherwise (LLAVA_FAST_TEXT_ATTENTION=triton|sdpa|cudnn forces one)",
            "triton": "triton (LLAVA_FAST_TEXT_ATTENTION): our kernels always",
            "sdpa": "sdpa (LLAVA_FAST_TEXT_ATTENTION): SDPA always (no cuDNN where a backward follows)",
            "cudnn": "cudnn (LLAVA_FAST_TEXT_ATTENTION): one-length documents through ops/cudnn_attention "
                     "(backward on its own thread) on any GPU, our kernels otherwise",
        }[text_attention_choice()]
    except ValueError as e:
        info["text_attention"] = f"invalid: {e}"
    try:
        from llava_fast.ops import cross_entropy as ce

        sched = ce._schedule("auto")
        info["loss_schedule"] = (f"vocab blocks (LLAVA_FAST_CE_SCHEDULE=vocab; budget {ce._vocab_budget_bytes() >> 20} "
                                 f"MiB)" if sched == "vocab" else
                                 "token chunks (LLAVA_FAST_CE_SCHEDULE=vocab: less memory, one more logits GEMM)")
    except ValueError as e:
        info["loss_schedule"] = f"invalid: {e}"
    except ImportError as e:  # no triton: the loss runs its reference
        info["loss_schedule"] = f"reference only ({e})"
    if cuda:
        from llava_fast.models import dispatch

        try:
            where = "" if dispatch._hopper(torch.device("cuda", 0)) else " (not this GPU: SDPA's own order here)"
            info["vision_sdpa"] = {
                "auto": "auto: trained towers through ops/cudnn_attention on Hopper with cuDNN >= 9.19 (backward "
                        f"on its own thread), frozen ones in SDPA's own order{where} (LLAVA_FAST_SDPA_CUDNN=0|1 "
                        "forces one)",
                "1": f"1 (LLAVA_FAST_SDPA_CUDNN): every tower through ops/cudnn_attention on Hopper{where}",
                "0": "0 (LLAVA_FAST_SDPA_CUDNN): SDPA's own order always",
            }[dispatch.vision_cudnn_choice()]
        except ValueError as e:
            info["vision_sdpa"] = f"invalid: {e}"
    import os

    if os.environ.get("LLAVA_FAST_DIRECT_LAUNCH", "1") == "0":
        info["triton_launch"] = "Triton's kernel[grid] (LLAVA_FAST_DIRECT_LAUNCH=0)"
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        info["triton_launch"] = "interpreter (TRITON_INTERPRET=1)"
    else:
        info["triton_launch"] = ("direct for compiled kernels (_ext.launch; LLAVA_FAST_DIRECT_LAUNCH=0 for Triton's "
                                 "kernel[grid])")
    # kernel variants and experiments chosen by environment variables (docs/gpu-runbook.md lists them)
    flags = {k: v for k, v in sorted(os.environ.items()) if k.startswith("LLAVA_FAST_")
             and not k.startswith("LLAVA_FAST_BACKEND_")}
    info["env_overrides"] = ", ".join(f"{k}={v}" for k, v in flags.items()) or "none"
    return info


def format_env(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k == "backends":
            lines.append("backends (per op):")
            width = max(map(len, v), default=0)
            lines += [f"  {op:<{width}} {b}" for op, b in v.items()]
        else:
            lines.append(f"{k:<18} {v if v is not None else '-'}")
    return "\n".join(lines)
