"""cuDNN's fused attention for training, with its backward graphs kept away from everyone else's. On Hopper the
default (since session 28) for the language model's training attention over documents of one length
(``models/dispatch._cudnn_text``) and for trained vision towers (``dispatch._prefer_cudnn``);
``LLAVA_FAST_TEXT_ATTENTION=cudnn`` takes it on any GPU. Measured on an H200 in session 28: causal D128 4k fwd+bwd
482.6 TFLOP/s (SDPA's own cuDNN 485.0, our Triton kernels 334.0); the stage-1 shape (16 documents of 640 tokens, 32
heads, D128) 0.724 ms against our 0.966; end to end (paired, 4 LLM layers) 1.021x on the OneVision step, 1.007x and
1.016x on stage 1.

Why not plain SDPA: torch caches cuDNN's backward graph per thread under the shapes and strides of q, k and v only
(aten/src/ATen/native/cudnn/MHA.cpp, ``MHAParams``), while the graph also bakes in the strides of the output
gradient dO. Two backward calls with the same q/k/v layout and different dO layouts share one graph, and the second
reads its dO in the first one's order: wrong gradients, no error (session 19: dq error 5.0 where PyTorch's own is
0.016). Autograd runs every CUDA backward of the process on one device thread, so another model's cuDNN call (a
reference model, user code) can leave such a graph behind for ours. Here:

1. the backward runs on a thread of our own (:func:`_worker`), whose thread-local cache only our calls fill;
2. every dO is copied into the output's layout first, so all our graphs for one q/k/v layout agree.

Numerics are cuDNN's (fp32 softmax and accumulation, bf16/fp16 in and out), the reference is SDPA's math path
(:func:`cudnn_attention_ref`: transformers' eager attention computes the same function). Traffic and FLOPs are those of
any fused attention (docs/perf-notes.md, "attention"); nothing here adds a pass but the dO copy when its layout
differs (2 x B*L*H*D*b bytes: 168 MB, ~0.06 ms, at stage 1; the model's dO arrives in the output's layout).

Limits (callers check :func:`supported`): CUDA, bf16/fp16, key heads dividing the query heads (GQA as cuDNN takes it:
torch's own SDPA hands cuDNN unexpanded k/v, sdp_utils.cpp ``check_batch_size_and_num_heads_dense<supports_gqa>``),
head dim a multiple of 8 up to 128, not inside a CUDA graph capture or a torch.compile trace (the worker thread is
outside both).
"""
from __future__ import annotations

import contextlib
import queue
import threading
import warnings

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------


