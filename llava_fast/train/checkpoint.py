"""Resumable, atomic training checkpoints.

Layout of ``<out>/checkpoints/step_00000100/``:
``model.safetensors`` (full, unsharded weights, fp32 or the training dtype), ``trainer_state.pt`` (optimizer,
scheduler, step, data position, config; loaded with ``torch.load(weights_only=True)``: no pickle code runs),
``rng_rank{R}.pt`` (every rank's RNG streams) and ``meta.json`` (written last, ``complete: true``).

Atomicity: everything is written into ``.tmp-step_...`` first, fsynced, and the folder is renamed into place; then
the ``LATEST`` pointer file is replaced (``os.replace``). A crash at any moment leaves the previous checkpoint and
pointer intact; :func:`latest_checkpoint` only returns folders whose ``meta.json`` says complete. A checkpoint saved
again at the same step (``train(stop_at_step=...)`` on a save step, a finished run started again) first moves the
existing folder aside to ``.old-step_...`` (complete, and found by :func:`latest_checkpoint` until the new one is in
place), never deletes it before. Folders are removed ``meta.json`` first, so one half deleted by a crash is never
taken for complete; rotation never removes the checkpoint just written.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

META = "meta.json"
LATEST = "LATEST"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict:
    """All RNG streams as weights_only-loadable types (tensors, ints, lists)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                    "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
          "python": {"version": py_state[0], "state": list(py_state[1]),
                     "gauss": py_state[2]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def _step_of(name: str) -> int | None:
    """The step of a ``step_N`` / ``.old-step_N`` folder name, else None."""
    base = name[len(".old-"):] if name.startswith(".old-") else name
    if not base.startswith("step_"):
        return None
    try:
        return int(base[len("step_"):])
    except ValueError:
        return None


def _discard(path: str) -> None:
    """Remove a checkpoint folder, ``meta.json`` first: a crash midway leaves an incomplete folder, never one that
    :func:`is_complete` accepts with some of its files gone."""
    try:
        os.remove(os.path.join(path, META))
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def check_new_folder(out: str, what: str = "--out") -> None:
    """Refuses an ``out`` that exists and is not an empty folder (callers check before minutes of loading, too)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{what} {out}: exists and is not empty; choose a new folder")


def write_new_folder(out: str, fill, what: str = "--out") -> str:
    """Fills a new (or empty) folder ``out`` all at once: ``fill(tmp)`` writes a sibling temporary folder, which is
    then renamed to ``out``; a failure (or Ctrl-C) leaves no half-written ``out``. A non-empty ``out`` is refused."""
    check_new_folder(out, what)
    tmp = f"{out.rstrip(os.sep)}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_complete(path: str) -> bool:
    try:
        with open(os.path.join(path, META)) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError):
        return False


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (the LATEST pointer first, else a scan), or None."""
    if not os.path.isdir(root):
        return None
    try:
        with open(os.path.join(root, LATEST)) as f:
            name = f.read().strip()
        if name:
            # .old-<name>: the previous copy of a checkpoint being saved again, moved aside until the new one is in
            # place (a crash between the two renames leaves only it)
            for p in (os.path.join(root, name), os.path.join(root, ".old-" + name)):
                if is_complete(p):
                    return p
    except OSError:
        pass
    cands = []
    for d in os.listdir(root):
        step = _step_of(d)
        if step is not None and is_complete(os.path.join(root, d)):
            cands.append((step, not d.startswith(".old-"), d))  # step_N before .old-step_N
    return os.path.join(root, max(cands)[2]) if cands else None


def save_checkpoint(root: str, step: int, model_state: dict, trainer_state: dict, rng: dict | None = None,
                    keep: int = 2, rank: int = 0, world_size: int = 1, barrier=None, _fail_after: str | None = None):
    """Write checkpoint ``step`` atomically. Every rank calls it (``rng`` is this rank's); rank 0 writes the
    weights and state. ``barrier`` synchronises ranks (None when single-process). Returns the final folder.

    ``_fail_after`` (tests only) raises after writing the named file, to simulate a crash mid-save.
    """
    barrier = barrier or (lambda: None)
    os.makedirs(root, exist_ok=True)
    final = step_dir(root, step)
    tmp = os.path.join(root, f".tmp-step_{step:08d}")
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    if rng is not None:
        p = os.path.join(tmp, f"rng_rank{rank}.pt")
        torch.save(rng, p)
        _fsync_file(p)
    barrier()
    if rank == 0:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        # safetensors refuses shared storage (tied weights): save a copy of each alias
        seen = {}
        for k, v in tensors.items():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if v.numel() and key in seen:
                tensors[k] = v.clone()
            seen[key] = k
        p = os.path.join(tmp, "model.safetensors")
        save_file(tensors, p, metadata={"format": "pt", "step": str(step)})
        _fsync_file(p)
        if _fail_after == "model.safetensors":
            raise RuntimeError("simulated crash after model.safetensors")
        p = os.path.join(tmp, "trainer_state.pt")
        torch.save(trainer_state, p)
        _fsync_file(p)
        if _fail_after == "trainer_state.pt":
            raise RuntimeError("simulated crash after trainer_state.pt")
        p = os.path.join(tmp, META)
        with open(p, "w") as f:
            json.dump({"complete": True, "step": step, "world_size": world_size, "time": time.time()}, f)
        _fsync_file(p)
        _fsync_dir(tmp)
        old = os.path.join(root, ".old-" + os.path.basename(final))
        if os.path.exists(final):
            # saved again at this step: the complete copy stays (moved aside, still found by latest_checkpoint)
            # until the new one has replaced it; deleting it first would leave no checkpoint of this step
            if os.path.exists(old):
                _discard(old)
            os.replace(final, old)
            _fsync_dir(root)
        os.replace(tmp, final)
        _fsync_dir(root)
        if _fail_after == "rename":
            raise RuntimeError("simulated crash after rename, before LATEST")
        ptr = os.path.join(root, LATEST + ".tmp")
        with open(ptr, "w") as f:
            f.write(os.path.basename(final))
        _fsync_file(ptr)
        os.replace(ptr, os.path.join(root, LATEST))
        _fsync_dir(root)
        for d in os.listdir(root):  # what crashed saves left: the new checkpoint supersedes it
            if d.startswith(".old-step_") or (d.startswith(".tmp-step_") and d != os.path.basename(tmp)):
                _discard(os.path.join(root, d))
        # rotate old step checkpoints: the one just written and the keep-1 newest before it stay. Folders numbered
        # after it (left by a run resumed from an older checkpoint, or started anew in this folder) never count:
        # sorting them in would delete the checkpoint just written (keep=1) and leave LATEST naming nothing
        if keep > 0:
            older = sorted((s, d) for d in os.listdir(root)
                           if d.startswith("step_") and (s := _step_of(d)) is not None and s < step)
            for _, d in older[:max(0, len(older) - (keep - 1))]:
                _discard(os.path.join(root, d))
    barrier()
    return final


def load_checkpoint(path: str, rank: int = 0) -> tuple[dict, dict, dict | None]:
    """(model_state, trainer_state, this rank's rng state or None). Never unpickles code."""
    if not is_complete(path):
        raise ValueError(f"{path} is not a complete checkpoint (no meta.json with complete=true); resume from "
                         "latest_checkpoint() instead")
    model_state = load_file(os.path.join(path, "model.safetensors"))
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    rp = os.path.join(path, f"rng_rank{rank}.pt")
    rng = torch.load(rp, map_location="cpu", weights_only=True) if os.path.exists(rp) else None
    return model_state, trainer_state, rng
