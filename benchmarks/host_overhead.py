"""Host (CPU) time of one end-to-end step with every GPU kernel launch stubbed out: what the Python side of a step
costs, measurable on a machine without a GPU.

A training step on a GPU is host-bound when the host needs longer to issue the step's work than the GPU needs to run
it (the GPU then waits between kernels). The OneVision-0.5B fine-tune is the workload at risk: small widths (hidden
896, kernels of 10-30 us) and a deep stack (26 SigLIP + 24 Qwen2 layers), against a GPU target of 128 ms per step
(docs/perf-notes.md, "Is the step host-bound?"). This script builds that model at full depth but toy widths on the CPU,
forces our fast paths on, replaces every Triton launch by a no-op (`KernelInterface.__getitem__`), and times the step:
Python, the dispatcher, autograd and our launchers; the toy model's remaining CPU arithmetic (its GEMMs, SDPA in the
vision tower, the optimizer) is counted too and is small at these widths (`--profile` shows how much).

The GPU host is faster than this 2-core dev CPU; the ratio is unknown until a GPU run's `profile_model.py` reports the
wall time against the kernel time. Use this script to compare versions of the host path, not as an absolute.

Usage: python benchmarks/host_overhead.py [--workload ov_ft] [--steps 5] [--provider llava_fast|reference|hf_sdpa]
       [--llm-layers 24] [--vision-layers 26] [--profile] [--per-layer]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402

FULL_DEPTH = {"ov_ft": (24, 26), "stage1": (32, 24), "prefill": (32, 24)}
launches: Counter = Counter()


def stub_triton_launches() -> None:
    """Every ``kernel[grid](...)`` returns at once and is counted (by kernel name)."""
    from triton.runtime.jit import KernelInterface

    def getitem(self, grid):
        name = getattr(getattr(self, "fn", self), "__name__", type(self).__name__)

        def launch(*args, **kwargs):
            launches[name] += 1
        return launch

    KernelInterface.__getitem__ = getitem


def force_fast() -> None:
    """Every op decides as it would for CUDA tensors (``"auto"`` on a GPU: kernels, except ``AUTO_REFERENCE``)."""
    from llava_fast import backend

    real = backend.use_fast
    backend.use_fast = lambda op, device_type: real(op, "cuda")


def count_ops(step):
    """aten ops dispatched in one step: in the forward, and in the backward and optimizer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    phase = {"now": "forward"}
    counts = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[phase["now"]] += 1
            counts[(phase["now"], str(func.overloadpacket))] += 1
            return func(*args, **(kwargs or {}))

    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        phase["now"] = "backward"
        return real_backward(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        with Count():
            step()
    finally:
        torch.Tensor.backward = real_backward
    counts["total"] = counts["forward"] + counts["backward"]
    return counts


READ_OPS = ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
            "aten.is_nonzero.default")


