"""The optional compiled extension ``llava_fast._C`` and the choice of backend per op.

Importing this module never touches the GPU and never fails: when ``_C`` is missing, ``HAS_EXT`` is False and every
op uses its PyTorch (reference) or Triton path. CUDA-only entry points call :func:`require_ext`, which explains how
to build the extension.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re

_C = None
EXT_ERROR: str | None = None
try:  # pragma: no branch
    _C = importlib.import_module("llava_fast._C")
except Exception as e:  # ImportError, or an OSError from a broken build
    EXT_ERROR = f"{type(e).__name__}: {e}"

HAS_EXT: bool = _C is not None
HAS_CUDA_EXT: bool = bool(_C is not None and getattr(_C, "with_cuda", False))

BUILD_HINT = (
    "build it from a source checkout with nvcc on the PATH: `pip install --no-build-isolation -e .` "
    "(set LLAVA_FAST_CUDA_ARCHS, default '80;90'); without nvcc only the C++ CPU functions are built"
)

# dtype codes understood by the native functions (csrc/common/checks.h)
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def dtype_code(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_CODES:
        raise ValueError(f"dtype {dtype} is not supported by the native kernels; use float32, float16 or bfloat16")
    return DTYPE_CODES[name]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as ``triton.cdiv``. The launchers use these two instead of triton's: since triton 3.5
    those are ``ConstexprFunction`` objects costing ~2 us per host call, and a launcher made up to five of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def row_config(n: int, target: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the row-wise kernels (RMSNorm, LayerNorm): a whole row of ``n`` in
    BLOCK_N, a tile of about ``target`` elements (several rows per program for small n), warps by tile size."""
    block_n = next_power_of_2(n)
    block_m = max(1, min(16, target // block_n))
    elems = block_m * block_n
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_m, block_n, num_warps


def as_rows(t):
    """(..., N) -> (M, N) with a unit last stride (a view when possible), for the row-wise kernels."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def persistent_split(device, m: int, block_m: int) -> tuple[int, int]:
    """``(programs, rows_per_program)`` of a persistent row-wise backward over ``m`` rows in tiles of ``block_m``:
    ~4 programs per SM on a GPU (a few on the CPU interpreter, so that the tests exercise the partial-sum
    reduction), each owning whole tiles, so that only the last one sees a partial tile. ``(1, 0)`` for no rows."""
    if not m:
        return 1, 0
    tiles = cdiv(m, block_m)
    programs = max(1, min(tiles, 4 * sm_count(device) if device.type == "cuda" else 4))
    rows_per_program = cdiv(tiles, programs) * block_m
    return cdiv(m, rows_per_program), rows_per_program


def launch_pointwise_fwd(kernel, x, block: int = 2048, num_warps: int = 8, **constexprs):
    """``y = f(x)`` by an elementwise Triton kernel ``kernel(X, Y, numel, ..., BLOCK)`` over the flat contiguous
    ``x``: a new tensor of ``x``'s shape and dtype (QuickGELU, GELU)."""
    import torch

    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        with device_guard(x.device):
            launch(kernel, (cdiv(n, block),), xc, y, n, BLOCK=block, num_warps=num_warps, **constexprs)
    return y


def launch_pointwise_bwd(kernel, dy, x, want_out: bool = False, block: int = 1024, num_warps: int = 4,
                         **constexprs):
    """``dx`` by an elementwise backward kernel ``kernel(DY, X, DX, Y, numel, ..., HAS_Y, BLOCK)``, and with
    ``want_out`` ``(dx, y)``: the forward's output written by the same launch (for act_linear's weight gradients)."""
    import torch

    xc, dyc = x.contiguous(), dy.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_out else None
    n = xc.numel()
    if n:
        with device_guard(x.device):
            launch(kernel, (cdiv(n, block),), dyc, xc, dx, y if want_out else dx, n, HAS_Y=want_out, BLOCK=block,
                   num_warps=num_warps, **constexprs)
    return (dx, y) if want_out else dx


def not_differentiable_again(grads, sources, what: str):
    """``grads`` (a tuple; None entries kept) made to depend, through a node that raises when a backward reaches it,
    on those of ``sources`` that require grad: the tensors the true second derivative would go through.
    Differentiating the gradients of a ``create_graph=True`` backward then raises, by ``loss.backward()`` and by
    ``torch.autograd.grad(..., inputs)`` alike, instead of silently treating them as constants.
    (``once_differentiable`` looks at the incoming gradients only and attaches its error node to detached leaves,
    which ``autograd.grad`` w.r.t. an input never visits.) Call it from a custom Function's backward when
    ``torch.is_grad_enabled()``, on gradients computed under ``no_grad``."""
    import torch

    live = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not live or not idx:
        return tuple(grads)
    err = torch._C._functions.DelayedError(
        f"{what}: double backward (differentiating its gradients, create_graph=True) is not supported".encode(),
        len(idx) + len(live))
    wrapped = err(*[grads[i] for i in idx], *live)
    out = list(grads)
    for j, i in enumerate(idx):
        out[i] = wrapped[j]
    return tuple(out)


def _tracing() -> bool:
    """True while torch.compile / export traces, or while a fake-tensor, proxy (make_fx) or functionalization mode is
    active: then ops must go through the dispatcher, whose fake implementations describe them."""
    import torch

    if torch.compiler.is_compiling():
        return True
    if not torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.Python):
        return False  # no dispatch mode at all is active: each one includes the Python key (0.3 us against 1.7)
    keys = torch._C._TorchDispatchModeKey
    return any(torch._C._get_dispatch_mode(k) is not None for k in (keys.FAKE, keys.PROXY, keys.FUNCTIONAL))


class EagerOp:
    """A ``torch.library`` custom op that, in plain eager mode, calls its Python implementation directly.

    The dispatcher round trip of a custom op costs ~10 us of host time per call (measured on the dev CPU: 23 us
    for RMSNorm's forward op against 13.6 us for its launcher), which a layer pays several times forward and
    backward; the op itself is only needed when something traces (``_tracing``). Calling an ``EagerOp`` runs the
    registered op while tracing and the function otherwise, with the same arguments and results."""

    __slots__ = ("op", "fn")

    def __init__(self, op, fn):
        self.op, self.fn = op, fn

    def __call__(self, *args, **kwargs):
        if _tracing():
            return self.op(*args, **kwargs)
        return self.fn(*args, **kwargs)

    def register_fake(self, fn):
        return self.op.register_fake(fn)


def custom_op(name: str, *, mutates_args):
    """``torch.library.custom_op(name, mutates_args=...)`` as a decorator that returns an :class:`EagerOp`."""
    import torch

    def wrap(fn):
        return EagerOp(torch.library.custom_op(name, mutates_args=mutates_args)(fn), fn)

    return wrap


def require_ext(op: str, cuda: bool = False):
    """Return the ``_C`` module or raise an error that says how to build it."""
    if _C is None:
        raise RuntimeError(f"llava_fast: `{op}` needs the compiled extension llava_fast._C, which is not available "
                           f"({EXT_ERROR}); {BUILD_HINT}")
    if cuda and not HAS_CUDA_EXT:
        raise RuntimeError(f"llava_fast: `{op}` needs the CUDA build of llava_fast._C, but it was built without nvcc; "
                           f"{BUILD_HINT}")
    return _C


def triton_version() -> tuple[int, int]:
    """Triton's (major, minor), e.g. ``(3, 8)`` for "3.8.0" or "3.9.0+git1234"; ``(0, 0)`` where it does not import."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - not installed, or broken: callers compare versions only
        return (0, 0)
    major, minor = (re.match(r"\d*", part).group() or "0" for part in (triton.__version__.split(".") + ["0"])[:2])
    return int(major), int(minor)


def triton_usable() -> tuple[bool, str]:
    """Whether Triton kernels can run here: a CUDA GPU, or the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton not importable ({type(e).__name__})"
    if interpreting():
        return True, "interpreter (TRITON_INTERPRET=1)"
    import torch

    if torch.cuda.is_available():
        return True, "cuda"
    return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"


def _tma_scratch(size: int, alignment: int, stream):
    import torch

    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def ensure_tma_allocator() -> None:
    """Device-side TMA tensor descriptors (``tl.make_tensor_descriptor``) need a small global scratch buffer per
    launch, which Triton takes from the allocator of ``triton.set_allocator``: set one (a torch CUDA allocation on
    the current device) before launching a kernel that builds descriptors. No-op under the interpreter.

    Triton keeps the allocator in a ``contextvars.ContextVar``: a thread does not see one set in another thread, and
    the autograd engine runs the backward in its own thread per device. A process-wide "already set" flag (the
    session-3 code) therefore left every TMA backward kernel without an allocator ("Kernel requires a runtime memory
    allocation, but no allocator was set": all TMA cuda tests on an H100, 2026-11-26). This
    checks the calling context at every launch (one ContextVar read) and keeps an allocator the caller set."""
    if interpreting():
        return
    import triton

    try:
        from triton.runtime import _allocation

        current = _allocation._allocator
        if hasattr(current, "get"):   # a ContextVar (Triton 3.4 and later); 3.3 keeps a plain module global
            current = current.get()
        unset = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another triton layout: set ours
        unset = True
    if unset:
        triton.set_allocator(_tma_scratch)


_ENV_KEYS: dict = {}


def getenv(name: str, default=None):
    """``os.environ.get(name, default)``, at a tenth of its cost for an unset variable (~60 ns against ~540 ns here).

    The model reads its switches at every call, so that a test or a user can flip one between calls: ~1400 reads per
    OneVision training step, most of them of unset variables, for which ``os.environ.get`` raises and catches a
    KeyError inside ``Mapping.get``. This looks the encoded key up in the mapping's own dict, the one every change
    through ``os.environ`` (``monkeypatch.setenv`` included) updates; a Python without that layout reads
    ``os.environ``."""
    env = os.environ
    data = getattr(env, "_data", None)
    key = _ENV_KEYS.get(name)
    if key is None or data is None:
        # the first read of this name: os.environ's own path, and the key kept for the next reads, but not while
        # torch.compile traces (a traced function that changes module state breaks the graph there)
        if data is not None and not _compiling():
            _ENV_KEYS[name] = env.encodekey(name)
        return env.get(name, default)
    value = data.get(key)
    return default if value is None else env.decodevalue(value)


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def interpreting() -> bool:
    """Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return getenv("TRITON_INTERPRET") == "1"


def f32_to_bf16_bits(x):
    """float32 values (a numpy array of any shape) -> the uint16 bits of bfloat16, rounded to nearest even as the
    GPU's ``cvt.rn.bf16.f32`` rounds (overflow to inf; NaN stays NaN, quiet, with its sign)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    flat = np.ascontiguousarray(x).reshape(-1)   # 1-D (a 0-d array's arithmetic would give numpy scalars)
    u = flat.view(np.uint32)
    out = ((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(flat)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return out.reshape(x.shape)


def interpreter_bf16() -> bool:
    """Make the Triton interpreter compute bfloat16 as the GPU does, in the two places where our kernels met it
    (returns whether the interpreter is mended).

    The interpreter (Triton 3.3-3.9 at least) keeps bfloat16 blocks as their uint16 bit patterns:
    - its ``tl.dot`` converts only 8-bit float operands before ``np.matmul``, so a bfloat16 dot multiplied the bit
      patterns: ~1e11 where the values give ~1 (triton-lang/triton#11584; the fix, PR #11585, was declined: "we just
      don't support it yet"). A bfloat16 operand is widened to float32 here (exact: bf16 is the top half of an
      fp32), which is what the tensor cores compute before their fp32 accumulation;
    - its float32 -> bfloat16 cast (``x.to(tl.bfloat16)``, a store of an fp32 value to a bf16 pointer) truncated
      the mantissa, where the GPU rounds to nearest even; its explicit round-to-nearest path rounded half up and
      lost the carry into the exponent. Both round to nearest even here (``f32_to_bf16_bits``). The widening cast
      (bf16 -> fp32, exact) shifts the bits instead of Triton's per-mantissa-bit loop: faster, and right for the
      254 subnormal patterns, which Triton's loop turned into 0 or other values.

    Our attention and projector kernels gave garbage in bf16 under TRITON_INTERPRET=1, which our error messages
    suggest for debugging on a CPU, and every kernel's bf16 output had twice the GPU's rounding error, which made
    flash-attn's rule (twice PyTorch's error) untestable there. Every other operation goes to Triton's own code.
    Called when an op module registers a Triton kernel under the interpreter (``backend.register_fast``); idempotent;
    does nothing on a Triton without these names."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # noqa: BLE001 - no Triton, or another layout of its interpreter: nothing to mend
        return False
    builder, handle = getattr(interp, "InterpreterBuilder", None), getattr(interp, "TensorHandle", None)
    names = ("create_dot", "cast_impl", "create_fp_to_fp")
    if builder is None or handle is None or not all(hasattr(builder, n) for n in names):
        return False
    if getattr(builder.create_dot, "_llava_fast_bf16", False):
        return True
    dot, cast, fp_to_fp = (getattr(builder, n) for n in names)
    rtne = getattr(getattr(getattr(interp, "_ir", None), "ROUNDING_MODE", None), "RTNE", None)

    def widen(x):
        if x.dtype.scalar != tl.bfloat16 or x.data.dtype != np.uint16:
            return x
        return handle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def narrows(src, dst_type):   # float32 -> bfloat16
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    def create_dot(self, a, b, d, *args, **kwargs):
        return dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if narrows(src, dst_type):
            return handle(f32_to_bf16_bits(src.data), tl.bfloat16)
        if dst_type.scalar == tl.float32 and src.dtype.scalar == tl.bfloat16:
            return widen(src)   # the same values as Triton's bit-by-bit conversion, without its Python loop
        return cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if narrows(src, dst_type) and rtne is not None and rounding_mode == rtne:
            return handle(f32_to_bf16_bits(src.data), tl.bfloat16)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    for fn in (create_dot, cast_impl, create_fp_to_fp):
        fn._llava_fast_bf16 = True
        setattr(builder, fn.__name__, fn)
    return True


def env_str(name: str, default: str) -> str:
    """The environment variable ``name`` (read at every call), stripped and lower-cased; unset or empty (``NAME=
    python ...``, how shells clear a variable for one command) means ``default``."""
    return (getenv(name) or "").strip().lower() or default


# Switches of variants removed in session 21, measured no faster than the defaults on H100/H200 (docs/perf-notes.md,
# "Removed attention variants" and "q, k and v as one GEMM"): a script that still sets one is told, once at import of
# the package, that it has no effect (instead of silently running the default).
REMOVED_SWITCHES = {
    "LLAVA_FAST_ATTN_BWD": "the atomic 5-GEMM attention backward",
    "LLAVA_FAST_ATTN_TMA": "the attention kernels' TMA loads",
    "LLAVA_FAST_ATTN_LSE_TMA": "the attention backward's lse/delta TMA loads",
    "LLAVA_FAST_ATTN_DKDV_LOOPS": "the one-loop causal dK/dV kernel",
    "LLAVA_FAST_FUSED_QKV": "q, k and v as one GEMM",
}


def warn_removed_switches() -> list[str]:
    """Warn about each set switch of :data:`REMOVED_SWITCHES` (it has no effect); returns their names."""
    import warnings

    found = [k for k in REMOVED_SWITCHES if os.environ.get(k)]
    for k in found:
        warnings.warn(f"{k} is set but no longer has an effect: {REMOVED_SWITCHES[k]} was removed (measured no "
                      f"faster than the default; docs/perf-notes.md). Unset it.", stacklevel=2)
    return found


def env_choice(name: str, choices: tuple, default: str) -> str:
    """:func:`env_str`, one of ``choices``; a ValueError naming the variable otherwise."""
    value = env_str(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {choices}")
    return value


_sm_counts: dict = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device index)."""
    import torch

    idx = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]


# ----------------------------------------------------------------------------------------------------------------------
# The optional CUTLASS library (Hopper GEMMs with fused epilogues, csrc/cutlass/): a plain shared library with a C ABI
# loaded with ctypes, so one build serves every torch and Python version. Loaded on first use, never at import.
# ----------------------------------------------------------------------------------------------------------------------
CUTLASS_LIB = "_cutlass_sm90.so"
CUTLASS_ABI = 5  # 5 (session 12): the non-causal attention forward masks the keys past S (ResidualFusion)
CUTLASS_BUILD_HINT = (
    "build it with the CUTLASS headers: `pip install nvidia-cutlass` (or set LLAVA_FAST_CUTLASS_DIR to a CUTLASS "
    "checkout), then `LLAVA_FAST_CUDA_ARCHS=90 pip install --no-build-isolation -e .`; it needs nvcc >= 12.3 and runs "
    "on sm_90 (H100/H200) only"
)
_cutlass = None
CUTLASS_ERROR: str | None = None


def cutlass_lib():
    """The ctypes handle of ``llava_fast/_cutlass_sm90.so``, or None (``CUTLASS_ERROR`` then says why)."""
    global _cutlass, CUTLASS_ERROR
    if _cutlass is not None or CUTLASS_ERROR is not None:
        return _cutlass
    import ctypes

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), CUTLASS_LIB)
    if not os.path.exists(path):
        CUTLASS_ERROR = f"{CUTLASS_LIB} is not built"
        return None
    try:
        lib = ctypes.CDLL(path)
        abi = lib.llava_fast_cutlass_abi_version()
        if abi != CUTLASS_ABI:
            raise OSError(f"ABI version {abi}, this llava_fast expects {CUTLASS_ABI}: rebuild it")
    except (OSError, AttributeError) as e:
        CUTLASS_ERROR = f"{CUTLASS_LIB} failed to load: {e}"
        return None
    p, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    lib.llava_fast_cutlass_workspace_bytes.restype = ctypes.c_size_t
    lib.llava_fast_cutlass_gelu_fwd.argtypes = [i, i, i, i, i, p, p, p, p, p, p, ctypes.c_size_t, p, c, i]
    lib.llava_fast_cutlass_gelu_fwd.restype = i
    lib.llava_fast_cutlass_dgelu_bwd.argtypes = [i, i, i, i, i, p, p, p, p, p, p, ctypes.c_size_t, p, c, i]
    lib.llava_fast_cutlass_dgelu_bwd.restype = i
    lib.llava_fast_cutlass_attn_fwd.argtypes = [i, i, i, i, i, i, p, p, p, p, p, p, c, i]
    lib.llava_fast_cutlass_attn_fwd.restype = i
    lib.llava_fast_cutlass_has_attn_fwd.restype = i
    _cutlass = lib
    return lib