def cudnn_attention_ref(q, k, v, scale: float, causal: bool = True) -> torch.Tensor:
    """Attention over (B, H, L, D) q / (B, Hkv, L, D) k, v by SDPA's math backend (fp32 softmax for fp32 inputs, as
    transformers' eager path; query head h reads key head h // (H / Hkv)): the function the cuDNN path computes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


# --------------------------------------------------------------------------------------------------------------------
# 2. kernel: torch's cuDNN entry points (aten ops, stable since torch 2.5)
# --------------------------------------------------------------------------------------------------------------------


def _cudnn_fwd(q, k, v, scale: float, causal: bool, lse: bool = True):
    """(out, logsumexp, cum_q, cum_k, max_q, max_k, seed, offset) of one cuDNN forward; ``lse`` False where no
    backward follows (nothing to keep)."""
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, causal, False, scale=scale)
    return r[:8]


def _cudnn_bwd(do, q, k, v, out, lse, seed, offset, cum_q, cum_k, max_q, max_k, scale: float, causal: bool):
    """(dq, dk, dv) of one cuDNN backward."""
    # attn_bias None: an undefined tensor, "no bias" (an empty one would be a defined bias)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)


# --------------------------------------------------------------------------------------------------------------------
# 3. launcher: the backward on our own thread
# --------------------------------------------------------------------------------------------------------------------
_jobs: queue.SimpleQueue | None = None
_worker_thread: threading.Thread | None = None
_lock = threading.Lock()


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        fn, args, done, box = jobs.get()
        try:
            box.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 -- handed back to the waiting caller, raised there
            box.append(e)
        done.set()


def _worker() -> queue.SimpleQueue:
    """The job queue of the one daemon thread that runs every cuDNN backward of this module (started on first use)."""
    global _jobs, _worker_thread
    with _lock:
        if _worker_thread is None or not _worker_thread.is_alive():
            _jobs = queue.SimpleQueue()
            _worker_thread = threading.Thread(target=_serve, args=(_jobs,), name="llava_fast-cudnn-bwd", daemon=True)
            _worker_thread.start()
        return _jobs


def _on_worker(fn, *args):
    """``fn(*args)`` on the worker thread, on the caller's CUDA device and stream (kernels queue on the same stream, in
    the caller's order: no synchronisation beyond the hand-off); exceptions are raised here."""
    done, box = threading.Event(), []
    grad = torch.is_grad_enabled()      # thread-local: off in autograd's backward, on by default in a new thread
    stream = torch.cuda.current_stream(args[0].device) if args[0].is_cuda else None

    def call(*a):
        on_stream = contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)
        on_device = contextlib.nullcontext() if stream is None else torch.cuda.device(stream.device)
        with torch.set_grad_enabled(grad), on_device, on_stream:
            return fn(*a)
    _worker().put((call, args, done, box))
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _like_out(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """dO in out's layout (a copy only where the strides differ)."""
    if do.stride() == out.stride():
        return do
    return torch.empty_like(out).copy_(do)   # empty_like keeps out's strides (dense, non-overlapping)


# --------------------------------------------------------------------------------------------------------------------
# 4. autograd Function
# --------------------------------------------------------------------------------------------------------------------
class CudnnAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset = _cudnn_fwd(q, k, v, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse, cum_q, cum_k, seed, offset)
        ctx.meta = (max_q, max_k, scale, causal)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse, cum_q, cum_k, seed, offset = ctx.saved_tensors
        max_q, max_k, scale, causal = ctx.meta
        try:
            dq, dk, dv = _on_worker(_cudnn_bwd, _like_out(do, out), q, k, v, out, lse, seed, offset, cum_q, cum_k,
                                    max_q, max_k, scale, causal)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # e.g. a cuDNN build with no backward plan for these shapes: say how to avoid it
            raise RuntimeError(
                f"cuDNN's attention backward failed for q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}: {e}. "
                f"LLAVA_FAST_TEXT_ATTENTION=triton (the language model) or LLAVA_FAST_SDPA_CUDNN=0 (the vision "
                f"towers) keeps these on other kernels") from e
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------------------------------------
# 5. functional
# --------------------------------------------------------------------------------------------------------------------


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`cudnn_attention` takes these q (B, H, L, D) / k (B, Hkv, L, D) here (see the module's limits)."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[1] % k.shape[1] == 0
            and d % 8 == 0 and d <= 128 and q.stride(-1) == 1 and k.stride(-1) == 1
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


def cudnn_attention(q, k, v, scale: float, causal: bool = True) -> torch.Tensor:
    """Attention over (B, H, L, D) q/k/v through cuDNN, its backward on this module's thread with dO in the output's
    layout. Raises ``ValueError`` naming the argument for inputs it does not take (:func:`supported`)."""
    if not supported(q, k):
        raise ValueError(
            f"cudnn_attention: takes CUDA bf16/fp16 q/k/v with key heads dividing the query heads and a head dim "
            f"that is a multiple of 8 up to 128, outside CUDA-graph capture and torch.compile; got q {tuple(q.shape)} "
            f"{q.dtype} on {q.device}, k {tuple(k.shape)}. Use LLAVA_FAST_TEXT_ATTENTION=triton for these.")
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # no backward will follow: no log-sum-exp, nothing saved
        return _cudnn_fwd(q, k, v, float(scale), bool(causal), lse=False)[0]
    return CudnnAttentionFunction.apply(q, k, v, float(scale), bool(causal))


# cuDNN >= 9.19 (what torch 2.11's wheels bundle) is the version the defaults were measured with (H200, session 28):
# below it, models/dispatch's "auto" rules keep their other kernels ("cudnn" / LLAVA_FAST_SDPA_CUDNN=1 still take it)
CUDNN_MIN_AUTO = 91900
# (query heads, key heads, head dim, dtype, causal, with a backward) that cuDNN refused on this machine
_refused: set = set()


def try_cudnn_attention(q, k, v, scale: float, causal: bool = True) -> torch.Tensor | None:
    """:func:`cudnn_attention` for callers that have another kernel to fall back on: None for inputs it does not take
    (:func:`supported`), and where cuDNN refuses the call (a cuDNN build with no execution plan for this head dim,
    dtype or head ratio; anything but running out of memory), with one warning per kind of call, and None at once
    for a kind it refused before."""
    if not supported(q, k):
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = (q.shape[1], k.shape[1], q.shape[-1], q.dtype, bool(causal), grad)
    if key in _refused:
        return None
    try:
        return cudnn_attention(q, k, v, scale, causal)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        _refused.add(key)
        warnings.warn(f"cuDNN attention refused q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                      f"({str(e).splitlines()[0][:200]}); such calls run on the other kernels from now on "
                      f"(LLAVA_FAST_TEXT_ATTENTION=triton and LLAVA_FAST_SDPA_CUDNN=0 skip cuDNN altogether)",
                      stacklevel=2)
        return None