def device_reads(step, device_tensors, on_device_paths=True):
    """The host reads of device data in ``step()``: each is a host synchronisation on a GPU (the host waits for the
    GPU's queue to drain, then the GPU idles until the host queues more). Measurable on the CPU: the tensors that
    would live on the GPU (``device_tensors``: the inputs and the parameters) are marked, every op's outputs are
    marked when one of its inputs is, and a read of a marked tensor (``int(t)``, ``bool(t)``, ``.item()``,
    ``.tolist()``, ``.numpy()``, ``.cpu()``, ``nonzero``) is recorded with the model's source line;
    ``llava_fast._ext.host_copies`` (the deliberate one synchronisation) counts once and returns unmarked copies.
    ``on_device_paths``: the code paths a GPU takes where the CPU's differ by device (the feature packing's token
    index is computed by a kernel on a GPU, by torch on the host from CPU ids).
    Host-to-device copies of host-made values are recorded too (what ``"h2d <op>"``): a tensor made from Python data
    (``torch.tensor(list)``, the value tensor of ``t[idx] = 3``; aten's ``lift_fresh``) that meets a marked tensor in
    an op must be copied to the GPU from pageable memory, a synchronisation (and an error under CUDA graph capture:
    session 14's H200 run found ``shift[0, idx] = ignore_index`` so). A 0-dim one is recorded only where the op
    copies it (``index_put_``, ``copy_``, ``cat``...): elementwise ops take a CPU scalar tensor as a kernel argument.
    Returns a Counter {(what, "file:line <- file:line"): count}."""
    import traceback
    import weakref
    from functools import partial

    from torch.utils._pytree import tree_flatten
    from torch.utils._python_dispatch import TorchDispatchMode

    from llava_fast import _ext
    from llava_fast.ops import pack_features

    marked: dict = {}
    host_born: dict = {}
    reads: Counter = Counter()

    def mark(t):
        if isinstance(t, torch.Tensor):
            marked[id(t)] = weakref.ref(t)

    def is_marked(t):
        r = marked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return r is not None and r() is t

    def where():
        frames = [f for f in traceback.extract_stack()[:-2]
                  if "llava_fast" in f.filename and "host_overhead" not in f.filename]
        return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-2:])) or "?"

    def is_host_born(t):
        r = host_born.get(id(t)) if isinstance(t, torch.Tensor) else None
        return r is not None and r() is t

    class Audit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            flat = tree_flatten((args, kwargs))[0]
            dev = any(is_marked(t) for t in flat)
            name = str(func.overloadpacket).split(".")[-1]
            if dev and str(func) in READS:
                reads[(name, where())] += 1
            if dev and any(is_host_born(t) and (t.dim() > 0 or name in COPYING) for t in flat):
                reads[(f"h2d {name}", where())] += 1
            out = func(*args, **kwargs)
            if str(func) == "aten.lift_fresh.default":
                host_born[id(out)] = weakref.ref(out)
            if dev:
                for t in tree_flatten(out)[0]:
                    mark(t)
            return out

    READS = set(READ_OPS)
    COPYING = {"index_put_", "index_put", "_index_put_impl_", "copy_", "cat", "stack", "masked_scatter_",
               "masked_scatter", "index_copy_", "index_copy", "scatter_", "scatter", "_to_copy"}
    real = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

    def reader(name):
        def fn(self, *a, **k):
            if is_marked(self):
                reads[(name, where())] += 1
            return real[name](self, *a, **k)
        return fn

    real_copies, real_token_index = _ext.host_copies, pack_features.token_index

    def host_copies(*tensors):
        if any(is_marked(t) for t in tensors):
            reads[("host_copies", where())] += 1
        out = [t.clone() if isinstance(t, torch.Tensor) else t for t in tensors]
        for t in out:
            marked.pop(id(t), None)   # a host copy: reading it costs nothing
        return out

    for t in device_tensors:
        mark(t)
    try:
        for name in real:
            setattr(torch.Tensor, name, reader(name))
        _ext.host_copies = host_copies
        if on_device_paths:
            pack_features.token_index = partial(real_token_index, on_device=True)
        with Audit():
            step()
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)
        _ext.host_copies = real_copies
        pack_features.token_index = real_token_index
    return reads


LAUNCHES: list = []   # with record=True: (kernel hash, grid, launch metadata, hooks, kernel arguments) per launch


