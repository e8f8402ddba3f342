"""torchrun / FSDP2 plumbing: process group, ``fully_shard`` per decoder layer, full state dicts for saving."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    host_group: object = None
    """A gloo process group for the trainer's host numbers (sample counts, the stop flag) where the default group is
    NCCL: their all-reduces then run on CPU tensors and never wait for the GPU's queue (an NCCL all-reduce of a
    CUDA tensor read back with ``.item()`` is a host synchronisation). None: the default group takes them."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; starts a process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev, _host_group(world))


def fsdp_gradients_are_averaged() -> bool:
    """Whether the default group's reduce-scatter with ``ReduceOp.AVG``, which FSDP2 runs on fp32 / bf16 gradients,
    averages over the ranks (the trainer then scales each rank's loss by the world size to get the sum of the
    per-token losses over the ranks). NCCL's AVG does; torch 2.7's gloo sums instead, silently (measured:
    reduce_scatter_tensor AVG of 1 and 2 gave 3.0 on torch 2.7.1, 1.5 on 2.14.1), which doubled every gradient of a
    two-process CPU run. Probed once on gloo (a few bytes); True elsewhere."""
    if not dist.is_initialized() or dist.get_world_size() <= 1 or dist.get_backend() != "gloo":
        return True
    world = dist.get_world_size()
    x = torch.full((world,), float(dist.get_rank() + 1), dtype=torch.float64)
    out = torch.empty(1, dtype=torch.float64)
    dist.reduce_scatter_tensor(out, x, op=dist.ReduceOp.AVG)
    got, mean, total = float(out), (world + 1) / 2, world * (world + 1) / 2
    if got == mean:
        return True
    if got == total:
        return False
    raise RuntimeError(f"the gloo reduce-scatter with ReduceOp.AVG gave {got} for ranks holding 1..{world} (mean "
                       f"{mean}, sum {total}): FSDP2's gradients cannot be trusted on this torch {torch.__version__}")


def _host_group(world: int):
    """A gloo group over every rank when the default group's backend is not gloo and every rank runs on this machine
    (torchrun's LOCAL_WORLD_SIZE == WORLD_SIZE; every rank calls this at the same point, as ``new_group`` asks).
    None where the default group is gloo already, across machines (gloo's TCP may need GLOO_SOCKET_IFNAME where NCCL
    runs over InfiniBand: a rank that could not join would leave the ranks disagreeing on the group), with
    ``LLAVA_FAST_HOST_GROUP=0``, or where gloo is missing: the host numbers then go through the default group on
    the device, as before session 29 (one host synchronisation per all-reduce)."""
    if world <= 1 or not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    if os.environ.get("LLAVA_FAST_HOST_GROUP", "1") == "0" or int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world:
        return None
    try:
        return dist.new_group(backend="gloo")
    except Exception:  # a torch build without gloo: one device all-reduce per number, correct, only slower
        return None


def has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        return True
    except ImportError:
        return False


def apply_fsdp2(model, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32):
    """``fully_shard`` every decoder layer and vision encoder layer, then the root (mixed precision optional)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    inner = model.model
    for layer in inner.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    vt = getattr(inner, "vision_tower", None)
    enc = getattr(getattr(vt, "encoder", None), "layers", None)
    if enc is not None and any(p.requires_grad for p in vt.parameters()):
        for layer in enc:
            fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def full_model_state(model, distributed: bool) -> dict:
    """Unsharded fp32 state dict on CPU (on every rank when distributed; cheap for the sizes we save)."""
    if not distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optim_state(model, optim, distributed: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=distributed,
                                                                           cpu_offload=True))


def load_full_states(model, optim, model_state: dict, optim_state: dict | None, distributed: bool) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=False) if distributed else StateDictOptions()
    if distributed:
        set_model_state_dict(model, model_state, options=opts)
    else:
        sd = model.state_dict()
        missing = [k for k in sd if k not in model_state]
        if missing:
            raise ValueError(f"checkpoint lacks tensors {missing[:5]}")
        with torch.no_grad():
            for k, v in sd.items():
                v.copy_(model_state[k])
    if optim is not None and optim_state is not None:
        # strict=False: parameters that never received a gradient (e.g. CLIP's unused post_layernorm) have no state
        oopts = StateDictOptions(full_state_dict=distributed, strict=False)
        with _stateless_params_hidden(model, optim, optim_state):
            set_optimizer_state_dict(model, optim, optim_state, options=oopts)


def _stateless_params_hidden(model, optim, optim_state: dict):
    """A context in which the optimizer's parameter groups leave out the trainable parameters that have no saved
    state (they never received a gradient: CLIP's post_layernorm, unused by LLaVA), put back in their places after.

    torch 2.7 to 2.9's ``set_optimizer_state_dict`` raises ``KeyError: '<name>'`` for such a parameter even with
    ``strict=False`` (pytorch/pytorch#164257, fixed in 2.10 by #165228): every resume of a run that trains a
    vision tower failed there. Newer torch skips them itself; either way they come out of the load with no state
    (``Optimizer.load_state_dict`` replaces the whole state), as they went in. A group that would be left empty is
    kept whole (a group's hyperparameters are matched by its parameters' names)."""
    import contextlib

    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns   # private: present from torch 2.2 to 2.15
    except ImportError:
        return contextlib.nullcontext()
    saved = optim_state.get("state", {}) if isinstance(optim_state, dict) else {}
    if not saved or all(isinstance(k, int) for k in saved):      # empty, or keyed by index: nothing to match
        return contextlib.nullcontext()
    with_state, in_model = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        in_model.add(id(p))
        if any(f in saved for f in _get_fqns(model, name)):
            with_state.add(id(p))
    hide = {id(p) for g in optim.param_groups for p in g["params"]
            if p.requires_grad and id(p) in in_model and id(p) not in with_state}
    if not hide:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def hidden():
        full = [g["params"] for g in optim.param_groups]
        for g in optim.param_groups:
            kept = [p for p in g["params"] if id(p) not in hide]
            if kept:
                g["params"] = kept
        try:
            yield
        finally:
            # load_state_dict made new group dicts (the saved hyperparameters, our parameter lists): the full lists back
            for g, params in zip(optim.param_groups, full):
                g["params"] = params
    return hidden()


def all_reduce_sum(x: float | int, info: DistInfo, dtype=torch.float64) -> float:
    """The sum of ``x`` over the ranks (``x`` itself in a single process)."""
    return all_reduce_sums([x], info, dtype)[0]


def all_reduce_sums(xs: list, info: DistInfo, dtype=torch.float64) -> list:
    """The sums of host numbers ``xs`` over the ranks, by one all-reduce (``xs`` as they are in a single process).
    On ``info.host_group`` (gloo, CPU tensors) where there is one: no wait for the GPU; otherwise on the default
    group, on the device where that group is NCCL (one host synchronisation for all of them)."""
    if not info.enabled:
        return list(xs)
    on_host = info.host_group is not None or info.device.type != "cuda"
    t = torch.tensor(list(xs), dtype=dtype, device="cpu" if on_host else info.device)
    dist.all_reduce(t, group=info.host_group)
    return t.tolist()


def barrier_fn(info: DistInfo):
    if not info.enabled:
        return None
    return lambda: dist.barrier()
