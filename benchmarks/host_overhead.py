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
       [--llm-layers 24] [--vision-layers 26] [--profile]
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
    return m, bench_model.step_fn(prov, workload, m, inp)


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
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(a.threads)
    if a.per_call:
        import profile_model

        stub_triton_launches()
        force_fast()
        for name, us in profile_model.launch_costs("cpu", 2000):
            print(f"  {name:24s} {us:7.1f} us per call (Triton launch stubbed)")
        return 0
    llm, vis = FULL_DEPTH[a.workload]
    llm, vis = a.llm_layers or llm, a.vision_layers or vis
    if a.provider == "llava_fast":
        stub_triton_launches()
        force_fast()
    # the GPU benchmark's AdamW is fused (a few launches); the CPU's default would add ~10 ops per parameter
    real_adamw = torch.optim.AdamW
    torch.optim.AdamW = lambda params, **kw: real_adamw(params, **dict(kw, fused=True))
    try:
        m, step = build(a.provider, a.workload, llm, vis, a.text_tokens)
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
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        step()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        pstats.Stats(pr).sort_stats("cumulative").print_stats("llava_fast", 30)
    return med


if __name__ == "__main__":
    main()
