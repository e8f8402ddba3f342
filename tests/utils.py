"""Test helpers shared by the op, model and training tests."""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch


@contextlib.contextmanager
def big_gpu_memory():
    """One test at a time across pytest-xdist workers for GPU tests that need tens of GiB (fp32 references of
    8k x 152k logits): device_check runs the cuda tests 12 at a time, and on an 80 GiB H100 four of them ran out of
    memory together (session 12). An exclusive lock on a file in the temp folder; the test's cached blocks go back
    to the driver afterwards, so the other workers can use them."""
    import fcntl

    path = os.path.join(tempfile.gettempdir(), "llava_fast_big_gpu_memory.lock")
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            fcntl.flock(f, fcntl.LOCK_UN)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_flash_rule(out: torch.Tensor, ref_fp32: torch.Tensor, ref_same_dtype: torch.Tensor, name: str = "out",
                      atol: float = 0.0) -> None:
    """flash-attn's tolerance rule: the kernel's error against an fp32 reference is at most twice the error of the
    same computation done by PyTorch in the kernel's dtype (plus ``atol``, for the fp32 case where that error is ~0:
    pass a few ULP of fp32 there, and say why at the call site)."""
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    err = max_err(out, ref_fp32)
    base = max_err(ref_same_dtype, ref_fp32)
    print(f"{name}: max err {err:.3e}, pytorch same-dtype err {base:.3e}")
    assert err <= 2 * base + atol, f"{name}: max error {err:.3e} > 2 x pytorch's {base:.3e} + {atol:.1e}"


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                         name: str = "") -> None:
    """torch.testing.assert_close, printing the max error and the first mismatching index first."""
    a, e = actual.float(), expected.float()
    diff = (a - e).abs()
    if diff.numel():
        idx = diff.argmax()
        print(f"{name}: max abs err {diff.max().item():.3e} at flat index {idx.item()}")
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def peak_live_bytes(fn, keep=()) -> tuple[int, object]:
    """(peak bytes of tensor storage alive at once while ``fn()`` runs, fn's result), counting only storages first
    seen as outputs of the ATen ops ``fn`` runs (a ``TorchDispatchMode``): what ``torch.cuda.max_memory_allocated``
    would report for the same code on a GPU, on the CPU. Storages of ``keep`` (inputs that exist before and after)
    are never counted, even when an op returns a view of them. Ops behind a ``torch.library`` custom op are not
    seen one by one: call the Python implementation. Memory the Triton interpreter uses (numpy) is not counted; the
    reference cycles it leaves around a kernel's tensor arguments (freed by the garbage collector, not when the last
    name goes: a GPU run has none) are collected before a new peak is recorded."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    skip = {t.untyped_storage().data_ptr() for t in keep if torch.is_tensor(t)}
    live: dict = {}
    peak = 0

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal peak
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if torch.is_tensor(t):
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key in skip or st.nbytes() == 0:
                        continue
                    ref = live.get(key)
                    if ref is None or ref[0].expired():
                        live[key] = (StorageWeakRef(st), st.nbytes())
            total = live_total()
            if total > peak:
                gc.collect()
                total = live_total()
            peak = max(peak, total)
            return out

    def live_total():
        for key in [k for k, (ref, _) in live.items() if ref.expired()]:
            del live[key]
        return sum(nb for _, nb in live.values())

    # gc.collect() runs whenever a new peak shows: freeze what exists before fn so that each collection only scans
    # the objects fn made (a test process holds ~10^6 objects; a full collection costs ~0.3 s of them)
    frozen = gc.get_freeze_count() == 0
    if frozen:
        gc.collect()
        gc.freeze()
    try:
        with Track():
            result = fn()
    finally:
        if frozen:
            gc.unfreeze()
    return peak, result


def raw_view(ptr: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor over ``prod(shape)`` elements at the raw address ``ptr`` (writes go to that memory): how the
    tests' fake CUTLASS libraries read and write the tensors a wrapper hands to the C entry points."""
    import ctypes
    import math

    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).view(shape)


# The cuda tests that ran longest on the GPU box (seconds; H200, session 18, 12 pytest-xdist workers). xdist hands
# each worker a chunk of consecutive tests first, so two of these next to each other ran back to back on one worker:
# the two torch.compile model tests made one worker's chain 235 s of the 298 s test step. long_first_order puts each
# at the head of its own worker's first chunk. Keys are test names with their parameters (item.name).
# Session 19 ran the three Inductor compiles at once, one per worker: 207 s, 207 s and >150 s (pytest-timeout), the
# test step 261 s; compiles that share 16 host cores take longer each, hence their 400 s timeout marks.
LONG_CUDA_TESTS = {
    "test_torch_compile_packed_training_step[llava_next]": 193,
    "test_cuda_cpu_ids_and_compile": 58,
    "test_cuda_training_step_does_not_synchronize[llava_onevision]": 47,
    "test_torch_compile_packed_training_step[llava_onevision]": 42,
    # session 23, not yet run: ~520 tiny training steps, generation, and the first compile of the demo's shapes
    "test_cuda_demo_quick": 90,
    # session 36, not yet run: 3 x 12 steps of the trainer (one in fp32), its first compile of the demo's shapes
    "test_cuda_kernels_train_like_the_reference": 60,
}