CUTLASS_DTYPES = {"bfloat16": 0, "float16": 1}  # dtype codes of every CUTLASS entry point


def cutlass_dtype_code(dtype) -> int | None:
    """The CUTLASS entry points' code for a torch dtype (None: not built for it)."""
    return CUTLASS_DTYPES.get(str(dtype).replace("torch.", ""))
CUTLASS_ON_CPU = False  # tests only: let CPU tensors through to a fake library that checks a C ABI contract
_warned_once: set = set()


def cutlass_unavailable(device, need: str | None = None) -> str | None:
    """Why the CUTLASS library cannot serve tensors on ``device`` (None: it can): not an sm_90 GPU, the library
    missing, or (``need="attn_fwd"``) built without the attention forward."""
    if not CUTLASS_ON_CPU:
        import torch

        if device.type != "cuda":
            return f"tensors on {device}"
        cap = torch.cuda.get_device_capability(device)
        if cap != (9, 0):
            return f"compute capability {cap} (sm_90 only)"
    lib = cutlass_lib()
    if lib is None:
        return f"{CUTLASS_ERROR}; {CUTLASS_BUILD_HINT}"
    if need == "attn_fwd" and not lib.llava_fast_cutlass_has_attn_fwd():
        return "the CUTLASS library was built without CUTLASS's examples/88_hopper_fmha headers"
    return None


