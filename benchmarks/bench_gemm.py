"""cuBLAS's rate on the workloads' linear layers: against the token count M, and under a sustained load.

Why: session 19's H200 profiles (`benchmarks/results/profile_model-*-150343.md`) ran the same Llama-7B GEMMs at very
different rates. The NeXT prefill's packed 8 x 2498 = 19984 tokens: q/k/v/o (N = K = 4096) at 616 TFLOP/s (cuBLAS
picked `nvjet_..._256x144_..._coopA`), gate/up at 701, down at 720; the stage-1 step's 16 x 640 = 10240 tokens: the
same three shapes at 785, 785 and 793 (`320x128 coopB`, `192x192`). Two explanations (docs/perf-notes.md, "GEMM rate
against M"): cuBLAS's pick for that M, which padding the tokens to a multiple of 256 would fix (the opt-in
``LLAVA_FAST_PAD_TOKENS``); or a power-limited clock under long GEMM stretches, which stage 1's full-depth step
suggests (14.45 ms per extra layer against 12.1 ms of its 4-layer kernels: ~650 TFLOP/s instead of 785) and no
padding fixes. transformers runs the same GEMMs on the same M, so either way what is found is about the bound both
run into.

Rows, per workload GEMM (bf16, ``torch.nn.functional.linear`` / ``mm`` as the model calls them) and per mode (``fwd``
x @ W^T, ``dgrad`` dy @ W, ``wgrad`` dy^T @ x where the model trains that linear; ``--quick``: ``fwd`` only):
- ``exact``: M as the workload has it;
- ``padNNN``: M rounded up to a multiple of NNN (64, 128, 256, 512; ``--quick`` 128 and 256; one row per distinct
  padded M, named by the smallest NNN giving it): the padded GEMM's whole time, so the padding's own cost is in it;
- ``split2``: two launches over the two parts of M (the first rounded up to 256 rows), one output (``fwd`` only);
- ``tunable``: torch's TunableOp (``torch.cuda.tunable``) tuned for the exact M: the best of cuBLASLt's heuristic
  candidates where this torch registers them (torch 2.14 does on CUDA; older ones may only have "Default"); the
  chosen algorithm in the note.
The metric is **useful** TFLOP/s, 2 M N K over the exact M, so every variant is compared on the same work; each note
gives the time relative to ``exact``. Timing: calls back to back between two events (``bench_utils.bench_loop``): a
GEMM of 0.1-2 ms hides its launch. Sustained rows (``layer_exact`` / ``layer_M<m>``): 32 layers' worth of GEMMs back to
back (the prefill's seven forward GEMMs per layer at the exact M and at each padded M; stage 1's seven forward and
seven input-gradient GEMMs at its M), with ``nvidia-smi`` polled meanwhile (:class:`ClockSampler`: the SM clock's
minimum and median against its maximum, the median power). Under a power limit these run below the one-at-a-time rows,
at a lowered clock, whatever the M.

Decision (decide.py ``gemm_padding``; docs/perf-notes.md, "GEMM rate against M"): a padded M >= 3% faster on the
prefill's sustained rows makes ``LLAVA_FAST_PAD_TOKENS`` worth a default (bench_model's paired ``llava_fast_pad256``
row has the last word); a ``tunable`` row >= 5% faster than cuBLAS's pick makes a tuned algorithm worth wiring.

Run: ``python benchmarks/bench_gemm.py [--quick]`` (needs a CUDA GPU; exits cleanly without one; ``--smoke``: the CPU
check of this script at tiny sizes).
"""
import argparse
import contextlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import Row, bench, save, to_markdown  # noqa: E402
from bench_utils import randn as cpu_randn  # noqa: E402

