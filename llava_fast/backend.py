"""Which implementation each op uses: ``"reference"`` (plain PyTorch, the CPU path), ``"triton"`` or ``"cuda"``.

``"auto"`` (the default) picks the fast kernel when the tensors live on a CUDA device and the kernel is available,
and the reference otherwise, except for the ops in ``AUTO_REFERENCE``: there a GPU measurement showed the reference
path faster, so ``"auto"`` keeps it until the kernel catches up (``"triton"`` still forces the kernel). Override per
op with :func:`set_backend` or the environment variable ``LLAVA_FAST_BACKEND_<OP>`` (for example
``LLAVA_FAST_BACKEND_ATTENTION=reference``).
"""
from __future__ import annotations

from llava_fast import _ext

# op name -> the fast kind it has once implemented ("triton" or "cuda"); ops without a fast kernel yet are absent.
OPS: dict[str, str | None] = {
    "attention": None,
    "vision_attention": None,
    "projector": None,
    "anyres_encode": None,
    "pack_features": None,
    "rms_norm": None,
    "rope": None,
    "swiglu": None,
    "quick_gelu": None,
    "gelu": None,
    "layer_norm": None,
    "bias_grad": None,
    "cross_entropy": None,
    "patch_embed": None,
}
_CHOICES = ("auto", "reference", "triton", "cuda")
_overrides: dict[str, str] = {}
# the module that implements each op; imported on first need so that it can register its kernel
_MODULES = {
    "attention": "llava_fast.ops.attention",
    "vision_attention": "llava_fast.ops.attention",
    "projector": "llava_fast.ops.projector",
    "anyres_encode": "llava_fast.ops.anyres",
    "pack_features": "llava_fast.ops.pack_features",
    "rms_norm": "llava_fast.ops.rms_norm",
    "rope": "llava_fast.ops.rope",
    "swiglu": "llava_fast.ops.swiglu",
    "quick_gelu": "llava_fast.ops.quick_gelu",
    "gelu": "llava_fast.ops.gelu",
    "layer_norm": "llava_fast.ops.layer_norm",
    "bias_grad": "llava_fast.ops.bias_grad",
    "cross_entropy": "llava_fast.ops.cross_entropy",
    "patch_embed": "llava_fast.ops.patch_embed",
}
_loaded: set[str] = set()
# Ops whose "auto" is the reference path even on CUDA, with the measurement that says why (docs/perf-notes.md).
AUTO_REFERENCE: dict[str, str] = {
    "vision_attention": "SDPA (cuDNN first on Hopper): 2.2-4.3x faster than the Triton kernel on SigLIP tiles (H200, "
                        "2026-11-26); H100 after the D=72 fixes: cuDNN fwd+bwd 214 vs ours 115 TFLOP/s",
    "projector": "cuBLAS eager: 1.14x the fused kernel's forward at M=23040, 2.8x at M=576 (H200, 2026-11-26); "
                 "set_backend('projector', 'triton') keeps half the saved activations",
    "gelu": "not yet measured (session 13): torch's one-kernel F.gelu already moves the forward's bytes, and the "
            "Triton backward saves ~23 us of GPU per SigLIP layer while a Triton call costs ~100 us of host time on "
            "the H100 box, which the host-bound OneVision step pays; bench_model's llava_fast_gelu_triton decides",
    "layer_norm": "not yet measured (session 14): the vision towers' LayerNorm kernels (one backward launch that also "
                  "writes the recomputed output, instead of torch's forward again + two backward kernels); "
                  "bench_model's llava_fast_ln_triton (paired with the default) decides",
    "bias_grad": "not yet measured (session 14): the linears' bias gradients by a two-pass Triton column sum "
                 "instead of torch's reduce_kernel (~30% of copy bandwidth in the H200 OneVision profile); "
                 "bench_bias_grad.py and bench_model's llava_fast_bias_triton decide",
}


def _ensure_registered(op: str) -> None:
    if op in _loaded:
        return
    _loaded.add(op)
    try:
        import importlib

        importlib.import_module(_MODULES[op])
    except Exception:  # a broken optional dependency must not break the reference path
        pass


def load_all() -> None:
    """Import every op module now (a model does when it is built). ``use_fast`` otherwise imports an op's module on
    its first use, which torch.compile cannot trace: a graph break at each op's first call inside a trace."""
    for op in list(OPS):
        _ensure_registered(op)


