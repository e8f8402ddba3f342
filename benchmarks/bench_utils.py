"""Benchmark harness shared by every ``benchmarks/bench_*.py``.

GPU times come from CUDA events after warm-up, reported as medians (and p20/p80); every row records the provider,
shape, dtype, GPU name and library versions. Results are written as JSON and as a markdown table under
``benchmarks/results/``. On a CPU-only machine the same code times with ``time.perf_counter`` and says so.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_RUN_STAMP = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")   # one file per benchmark per run, rewritten as it goes


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "liger_kernel", "flash_attn", "llava_fast"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    try:
        out["git_sha"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        out["git_sha"] = None
    return out


TIMINGS = ("eager", "graph", "loop")
_FLUSH: list = []


def _l2_flush() -> None:
    """Overwrite 256 MiB (over 4x the L2 of an H100/H200) so that the next kernel starts with a cold cache."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    _FLUSH[0].zero_()


def _stats(times: list) -> dict:
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]  # noqa: E731
    return {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8)}


_INPUT_GEN = torch.Generator(device="cpu")
_INPUT_GEN.manual_seed(0)


def manual_seed(seed: int) -> None:
    """Restart the sequence drawn by :func:`randn` / :func:`randn_like` (seeded 0 at import)."""
    _INPUT_GEN.manual_seed(seed)


def randn(*shape, device="cuda", dtype=torch.float32, requires_grad: bool = False) -> torch.Tensor:
    """Standard-normal benchmark input drawn on the CPU (one process-wide generator, seeded deterministically) and
    copied to ``device``. Not ``torch.randn(..., device="cuda")``: a CUDA graph capture that fails can leave the CUDA
    generator believing a capture is under way (seen on an H100, torch 2.11: every later CUDA draw raised "Offset
    increment outside graph capture encountered unexpectedly", killing the run after its first shape); the CPU one
    is out of its reach. Costs ~0.5 s per 10^8 elements of host time, outside anything timed."""
    t = torch.randn(*shape, generator=_INPUT_GEN, dtype=dtype)
    return t.to(device).requires_grad_(requires_grad)