# (workload, M, [(linear, N, K, modes)]): the LLM linears of bench_model's three workloads, and the vision towers'
WORKLOADS = [
    ("prefill NeXT-7B 8x2498", 19984, [("q/k/v/o", 4096, 4096, ("fwd",)), ("gate/up", 11008, 4096, ("fwd",)),
                                       ("down", 4096, 11008, ("fwd",))]),
    ("prefill CLIP-L 40x577", 23080, [("q/k/v/o", 1024, 1024, ("fwd",)), ("fc1", 4096, 1024, ("fwd",))]),
    ("stage1 Llama-7B 16x640", 10240, [("q/k/v/o", 4096, 4096, ("fwd", "dgrad")),
                                       ("gate/up", 11008, 4096, ("fwd", "dgrad")),
                                       ("down", 4096, 11008, ("fwd", "dgrad"))]),
    ("OV-0.5B Qwen2 2x5453", 10906, [("q/o", 896, 896, ("fwd", "dgrad", "wgrad")),
                                     ("gate/up", 4864, 896, ("fwd", "dgrad", "wgrad")),
                                     ("down", 896, 4864, ("fwd", "dgrad", "wgrad"))]),
    ("OV-0.5B SigLIP 14x729", 10206, [("q/k/v/o", 1152, 1152, ("fwd", "dgrad", "wgrad")),
                                      ("fc1", 4304, 1152, ("fwd", "dgrad", "wgrad"))]),
]
PADS = (64, 128, 256, 512)
# the vision towers' patch embeddings (ops/patch_embed.py, opt-in since session 23): (workload, tiles, tile px, D,
# bias, modes); the convolution cuDNN runs (an Ampere mma.sync kernel at ~39 TFLOP/s in session 19's profiles, plus
# layout copies) against the same products as one GEMM over the gathered patches
PATCHES = [("prefill CLIP-L/336", 40, 336, 1024, False, ("fwd",)),
           ("stage1 CLIP-L/336", 16, 336, 1024, False, ("fwd",)),
           ("OV-0.5B SigLIP/384", 14, 384, 1152, True, ("fwd", "fwd+wgrad"))]
PATCHES_SMOKE = [("smoke", 2, 28, 16, True, ("fwd", "fwd+wgrad"))]
SMOKE = [("smoke", 100, [("lin", 48, 32, ("fwd", "dgrad", "wgrad"))]),
         ("stage1 smoke", 64, [("lin", 16, 32, ("fwd",))])]


_GPU_GEN: dict = {}


def randn(*shape, device, dtype):
    """Standard-normal inputs (random bits, as a real layer's: the power a GEMM draws depends on its data). On the GPU
    drawn there by a generator of this script's own: the inputs are ~8 x 10^9 elements in all (the sustained rows
    most), ~40 s of host time through ``bench_utils.randn``'s CPU draw, and nothing here is captured in a CUDA graph
    (the reason that one draws on the CPU)."""
    if torch.device(device).type != "cuda":
        return cpu_randn(*shape, device=device, dtype=dtype)
    gen = _GPU_GEN.get(device)
    if gen is None:
        gen = _GPU_GEN[device] = torch.Generator(device=device)
        gen.manual_seed(0)
    return torch.randn(*shape, device=device, dtype=dtype, generator=gen)