def xdist_first_chunk(n_items: int, n_workers: int) -> int:
    """How many consecutive tests pytest-xdist's ``load`` scheduler (3.x, no --maxschedchunk) sends each worker
    first: ``max(n_items // n_workers // 4, 2)``, or 1 when there are fewer than two tests per worker."""
    if n_items < 2 * n_workers:
        return 1
    return max(n_items // n_workers // 4, 2)


def long_first_order(names: list[str], n_workers: int, long_seconds: dict[str, float] = LONG_CUDA_TESTS) -> list[int]:
    """A permutation of ``range(len(names))``: the tests named in ``long_seconds`` (longest first) at the starts of
    the first workers' chunks (positions 0, c, 2c, ... for chunk c), at most one per worker; every other test keeps
    its order in the remaining positions."""
    chunk = xdist_first_chunk(len(names), n_workers)   # (1: round robin, one test per worker at a time)
    long = sorted((i for i, n in enumerate(names) if n in long_seconds), key=lambda i: -long_seconds[names[i]])
    placed = {j * chunk: i for j, i in enumerate(long[:n_workers])}
    taken = set(placed.values())
    rest = iter(i for i in range(len(names)) if i not in taken)
    return [placed[pos] if pos in placed else next(rest) for pos in range(len(names))]


def write_video(path, n: int = 40, codec: str = "libx264", opts: dict | None = None, w: int = 64, h: int = 48,
                fps: int = 25) -> str:
    """A video file written with PyAV. Frame i: grey level 6 * i with its first i columns white (every frame
    differs)."""
    import av
    import numpy as np

    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = dict(opts or {})
    for i in range(n):
        a = np.full((h, w, 3), (6 * i) % 250, np.uint8)
        a[:, : i % w] = 255
        for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return str(path)


def tiny_onevision(folder):
    """A tiny LLaVA-OneVision (SigLIP tower, Qwen2 language model) with the word tokenizer, as a llava-hf folder."""
    from llava_fast.data.word_tokenizer import build_word_tokenizer
    from llava_fast.models import LlavaConfig, LlavaOnevisionForConditionalGeneration

    tok = build_word_tokenizer("what happens in the clip a cat runs jumps sits".split(), bos=False)
    hf = {"model_type": "llava_onevision", "image_token_id": tok.convert_tokens_to_ids("<image>"),
          "video_token_id": tok.convert_tokens_to_ids("<video>"), "vision_aspect_ratio": "anyres_max_9",
          "image_grid_pinpoints": [[28 * i, 28 * j] for i in range(1, 4) for j in range(1, 4)],
          "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "tie_word_embeddings": True,
          "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
          "text_config": {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 2048, "tie_word_embeddings": True,
                          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}}
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(LlavaConfig.from_hf_dict(hf)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_distance(hist, weights, oracle_hist, oracle_weights):
    """How far a training run is from an oracle run: (largest loss difference over the steps, relative L2 distance of
    all trained weights at the end). ``hist``: per-step dicts with "loss"; ``weights``: name -> tensor."""
    import math

    loss = max(abs(h["loss"] - o["loss"]) for h, o in zip(hist, oracle_hist, strict=True))
    num = sum(float((weights[k] - oracle_weights[k]).double().square().sum()) for k in oracle_weights)
    den = sum(float(oracle_weights[k].double().square().sum()) for k in oracle_weights)
    return loss, math.sqrt(num / den)


def record(test: str, **values) -> None:
    """A cuda test's measurement kept for the GPU session's notes: one JSON line appended to
    ``$LLAVA_FAST_RESULTS_DIR/cuda_test_measurements.jsonl`` (device_check.sh sets the folder; its results come
    back with the call's files), besides the test's own print, which pytest keeps only for failing tests."""
    import json
    import os

    folder = os.environ.get("LLAVA_FAST_RESULTS_DIR")
    if not folder:
        return
    row = {"test": test, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **values}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cuda_test_measurements.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def assert_run_flash_rule(test: str, ours, same, oracle, names=("kernels", "reference_bf16")) -> None:
    """flash-attn's rule over a training run: ``ours`` is at most twice as far from the fp32 ``oracle`` as ``same``
    (the same computation without our kernels, in the same dtype), in the largest loss difference over the steps and
    in the trained weights (``run_distance``). Each run: (per-step dicts with "loss", final weights). The floors,
    1e-4 on the loss (~2e-5 of the demo's losses of ~4-5) and 1e-6 on the weights, only keep a ``same`` run that
    lands on the oracle by luck from failing ``ours`` for the rounding of one value: on the CPU, 3 steps of the
    reference path in bf16 are already 3.7e-4 (loss) and 4.8e-4 (weights) from the fp32 run. The distances are
    printed and ``record``-ed."""
    (ours_loss, ours_w), (same_loss, same_w) = run_distance(*ours, *oracle), run_distance(*same, *oracle)
    print(f"{test}: distance from the fp32 run over {len(oracle[0])} steps: {names[0]} loss {ours_loss:.2e} weights "
          f"{ours_w:.2e}; {names[1]} loss {same_loss:.2e} weights {same_w:.2e}")
    record(test, **{f"{names[0]}_loss": ours_loss, f"{names[0]}_weights": ours_w, f"{names[1]}_loss": same_loss,
                    f"{names[1]}_weights": same_w})
    assert ours_loss <= 2 * same_loss + 1e-4, (ours_loss, same_loss)
    assert ours_w <= 2 * same_w + 1e-6, (ours_w, same_w)


# every op the model can run on a kernel (backend.OPS but the image encoder, which runs in the data pipeline)
MODEL_KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy", "pack_features", "attention", "vision_attention",
                 "projector", "gelu", "quick_gelu", "layer_norm", "bias_grad", "patch_embed")
