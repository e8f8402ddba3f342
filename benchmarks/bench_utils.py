"""Benchmark harness shared by every ``benchmarks/bench_*.py``.

GPU times come from CUDA events after warm-up, reported as medians (and p20/p80); every row records the provider,
shape, dtype, GPU name and library versions. Results are written as JSON and as a markdown table under
``benchmarks/results/``. On a CPU-only machine the same code times with ``time.perf_counter`` and says so.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
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


TIMINGS = ("eager", "graph")
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


def bench_graph(fn, warmup: int = 3, rep: int = 10, flush: bool = True) -> dict:
    """GPU time of ``fn()`` alone: ``fn`` captured once into a CUDA graph (after warm-up on a side stream, as
    torch.cuda.graph requires), each replay timed with events, the L2 flushed before each replay (``flush``). No
    Python or launch overhead is in the number (it is the kernels' time), nor any L2-resident input from the run
    before. Raises when ``fn`` cannot be captured (a host synchronisation, a CPU tensor, ...)."""
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


def bench(fn, warmup: int = 3, rep: int = 10, sync: bool = True, timing: str | None = None) -> dict:
    """Time ``fn()``: median, p20 and p80 in milliseconds over ``rep`` runs after ``warmup`` runs, plus the
    ``timing`` used.

    ``timing="eager"`` (the default; ``LLAVA_FAST_BENCH_TIMING`` overrides): one call between two CUDA events on an
    idle GPU, so the number includes the Python/dispatch latency of the call (what an eager training step pays;
    it dominates ops of ~0.1 ms: the first H200 run measured ~0.1-0.25 ms for kernels that move 15-130 MB).
    ``timing="graph"``: :func:`bench_graph`, the kernels' own time with a cold L2, falling back to eager (and saying
    so in ``timing``) when ``fn`` cannot be captured. On the CPU: ``time.perf_counter``."""
    timing = timing or os.environ.get("LLAVA_FAST_BENCH_TIMING") or "eager"
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    cuda = torch.cuda.is_available() and sync
    if cuda and timing == "graph":
        try:
            return dict(bench_graph(fn, warmup, rep), timing="graph")
        except Exception as e:  # not capturable: time it eagerly and say why
            torch.cuda.synchronize()
            timing = f"eager (graph capture failed: {type(e).__name__})"
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


def peak_memory(fn) -> float | None:
    """Peak GPU memory in GiB allocated while running ``fn()`` (None on CPU)."""
    if not torch.cuda.is_available():
        return None
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
    timing: str = ""    # "eager" / "graph" (see bench); ratios only compare rows timed the same way


def add_ratios(rows: list[Row], ours: str = "llava_fast") -> None:
    """For each (bench, shape, mode), divide our metric by every other provider's (higher metric = better), among
    rows timed the same way (a graph-timed kernel is not compared with an eager call). Idempotent."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.bench, r.shape, r.mode), []).append(r)
    for group in groups.values():
        mine = [r for r in group if r.provider == ours and r.metric]
        if not mine:
            continue
        for r in group:
            if r.provider != ours and r.metric and r.timing == mine[0].timing:
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
    x = torch.randn(numel, device=device, dtype=dtype)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), warmup, rep, timing="graph")
    gbps = 2 * x.numel() * x.element_size() / t["ms"] / 1e6
    rows.append(Row(bench="copy", provider="torch.copy_", shape=f"{numel}", dtype=str(dtype).split(".")[-1],
                    mode="copy", ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=gbps, unit="GB/s"))
    del x, y
    return gbps