def round_up(m: int, k: int) -> int:
    return -(-m // k) * k


def gemm_fn(mode: str, m: int, n: int, k: int, dev, dtype):
    """A closure running one GEMM of ``mode`` at M = ``m`` (inputs allocated here)."""
    if mode == "fwd":
        x, w = randn(m, k, device=dev, dtype=dtype), randn(n, k, device=dev, dtype=dtype)
        return lambda: F.linear(x, w)
    if mode == "dgrad":
        dy, w = randn(m, n, device=dev, dtype=dtype), randn(n, k, device=dev, dtype=dtype)
        return lambda: torch.mm(dy, w)
    dy, x = randn(m, n, device=dev, dtype=dtype), randn(m, k, device=dev, dtype=dtype)
    return lambda: torch.mm(dy.t(), x)


def split_fn(m: int, n: int, k: int, dev, dtype):
    """``fwd`` as two launches over the two halves of M (the first rounded to 256 rows), into one output."""
    x, w = randn(m, k, device=dev, dtype=dtype), randn(n, k, device=dev, dtype=dtype)
    y = torch.empty(m, n, device=dev, dtype=dtype)
    h = min(m, round_up(m // 2, 256))

    def run():
        torch.mm(x[:h], w.t(), out=y[:h])
        torch.mm(x[h:], w.t(), out=y[h:])
    return run


def tunable_time(fn, warmup, rep):
    """(stats, chosen algorithm) of ``fn`` with TunableOp tuning on, or (None, why) where this torch has none or it
    fails. The algorithm is the tuning result this shape added (``get_results()``: op, shape, algorithm, time)."""
    tun = getattr(torch.cuda, "tunable", None)
    if tun is None or not torch.cuda.is_available():
        return None, "no torch.cuda.tunable"
    try:
        tun.enable(True)
        tun.tuning_enable(True)
        if hasattr(tun, "write_file_on_exit"):   # torch 2.11 (the GPU box) has none: "AttributeError" in session 28
            tun.write_file_on_exit(False)
        tun.set_max_tuning_duration(10)   # ms per candidate: a few seconds per shape at most
        tun.set_max_tuning_iterations(20)
        before = set(map(tuple, tun.get_results()))
        fn()   # the first call tunes this shape
        new = [r for r in map(tuple, tun.get_results()) if r not in before]
        t = bench(fn, warmup, rep, timing="loop")
    except Exception as e:  # a prototype feature: report, do not stop the run
        return None, f"failed: {type(e).__name__}: {str(e)[:120]}"
    finally:
        with contextlib.suppress(Exception):
            tun.tuning_enable(False)
            tun.enable(False)
    return t, (", ".join(str(r[2]) for r in new if len(r) > 2) or "no new result")


class ClockSampler:
    """``nvidia-smi`` polled on a thread while the block runs: the SM clock and the board power, and the clock's
    maximum, so a power- or heat-limited GEMM rate shows as a low clock. Informative only: without nvidia-smi (or on
    the CPU) the note is empty."""

    QUERY = "--query-gpu=clocks.sm,power.draw,clocks.max.sm"

    def __init__(self, enabled: bool, period_s: float = 0.05):
        self.enabled, self.period, self.samples = enabled and shutil.which("nvidia-smi") is not None, period_s, []

    def _poll(self, idx: str):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", self.QUERY, "--format=csv,noheader,nounits", "-i", idx],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(tuple(float(v) for v in out.strip().split(",")))
            except Exception:  # a malformed line or a slow call: skip the sample
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        if self.enabled:
            idx = str(torch.cuda.current_device()) if torch.cuda.is_available() else "0"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, args=(idx,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join(timeout=10)

    def note(self) -> str:
        if not self.samples:
            return ""
        clocks = sorted(c for c, _, _ in self.samples)
        power = sorted(p for _, p, _ in self.samples)
        return (f"SM clock min/median {clocks[0]:.0f}/{clocks[len(clocks) // 2]:.0f} of max "
                f"{self.samples[0][2]:.0f} MHz, power median {power[len(power) // 2]:.0f} W ({len(clocks)} samples)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, pads 128 and 256 only")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (tiny sizes)")
    args = ap.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gemm: needs a CUDA GPU; nothing measured on this machine.")
        return 0
    dtype = getattr(torch, args.dtype)
    warmup, rep = (1, 2) if args.smoke else (3, 10) if args.quick else (5, 20)
    pads = (64, 128) if args.smoke else (128, 256) if args.quick else PADS
    rows: list[Row] = []
    dname = str(dtype).split(".")[-1]

    def add(shape, mode, provider, stats, m, n, k, base_ms=None, note=""):
        ms = stats["ms"]
        rel = [f"{base_ms / ms:.3f}x exact"] if base_ms else []
        rows.append(Row(bench="gemm", provider=provider, shape=shape, dtype=dname, mode=mode, ms=ms,
                        ms_p20=stats["ms_p20"], ms_p80=stats["ms_p80"], metric=2 * m * n * k / ms / 1e9,
                        unit="TFLOP/s", note="; ".join(rel + [note] * bool(note)), timing=stats["timing"]))

    timing = "loop" if dev == "cuda" else None

    def one_gemm(shape, mode, m, n, k):
        base = bench(gemm_fn(mode, m, n, k, dev, dtype), warmup, rep, timing=timing)
        add(shape, mode, "exact", base, m, n, k)
        for mp in sorted({round_up(m, p) for p in pads} - {m}):
            t = bench(gemm_fn(mode, mp, n, k, dev, dtype), warmup, rep, timing=timing)
            add(shape, mode, f"pad{min(p for p in pads if round_up(m, p) == mp)}", t, m, n, k, base["ms"], f"M={mp}")
        if mode == "fwd":
            add(shape, mode, "split2", bench(split_fn(m, n, k, dev, dtype), warmup, rep, timing=timing), m, n, k,
                base["ms"])
        if dev == "cuda":
            t, algo = tunable_time(gemm_fn(mode, m, n, k, dev, dtype), warmup, rep)
            if t is not None:
                add(shape, mode, "tunable", t, m, n, k, base["ms"], algo)
            else:
                rows.append(Row(bench="gemm", provider="tunable", shape=shape, dtype=dname, mode=mode, note=algo))

    def layer_rows(workload, m, linears, modes=("fwd",), padded=True, layers=32):
        """The workload's seven GEMMs of a decoder layer (in each of ``modes``), ``layers`` layers back to back (the
        full depth: a sustained load, its SM clock and power sampled), at the exact M and (``padded``) each padded M.
        Against the single-GEMM rows above: a lower rate here is the clock, not cuBLAS's choice."""
        counts = {"q/k/v/o": 4, "gate/up": 2, "down": 1, "lin": 7}
        flops = sum(counts[nm] * 2 * m * n * k for nm, n, k, _ in linears) * len(modes) * layers
        base = None
        for mp in sorted({m} | ({round_up(m, p) for p in pads} if padded else set())):
            fns = [gemm_fn(mode, mp, n, k, dev, dtype) for mode in modes for nm, n, k, _ in linears
                   for _ in range(counts[nm])]

            def run(fns=fns):
                for _ in range(layers):
                    for f in fns:
                        f()
            with ClockSampler(dev == "cuda") as clocks:
                t = bench(run, min(warmup, 2), max(rep // 2, 1), timing=timing)
            base = base or t["ms"]
            note = ([f"{base / t['ms']:.3f}x exact"] if mp != m else []) + ([clocks.note()] if clocks.note() else [])
            rows.append(Row(bench="gemm", provider="layer_exact" if mp == m else f"layer_M{mp}",
                            shape=f"{workload} {layers} layers x {len(fns)} GEMMs", dtype=dname, mode="+".join(modes),
                            ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=flops / t["ms"] / 1e9,
                            unit="TFLOP/s", note="; ".join(note), timing=t["timing"]))
            del fns

    def patch_rows():
        """The patch embedding as the convolution (``patch_conv``) and as one GEMM (``patch_gemm``), forward and, where
        the tower trains, forward + weight gradient; useful TFLOP/s of 2 x tiles x patches x D x 3 p p (x 2 with the
        weight gradient). decide.py ``patch_embed``: the GEMM form the default at >= 1.3x on every row."""
        from llava_fast.ops.patch_embed import patch_embed_gemm, patch_embed_ref

        for workload, tiles, size, d, bias, modes in (PATCHES_SMOKE if args.smoke else PATCHES):
            x = randn(tiles, 3, size, size, device=dev, dtype=dtype)
            w = randn(d, 3, 14, 14, device=dev, dtype=dtype).mul_(0.05).requires_grad_()
            b = randn(d, device=dev, dtype=dtype).requires_grad_() if bias else None
            n_pos = tiles * (size // 14) ** 2
            gy = randn(tiles, (size // 14) ** 2, d, device=dev, dtype=dtype)
            for mode in modes:
                base = None
                for prov, fn in (("patch_conv", patch_embed_ref), ("patch_gemm", patch_embed_gemm)):
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                fn(x, w, b)
                    else:
                        def run(fn=fn):
                            torch.autograd.grad(fn(x, w, b), [w], gy)
                    t = bench(run, warmup, rep, timing=timing)
                    base = base or t["ms"]
                    flops = 2 * n_pos * d * 3 * 14 * 14 * (1 if mode == "fwd" else 2)
                    rows.append(Row(bench="gemm", provider=prov, shape=f"{workload} patch embedding {tiles}x3x{size}^2 "
                                    f"-> {n_pos}x{d}", dtype=dname, mode=mode, ms=t["ms"], ms_p20=t["ms_p20"],
                                    ms_p80=t["ms_p80"], metric=flops / t["ms"] / 1e9, unit="TFLOP/s",
                                    note=f"{base / t['ms']:.3f}x conv" if prov == "patch_gemm" else "",
                                    timing=t["timing"]))
            print(f"{workload} patch embedding: done", flush=True)

    try:   # first: a few seconds, before the long rows
        patch_rows()
    except Exception as e:  # must not stop the GEMM rows
        rows.append(Row(bench="gemm", provider="patch_gemm", shape="patch embedding", dtype=dname, mode="fwd",
                        note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
    for i, (workload, m, linears) in enumerate(SMOKE if args.smoke else WORKLOADS):
        for name, n, k, modes in linears:
            shape = f"{workload} {name} M={m} N={n} K={k}"
            for mode in modes[:1] if args.quick else modes:
                try:
                    one_gemm(shape, mode, m, n, k)
                except Exception as e:  # one shape failing must not stop the run
                    rows.append(Row(bench="gemm", provider="exact", shape=shape, dtype=dname, mode=mode,
                                    note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
                if dev == "cuda":
                    torch.cuda.empty_cache()
            print(f"{shape}: done", flush=True)
            if not args.smoke:
                save(rows, "gemm")   # a step cut by its time limit keeps what it measured
        if i == 0:   # the prefill's sustained rows next, before the other workloads
            layer_rows(workload, m, linears, layers=4 if args.smoke else 32)
        elif workload.startswith("stage1"):   # stage 1's frozen layers: forward and input gradient, exact M
            layer_rows(workload, m, linears, modes=("fwd", "dgrad"), padded=False, layers=2 if args.smoke else 32)
    print(to_markdown(rows))
    if not args.smoke:
        print(f"saved {save(rows, 'gemm')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
