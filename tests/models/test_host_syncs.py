"""Host synchronisations of a training step: every read of device data on the host (``int(t)``, ``.tolist()``,
``nonzero``, ...) makes the host wait for the GPU's queue, then the GPU idle until new work is queued. The model's
input checks and the fused loss read the inputs once, through ``_ext.host_copies`` (none when the caller passes its
CPU copies as ``host_inputs``, as the trainer does). Session 12's H100 profile counted 11 reads per OneVision step
(the same 11 lines this audit finds in the code of then).

Counted on the CPU by ``benchmarks/host_overhead.py``'s ``device_reads``: the inputs and the parameters are marked as
device tensors, marks follow every op, and a read of a marked tensor is recorded (the kernels run under the
interpreter, as on a GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import llava_fast

from test_model_kernels import packed_inputs
from llava_fast.models.llava import HostInputs
from tiny import save_tiny
from utils import MODEL_KERNELS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from host_overhead import device_reads  # noqa: E402


def _step(m, kw):
    def step():
        out = m(**kw, logits=False)
        out.loss.backward()
    return step


def _device_tensors(m, kw):
    return [v for v in kw.values() if torch.is_tensor(v)] + list(m.parameters())


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_training_step_reads_device_data_once(tmp_path, forced, model_type):
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    forced(*MODEL_KERNELS)
    kw = packed_inputs(model_type)
    reads = device_reads(_step(m, kw), _device_tensors(m, kw))
    assert sum(reads.values()) == 1 and next(iter(reads))[0] == "host_copies", dict(reads)


@pytest.mark.parametrize("model_type", ["llava", "llava_onevision"])
def test_training_step_with_host_inputs_reads_nothing(tmp_path, forced, model_type):
    """With the CPU copies given (the trainer's batch), forward + backward never wait for the GPU; the loss and the
    gradients are those of the call without them."""
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path)
    forced(*MODEL_KERNELS)
    kw = packed_inputs(model_type)
    ref = m(**kw, logits=False)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    host = {k: kw[k].clone() for k in HostInputs.KEYS if torch.is_tensor(kw.get(k))}
    kw_host = dict(kw, host_inputs=host)
    reads = device_reads(_step(m, kw_host), _device_tensors(m, kw))
    assert not reads, dict(reads)
    m.zero_grad(set_to_none=True)
    out = m(**kw_host, logits=False)
    assert torch.equal(out.loss, ref.loss)
    out.loss.backward()
    for n, p in m.named_parameters():
        if n in ref_grads:
            assert torch.equal(p.grad, ref_grads[n]), n


def test_audit_counts_a_read():
    """The audit is not blind: a read of a marked tensor, and of anything computed from one, is recorded."""
    x = torch.arange(6)
    reads = device_reads(lambda: (int(x.max()), (x + 1).tolist(), torch.arange(3).tolist()), [x])
    assert sum(reads.values()) == 2, dict(reads)


def _setitem_ops(index, value):
    """The aten ops ``y[index] = value`` dispatches to on this torch (plain CPU tensors, no marks)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    y = torch.arange(6)
    with Record():
        y[index] = value
    return [op for op in seen if op not in ("lift_fresh", "select", "slice", "alias", "detach")]


def test_audit_counts_a_host_to_device_copy():
    """Host-made values entering a device op are recorded (a pageable copy: the GPU run of session 14 failed graph
    capture on ``shift[0, idx] = -100``); a Python or 0-dim scalar taken by an elementwise op is not.

    How torch dispatches a setitem of a Python scalar depends on its version: up to 2.14 the value becomes a host
    tensor (``index_put_`` with a host index and value, ``copy_`` for ``y[0] = 7``); torch 2.15 passes it as a scalar
    (``index_fill_`` with the host index, ``fill_``: no host tensor). The audit must record the host tensors of
    whichever ops this torch runs."""
    x = torch.arange(6)

    def step():
        y = x.clone()
        y[torch.tensor([1, 2])] = -100          # an index from host data (and, up to torch 2.14, a host value)
        y[0] = 7                                # up to torch 2.14 the value tensor of a copy_; 2.15: a fill_
        y.index_fill_(0, x[:2], -1)             # the value as a kernel argument: nothing
        z = torch.where(y > 0, y, 0) + torch.tensor(3) * 2   # CPU scalars of elementwise ops: nothing
        return z + torch.tensor([1, 1, 1, 1, 1, 1])          # a host vector: 1 copy

    index_ops = _setitem_ops(torch.tensor([1, 2]), -100)
    scalar_ops = _setitem_ops(0, 7)
    assert index_ops in (["index_put_"], ["index_fill_"]) and scalar_ops in (["copy_"], ["fill_"]), \
        (index_ops, scalar_ops)     # another dispatch: read it and extend this test
    expected = ["h2d add", f"h2d {index_ops[0]}"] + (["h2d copy_"] if scalar_ops == ["copy_"] else [])
    reads = device_reads(step, [x])
    assert sorted(k[0] for k in reads.elements()) == sorted(expected), dict(reads)


def test_host_inputs_are_checked(tmp_path):
    _, path = save_tiny(tmp_path, "llava")
    m = llava_fast.from_pretrained(path)
    kw = packed_inputs("llava")
    with pytest.raises(ValueError, match="host_inputs takes the keys"):
        m(**kw, host_inputs={"ids": kw["input_ids"]})
    with pytest.raises(ValueError, match=r"host_inputs\['labels'\] must be a CPU tensor"):
        m(**kw, host_inputs={"labels": kw["labels"][:, :3]})
    # the checks read the host copies: a bad label there is reported
    bad = kw["labels"].clone()
    bad[0, -1] = 10 ** 6
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        m(**kw, host_inputs={"labels": bad})


def test_cross_entropy_host_labels(forced):
    """host_labels gives the same loss and gradients bit for bit, and a wrong one is refused."""
    from llava_fast.ops.cross_entropy import fused_linear_cross_entropy

    forced("cross_entropy")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    y[::3] = -100
    grads = []
    for host in (None, y.clone()):
        loss = fused_linear_cross_entropy(h, w, y, host_labels=host)
        gh, gw = torch.autograd.grad(loss, (h, w))
        grads.append((loss, gh, gw))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="host_labels must be a CPU int64 tensor"):
        fused_linear_cross_entropy(h, w, y, host_labels=y[:5])
    bad = y.clone()
    bad[1] = 99
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        fused_linear_cross_entropy(h, w, y, host_labels=bad)