def cutlass_invoke(name: str, device, *args) -> tuple[int, str]:
    """``llava_fast_cutlass_<name>(*args, stream, err, errlen)`` on ``device``'s current stream (a null stream for the
    tests' fake library on CPU tensors): (return code, error message)."""
    import ctypes

    import torch

    fn = getattr(cutlass_lib(), f"llava_fast_cutlass_{name}")
    err = ctypes.create_string_buffer(512)
    if device.type == "cuda":
        with device_guard(device):
            ensure_cuda_context(device.index if device.index is not None else torch.cuda.current_device())
            rc = fn(*args, torch.cuda.current_stream(device).cuda_stream, err, len(err))
    else:
        rc = fn(*args, None, err, len(err))
    return rc, err.value.decode(errors="replace")


_NULL_GUARD = contextlib.nullcontext()  # reusable: enter and exit do nothing


def device_guard(device):
    """The guard to launch on ``device`` under: ``torch.cuda.device(device)`` for a CUDA device other than the
    current one, else a shared no-op context. Entering and leaving ``torch.cuda.device`` runs several Python calls
    even when the device is already current (where it changes nothing), on every launch of every op: ~300 launches
    per OneVision step on a CPU that took ~16 us for an aten ``add`` (the H100 box, session 12)."""
    import torch

    if device.type != "cuda" or device.index is None or device.index == torch._C._cuda_getDevice():
        return _NULL_GUARD
    return torch.cuda.device(device)


