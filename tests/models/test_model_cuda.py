"""GPU checks of the whole model (skipped without CUDA): our bf16/fp16 model, with whatever fast kernels are wired
in, against transformers eager in fp32 on the same weights, by flash-attn's rule (our error at most twice the error of
transformers eager run in the same low precision)."""
from __future__ import annotations

import pytest
import torch

import llava_fast

from test_llava_parity import SIZES, hf_pixels, make_batch
from tiny import save_tiny
from utils import assert_flash_rule


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_low_precision_against_fp32_reference(tmp_path, model_type, dtype):
    hf, path = save_tiny(tmp_path, model_type)
    hf = hf.cuda()
    hf_low = type(hf).from_pretrained(path, dtype=dtype, attn_implementation="eager").cuda().eval()
    ours = llava_fast.from_pretrained(path, dtype=dtype, device="cuda")
    sizes = [SIZES[2], SIZES[5]] if model_type != "llava" else [(28, 28), (28, 28)]
    batch = make_batch(model_type, [[sizes[0]], [sizes[1]]], left_pad=False)
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if model_type != "llava":
        kw["image_sizes"] = batch["image_sizes"]
    with torch.no_grad():
        ref = hf(pixel_values=hf_pixels(model_type, batch).cuda(), **kw).logits
        low = hf_low(pixel_values=hf_pixels(model_type, batch).cuda().to(dtype), **kw).logits
        out = ours(pixel_values=batch["pixel_values"].to(dtype), **kw).logits
    valid = batch["attention_mask"].bool()
    assert_flash_rule(out[valid], ref[valid], low[valid], name=f"{model_type} logits")


@pytest.mark.cuda
@pytest.mark.timeout(400)  # Inductor compiles a whole model: 150 s was not enough for NeXT with 12 tests in parallel
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_torch_compile_packed_training_step(tmp_path, model_type):
    """The model with every kernel, packed, under torch.compile (inductor): same loss and gradients as eager."""
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    batch = make_batch(model_type, [[SIZES[2]], [], [SIZES[5]]], left_pad=False)
    lens = [len(s) for s in batch["seqs"]]
    flat = torch.tensor([t for s in batch["seqs"] for t in s], device="cuda")[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    labels = torch.cat([batch["labels"][i, :n] for i, n in enumerate(lens)])[None].cuda()
    kw = dict(input_ids=flat, cu_seqlens=cu, position_ids=pos, max_seqlen=max(lens), logits=False, labels=labels,
              pixel_values=batch["pixel_values"].cuda().bfloat16(), image_sizes=batch["image_sizes"])
    ref = m(**kw).loss
    ref.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    loss = torch.compile(m)(**kw).loss
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)   # bf16: inductor may fuse/reorder elementwise ops
    for n, g in grads.items():
        torch.testing.assert_close(m.get_parameter(n).grad.float(), g.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_whole_training_step_as_cuda_graph(tmp_path, model_type):
    """A packed training step with every kernel, given its host_inputs, reads nothing back from the GPU, so the
    whole step (forward, backward, fused AdamW) can be captured as one CUDA graph (bench_model's llava_fast_graph).
    Three replays give the losses and weights of three eager steps from the same start."""
    from test_model_kernels import packed_inputs

    _, path = save_tiny(tmp_path, model_type)
    kw = packed_inputs(model_type)
    from llava_fast.models.llava import HostInputs

    host = {k: kw[k] for k in HostInputs.KEYS if torch.is_tensor(kw.get(k))}
    dev = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    dev["pixel_values"] = dev["pixel_values"].to(torch.bfloat16)
    dev.update(host_inputs=host, logits=False)
    results = []
    for graphed in (False, True):
        m = llava_fast.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)
        loss = torch.zeros((), device="cuda")

        def step():
            out = m(**dev)
            out.loss.backward()
            opt.step()
            loss.copy_(out.loss.detach())
        losses = []
        if not graphed:
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step()
                losses.append(loss.item())
        else:
            # warm-up steps on a copy of the weights would change them: warm up on the real ones, then reload
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opt.zero_grad(set_to_none=True)
                step()
            torch.cuda.current_stream().wait_stream(side)
            fresh = llava_fast.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
            with torch.no_grad():
                for p, q in zip(m.parameters(), fresh.parameters()):
                    p.copy_(q)
            for st in opt.state.values():
                for t in st.values():
                    t.zero_()
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                step()
            for _ in range(3):
                graph.replay()
                losses.append(loss.item())
        results.append((losses, [p.detach().float().clone() for p in m.parameters()]))
    (eager, w_eager), (graphed, w_graph) = results
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-3, atol=1e-3)
    for a, b in zip(w_graph, w_eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
