"""pytest-benchmark entry point: `pytest benchmarks/test_model_speed.py --benchmark-only` (CPU or GPU).

Times one forward of our model and of transformers (eager, sdpa) on the same tiny random LLaVA-NeXT checkpoint, so
the harness can be exercised anywhere; the full-size comparisons live in bench_model.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import llava_fast
    from tiny import save_tiny

    hf, path = save_tiny(tmp_path_factory.mktemp("bench"), "llava_next")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return hf.to(dev), llava_fast.from_pretrained(path, device=dev), dev


@pytest.mark.parametrize("provider", ["llava_fast", "hf_eager"])
def test_forward_speed(benchmark, pair, provider):
    from llava_fast.ops.anyres import num_image_tokens, num_tiles
    from tiny import IMAGE_TOKEN, NEXT_PINS, TILE

    hf, ours, dev = pair
    size = (50, 90)
    n, t = num_image_tokens(size, NEXT_PINS, TILE, TILE // 14), num_tiles(size, NEXT_PINS, TILE)
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN] * n + [3, 4]], device=dev)
    pv = torch.randn(t, 3, TILE, TILE, device=dev)
    sizes = torch.tensor([size], device=dev)
    model, pix = (ours, pv) if provider == "llava_fast" else (hf, pv[None])
    benchmark.extra_info["device"] = dev
    with torch.no_grad():
        benchmark(lambda: model(input_ids=ids, pixel_values=pix, image_sizes=sizes))