def mock_cuda_driver(record: bool = False) -> None:
    """Make Triton believe it runs on an sm_90 GPU: kernels compile for real (ptxas ships with triton) and every
    launch goes through the whole JIT dispatch (argument specialisation, cache lookup, the launcher call), but the
    launcher is a no-op and the binaries are never loaded. Uses Triton's driver interface (3.6-3.8); for
    measurements only (``--dispatch``)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    global _LOAD_BINARY_VALUES
    import inspect

    from triton.compiler import compiler as _compiler
    src = inspect.getsource(_compiler.CompiledKernel._init_handles)
    _LOAD_BINARY_VALUES = 5 if "n_max_threads = driver.active.utils.load_binary" in src else 4

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            # module, function, registers, spills, max threads (Triton 3.3 takes the first four)
            return (None, 1, 0, 0, 1024)[:_LOAD_BINARY_VALUES]

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

        def unload_module(self, module):
            pass

    class MockDriver:
        utils = Utils()

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

        def launcher_cls(self, src, metadata):
            name = getattr(src, "name", "kernel")
            if not record:
                def count(*args):
                    launches[name] += 1
                return count

            def run(gx, gy, gz, stream, function, kernel_metadata, launch_metadata, enter, exit_, *args):
                LAUNCHES.append((metadata.hash, (gx, gy, gz), launch_metadata, (enter, exit_), args))
            return run

    driver.set_active(MockDriver())


def _direct_cases():
    """Launches that cover Triton's specialisations: integer arguments equal to 1 or divisible by 16 or neither,
    pointers 16-byte aligned or not (views at an element offset), contiguous and row-strided layouts, dtypes."""
    from llava_fast.ops import gelu, quick_gelu, rms_norm, rope, swiglu

    g = torch.Generator().manual_seed(0)
    buf = torch.randn(64 * 897 + 8, generator=g)
    cases = []
    for m, n in ((1, 896), (16, 896), (17, 897), (5, 64)):
        x = buf[: m * n].view(m, n)
        xo = buf[1: 1 + m * n].view(m, n)                   # one element in: the pointer is not 16-byte aligned
        w = torch.ones(n)
        cases += [(f"rms_norm {m}x{n}", lambda x=x, w=w: rms_norm.rms_norm_fwd(x, w, 1e-6)),
                  (f"rms_norm {m}x{n} offset", lambda x=xo, w=w: rms_norm.rms_norm_fwd(x, w, 1e-6)),
                  (f"rms_norm+res {m}x{n}", lambda x=x, w=w: rms_norm.rms_norm_fwd(x, w, 1e-6, residual=x)),
                  (f"rms_norm bwd {m}x{n}", lambda x=x, w=w: rms_norm.rms_norm_bwd(
                      x, x, w, torch.ones(m), want_out=True)),
                  (f"swiglu {m}x{n}", lambda x=x: swiglu.swiglu_fwd(x, x)),
                  (f"swiglu bwd {m}x{n}", lambda x=x: swiglu.swiglu_bwd(x, x, x)),
                  (f"quick_gelu {m}x{n}", lambda x=xo: quick_gelu.quick_gelu_bwd(x, x, want_out=True)),
                  (f"gelu {m}x{n}", lambda x=x: gelu.gelu_bwd(x, x, "tanh"))]
    gu = torch.randn(9, 2 * 100, generator=g)
    cases.append(("swiglu strided halves", lambda: swiglu.swiglu_fwd(gu[:, :100], gu[:, 100:])))
    xh = torch.randn(9, 100, generator=g).half()
    cases.append(("swiglu fp16", lambda: swiglu.swiglu_fwd(xh, xh)))
    q, k = torch.randn(12, 14, 64, generator=g), torch.randn(12, 2, 64, generator=g)
    pos, inv = torch.arange(12), 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    cases.append(("rope 14/2 x 64", lambda: rope.rope_fwd(q, k, pos, inv)))
    from llava_fast.ops.attention import flash_attn_varlen_func

    qa = torch.randn(40, 4, 64, generator=g).bfloat16().requires_grad_()
    ka = torch.randn(40, 2, 64, generator=g).bfloat16().requires_grad_()
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)

    def attention():   # forward, backward preprocess, dK/dV and dQ kernels (GQA 4/2, two documents, causal)
        o = flash_attn_varlen_func(qa, ka, ka, cu, cu, 23, 23, causal=True)
        torch.autograd.grad(o.float().sum(), (qa, ka))
    cases.append(("attention fwd+bwd", attention))
    return cases


def _arg_key(x):
    """A launch argument as the kernel sees it: a tensor by dtype, shape, strides and 16-byte alignment (each call
    allocates its outputs anew), anything else by value."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.shape), x.stride(), x.data_ptr() % 16)
    return ("value", type(x).__name__, x)