_DIRECT = None   # the direct-launch state: None until first use, False when off, else a dict of Triton's pieces

# The Triton versions whose ``JITFunction.run`` and compiled-kernel launcher :func:`launch` mirrors (read in their
# sources), each with the ``knobs.compilation`` values ``run`` adds to the call's options before binding: from 3.4 to
# 3.8 ``instrumentation_mode``; 3.9 adds ``fpsan_homomorphic_casts`` (its ``run`` differs from 3.8's in that alone).
# Another version takes Triton's own path. ``benchmarks/host_overhead.py --direct-check`` compares the two paths'
# launches under a mock driver on the installed Triton.
_DIRECT_OPTION_KNOBS = {**{(3, minor): ("instrumentation_mode",) for minor in range(4, 9)},
                        (3, 9): ("instrumentation_mode", "fpsan_homomorphic_casts")}


def _direct_state():
    """Decide once per process whether :func:`launch` may skip Triton's per-call extras (see there)."""
    global _DIRECT
    if _DIRECT is None:
        _DIRECT = False
        if getenv("LLAVA_FAST_DIRECT_LAUNCH", "1") != "0" and not interpreting():
            try:
                from triton import knobs
                from triton.runtime import driver
                from triton.runtime.jit import JITFunction, compute_cache_key

                option_knobs = _DIRECT_OPTION_KNOBS.get(triton_version())
                if option_knobs is not None and isinstance(getattr(knobs.runtime, "launch_enter_hook", None),
                                                           knobs.HookChain):
                    _DIRECT = dict(jit=JITFunction, key=compute_cache_key, knobs=knobs, driver=driver.active,
                                   option_knobs=option_knobs)
            except Exception:  # noqa: BLE001 - any surprise: Triton's own path
                _DIRECT = False
    return _DIRECT


