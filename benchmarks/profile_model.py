"""Where the end-to-end step spends its GPU time: torch.profiler over a few steps of one bench_model.py workload and
provider, kernels grouped into classes (GEMM, attention, norms, elementwise, optimizer, copies, ...), the top kernels
by total time, and the share each class takes of the step. Written because the end-to-end rows (H100, 2026-11-26:
llava_fast 1.32x / 1.06x / 1.05x transformers sdpa on stage 1 / NeXT prefill / OneVision-0.5B fine-tune, all three
targets 1.4-1.8x) say how far off we are, not where the time goes.

Usage: python benchmarks/profile_model.py [--workload ov_ft] [--provider llava_fast] [--layers 4] [--steps 3]
       python benchmarks/profile_model.py --tiny   (CPU smoke run: CPU ops instead of CUDA kernels)
Writes <results>/profile_model-<workload>-<provider>-<GPU>-<stamp>.md (the tables printed) and a .json beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402
from bench_utils import device_name  # noqa: E402

# First match wins; patterns are matched against the lower-cased kernel / op name.
CLASSES = [
    ("attention", r"flash|fmha|attn|attention|sdpa|cudnn.*(mha|sdpa)|_flash_attn"),
    ("cross_entropy", r"cross_entropy|log_softmax|nll_loss|_ce_"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|\baddmm|\bmm\b|\bbmm\b|linear|wgmma|_projector"),
    ("norm", r"norm|rms"),
    ("rope", r"rope|rotary"),
    ("optimizer", r"adam|foreach|multi_tensor|_fused_adam"),
    ("anyres/packing", r"pack_features|scatter|index_put|index_select|gather|masked_select|nonzero"),
    ("activation", r"gelu|silu|swiglu|sigmoid|tanh"),
    ("copy/cast", r"copy|cast|convert|to_copy|contiguous|cat\b|cat_|memcpy|transpose|permute"),
    ("reduce", r"reduce|sum|mean|max|amax"),
    ("memset", r"memset|fill|zero"),
    ("elementwise", r"elementwise|vectorized|unrolled|add|mul|div|sub|where"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pat in CLASSES:
        if re.search(pat, low):
            return cls
    return "other"


PARTS = ("model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head")


def _range_hooks(label: str):
    """(enter, leave) hook functions opening and closing a profiler range named ``label``."""
    state = {}

    def enter(*_):
        state["r"] = torch.profiler.record_function(label)
        state["r"].__enter__()

    def leave(*_):
        if "r" in state:
            state.pop("r").__exit__(None, None, None)
    return enter, leave


def annotate_parts(model, backward: bool = False) -> list:
    """Wrap each model part (same names in our model and transformers') in profiler ranges: ``part::<name>`` around
    its forward (forward pre-hook / forward hook) and, with ``backward`` (our model: its parts return tensors),
    ``part_bwd::<name>`` around its backward (full backward pre-hook / hook), except the vision tower's (see below).
    Returns the hook handles."""
    handles = []
    mods = dict(model.named_modules())
    for name in PARTS:
        mod = mods.get(name)
        if mod is None or (backward and isinstance(mod, torch.nn.Linear)):
            # our lm_head: a hooked Linear is called as a module (act_linear.plain_linears), which would turn off
            # the fused loss being profiled (its kernels show as the cross_entropy class anyway)
            continue
        short = name.split(".")[-1]
        enter, leave = _range_hooks(f"part::{short}")
        handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
        if backward and short != "vision_tower":  # its input (pixels) needs no gradient: no bracket around its
            # backward would be right (the full backward hook fires once the input gradients are done, i.e. at once)
            b_enter, b_leave = _range_hooks(f"part_bwd::{short}")
            handles += [mod.register_full_backward_pre_hook(b_enter), mod.register_full_backward_hook(b_leave)]
    return handles


def part_table(prof, use_cuda: bool, steps: int) -> list[dict]:
    """Forward time per model part (the ``part::`` ranges): device time on a GPU, CPU time otherwise."""
    rows = []
    for evt in prof.key_averages():
        if evt.key.startswith(("part::", "part_bwd::")):
            if use_cuda and _gpu_annotation(evt):
                # the range's GPU-side copy (kineto's gpu_user_annotation: its span on the GPU timeline, idle gaps
                # included) under the same name: one row per part, the kernels launched inside the CPU-side range
                continue
            t = (getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)) if use_cuda \
                else evt.cpu_time_total
            kind, part = evt.key.split("::", 1)
            rows.append(dict(part=part + (" (backward)" if kind == "part_bwd" else ""), ms_per_step=t / 1e3 / steps))
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def _gpu_annotation(evt) -> bool:
    """A ``record_function`` range's device-side event (kineto's ``gpu_user_annotation``: device_type CUDA, its
    "self" device time the range's whole span on the GPU timeline), not a kernel. Every ``part::`` range of
    :func:`annotate_parts` and torch's own ranges (``Optimizer.step#AdamW.step``) have one."""
    return str(getattr(evt, "device_type", "")).endswith("CUDA") and bool(getattr(evt, "is_user_annotation", False))


def kernel_table(prof, use_cuda: bool) -> list[dict]:
    """One dict per kernel (CUDA) or leaf op (CPU): name, class, calls, total ms (over all profiled steps). On a GPU
    the device-side copies of ``record_function`` ranges are left out: counted as kernels, the ``part::`` spans
    covered most of the step a second time (kernel time, "GPU busy" and decide.py's host-bound rule inflated, the
    projector's range counted as GEMM)."""
    rows = []
    for evt in prof.key_averages():
        if use_cuda:
            # device-side kernels only (their self time on the GPU); CPU-side ops have device_type CPU
            if str(getattr(evt, "device_type", "")).endswith("CUDA") and not _gpu_annotation(evt):
                t = evt.self_device_time_total if hasattr(evt, "self_device_time_total") else evt.self_cuda_time_total
            else:
                continue
        else:
            t = evt.self_cpu_time_total
        if t <= 0:
            continue
        rows.append(dict(name=evt.key, cls=classify(evt.key), calls=evt.count, ms=t / 1e3))
    rows.sort(key=lambda r: -r["ms"])
    return rows


def launch_sites(events, pattern: str, steps: int, top: int = 10) -> list[dict]:
    """Where the GPU kernels whose name contains ``pattern`` are launched from (the profile must be recorded with
    ``with_stack=True, record_shapes=True``): per site, the calls and ms per step. A site is the outermost aten op
    above the launch, its input shapes, and the innermost frames of llava_fast / benchmarks code above it. Made to
    find the stage-1 step's unexplained ``Memcpy DtoD`` copies (docs/perf-notes.md, "Fourth GPU run")."""
    found: dict = {}
    for evt in events:
        ks = [k for k in (getattr(evt, "kernels", None) or []) if pattern in k.name]
        if not ks:
            continue
        op = evt
        while getattr(op, "cpu_parent", None) is not None and str(op.cpu_parent.name).startswith("aten::"):
            op = op.cpu_parent
        stack = getattr(op, "stack", None) or getattr(evt, "stack", None) or []
        frames = [f for f in stack if "llava_fast" in f or "benchmarks" in f][:3]
        shapes = getattr(op, "input_shapes", None)
        site = f"{op.name} {shapes if shapes else ''} <- " + (" <- ".join(frames) if frames else "(no llava_fast frame)")
        c = found.setdefault(site, dict(site=site, calls=0, ms=0.0))
        c["calls"] += len(ks)
        c["ms"] += sum(k.duration for k in ks) / 1e3
    out = sorted(found.values(), key=lambda c: -c["ms"])[:top]
    for c in out:
        c["calls"] /= steps
        c["ms"] /= steps
    return out


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def gemm_dims(op: str, shapes) -> tuple[int, int, int, int] | None:
    """(batch, M, N, K) of a GEMM op from its recorded input shapes (``record_shapes=True``), None when they do not
    read as one: mm [[M,K],[K,N]]; addmm/addmm_/_addmm_activation [[bias or (M,N)],[M,K],[K,N]]; bmm [[B,M,K],[B,K,N]];
    baddbmm [[.],[B,M,K],[B,K,N]]."""
    try:
        if op == "aten::mm":
            (m, k), (k2, n) = shapes[0], shapes[1]
            b = 1
        elif op in ("aten::addmm", "aten::addmm_", "aten::_addmm_activation"):
            (m, k), (k2, n) = shapes[1], shapes[2]
            b = 1
        elif op == "aten::bmm":
            (b, m, k), (_, k2, n) = shapes[0], shapes[1]
        elif op == "aten::baddbmm":
            (b, m, k), (_, k2, n) = shapes[1], shapes[2]
        else:
            return None
    except (TypeError, ValueError, IndexError):
        return None
    return (int(b), int(m), int(n), int(k)) if k == k2 else None


def gemm_shapes(events, steps: int, use_cuda: bool, top: int = 20) -> list[dict]:
    """The step's GEMMs grouped by (op, M x N x K): calls and ms per step and TFLOP/s (2·B·M·N·K per call), with the
    kernel names. On a GPU the time is the kernels' (each kernel charged to the nearest enclosing GEMM op); on the CPU
    the ops' own time. Needs a profile recorded with ``record_shapes=True``. Written because session 14 read the
    stage-1 profile's 20 ``nvjet ... 320x128`` calls as the q/k/v/o projections alone (343 GFLOP each: "~580
    TFLOP/s") when 4 of them were the down projection (923 GFLOP: ~780 TFLOP/s for all 20): which GEMM runs slowly
    is a per-shape question that kernel names cannot answer."""
    found: dict = {}

    def add(op, ms, kname):
        dims = gemm_dims(op.name, getattr(op, "input_shapes", None))
        if dims is None:
            return
        b, m, n, k = dims
        key = (op.name, b, m, n, k)
        c = found.setdefault(key, dict(op=op.name.replace("aten::", ""), b=b, m=m, n=n, k=k, calls=0, ms=0.0,
                                       kernels=Counter(), ops=set()))
        # one call per GEMM op, however many kernels it launched: until session 17 every kernel counted, cuBLAS's
        # workspace Memsets included, which put the 7B GEMM rows at "1558 TFLOP/s" (above the H200's peak)
        if id(op) not in c["ops"]:
            c["ops"].add(id(op))
            c["calls"] += 1
        c["ms"] += ms
        if kname:
            c["kernels"][kname] += 1

    for evt in events:
        if use_cuda:
            ks = getattr(evt, "kernels", None) or []
            if not ks:
                continue
            op = evt
            while op is not None and op.name not in GEMM_OPS:
                op = getattr(op, "cpu_parent", None)
            if op is None:
                continue
            for kern in ks:
                add(op, kern.duration / 1e3, kern.name)
        elif evt.name in GEMM_OPS:
            add(evt, evt.self_cpu_time_total / 1e3, "")
    out = sorted(found.values(), key=lambda c: -c["ms"])[:top]
    for c in out:
        flops = 2.0 * c["b"] * c["m"] * c["n"] * c["k"] * c["calls"]
        c["tflops"] = flops / (c["ms"] / 1e3) / 1e12 if c["ms"] > 0 else 0.0
        c["calls"] /= steps
        c["ms"] /= steps
        c["kernels"] = ", ".join(f"{name[:60]} x{n}" for name, n in c["kernels"].most_common(2))
        del c["ops"]
    return out


def gemm_markdown(rows: list[dict], use_cuda: bool) -> str:
    head = ("\nGEMMs by shape (per step; " + ("kernel time" if use_cuda else "CPU op time") +
            ", TFLOP/s = 2·B·M·N·K per call):\n\n| op | B | M | N | K | calls | ms | TFLOP/s | kernels |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
    body = "".join(f"| {r['op']} | {r['b']} | {r['m']} | {r['n']} | {r['k']} | {r['calls']:.0f} | {r['ms']:.3f} | "
                   f"{r['tflops']:.1f} | `{r['kernels'] or '-'}` |\n" for r in rows)
    return head + (body or "| - | | | | | | | | none recorded |\n")


def summarize(rows: list[dict], steps: int) -> list[dict]:
    total = sum(r["ms"] for r in rows) or 1.0
    by = {}
    for r in rows:
        c = by.setdefault(r["cls"], dict(cls=r["cls"], ms=0.0, kernels=0))
        c["ms"] += r["ms"]
        c["kernels"] += 1
    out = sorted(by.values(), key=lambda c: -c["ms"])
    for c in out:
        c["ms_per_step"] = c["ms"] / steps
        c["share"] = c["ms"] / total
    return out


def wall_ms_per_step(fn, steps: int, use_cuda: bool) -> float:
    """Wall-clock milliseconds per step over ``steps`` steps, synchronised at both ends, with no profiler attached."""
    if use_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if use_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def count_syncs(fn) -> tuple[int, dict]:
    """Host synchronisations in one step (torch's sync debug mode warns at each synchronizing CUDA call), and where
    they come from (file:line of the Python caller, most frequent first). Each one drains the GPU's queue: the GPU
    then idles while the host launches the next kernels."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())
    return sum(hits.values()), dict(hits.most_common(10))


def busy_lines(wall_ms: float, kernel_ms: float, use_cuda: bool, syncs) -> str:
    """The step's wall time against the GPU's kernel time: a GPU busy well under ~90% of the step means the host
    (Python and launch overhead, or synchronisations) sets the pace, not the kernels."""
    if not use_cuda:
        return f"\nWall time per step (CPU): {wall_ms:.2f} ms.\n"
    out = (f"\nWall time per step (no profiler): {wall_ms:.2f} ms; GPU kernel time per step: {kernel_ms:.2f} ms, "
           f"i.e. the GPU is busy {100 * kernel_ms / max(wall_ms, 1e-9):.0f}% of the step.\n")
    if syncs is not None:
        n, where = syncs
        out += f"Host synchronisations per step: {n}" + (
            " (" + ", ".join(f"{k} x{v}" for k, v in where.items()) + ")" if where else "") + ".\n"
    return out


def launch_costs(device: str, calls: int = 300) -> list[tuple[str, float]]:
    """Host microseconds per call of one op on tiny inputs, ``calls`` calls back to back between two syncs: the GPU
    work is a few microseconds, so this is the host's cost to issue the op (Python, our launcher, Triton's launcher or
    aten's dispatch), the number that says whether a deep stack of small layers (OneVision-0.5B's 24 Qwen2 layers at
    hidden 896) is host-bound. aten's ``add`` is the yardstick."""
    from llava_fast.ops.attention import flash_attn_varlen_func
    from llava_fast.ops.rms_norm import rms_norm
    from llava_fast.ops.rope import apply_rotary_pos_emb, rope, rotary_rows
    from llava_fast.ops.swiglu import swiglu

    dt = torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(16, 896, device=device, dtype=dt)
    w = torch.ones(896, device=device, dtype=dt)
    q = torch.randn(128, 14, 64, device=device, dtype=dt)
    k = torch.randn(128, 2, 64, device=device, dtype=dt)
    cu = torch.tensor([0, 64, 128], device=device, dtype=torch.int32)
    pos = torch.arange(128, device=device)
    # transformers' layout and tables (patch_hf(rope=True) against transformers' own apply_rotary_pos_emb)
    qh, kh = q.view(1, 128, 14, 64).transpose(1, 2), k.view(1, 128, 2, 64).transpose(1, 2)
    cos = torch.randn(1, 128, 32, device=device, dtype=dt).repeat(1, 1, 2)
    sin = torch.randn(1, 128, 32, device=device, dtype=dt).repeat(1, 1, 2)
    rows = rotary_rows(cos, 1)
    ops = [("aten add", lambda: torch.add(x, x)),
           ("rms_norm (Triton)", lambda: rms_norm(x, w)),
           ("swiglu (Triton)", lambda: swiglu(x, x)),
           ("rope (Triton)", lambda: rope(q, k, pos)),
           ("rope on HF tables (Triton)", lambda: apply_rotary_pos_emb(qh, kh, cos, sin, rows=rows)),
           ("rope HF apply_rotary (aten)", lambda: _hf_rotary(qh, kh, cos, sin)),
           ("attention fwd (Triton)", lambda: flash_attn_varlen_func(q, k, k, cu, cu, 64, 64, causal=True))]
    if device == "cuda":
        ops += _launch_only_ops(x, w)
    out = []
    with torch.no_grad():
        for name, fn in ops:
            try:
                for _ in range(20):
                    fn()
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                out.append((name, (time.perf_counter() - t0) * 1e6 / calls))
            except Exception as e:  # noqa: BLE001 - the launch-only rows use Triton internals that may change
                out.append((f"{name}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})", float("nan")))
    return out


def _hf_rotary(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb`` (its ops: llava_fast.ops.rope.apply_rotary_ref), without importing
    whichever function patch_hf may have swapped into transformers' modules."""
    from llava_fast.ops.rope import apply_rotary_ref

    return apply_rotary_ref(q, k, cos, sin)


def _launch_only_ops(x, w) -> list:
    """RMSNorm's forward kernel launched without our wrapper: ``kernel[grid](...)`` (Triton's JIT dispatch:
    argument specialisation, cache lookup, then the launcher) and the compiled kernel's runner called directly (the
    launcher alone, what a direct-launch fast path would pay). With the wrapper's row above they split a call's host
    cost into ours / Triton's dispatch / the launch itself (session 12: ~140 us per call on the H100 box, which part
    is whose unknown). Triton 3.6's CompiledKernel runner takes every parameter, constexprs included, in order."""
    from llava_fast import _ext
    from llava_fast.ops import rms_norm as rn

    m, n = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    bm, bn, nw = _ext.row_config(n, 4096)
    grid = ((m + bm - 1) // bm,)
    args = (x, x, w, y, y, rstd, m, n, n, n, n, 0, 1e-6)
    const = dict(HAS_RES=False, BLOCK_M=bm, BLOCK_N=bn)

    def jit_launch():
        return rn._rms_norm_fwd_kernel[grid](*args, **const, num_warps=nw)

    state = {}

    def direct():
        if "run" not in state:
            state["run"] = jit_launch()[grid]
        state["run"](*args, *const.values())

    from llava_fast import _ext

    def ext_launch():   # what the launchers call (session 13): Triton's binder and cache, no per-call extras
        return _ext.launch(rn._rms_norm_fwd_kernel, grid, *args, **const, num_warps=nw)

    return [("rms_norm kernel[grid] only", jit_launch), ("rms_norm _ext.launch only", ext_launch),
            ("rms_norm compiled runner only", direct)]


def host_profile(fn, use_cuda: bool, top: int = 25) -> str:
    """cProfile of one step (the host side: which Python functions the step's wall time goes to), top by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    if use_cuda:
        torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def to_markdown(classes, rows, steps, top, header) -> str:
    lines = [header, "", "| class | ms per step | share | kernels |", "|---|---:|---:|---:|"]
    lines += [f"| {c['cls']} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f}% | {c['kernels']} |" for c in classes]
    lines += ["", f"Top {top} kernels (ms per step):", "", "| ms per step | calls per step | class | kernel |",
              "|---:|---:|---|---|"]
    for r in rows[:top]:
        name = r["name"].replace("|", "/")
        name = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| {r['ms'] / steps:.3f} | {r['calls'] / steps:.0f} | {r['cls']} | `{name}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="ov_ft", choices=["stage1", "prefill", "ov_ft"])
    p.add_argument("--provider", default="llava_fast", choices=bench_model.known_providers(),
                   help="a bench_model.py provider (llava_fast, its A/B variants, hf_sdpa, hf_eager, hf_sdpa_liger)")
    p.add_argument("--layers", type=int, default=4, help="LLM depth (as device_check's bench_model rows)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test of this script)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--sites", default=None, metavar="PATTERN",
                   help="also where the kernels whose name contains PATTERN are launched from (op, shapes, our "
                        "frames; the profile then records stacks and shapes), e.g. 'Memcpy DtoD'")
    p.add_argument("--gemms", action="store_true",
                   help="also the GEMMs by shape (op, M x N x K, calls, ms, TFLOP/s, kernels; the profile then "
                        "records shapes)")
    p.add_argument("--host", action="store_true",
                   help="also the host cost per call of single ops (launch_costs) and a cProfile of one step")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    use_cuda = torch.cuda.is_available() and not a.tiny
    device = "cuda" if use_cuda else "cpu"
    env = bench_model.PROVIDER_ENV.get(a.provider, {})
    os.environ.update(env)
    if not bench_model.available(a.provider):
        print(f"{a.provider}: not installed")
        return 1
    cfg = bench_model.hf_configs(a.workload, None if a.tiny else a.layers, a.tiny)
    inp = bench_model.make_inputs(a.workload, cfg, device, a.tiny)
    m = bench_model.build(a.provider, a.workload, cfg, device)
    fn = bench_model.step_fn(a.provider, a.workload, m, inp)
    for _ in range(2):
        fn()
    wall = wall_ms_per_step(fn, a.steps, use_cuda)  # no profiler attached: what a training loop sees
    syncs = count_syncs(fn) if use_cuda else None
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if use_cuda else [])
    hooks = annotate_parts(m, backward=a.provider.startswith("llava_fast"))
    try:
        with torch.profiler.profile(activities=acts, with_stack=bool(a.sites),
                                    record_shapes=bool(a.sites) or a.gemms) as prof:
            for _ in range(a.steps):
                fn()
            if use_cuda:
                torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    rows = kernel_table(prof, use_cuda)
    classes = summarize(rows, a.steps)
    parts = part_table(prof, use_cuda, a.steps)
    where = device_name() if use_cuda else "CPU"
    header = (f"## profile_model: {a.workload} / {a.provider} ({'tiny' if a.tiny else f'{a.layers} LLM layers'}), "
              f"{where}, {a.steps} steps, {'GPU kernel' if use_cuda else 'CPU op'} self time")
    md = to_markdown(classes, rows, a.steps, a.top, header)
    md += busy_lines(wall, sum(r["ms"] for r in rows) / a.steps, use_cuda, syncs)
    md += ("\nTime per model part (ms per step; forward, and backward for our model: kernels launched inside the "
           "part's ranges):\n\n| part | ms |\n|---|---:|\n")
    md += "".join(f"| {p['part']} | {p['ms_per_step']:.2f} |\n" for p in parts)
    if a.sites:
        sites = launch_sites(prof.events(), a.sites, a.steps)
        md += (f"\nWhere the `{a.sites}` kernels come from (per step):\n\n| calls | ms | launched by |\n|---:|---:|---|\n"
               + "".join(f"| {c['calls']:.0f} | {c['ms']:.3f} | `{c['site'].replace('|', '/')}` |\n" for c in sites)
               + ("| - | - | none found |\n" if not sites else ""))
    gemms = None
    if a.gemms:
        gemms = gemm_shapes(prof.events(), a.steps, use_cuda)
        md += gemm_markdown(gemms, use_cuda)
    costs = None
    if a.host:  # (on the CPU, --tiny: a smoke test of the script; the ops run their reference paths)
        costs = launch_costs(device, 300 if use_cuda else 5)
        md += ("\nHost cost per call, tiny inputs (us; back-to-back calls between two syncs):\n\n| op | us per call |\n"
               "|---|---:|\n" + "".join(f"| {n} | {us:.1f} |\n" for n, us in costs))
        md += "\ncProfile of one step (host side), top functions by own time:\n\n```\n" + host_profile(fn, use_cuda) + "```\n"
    print(md)
    if not a.no_save and not a.tiny:
        res = Path(os.environ.get("LLAVA_FAST_RESULTS_DIR", Path(__file__).resolve().parent / "results"))
        res.mkdir(parents=True, exist_ok=True)
        stamp = os.environ.get("LLAVA_FAST_RESULTS_STAMP", "run")
        gpu = re.sub(r"[^A-Za-z0-9]+", "_", where).strip("_")
        base = res / f"profile_model-{a.workload}-{a.provider}-{gpu}-{stamp}"
        base.with_suffix(".md").write_text(md)
        base.with_suffix(".json").write_text(json.dumps(dict(
            classes=classes, kernels=rows[:200], parts=parts, steps=a.steps, workload=a.workload, wall_ms=wall,
            syncs=None if syncs is None else dict(count=syncs[0], where=syncs[1]),
            provider=a.provider, gpu=where, layers=a.layers,
            launch_us=None if costs is None else dict(costs), gemms=gemms)))
        print("saved", base.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
