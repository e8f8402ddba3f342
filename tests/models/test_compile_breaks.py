"""Where torch.compile breaks the model's graph: only in the model's host-side input checks.

The forward reads its inputs' values on the host (the checks of ``_check_values``, the image sizes, the placeholder
runs, the kept rows): dynamo cannot trace those reads and breaks the graph there, by design. Everything after them,
the towers, the layers, the kernels' launchers and the choice of kernel (environment switches read at every call),
must trace without a break: a break there splits the layers into many small graphs (each compiled on its own: Inductor
time and launches) and is easy to add by accident (session 20: a cache filled on first use inside a traced function
added 8 breaks, one per switch read first inside the trace)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llava_fast

from test_model_kernels import packed_inputs
from tiny import save_tiny

KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy", "pack_features", "attention", "vision_attention", "projector",
           "quick_gelu")


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_graph_breaks_only_in_the_input_checks(tmp_path, forced, model_type, monkeypatch):
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    forced(*KERNELS)
    kw = dict(packed_inputs(model_type), logits=False)
    m(**kw).loss.backward()          # the op modules are imported on first use, outside the trace
    for name in list(llava_fast._ext._ENV_KEYS):
        monkeypatch.delitem(llava_fast._ext._ENV_KEYS, name)   # every switch read for the first time inside the trace
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(m)(**kw)
    finally:
        torch._dynamo.reset()
    places = [(Path(b.user_stack[-1].filename).name, b.user_stack[-1].name) for b in ex.break_reasons]
    assert places, "no graph break at all: the input checks are traced now; update this test"
    outside = [p for p in places if p[0] != "llava.py"]
    assert not outside, f"graph breaks outside the model's input checks: {outside}"