def direct_launch_check() -> list[str]:
    """The direct launch (``_ext.launch``) against Triton's own path, with the mock driver: for every case, the same
    compiled kernel, grid and arguments, and no hook objects (the direct path's point). Returns the mismatches."""
    import os as _os

    from llava_fast import _ext

    import triton

    version = _ext.triton_version()
    if version < min(_ext._DIRECT_OPTION_KNOBS):   # off by design: check that it is
        mock_cuda_driver(record=True)
        _os.environ["LLAVA_FAST_DIRECT_LAUNCH"] = "1"
        _ext.reset_direct_launch()
        off = _ext._direct_state() is False
        _os.environ.pop("LLAVA_FAST_DIRECT_LAUNCH", None)
        _ext.reset_direct_launch()
        return [] if off else [f"triton {triton.__version__}: the direct launch is on, on a version it does not mirror"]
    if version not in _ext._DIRECT_OPTION_KNOBS:
        known = ", ".join(f"{a}.{b}" for a, b in sorted(_ext._DIRECT_OPTION_KNOBS))
        return [f"triton {triton.__version__}: the direct launch is off (Triton's own path, correct but slower): it "
                f"mirrors JITFunction.run of Triton {known} only. Read this version's run() and add it to "
                f"llava_fast._ext._DIRECT_OPTION_KNOBS with the knobs.compilation values run() adds to the options"]
    mock_cuda_driver(record=True)
    force_fast()
    problems, direct_used = [], 0
    for name, call in _direct_cases():
        seen = {}
        for mode in ("0", "1"):
            _os.environ["LLAVA_FAST_DIRECT_LAUNCH"] = mode
            _ext.reset_direct_launch()
            for _ in range(2):      # the first call of a specialisation compiles through Triton's path
                LAUNCHES.clear()
                call()
                seen.setdefault(mode, []).append(list(LAUNCHES))
        slow, fast = seen["0"][1], seen["1"][1]
        direct_used += sum(1 for launch in fast if launch[2] is None and launch[3] == (None, None))
        if len(slow) != len(fast):
            problems.append(f"{name}: {len(slow)} launches by Triton's path, {len(fast)} direct")
            continue
        for a, b in zip(slow, fast):
            same_args = len(a[4]) == len(b[4]) and all(_arg_key(x) == _arg_key(y) for x, y in zip(a[4], b[4]))
            if a[0] != b[0] or a[1] != b[1] or not same_args:
                problems.append(f"{name}: kernel {a[0][:8]} vs {b[0][:8]}, grid {a[1]} vs {b[1]}, "
                                f"arguments {'equal' if same_args else 'differ'}")
            if b[2] is not None or b[3] != (None, None):
                problems.append(f"{name}: the direct path passed launch hooks or metadata")
    # a launcher that refuses the direct call: one warning, Triton's path for this launch and every later one
    import warnings

    _os.environ["LLAVA_FAST_DIRECT_LAUNCH"] = "1"
    _ext.reset_direct_launch()
    name, call = _direct_cases()[0]
    call()
    call()                                   # compiled: the direct path now
    from triton.compiler.compiler import CompiledKernel

    real_run = CompiledKernel.run

    def broken(self):
        def refuse(*args):
            if args[6] is None:              # the direct call (no launch metadata): refused
                raise TypeError("launcher refused the call")
            return real_run.fget(self)(*args)
        return refuse
    CompiledKernel.run = property(broken)
    try:
        LAUNCHES.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            call()
        if not any("direct Triton launch failed" in str(w.message) for w in caught) or len(caught) != 1:
            problems.append(f"fallback: expected one warning, got {[str(w.message)[:60] for w in caught]}")
        if _ext._DIRECT is not False or not LAUNCHES or any(launch[2] is None for launch in LAUNCHES):
            problems.append("fallback: the launches after a refused direct call did not all take Triton's path")
    finally:
        CompiledKernel.run = real_run
    _os.environ.pop("LLAVA_FAST_DIRECT_LAUNCH", None)
    _ext.reset_direct_launch()
    if not direct_used:
        problems.append("the direct path was never taken")
    return problems