def register_fast(op: str, kind: str) -> None:
    """Called by an op module when it has a fast kernel of ``kind``."""
    OPS[op] = kind
    if kind == "triton" and _ext.interpreting():   # bfloat16 as on the GPU (_ext.interpreter_bf16)
        _ext.interpreter_bf16()
    _loaded.add(op)  # already imported: use_fast must not import (torch.compile cannot trace an import)


def set_backend(op: str, backend: str) -> None:
    """Force ``op`` (or ``"all"``) to ``backend`` in ``auto|reference|triton|cuda``."""
    if backend not in _CHOICES:
        raise ValueError(f"set_backend: backend must be one of {_CHOICES}, got {backend!r}")
    names = list(OPS) if op == "all" else [op]
    for name in names:
        if name not in OPS:
            raise ValueError(f"set_backend: unknown op {name!r}; known ops: {sorted(OPS)}")
        _overrides[name] = backend


_ENV_KEYS: dict = {}


def get_backend(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(OPS)}")
    over = _overrides.get(op)
    if over:
        return over
    key = _ENV_KEYS.get(op)
    if key is None:
        key = _ENV_KEYS[op] = f"LLAVA_FAST_BACKEND_{op.upper()}"
    return _ext.getenv(key) or "auto"


_UNSUPPORTED_GPU: str | None = None  # "" or why "auto" keeps the reference path on this machine's GPUs; None: unasked


def _gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capability of every visible CUDA device (none without CUDA)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [torch.cuda.get_device_capability(i) for i in range(n)]


def unsupported_gpu() -> str:
    """Why ``"auto"`` takes the reference path on this machine's CUDA devices ("" when it need not): a GPU of compute
    capability below 8.0 (V100, T4, RTX 20xx), or an AMD GPU under ROCm. The Triton kernels are written for and
    tested on NVIDIA sm_80 and newer (bf16 tensor-core dots, cp.async, the shared memory of Ampere) and the CUDA tile
    encoder is compiled for sm_80 / sm_90. Asked once, on the first CUDA call: nothing touches the GPU at import."""
    global _UNSUPPORTED_GPU
    if _UNSUPPORTED_GPU is None:
        import torch

        if torch.compiler.is_compiling():  # torch.cuda's device queries do not trace (a graph break under fullgraph):
            return ""                      # not asked here; the model's eager _host_prepare asks before its layers
        caps = _gpu_capabilities()
        old = sorted({"%d.%d" % cap for cap in caps if cap[0] < 8})
        why = ("ROCm: the kernels are written and tested for NVIDIA GPUs" if caps and torch.version.hip else
               f"compute capability {', '.join(old)}: the kernels need 8.0 (Ampere) or newer" if old else "")
        _UNSUPPORTED_GPU = f"{why}; set_backend(op, 'triton') tries them anyway" if why else ""
    return _UNSUPPORTED_GPU


def use_fast(op: str, device_type: str) -> bool:
    """True when ``op`` should run its fast kernel for tensors on ``device_type``."""
    choice = get_backend(op)
    if choice == "reference":
        return False
    if choice == "auto" and (device_type != "cuda" or op in AUTO_REFERENCE or
                             (_UNSUPPORTED_GPU if _UNSUPPORTED_GPU is not None else unsupported_gpu())):
        return False
    _ensure_registered(op)
    return OPS.get(op) is not None


def describe(device_type: str) -> dict[str, str]:
    """What each op will use for tensors on ``device_type``."""
    out = {}
    load_all()
    for op, kind in OPS.items():
        choice = get_backend(op)
        if kind is None:
            out[op] = "reference (no fast kernel yet)"
        elif use_fast(op, device_type):
            out[op] = f"{kind}" + ("" if choice == "auto" else f" (forced: {choice})")
        elif choice == "auto" and device_type == "cuda" and op in AUTO_REFERENCE:
            out[op] = f"reference ({AUTO_REFERENCE[op]})"
        elif choice == "auto" and device_type == "cuda" and unsupported_gpu():
            out[op] = f"reference ({unsupported_gpu()})"
        else:
            out[op] = "reference" + (" (forced)" if choice == "reference" else f" (tensors on {device_type})")
    return out