def test_host_inputs_survive_fsdp_input_moves():
    """FSDP2's root pre-forward (and DDP) move every tensor of a forward's arguments to the GPU, dicts included
    (torch.distributed.utils._to_kwargs): a HostInputs passes through as it is. A host copy that did end up on a
    device is not used (the forward copies that input itself), never an error."""
    from torch.distributed.utils import _to_kwargs

    from llava_fast.models.llava import HostInputs, _LlavaBase

    ids = torch.arange(6)[None]
    wrapped = HostInputs({"input_ids": ids})
    _, (kw,) = _to_kwargs((), {"plain": {"input_ids": ids}, "host_inputs": wrapped}, torch.device("meta"), False)
    assert kw["plain"]["input_ids"].device.type == "meta"              # what happens to a dict
    assert kw["host_inputs"] is wrapped and wrapped.tensors["input_ids"] is ids
    h = _LlavaBase._host_inputs(kw["plain"], False, input_ids=ids, labels=None)
    assert h["input_ids"] is ids                                     # the meta copy ignored: the input itself (CPU)
    h = _LlavaBase._host_inputs(wrapped, False, input_ids=ids.clone(), labels=None)
    assert h["input_ids"].data_ptr() == ids.data_ptr()              # the given copy (a view of it)


@pytest.mark.cuda
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_cuda_training_step_does_not_synchronize(tmp_path, model_type):
    """On a GPU, with torch's sync debug mode set to "error", a packed training step with its host_inputs (forward,
    backward) raises at any host synchronisation: a read of device data, a blocking copy, nonzero. Warm-up first
    (the plans and tables the kernels upload are cached by shape on the first call)."""
    _, path = save_tiny(tmp_path, model_type)
    m = llava_fast.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    kw = packed_inputs(model_type)
    host = {k: kw[k] for k in HostInputs.KEYS if torch.is_tensor(kw.get(k))}
    dev = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    dev["pixel_values"] = dev["pixel_values"].to(torch.bfloat16)

    def step():
        out = m(**dev, host_inputs=host, logits=False)
        out.loss.backward()
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