def dispatch_costs(calls: int = 5000) -> list[tuple[str, float]]:
    """Host microseconds per call of RMSNorm's forward (16 x 896) with the mock driver: through our op (wrapper +
    Triton's dispatch, no-op launch) and ``kernel[grid](...)`` alone (Triton's dispatch only). With the stubbed
    ``--per-call`` row (our wrapper alone) they split a call's Python time between ours and Triton's."""
    import os as _os

    from llava_fast import _ext

    mock_cuda_driver()
    force_fast()
    from llava_fast.ops import rms_norm as rn

    x, w = torch.randn(16, 896), torch.ones(896)
    m, n = x.shape
    y, rstd = torch.empty_like(x), torch.empty(m)
    bm, bn, nw = _ext.row_config(n, 4096)
    grid = (-(-m // bm),)
    args = (x, x, w, y, y, rstd, m, n, n, n, n, 0, 1e-6)
    out = []
    with torch.no_grad():
        for direct in ("0", "1"):
            _os.environ["LLAVA_FAST_DIRECT_LAUNCH"] = direct
            _ext.reset_direct_launch()
            how = "direct launch" if direct == "1" else "kernel[grid]"
            for name, fn in ((f"rms_norm op, {how}", lambda: rn.rms_norm(x, w)),
                             (f"{how} only", lambda: _ext.launch(rn._rms_norm_fwd_kernel, grid, *args, HAS_RES=False,
                                                                 BLOCK_M=bm, BLOCK_N=bn, num_warps=nw))):
                for _ in range(50):   # the first call compiles
                    fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                out.append((name, (time.perf_counter() - t0) * 1e6 / calls))
    _os.environ.pop("LLAVA_FAST_DIRECT_LAUNCH", None)
    _ext.reset_direct_launch()
    return out


def build(provider, workload, llm_layers, vision_layers, text_tokens):
    # few tokens: the toy model's CPU arithmetic shrinks towards zero, the host work per op does not depend on it
    real_shape = bench_model.workload_shape

    def shape(name, cfg, tiny=False):
        batch, n_img, n_txt, tiles, hw = real_shape(name, cfg, tiny)
        return batch, n_img, min(n_txt, text_tokens), tiles, hw
    bench_model.workload_shape = shape
    cfg = bench_model.hf_configs(workload, llm_layers, tiny=True)
    cfg.vision_config.num_hidden_layers = vision_layers
    prov = "llava_fast" if provider in ("llava_fast", "reference") else provider
    m = bench_model.build(prov, workload, cfg, "cpu")
    inp = bench_model.make_inputs(workload, cfg, "cpu", tiny=True)
    bench_model.workload_shape = real_shape
    print(f"  inputs: {tuple(inp['ids'].shape)} tokens, {inp['tiles']} tiles of {cfg.vision_config.image_size}^2")
    return m, bench_model.step_fn(prov, workload, m, inp), inp


def per_layer(workload: str, layers: int, vision_layers: int, runs: int = 60) -> dict:
    """Host time per layer, forward + backward, with almost no arithmetic: each tower alone (toy widths, launches
    stubbed), the language model on two packed documents of 16 tokens, ``layers`` deep, the vision encoder on two
    tiles of 4 tokens, ``vision_layers`` deep. The step's number above is mostly the toy model's own CPU GEMMs; these
    are Python, the dispatcher and autograd, the part that a slow GPU host multiplies (session 19's H200 box: ~5.7 ms
    of wall time per Qwen2 layer against ~3.5 ms of GPU work). On the CPU the vision attention runs SDPA's math path
    (a few more ops than one cuDNN call). Returns {tower: (median ms, min ms) per layer}."""
    cfg = bench_model.hf_configs(workload, layers, tiny=True)
    cfg.vision_config.num_hidden_layers = vision_layers
    m = bench_model.build("llava_fast", workload, cfg, "cpu")
    lm, vlayers = m.model.language_model, m.model.vision_tower.encoder.layers
    x = torch.randn(1, 32, cfg.text_config.hidden_size, requires_grad=True)
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    pos = torch.arange(16).repeat(2)[None]
    xv = torch.randn(2, 4, cfg.vision_config.hidden_size, requires_grad=True)

    def text():
        lm(x, position_ids=pos, cu_seqlens=cu, max_seqlen=16).sum().backward()

    def vision():
        h = xv
        for layer in vlayers:
            h = layer(h)
        h.sum().backward()

    out = {}
    for tower, run, n in (("language model", text, layers), ("vision encoder", vision, vision_layers)):
        for _ in range(3):
            run()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        times.sort()
        out[tower] = (times[runs // 2] * 1e3 / n, times[0] * 1e3 / n)   # median, min (this CPU's noise is ~5%)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="ov_ft", choices=sorted(FULL_DEPTH))
    p.add_argument("--provider", default="llava_fast", choices=["llava_fast", "reference", "hf_sdpa"])
    p.add_argument("--llm-layers", type=int)
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--text-tokens", type=int, default=16, help="text tokens per sample (the workload's, capped)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: host time of one Python thread)")
    p.add_argument("--top", type=int, default=12, help="how many of the most frequent aten ops to list")
    p.add_argument("--profile", action="store_true", help="cProfile one step: top functions by own time")
    p.add_argument("--per-call", action="store_true",
                   help="only the host cost per call of single ops on tiny inputs (profile_model.launch_costs) with "
                        "the launches stubbed: our wrappers' share of what the GPU box reports per call")
    p.add_argument("--per-layer", action="store_true",
                   help="only the host time per layer (forward + backward) of each tower alone at a few tokens, "
                        "launches stubbed: the Python / dispatcher / autograd part without the toy GEMMs")
    p.add_argument("--mock-driver", action="store_true",
                   help="instead of stubbing the launches, run Triton's whole dispatch against a mock sm_90 driver "
                        "(real compiles, first run slow; no-op launches): the step's host time with Triton's part")
    p.add_argument("--dispatch", action="store_true",
                   help="only Triton's dispatch cost per launch on this CPU (a mock sm_90 driver: real compile, no-op "
                        "launch)")
    p.add_argument("--direct-check", action="store_true",
                   help="only compare the direct launch with Triton's path under the mock driver "
                        "(exit 1 on a mismatch)")
    p.add_argument("--syncs", action="store_true",
                   help="also list the step's host reads of device data (host synchronisations on a GPU), by line")
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(a.threads)
    if a.direct_check:
        problems = direct_launch_check()
        import triton

        from llava_fast import _ext

        older = _ext.triton_version() < min(_ext._DIRECT_OPTION_KNOBS)
        if older and not problems:
            print(f"direct launch: off on triton {triton.__version__}, older than the versions it mirrors (every "
                  f"launch takes Triton's own path)")
            return 0
        print("direct launch: " + ("same kernels, grids and arguments as Triton's path in every case" if not problems
                                   else "\n  ".join(["MISMATCH"] + problems)))
        return 1 if problems else 0
    if a.dispatch:
        for name, us in dispatch_costs():
            print(f"  {name:28s} {us:7.1f} us per call")
        return 0
    if a.per_call:
        import profile_model

        stub_triton_launches()
        force_fast()
        for name, us in profile_model.launch_costs("cpu", 2000):
            print(f"  {name:28s} {us:7.1f} us per call (Triton launch stubbed)")
        return 0
    llm, vis = FULL_DEPTH[a.workload]
    llm, vis = a.llm_layers or llm, a.vision_layers or vis
    if a.per_layer:
        stub_triton_launches()
        force_fast()
        res = per_layer(a.workload, llm, vis)
        for tower, (ms, best) in res.items():
            print(f"host_overhead --per-layer: {a.workload} {tower}, {llm if tower[0] == 'l' else vis} layers, "
                  f"launches stubbed ({torch.get_num_threads()} thread): {ms:.3f} ms per layer forward + backward "
                  f"(median; min {best:.3f})")
        return res["language model"][0]
    if a.provider == "llava_fast":
        if a.mock_driver:
            mock_cuda_driver()
        else:
            stub_triton_launches()
        force_fast()
    # the GPU benchmark's AdamW is fused (a few launches); the CPU's default would add ~10 ops per parameter
    real_adamw = torch.optim.AdamW
    torch.optim.AdamW = lambda params, **kw: real_adamw(params, **dict(kw, fused=True))
    try:
        m, step, inp = build(a.provider, a.workload, llm, vis, a.text_tokens)
    finally:
        torch.optim.AdamW = real_adamw
    for _ in range(2):
        step()
    launches.clear()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2] * 1e3
    n = sum(launches.values()) / a.steps
    print(f"host_overhead: {a.workload} / {a.provider}, {llm} LLM + {vis} vision layers (toy widths, "
          f"{torch.get_num_threads()} thread): {med:.1f} ms/step (median of {a.steps}; min {times[0] * 1e3:.1f}), "
          f"{n:.0f} Triton launches/step")
    if launches:
        top = ", ".join(f"{k} {v / a.steps:.0f}" for k, v in launches.most_common(8))
        print(f"  launches per step: {top}")
    ops = count_ops(step)
    print(f"  per step: {ops['total']} aten ops ({ops['forward']} in the forward, {ops['backward']} in the backward "
          f"and the optimizer)")
    for ph in ("forward", "backward"):
        top = sorted(((v, k[1]) for k, v in ops.items() if isinstance(k, tuple) and k[0] == ph), reverse=True)[:a.top]
        print(f"  top {ph} ops: " + ", ".join(f"{name} {v}" for v, name in top))
    if a.syncs:
        dev = [t for k in ("ids", "labels", "pv", "hf_pv", "sizes") if isinstance(t := inp.get(k), torch.Tensor)]
        reads = device_reads(step, dev + list(m.parameters()))
        print(f"  host reads of device data per step (host synchronisations on a GPU): {sum(reads.values())}")
        for (what, line), c in reads.most_common():
            print(f"    {c:3d} x {what:20s} {line}")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        step()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        pstats.Stats(pr).sort_stats("cumulative").print_stats("llava_fast", 30)
    return med


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
