"""torch.compile traces the model's forward as one graph.

The forward reads its inputs' values on the host (the value checks, the image sizes, the placeholder runs, the
supervised rows): dynamo cannot trace such reads, so they all live in one function, ``_LlavaBase._host_prepare``,
which runs eagerly under torch.compile (``torch.compiler.disable``) before any tensor work. Everything else, the
towers, the layers, the kernels' launchers and the choice of kernel (environment switches read at every call), must
trace without a break. Before session 20 the reads were spread through the forward: 19 graphs for the packed NeXT
training step; and a cache filled on first use inside a traced function (the switch reads' first version) added 8
breaks, one per switch read for the first time inside the trace."""
from __future__ import annotations

import pytest
import torch

import llava_fast

from test_model_kernels import packed_inputs
from tiny import save_tiny

KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy", "pack_features", "attention", "vision_attention", "projector",
           "quick_gelu", "patch_embed")


@pytest.mark.parametrize("model_type, host", [("llava_next", False), ("llava_onevision", True)],
                         ids=["llava_next-device_inputs", "llava_onevision-host_inputs"])
def test_forward_traces_as_one_graph(tmp_path, forced, model_type, host, monkeypatch):
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    forced(*KERNELS)
    kw = dict(packed_inputs(model_type), logits=False)
    if host:   # the trainer's call: the integer inputs' CPU copies given
        kw["host_inputs"] = {k: kw[k].clone() for k in ("input_ids", "labels", "cu_seqlens", "position_ids")}
    ref = m(**kw).loss
    for name in list(llava_fast._ext._ENV_KEYS):
        monkeypatch.delitem(llava_fast._ext._ENV_KEYS, name)   # every switch read for the first time inside the trace
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(m)(**kw)
        loss = torch.compile(m, backend="eager")(**kw).loss
    finally:
        torch._dynamo.reset()
    where = [f"{b.user_stack[-1].filename}:{b.user_stack[-1].lineno} {str(b.reason)[:120]}" for b in ex.break_reasons]
    assert ex.graph_break_count == 0 and not where, f"graph breaks: {where}"
    assert ex.graph_count == 1
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