def randn_like(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """:func:`randn` with the shape, dtype, device and strides of ``t`` (a gradient for a non-contiguous output keeps
    that output's layout, as ``torch.randn_like`` would)."""
    out = torch.empty_like(t, requires_grad=False)
    with torch.no_grad():
        out.copy_(randn(*t.shape, device="cpu", dtype=t.dtype))
    return out.requires_grad_(requires_grad)


def bench_graph(fn, warmup: int = 3, rep: int = 10, flush: bool = True) -> dict:
    """GPU time of ``fn()`` alone: ``fn`` captured once into a CUDA graph (after warm-up on a side stream, as
    torch.cuda.graph requires), each replay timed with events, the L2 flushed before each replay (``flush``). No
    Python or launch overhead is in the number (it is the kernels' time), nor any L2-resident input from the run
    before. Raises when ``fn`` cannot be captured (a host synchronisation, a CPU tensor, ...); :func:`bench` retries
    once, then times eagerly (:func:`_graph_with_retry`).

    The capture keeps torch's default ``capture_error_mode="global"``: torch's docs give no case for another mode
    (only "Do NOT change this setting unless you're familiar with cudaStreamCaptureMode"), and "thread_local" would
    merely stop checking unsafe calls made by other threads, such as the autograd engine's device thread that runs
    a captured backward, rather than make them safe."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, warmup)):
        graph.replay()
    for _ in range(rep):
        if flush:
            _l2_flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return _stats(times)


def _graph_with_retry(fn, warmup: int, rep: int) -> tuple[dict | None, str]:
    """:func:`bench_graph`, tried twice: (its stats, "graph" or "graph (2nd capture)"), or (None, "eager
    (graph capture failed: <exception name>)") when every capture failed, for the caller to time ``fn`` eagerly.

    Why a second try: on an H100 (torch 2.11) the first capture of a fwd+bwd ``torch.autograd.grad`` closure in a
    process failed with ``torch.AcceleratorError`` while later, identical ones succeeded, which points at a one-off
    cause (lazy per-thread set-up in the autograd engine's device thread, or its stream bookkeeping for leaves made
    on the legacy default stream: "operation would make the legacy stream depend on a capturing blocking stream"). A
    function that can never be captured (a host synchronisation) only costs one more warm-up. Each failure's message
    goes to stderr, since the timing string keeps only the exception's name."""
    errors: list[str] = []
    for label in ("graph", "graph (2nd capture)"):
        try:
            stats = bench_graph(fn, warmup, rep)
        except Exception as e:  # any capture failure: retry, then time it eagerly and say why
            errors.append(type(e).__name__)
            print(f"bench: graph capture {len(errors)}/2 failed: {type(e).__name__}: {str(e)[:300]}",
                  file=sys.stderr, flush=True)
            # let the failed capture's work drain before the next step; a sticky error raises again there
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            continue
        return stats, label
    names = ", then ".join(dict.fromkeys(errors))  # the name once when every try failed the same way
    return None, f"eager (graph capture failed: {names})"


def bench_loop(fn, warmup: int = 3, rep: int = 10, min_ms: float = 20.0, max_inner: int = 50) -> dict:
    """GPU time per call of ``fn()`` run back to back: each of the ``rep`` samples times ``inner`` consecutive calls
    between two CUDA events (``inner`` sized from one synchronized call so that a sample lasts about ``min_ms``), and
    reports the time divided by ``inner``. The host enqueues the next call while the GPU runs the current one, so a
    call's Python and launch latency only shows when it exceeds the kernels' time (what a training step that runs
    ahead of the GPU sees); no L2 flush between calls. Written after an H100 run (2026-11-26) where the same
    attention forward took 1.555 ms timed as one call on an idle GPU (``timing="eager"``) and 1.266 ms under
    ``triton.testing.do_bench``."""
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    inner = max(1, min(max_inner, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return _stats(times)


def bench(fn, warmup: int = 3, rep: int = 10, sync: bool = True, timing: str | None = None) -> dict:
    """Time ``fn()``: median, p20 and p80 in milliseconds over ``rep`` runs after ``warmup`` runs, plus the
    ``timing`` used.

    ``timing="eager"`` (the default; ``LLAVA_FAST_BENCH_TIMING`` overrides): one call between two CUDA events on an
    idle GPU, so the number includes the Python/dispatch latency of the call (what an eager training step pays;
    it dominates ops of ~0.1 ms: the first H200 run measured ~0.1-0.25 ms for kernels that move 15-130 MB).
    ``timing="graph"``: :func:`bench_graph`, the kernels' own time with a cold L2; a failed capture is retried once
    (``timing`` "graph (2nd capture)"), then ``fn`` is timed eagerly (``timing`` "eager (graph capture failed:
    <exception>)"). ``timing="loop"``: :func:`bench_loop`, calls back to back (the GPU stays busy, the Python time
    of a call hides behind the kernels of the one before, as in a training step that runs ahead of the GPU).
    On the CPU: ``time.perf_counter``."""
    timing = timing or os.environ.get("LLAVA_FAST_BENCH_TIMING") or "eager"
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    cuda = torch.cuda.is_available() and sync
    if cuda and timing == "graph":
        stats, timing = _graph_with_retry(fn, warmup, rep)
        if stats is not None:
            return dict(stats, timing=timing)
    if cuda and timing == "loop":
        return dict(bench_loop(fn, warmup, rep), timing="loop")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return dict(_stats(times), timing=timing if cuda else "cpu")


def peak_memory(fn, reset=None) -> float | None:
    """Peak GPU memory in GiB allocated while running ``fn()`` beyond what was allocated before it (None on CPU).

    ``reset()`` runs first, before the baseline is read: pass one that drops what ``fn`` would free itself (e.g. the
    ``.grad`` of its inputs left by the timing loop), or the baseline counts those tensors and the peak comes out
    low by their size (the H100 cross-entropy table of session 4 under-reported every provider by the size of the
    two returned gradients that way)."""
    if not torch.cuda.is_available():
        return None
    if reset is not None:
        reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


@dataclass
class Row:
    bench: str
    provider: str
    shape: str
    dtype: str
    mode: str = ""
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    metric: float | None = None          # TFLOP/s, GB/s, tokens/s ... (unit below)
    unit: str = ""
    peak_gib: float | None = None
    ratio: dict = field(default_factory=dict)   # our metric / baseline metric, filled by add_ratios
    note: str = ""
    gpu: str = field(default_factory=device_name)
    timing: str = ""    # bench's "timing" ("graph", "eager", ...); ratios only compare rows timed the same way
    paired: dict = field(default_factory=dict)  # an A/B row timed in alternation with its control (bench_model)


def _timing_kind(timing: str) -> str:
    """"graph" for "graph" / "graph (2nd capture)", "eager" for "eager" / "eager (graph capture failed: ...)": what
    the number measures (kernels alone or a whole eager call), whatever it took to get it."""
    return timing.split(" ", 1)[0]


def add_ratios(rows: list[Row], ours: str = "llava_fast") -> None:
    """For each (bench, shape, mode), divide our metric by every other provider's (higher metric = better), among
    rows timed the same way (a graph-timed kernel is not compared with an eager call; see :func:`_timing_kind`).
    Idempotent."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.bench, r.shape, r.mode), []).append(r)
    for group in groups.values():
        mine = [r for r in group if r.provider == ours and r.metric]
        if not mine:
            continue
        for r in group:
            if r.provider != ours and r.metric and _timing_kind(r.timing) == _timing_kind(mine[0].timing):
                mine[0].ratio[r.provider] = round(mine[0].metric / r.metric, 3)


def to_markdown(rows: list[Row]) -> str:
    head = "| bench | shape | mode | provider | dtype | ms | metric | peak GiB | ratio (ours / provider) | note |\n"
    head += "|---|---|---|---|---|---:|---:|---:|---|---|\n"
    lines = []
    for r in rows:
        ratio = ", ".join(f"{k} {v:.2f}x" for k, v in r.ratio.items())
        ms = f"{r.ms:.3f}" if r.ms is not None else "-"
        metric = f"{r.metric:.1f} {r.unit}" if r.metric is not None else "-"
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        lines.append(f"| {r.bench} | {r.shape} | {r.mode} | {r.provider} | {r.dtype} | {ms} | {metric} | {peak} | "
                     f"{ratio} | {r.note} |")
    return head + "\n".join(lines) + "\n"


def save(rows: list[Row], name: str, out_dir: Path | None = None) -> Path:
    """Write ``<name>-<gpu>-<date>.json`` and ``.md`` under benchmarks/results (or ``out_dir``)."""
    out_dir = Path(out_dir or os.environ.get("LLAVA_FAST_RESULTS_DIR") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = device_name().replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "").replace(",", "")
    stamp = os.environ.get("LLAVA_FAST_RESULTS_STAMP") or _RUN_STAMP
    base = out_dir / f"{name}-{gpu}-{stamp}"
    meta = {"gpu": device_name(), "versions": versions(), "time": stamp}
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    md = f"# {name}\n\nGPU: {meta['gpu']}; versions: {meta['versions']}\n\n" + to_markdown(rows)
    base.with_suffix(".md").write_text(md)
    return base.with_suffix(".md")


def copy_bandwidth(rows, device="cuda", dtype=torch.bfloat16, numel=1 << 28, warmup=5, rep=20):
    """GB/s of ``y.copy_(x)`` for a 512 MiB bf16 tensor (read + write counted)."""
    x = randn(numel, device=device, dtype=dtype)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), warmup, rep, timing="graph")
    gbps = 2 * x.numel() * x.element_size() / t["ms"] / 1e6
    rows.append(Row(bench="copy", provider="torch.copy_", shape=f"{numel}", dtype=str(dtype).split(".")[-1],
                    mode="copy", ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=gbps, unit="GB/s"))
    del x, y
    return gbps