_FP_FUSION = None   # fp_fusion_kwargs()'s answer, once per process


def fp_fusion_kwargs() -> dict:
    """The launch option that keeps our kernels' floating-point contraction (FMA) as every Triton up to 3.9 compiles
    it by default: ``{"enable_fp_fusion": True}``, or ``{}`` where the user set ``TRITON_DEFAULT_FP_FUSION`` (their
    choice then rules; ``TRITON_FORCE_DISABLE_FP_FUSION=1`` always does, inside Triton). Triton 3.9 warns once per
    process at the first compile of a kernel launched without it ("TRITON_DEFAULT_FP_FUSION is unset ... The
    default will change to DISABLED in Triton 3.10"), and 3.10 would compile the kernels without FMA: other
    rounding than the kernels measured and tested on GPUs, and more instructions. :func:`launch` adds it to every
    launch; the few launches that do not go through it (autotuned and interpreter-only paths) pass it themselves.
    Older Triton and the interpreter take it (the interpreter drops launch options)."""
    global _FP_FUSION
    if _FP_FUSION is None:
        _FP_FUSION = {} if getenv("TRITON_DEFAULT_FP_FUSION") is not None else {"enable_fp_fusion": True}
    return _FP_FUSION


def reset_direct_launch() -> None:
    """Forget the direct-launch decision and the FP-fusion option (tests: after changing LLAVA_FAST_DIRECT_LAUNCH,
    TRITON_DEFAULT_FP_FUSION or Triton's driver)."""
    global _DIRECT, _FP_FUSION
    _DIRECT = None
    _FP_FUSION = None


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with less host work once the kernel is compiled for these arguments.

    Triton's ``JITFunction.run`` does, per launch, besides the launch: reads of two knobs (an environment variable),
    the device and stream queries through its driver, the pre-run hooks, ``str(options)`` for the cache key, a check
    of the kernel's global variables, and ``launch_metadata`` (a dict built for the launch hooks, even with no hook
    registered), and the launcher then calls the two empty hook chains. The OneVision step makes ~300 launches on a
    host that was the bottleneck (session 12: ~100 us of host per Triton op call on the H100 box). This path keeps
    what decides correctness, Triton's own binder (the arguments' specialisation: dtypes, 16-byte alignment, integers
    equal to 1 or divisible by 16) and Triton's compiled-kernel cache, and looks the result up by the specialisation
    tuple; it then calls the compiled kernel's launcher with the same arguments ``run`` passes, with no hooks. It
    falls back to ``kernel[grid]`` for the first call of a specialisation (which compiles), while any launch hook,
    pre-run hook or stage-inspection hook is registered (profilers), under the interpreter, for anything that is
    not a plain ``JITFunction`` (autotuners), on Triton versions outside 3.4-3.9, and with
    ``LLAVA_FAST_DIRECT_LAUNCH=0`` (read once per process). A launcher that raises on the direct call (a Triton whose
    launcher takes other arguments) warns once and turns the direct path off for the process, that launch going
    through Triton's path. Skipped for good: the check that a kernel's global variables have not changed since it
    compiled (ours read none that change)."""
    global _DIRECT
    if "enable_fp_fusion" not in kwargs:
        kwargs.update(_FP_FUSION if _FP_FUSION is not None else fp_fusion_kwargs())
    d = _DIRECT if _DIRECT is not None else _direct_state()
    if d is False or type(kernel) is not d["jit"] or kernel.pre_run_hooks or not kernel.device_caches:
        return kernel[grid](*args, **kwargs)
    knobs = d["knobs"]
    rt = knobs.runtime
    if rt.launch_enter_hook.calls or rt.launch_exit_hook.calls or \
            getattr(rt, "add_stages_inspection_hook", None) is not None:
        return kernel[grid](*args, **kwargs)
    drv = d["driver"]
    device = drv.get_current_device()
    caches = kernel.device_caches.get(device)
    if caches is None:
        return kernel[grid](*args, **kwargs)
    kernel_cache, key_cache, _target, _backend, binder = caches
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or rt.debug
    for name in d["option_knobs"]:
        kwargs[name] = getattr(knobs.compilation, name)
    bound, spec, options = binder(*args, **kwargs)
    ck = (tuple(spec), tuple(options.items()))
    per = kernel.__dict__.get("_llava_fast_direct")
    if per is None:
        per = kernel.__dict__["_llava_fast_direct"] = {}
    compiled = per.get((device, ck))
    if compiled is None:
        compiled = kernel_cache.get(d["key"](key_cache, spec, options))
        if compiled is None or hasattr(compiled, "result"):   # not compiled yet (or compiling): Triton compiles
            return kernel[grid](*args, **kwargs)
        per[(device, ck)] = compiled
    n = len(grid)
    try:
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, drv.get_current_stream(device),
                     compiled.function, compiled.packed_metadata, None, None, None, *bound.values())
    except Exception as e:  # noqa: BLE001 - a launcher that does not take these arguments: Triton's path from now on
        if type(e).__name__ == "OutOfResources":  # the kernel does not fit this GPU: the caller's to handle
            raise
        _DIRECT = False
        import warnings

        warnings.warn(f"llava_fast: the direct Triton launch failed ({type(e).__name__}: {e}); launching through "
                      f"Triton's kernel[grid] from now on (LLAVA_FAST_DIRECT_LAUNCH=0 skips the attempt)",
                      RuntimeWarning, stacklevel=2)
        return kernel[grid](*args, **kwargs)
    return compiled


def host_copies(*tensors):
    """CPU copies of several small device tensors for one host synchronisation in all (None and CPU tensors come
    back as they are). Reading a CUDA tensor on the host (``.tolist()``, ``int(t)``, ``bool(t)``, ``nonzero``) waits
    until the GPU has run everything queued before it, and then the GPU idles until the host queues new work: the
    model's input checks read input_ids, labels, image_sizes, ... one after another, 11 such waits per OneVision
    training step (session 12's H100 profile), and the fused loss two more. The CUDA copies go into pinned memory
    without blocking (``non_blocking=True``), then one stream synchronisation covers them all."""
    import torch

    out, sync = [], None
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "cpu":
            out.append(t)
        elif t.device.type == "cuda":
            out.append(t.to("cpu", non_blocking=True))
            sync = t.device
        else:  # another accelerator: a plain blocking copy
            out.append(t.cpu())
    if sync is not None:
        torch.cuda.current_stream(sync).synchronize()
    return out


_libcuda = None


def ensure_cuda_context(index: int, libcuda=None) -> None:
    """Make device ``index``'s primary context current on the calling thread when no context is, as Triton's
    launcher does before each launch. The CUTLASS library builds TMA descriptors with the driver API, which needs a
    current context; autograd's backward threads have none until a runtime call binds one, and torch's device guard
    skips ``cudaSetDevice`` for the device the thread already reports (0). The first backward of a fresh process
    that reached the CUTLASS projector before any other CUDA work failed so on the H100 (session 12:
    CUDA_ERROR_INVALID_CONTEXT, 201, from cuTensorMapEncodeTiled). ``libcuda``: tests pass a fake driver."""
    global _libcuda
    import ctypes

    if libcuda is None:
        if _libcuda is None:
            _libcuda = ctypes.CDLL("libcuda.so.1")
        libcuda = _libcuda
    ctx = ctypes.c_void_p()
    if libcuda.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or ctx.value:
        return
    dev = ctypes.c_int()
    rc = libcuda.cuDeviceGet(ctypes.byref(dev), int(index))
    if rc == 0:
        rc = libcuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    if rc == 0:
        rc = libcuda.cuCtxSetCurrent(ctx)
    if rc != 0:
        raise RuntimeError(f"could not make CUDA device {index}'s primary context current on this thread "
                           f"(driver error {rc})")


def warn_once(msg: str) -> None:
    """One warning per message: a path that cannot take a call (CUTLASS, TMA) and falls back says why once."""
    if msg not in _warned_once:
        _warned_once.add(msg)
        import warnings

        warnings.warn(msg, stacklevel=4)
