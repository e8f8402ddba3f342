"""Plot the newest end-to-end results as a PNG for the README: the full-depth table (bench_model_full-*.json, the
issue's exact shapes) when there is one, else the 4-layer one (bench_model-*.json).

Usage: python benchmarks/plot_results.py [RESULTS_DIR]   (needs matplotlib)
Writes <RESULTS_DIR>/<table>-<gpu>.png: one group of bars per workload, throughput relative to transformers sdpa.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = Path(argv[0] if argv else os.environ.get("LLAVA_FAST_RESULTS_DIR")
               or Path(__file__).resolve().parent / "results")
    files = []
    for pattern in ("bench_model_full-*.json", "bench_model-*.json"):
        files = [f for f in sorted(res.glob(pattern), key=lambda p: p.name.rsplit("-", 2)[-2:])
                 if "CPU" not in f.name]
        if files:
            break
    if not files:
        print(f"plot_results: no GPU bench_model results in {res}")
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_results: matplotlib is not installed (pip install matplotlib)")
        return 0
    data = json.loads(files[-1].read_text())
    rows = [r for r in data["rows"] if r.get("metric")]
    modes = sorted({r["mode"] for r in rows})
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "llava_fast", p))
    fig, ax = plt.subplots(figsize=(2.2 * len(modes) + 2, 4))
    width = 0.8 / max(1, len(providers))
    for j, prov in enumerate(providers):
        vals = []
        for mode in modes:
            base = next((r["metric"] for r in rows if r["mode"] == mode and r["provider"] == "hf_sdpa"), None)
            mine = next((r["metric"] for r in rows if r["mode"] == mode and r["provider"] == prov), None)
            vals.append(mine / base if (mine and base) else 0)
        ax.bar([i + j * width for i in range(len(modes))], vals, width, label=prov)
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(modes))], modes)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("throughput / transformers sdpa")
    depth = "full depth" if files[-1].name.startswith("bench_model_full") else "4 LLM layers"
    ax.set_title(f"llava_fast end to end on {data['meta']['gpu']} ({depth})")
    ax.legend(fontsize=8, loc="lower center", ncol=3)
    out = res / (files[-1].stem.rsplit("-", 2)[0] + ".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot_results: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
