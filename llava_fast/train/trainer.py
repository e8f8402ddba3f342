"""The training loop: ``Trainer(cfg).train()``.

Reads like nanoGPT (explicit lr schedule, accumulation, clipping, ``zero_grad(set_to_none=True)``), structured like
torchtitan (``setup`` -> ``train`` -> ``train_step``; checkpoint save/resume; one log line per step).

Loss normalisation: all micro-batches of an optimizer step (on every rank) are fetched first, their supervised
token counts are summed (and all-reduced), and each micro-batch's loss is ``sum(CE) / N_total``, so the update is the
token-weighted mean over the whole accumulated global batch, exactly as one big batch would give (transformers'
``num_items_in_batch`` convention). Under FSDP2 the gradients are averaged over ranks, so the backward loss is
multiplied by the world size.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import os
import random
import signal
import sys
import threading
import time
import zlib
from collections import Counter

import numpy as np
import torch

from llava_fast import _ext
from llava_fast.envinfo import peak_bf16_flops
from llava_fast.models.llava import HostInputs
from llava_fast.train import checkpoint as ckpt
from llava_fast.train.config import TrainConfig
from llava_fast.train.distributed import (all_reduce_sum, all_reduce_sums, apply_fsdp2, barrier_fn, full_model_state,
                                          fsdp_gradients_are_averaged, full_optim_state, has_fsdp2, init_distributed,
                                          load_full_states)

# Objects in the garbage collector's permanent generation when this module was imported: 0 on Python 3.10, 3.11 and
# 3.13, but 375 of the interpreter's own on 3.12. train() freezes and later unfreezes everything only where no one
# else froze objects since (see there); with a test against 0, on 3.12 it never unfroze, so every run's set-up objects
# stayed out of the collector's reach after train() returned.
_FROZEN_AT_IMPORT = gc.get_freeze_count()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_lambda(total: int, warmup: int, min_ratio: float = 0.0):
    """Linear warmup to 1, then cosine to ``min_ratio`` (HF get_cosine_schedule_with_warmup when min_ratio=0)."""
    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        prog = float(step - warmup) / float(max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))
    return f


def param_part(name: str) -> str:
    """The part a parameter belongs to: projector, newline, vision or llm (language model + lm_head)."""
    if "multi_modal_projector" in name:
        return "projector"
    if "image_newline" in name:
        return "newline"
    return "vision" if "vision_tower" in name else "llm"


def set_trainable(model, parts) -> dict[str, int]:
    """Freeze everything, then unfreeze ``parts`` (projector, llm, vision, newline). Returns parameter counts."""
    parts = set(parts)
    counts = Counter()
    for name, p in model.named_parameters():
        part = param_part(name)
        p.requires_grad_(part in parts)
        counts[part + ("" if part in parts else "_frozen")] += p.numel()
    return dict(counts)


def param_groups(model, lr: float, weight_decay: float,
                 part_lr: dict[str, float | None] | None = None):
    """AdamW groups: no decay for biases/norms/1-D params. ``part_lr`` gives a part (``vision``, ``projector``) its
    own lr; a part it does not name, or names with None, trains at ``lr`` (the original LLaVA's
    ``--mm_vision_tower_lr`` / ``--mm_projector_lr``: its image_newline is not in the projector group)."""
    part_lr = part_lr or {}
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay if (p.dim() >= 2 and "norm" not in name) else 0.0
        glr = part_lr.get(param_part(name))
        groups.setdefault((lr if glr is None else glr, decay), []).append(p)
    return [{"params": ps, "lr": glr, "weight_decay": wd, "initial_lr": glr} for (glr, wd), ps in groups.items()]


def bf16_autocast(precision: str, device: torch.device) -> bool:
    """Whether a step runs under bf16 autocast: ``train.precision`` ``bf16``, or ``auto`` on a GPU with native bf16
    (compute capability >= 8.0). ``auto`` on an older GPU (V100, T4: bf16 only emulated, slower than fp32) and on the
    CPU trains in fp32."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def _supports_packing(model) -> bool:
    try:
        return "cu_seqlens" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except Exception:  # noqa: BLE001
        return float("nan")



@contextlib.contextmanager
def _deterministic_mode(on: bool):
    """``train.deterministic`` for the run (config.py): torch's deterministic algorithms, cuDNN deterministic and
    not benchmarking; the attention dispatch reads the former (models/dispatch.py, ``_deterministic_backward``).
    Everything goes back to how it was after the run, so a process that trains and then does other work gets torch's
    settings back."""
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


class _GracefulInterrupt:
    """While training (main thread of each process): the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's
    preemption notice; what torchrun's agent forwards to its workers when it gets either) only sets ``requested``,
    so that the trainer finishes the optimizer step it is in and saves a checkpoint before stopping (nothing lost);
    a second one raises KeyboardInterrupt at once. The checkpoint is saved with checkpoint.every_steps=0 too (the
    default: no periodic checkpoints; a run stopped by hand should still be resumable). Under torchrun the ranks
    agree after every step (``Trainer._stop_agreed``: any rank's signal stops all of them after the same step, since
    the checkpoint is a collective). torchrun's agent kills its workers 30 s after forwarding the signal: a step and
    a checkpoint that take longer are cut short there, and the previous checkpoint (saves are atomic) stands."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, log, enabled: bool = True):
        self.requested, self._log, self._old = False, log, {}
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.enabled:
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self._log(f"{what}: finishing this step and saving a checkpoint (a second {what} stops at once, losing the "
                  f"steps since the last checkpoint)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


class Trainer:
    """Runs one recipe. Pass ``model``/``tokenizer``/``dataset`` to skip building them from ``cfg``."""

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, dataset=None, log=None, quiet: bool = False):
        self.cfg = cfg
        if cfg.train.deterministic:
            # read by cuBLAS when it makes its handle (torch's first GEMM on a stream): before the model reaches the
            # GPU. torch checks it at each GEMM under use_deterministic_algorithms and raises when it is missing.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.quiet = quiet
        self._log_fn = log
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.history: list[dict] = []
        self.drops = Counter()
        self._dropped_seen: set = set()  # dataset indices of the samples a worker could not load, counted once
        self.skipped_nonfinite = 0     # steps skipped for a NaN/inf loss or gradient norm (checkpointed)
        self._nonfinite_run = 0        # of them, in a row up to now
        self._t_last_read = None       # host clock at the previous step's read of its loss (train_step's timing)
        self._setup_done = False

    # ------------------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if getattr(self, "dist", None) is not None and not self.dist.is_main:
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        elif not self.quiet:
            print(msg, flush=True)

    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.dist = init_distributed(cfg.train.device)
        dev = self.dist.device
        seed_everything(cfg.train.seed)
        if self.model is None:
            from llava_fast.train.build import build_model

            self.model, tok = build_model(cfg.model, log=self.log)
            self.tokenizer = self.tokenizer or tok
        if self.tokenizer is None:
            from llava_fast.data import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.model.path)
        model = self.model
        if cfg.model.dtype == "bfloat16":
            model.to(torch.bfloat16)
        elif cfg.model.dtype == "float32":
            model.to(torch.float32)
        counts = set_trainable(model, cfg.train.trainable)
        if cfg.train.lora:
            from llava_fast.train.lora import apply_lora

            apply_lora(model, cfg.train)
            counts = {"lora+" + ",".join(p for p in cfg.train.trainable if p != "llm"):
                      sum(p.numel() for p in model.parameters() if p.requires_grad)}
        self.param_counts = counts
        self.log("trainable parameters: " + ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in sorted(counts.items())))
        model.to(dev)
        model.train()
        lm = model.model.language_model
        if cfg.train.activation_checkpointing:
            lm.gradient_checkpointing = True
        self.autocast = mixed = bf16_autocast(cfg.train.precision, dev)
        if dev.type == "cuda" and cfg.train.precision == "auto" and not mixed:
            self.log("train.precision=auto: this GPU has no native bf16 (compute capability < 8.0): training in fp32")
        self.fsdp = False
        if self.dist.enabled:
            if cfg.train.fsdp == "off":
                raise ValueError("several processes need FSDP2 (train.fsdp=auto)")
            if not has_fsdp2():
                raise RuntimeError("torch.distributed.fsdp.fully_shard (FSDP2) is not available in this torch; "
                                   "upgrade to torch >= 2.6 or run on one process")
            apply_fsdp2(model, param_dtype=torch.bfloat16 if self.autocast else None)
            self.fsdp = True
            # FSDP2 averages the gradients over the ranks; each rank's loss is scaled by the world size so that the
            # step's gradient is the sum over every rank's supervised tokens divided by their global count
            self._loss_scale = float(self.dist.world_size)
            if not fsdp_gradients_are_averaged():
                self._loss_scale = 1.0
                self.log(f"torch {torch.__version__}'s gloo reduce-scatter sums where FSDP2 asks for the average "
                         f"(fixed in later torch): each rank's loss is not scaled by the world size")
            self.autocast = False  # FSDP2's MixedPrecisionPolicy casts the parameters
        self._pix_dtype = torch.bfloat16 if (self.fsdp and dev.type == "cuda" and mixed) \
            else next(model.parameters()).dtype
        if cfg.train.compile:
            model.compile_layers()
        self.packed = cfg.data.packing and _supports_packing(model)
        if cfg.data.packing and not self.packed:
            self.log("this model takes no cu_seqlens: using padded batches")
        # optimizer & schedule
        fused = cfg.optim.fused if cfg.optim.fused is not None else dev.type == "cuda"
        part_lr = {"vision": cfg.optim.vision_lr, "projector": cfg.optim.projector_lr}
        groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, part_lr)
        if not groups:
            raise ValueError(f"nothing to train: train.trainable={cfg.train.trainable}")
        for part, lr in part_lr.items():
            if lr is not None and not any(p.requires_grad for n, p in model.named_parameters()
                                          if param_part(n) == part):
                what = "vision tower" if part == "vision" else part
                self.log(f"optim.{part}_lr={lr} is unused: the {what} does not train "
                         f"(train.trainable={','.join(cfg.train.trainable)})")
        kw = dict(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self._fused = bool(fused)
        if fused:
            kw["fused"] = True
        self.optimizer = torch.optim.AdamW(groups, **kw)
        self._build_data()
        spe = self.sampler.num_steps(0)
        if spe == 0:
            raise ValueError(f"the data gives no full optimizer step (world_size={self.dist.world_size}, "
                             f"accum={cfg.train.accum}); use more data or smaller accum")
        self.steps_per_epoch = spe
        self.total_steps = cfg.schedule.max_steps or max(1, math.ceil(cfg.schedule.epochs * spe))
        warm = cfg.schedule.warmup_steps if cfg.schedule.warmup_steps is not None else \
            math.ceil(cfg.schedule.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lambda(self.total_steps, warm, cfg.schedule.min_lr_ratio))
        self._flops_setup()
        self.out = cfg.checkpoint.out
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        if self.dist.is_main:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as f:
                f.write(cfg.to_json())
        self._maybe_resume()
        self._setup_done = True
        return self

    def image_spec(self):
        """The image preprocessing this run trains with (:func:`run_image_spec`)."""
        return run_image_spec(self.cfg, self.model.config)

    def _build_data(self):
        cfg = self.cfg
        from llava_fast.data import LlavaDataset, PackedBatchSampler, PaddedBatchSampler, collate_packed

        if self.dataset is None:
            cache = os.path.join(cfg.checkpoint.out, "dataset_index") if cfg.data.index_cache else None
            from llava_fast.data.templates import is_llama3_tokenizer

            if cfg.data.template == "vicuna_v1" and is_llama3_tokenizer(self.tokenizer):
                self.log("data.template=vicuna_v1 on a Llama 3 tokenizer: LLaVA-NeXT trained its Llama-3 models "
                         "(llama3-llava-next-8b) with data.template=llama3 (its --version llava_llama_3)")

            def build():
                return LlavaDataset.for_model(self.model.config, cfg.data.data, cfg.data.images, self.tokenizer,
                                              cfg.data.template, spec=self.image_spec(), max_len=cfg.data.max_len,
                                              frames_upbound=cfg.data.frames_upbound, video_fps=cfg.data.video_fps,
                                              strict=cfg.data.strict, log=self.log, cache_dir=cache,
                                              index_workers=cfg.data.index_workers,
                                              progress=cfg.log.progress and self.dist.is_main and not self.quiet)

            if cache is not None and self.dist.enabled:
                # the main rank indexes (and writes the cache) while the others wait, then they load it. The wait is
                # on a gloo group with a long timeout: indexing millions of records (image headers on a network file
                # system) can outlast the default process group's collective timeout (10 minutes for NCCL)
                import datetime

                wait = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
                if self.dist.is_main:
                    self.dataset = build()
                torch.distributed.barrier(group=wait)
                torch.distributed.destroy_process_group(wait)
                if not self.dist.is_main:
                    self.dataset = build()
            else:
                self.dataset = build()
        ds = self.dataset
        self.drops.update(ds.drops.counts)
        common = dict(seed=cfg.train.seed, shuffle=cfg.data.shuffle, rank=self.dist.rank,
                      world_size=self.dist.world_size, accum=cfg.train.accum)
        if self.packed:
            self.sampler = PackedBatchSampler(ds.lengths, cfg.data.max_tokens,
                                              modality=[l > 0 for l in ds.modality_lengths],
                                              group_by_modality=cfg.data.group_by_modality_length, **common)
            self.collate = collate_packed
            fill = self.sampler.fill(0)
            self.log(f"data: {len(ds)} samples ({ds.drops.summary()}), {sum(ds.lengths)} tokens, packed into "
                     f"{len(self.sampler.micro_batches(0))} sequences of {cfg.data.max_tokens} tokens "
                     f"({100 * fill:.1f}% full)")
        else:
            self.sampler = PaddedBatchSampler(len(ds), cfg.data.batch_size, modality_lengths=ds.modality_lengths,
                                              group_by_modality_length=cfg.data.group_by_modality_length, **common)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            self.collate = _PadCollate(pad)
            self.log(f"data: {len(ds)} samples ({ds.drops.summary()}), padded batches of {cfg.data.batch_size}")
        if self.fsdp:
            self.collate = self._fsdp_collate(self.collate)
        self.collate = _NameDropped(self.collate)
        left = self.sampler.left_out(0)
        if left:
            self.log(f"data: the partial last step of each epoch ({len(left)} micro-batches, "
                     f"{sum(len(mb) for mb in left)} samples in epoch 0) is left out so that every rank runs "
                     f"train.accum={cfg.train.accum} micro-batches; counted as dropped 'partial_last_step'")

    def _fsdp_collate(self, collate):
        """Under FSDP2 every rank must run the same sharded modules for each micro-batch, or the collectives of the
        ranks pair up wrongly (a hang): a micro-batch whose samples were all dropped (decode errors), or one without
        images while the (sharded) vision tower trains, gets a filler sample with every label masked (no loss,
        no gradient: it only runs the same modules)."""
        ds = self.dataset
        vt = getattr(self.model.model, "vision_tower", None)
        mm = [i for i, l in enumerate(ds.modality_lengths) if l > 0]
        need_media = bool(mm) and vt is not None and any(p.requires_grad for p in vt.parameters())
        for i in sorted(mm if need_media else range(len(ds)), key=lambda i: ds.lengths[i]):
            s = ds[i]
            if "dropped" not in s:
                break
        else:
            raise RuntimeError("no sample of the data decodes (see the dropped samples above)")
        from llava_fast.data import IGNORE_INDEX

        filler = dict(s, labels=torch.full_like(s["labels"], IGNORE_INDEX), sample_id="<fsdp filler>")
        return _FsdpCollate(collate, filler, need_media)

    def _loader(self):
        # its own generator (worker seeds): a DataLoader would otherwise draw from the global RNG at each iter(),
        # and a run resumed mid-epoch (one more iter() than the uninterrupted run) would continue another stream
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.sampler.epoch)
        # Workers forked on Linux, whatever the default: Python 3.14 made forkserver the default there, which pickles
        # the dataset (its whole index), sampler and collate for every worker at every epoch, and the collate is not
        # picklable (the run stopped at its first batch: "Can't pickle local object"). Elsewhere: Python's default.
        ctx = None
        if self.cfg.data.num_workers > 0 and sys.platform.startswith("linux"):
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate,
                                           num_workers=self.cfg.data.num_workers,
                                           pin_memory=self.dist.device.type == "cuda",
                                           persistent_workers=False, generator=g, multiprocessing_context=ctx)

    def _flops_setup(self):
        m = self.model
        n_llm = sum(p.numel() for n, p in m.named_parameters() if "vision_tower" not in n and "embed_tokens" not in n)
        n_vis = sum(p.numel() for n, p in m.named_parameters() if "vision_tower" in n)
        tr = set(self.cfg.train.trainable)
        self._llm_mult = 6 if "llm" in tr else 4  # frozen LLM still back-propagates activations to the projector
        self._vis_mult = 6 if "vision" in tr else 2
        self._n_llm, self._n_vis = n_llm, n_vis
        vc = m.config.vision_config
        self._patches_per_tile = (vc.image_size // vc.patch_size) ** 2 + 1
        self._peak = peak_bf16_flops(torch.cuda.get_device_name(self.dist.device)) \
            if self.dist.device.type == "cuda" else None

    # ------------------------------------------------------------------------------------------------------------
    def _resume_key(self) -> dict:
        """What a checkpoint's data position and its restored optimizer/scheduler state mean: the settings that fix
        the data order, and the hyperparameters the restored state would silently override. A resumed run must
        have the same."""
        c, ds = self.cfg, self.dataset
        lengths = np.asarray(ds.modality_lengths, dtype=np.int64)
        key = {"samples (data.data, data.max_len, data.template)":
               f"{len(lengths)} samples, token counts crc32 {zlib.crc32(lengths.tobytes()):08x}",
               "data.packing": self.packed, "data.shuffle": c.data.shuffle,
               "data.group_by_modality_length": c.data.group_by_modality_length, "train.seed": c.train.seed,
               "train.accum x world size": c.train.accum * self.dist.world_size,
               # several ranks leave out each epoch's partial last step, one process trains it: the same
               # accum x world size on another number of ranks gives other epochs and another lr schedule
               "partial last step left out (several ranks)": bool(self.sampler.drop_last),
               "train.trainable": list(c.train.trainable), "train.lora": c.train.lora}
        key.update({"data.max_tokens": c.data.max_tokens} if self.packed else {"data.batch_size": c.data.batch_size})
        # the model's config (pinpoints, feature layer, vocabulary, ...): another model under the same weights would
        # train on other inputs (its dtype may change: precision changes are noted, not refused)
        mcfg = {k: v for k, v in self.model.config.to_hf_dict().items() if k not in ("dtype", "torch_dtype")}
        key["model (its config.json)"] = f"crc32 {zlib.crc32(json.dumps(mcfg, sort_keys=True).encode()):08x}"
        if c.train.lora:
            key.update({f"train.{k}": getattr(c.train, k) for k in ("lora_r", "lora_alpha", "lora_dropout")})
        for sec in ("optim", "schedule"):
            for k, v in getattr(c, sec).__dict__.items():
                if k not in ("max_grad_norm", "fused", "max_nonfinite_steps"):  # read at every step: may change
                    key[f"{sec}.{k}"] = list(v) if isinstance(v, tuple) else v
        return key

    def state(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "scheduler": self.scheduler.state_dict(), "drops": dict(self.drops),
                "dropped_samples": sorted(self._dropped_seen, key=str), "history": self.history,
                "skipped_nonfinite": self.skipped_nonfinite, "nonfinite_run": self._nonfinite_run,
                "resume_key": json.dumps(self._resume_key()),
                "config": self.cfg.to_json()}

    def _check_not_merged(self, what: str) -> None:
        if getattr(self, "_lora_merged", False):
            raise RuntimeError(f"cannot {what}: export() merged the LoRA adapters into the model (train.lora), so it "
                               f"no longer holds what the optimizer trains; export last, or resume from a checkpoint "
                               f"with a new Trainer")

    def save(self, _fail_after: str | None = None) -> str:
        """Resumable checkpoint at the current step (atomic; see :mod:`llava_fast.train.checkpoint`)."""
        self._check_not_merged("save a checkpoint")
        ms = full_model_state(self.model, self.fsdp)
        st = self.state()
        st["optimizer"] = full_optim_state(self.model, self.optimizer, self.fsdp)
        ok = 1
        try:
            path = ckpt.save_checkpoint(self.ckpt_root, self.global_step, ms, st, ckpt.rng_state(),
                                        keep=self.cfg.checkpoint.keep, rank=self.dist.rank,
                                        world_size=self.dist.world_size, barrier=barrier_fn(self.dist),
                                        _fail_after=_fail_after)
        except Exception:
            ok = 0
            if not self.dist.enabled:
                raise
            path = None
        if self.dist.enabled and all_reduce_sum(1 - ok, self.dist) > 0:
            raise RuntimeError(f"saving checkpoint step {self.global_step} failed on a rank; the previous "
                               f"checkpoint in {self.ckpt_root} is intact")
        self._saved_step = self.global_step
        self._t_last_read = None   # the next step's time counts from its own start, not over this save
        self.log(f"saved checkpoint {path}")
        return path

    def _stop_agreed(self, stop: _GracefulInterrupt) -> bool:
        """Whether to stop after this step: this process was signalled, or (torchrun) any rank was. Every rank calls
        this after every step, so they all stop after the same one and save its checkpoint together."""
        if not self.dist.enabled:
            return stop.requested
        return all_reduce_sum(int(stop.requested), self.dist) > 0

    def _stop_on_interrupt(self):
        """After a Ctrl-C: a checkpoint of the steps done (unless this step's was just saved), then stop."""
        if getattr(self, "_saved_step", None) != self.global_step:
            self.save()
        how = ("the same command resumes from it" if self.cfg.checkpoint.resume == "auto"
               else "checkpoint.resume=auto (or this folder) resumes from it")
        self.log(f"interrupted: checkpoint of step {self.global_step} saved; {how}"
                 + (" (on every rank: one of them was signalled)" if self.dist.enabled else ""))
        raise KeyboardInterrupt

    def _maybe_resume(self):
        r = self.cfg.checkpoint.resume
        if r in (None, "none", "", "no"):
            return
        path = ckpt.latest_checkpoint(self.ckpt_root) if r == "auto" else r
        if path is None:
            return
        ms, st, rng = ckpt.load_checkpoint(path, self.dist.rank)
        if "resume_key" in st:  # (checkpoints before it: not checked)
            old, new = json.loads(st["resume_key"]), json.loads(json.dumps(self._resume_key()))
            # a key the checkpoint lacks was added to the check after it was written: not compared
            diff = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in sorted(old)
                    if old.get(k) != new.get(k)]
            if diff:
                raise ValueError(f"cannot resume from {path}: " + "; ".join(diff) + ". Resuming would continue "
                                 "another data order (samples repeated or skipped) or keep the checkpoint's "
                                 "optimizer and lr-schedule settings over the new ones. Resume with the checkpoint's "
                                 "settings, or start a new run (another checkpoint.out, or checkpoint.resume=none)")
        self._note_precision_change(path, st)
        load_full_states(self.model, self.optimizer, ms, st["optimizer"], self.fsdp)
        _set_fused(self.optimizer, self._fused)  # the loaded groups carry the checkpoint's choice: optim.fused wins
        self.scheduler.load_state_dict(st["scheduler"])
        self.global_step, self.epoch, self.step_in_epoch = st["global_step"], st["epoch"], st["step_in_epoch"]
        self.drops = Counter(st.get("drops", {}))
        self._dropped_seen = set(st.get("dropped_samples", ()))
        self.history = list(st.get("history", []))
        self.skipped_nonfinite = int(st.get("skipped_nonfinite", 0))
        self._nonfinite_run = int(st.get("nonfinite_run", 0))  # a resume does not reset the run of NaN steps
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.log(f"resumed from {path} at step {self.global_step} (epoch {self.epoch}, step {self.step_in_epoch})")

    def _note_precision_change(self, path, st) -> None:
        """model.dtype / train.precision may change on resume (a bf16 run continued in fp32, or the reverse: the
        restored weights and optimizer moments are cast to the new parameters' dtype), but not silently."""
        try:
            old = json.loads(st.get("config") or "{}")
        except (TypeError, ValueError):
            return
        now = json.loads(self.cfg.to_json())
        changed = [f"{sec}.{k}={old[sec][k]!r} -> {now[sec][k]!r}" for sec, k in (("model", "dtype"),
                                                                                  ("train", "precision"))
                   if k in old.get(sec, {}) and old[sec][k] != now[sec][k]]
        if changed:
            self.log(f"note: resuming {path} with another precision ({', '.join(changed)}): the checkpoint's weights "
                     f"and optimizer moments are cast to this run's parameter dtype "
                     f"({next(self.model.parameters()).dtype}); the loss curve may shift at the resume step")

    # ------------------------------------------------------------------------------------------------------------
    def _to_device(self, b: dict) -> dict:
        dev = self.dist.device
        out = {}
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_sizes",
                  "attention_mask", "pixel_values_videos", "batch_num_images"):
            if b.get(k) is not None:
                out[k] = b[k].to(dev, non_blocking=True)
        if self.packed and "cu_seqlens" in out:
            out["max_seqlen"] = b["max_seqlen"]
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self._pix_dtype)
        return out

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches (already collated)."""
        info, model = self.dist, self.model
        t0 = time.perf_counter()
        dropped, keys = Counter(), []  # this step's drops; (reason, dataset index or None) of each
        for b in micro_batches:
            dropped.update(b.get("dropped") or {})
            named = b.get("dropped_index")
            keys += named if named is not None else [(r, None) for r, c in (b.get("dropped") or {}).items()
                                                     for _ in range(c)]
        # the ranks' counts in one all-reduce (on the host group: no wait for the GPU, which may still run the
        # previous step's optimizer)
        n_global, tokens, tiles, n_dropped = all_reduce_sums(
            [sum(b["num_items"] for b in micro_batches), sum(b["num_tokens"] for b in micro_batches),
             sum(sum(b.get("num_tiles") or []) for b in micro_batches), sum(dropped.values())], info)
        if info.enabled and n_dropped > 0:
            # every rank's drops: the log, the metrics and the checkpoints (main rank) count them all
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, (dict(dropped), keys))
            dropped = sum((Counter(g[0]) for g in gathered), Counter())
            keys = [k for g in gathered for k in g[1]]
        # a sample that fails to load fails again every epoch: counted the first time only (same on every rank,
        # the keys are gathered); one a batch does not name (collated without _NameDropped) counts each time
        new = Counter()
        for reason, i in keys:
            if i not in self._dropped_seen:
                new[reason] += 1
                if i is not None:
                    self._dropped_seen.add(i)
        loss_acc = None   # on the device: reading each micro-batch's loss would wait for its backward
        # a fill on the device, not a copy of a host value (a blocking copy would wait for the previous step's
        # optimizer, which the host no longer waits for)
        denom = torch.full((), float(max(n_global, 1)), device=info.device)
        scale = self._loss_scale if self.fsdp else 1.0
        # no supervised token in the whole step (every sample dropped): no mean to take, and an update would move
        # the weights on AdamW's moments alone; skipped on every rank (n_global is reduced)
        empty = n_global == 0
        real = [] if empty else [b for b in micro_batches if b.get("input_ids") is not None]
        for i, b in enumerate(real):
            if self.fsdp and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(i == len(real) - 1)
            try:
                inputs = self._to_device(b)
                # the batch's CPU tensors: the model's input checks and the loss read them instead of the device
                # copies, so no micro-batch waits for the GPU (docs/architecture.md, "Host synchronisations")
                host = {k: b[k] for k in HostInputs.KEYS
                        if k in inputs and torch.is_tensor(b.get(k)) and b[k].device.type == "cpu"}
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    # (a HostInputs, not a dict: FSDP2 moves the tensors of dict arguments to the GPU)
                    out = model(**inputs, num_items_in_batch=denom, logits=False,  # fused loss: no logits tensor
                                host_inputs=HostInputs(host) if host else None)
                (out.loss * scale).backward()
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(self._oom_message(b, i, len(real), e)) from e
            # summed in float64, in micro-batch order: the same value as adding their Python floats
            loss_acc = out.loss.detach().double() if loss_acc is None else loss_acc + out.loss.detach().double()
        if self.fsdp and not real and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        params = [p for p in model.parameters() if p.requires_grad]
        mg = self.cfg.optim.max_grad_norm
        # the norm is queued behind the backward before anything is read: the host then waits once, for the loss and
        # the norm together (a read of each in turn left the GPU idle while the host queued the norm's kernels)
        gn = torch.nn.utils.clip_grad_norm_(params, mg if mg and mg > 0 else float("inf"))
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        if info.enabled:  # summed over the ranks on the device, before the one read (a rank without data adds 0)
            loss_acc = (loss_acc if loss_acc is not None
                        else torch.zeros((), dtype=torch.float64, device=info.device)).clone()
            torch.distributed.all_reduce(loss_acc)
        loss_h, gn_h = _ext.host_copies(loss_acc, gn)
        t_read = time.perf_counter()
        loss = float(loss_h) if loss_h is not None else 0.0
        gn = float(gn_h)
        g0 = self.optimizer.param_groups[0]  # may be a part's own lr (vision / projector): log optim.lr's schedule
        lr = g0["lr"] / g0["initial_lr"] * self.cfg.optim.lr
        limit = self.cfg.optim.max_nonfinite_steps
        skip = limit > 0 and not (math.isfinite(gn) and math.isfinite(loss))  # same on every rank (reduced values)
        if empty:
            loss = float("nan")
            self.log(f"step {self.global_step + 1}: no supervised token (every sample of the step was dropped: "
                     f"{dict(dropped)}); update skipped")
        elif skip:
            self.skipped_nonfinite += 1
            self._nonfinite_run += 1
            self.log(f"step {self.global_step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                     f"(loss {loss}, grad_norm {gn}); update skipped ({self._nonfinite_run} in a row, "
                     f"{self.skipped_nonfinite} in all)")
            if self._nonfinite_run >= limit:
                self.optimizer.zero_grad(set_to_none=True)
                raise RuntimeError(
                    f"training stopped at step {self.global_step + 1}: {self._nonfinite_run} steps in a row had a "
                    f"NaN/inf loss or gradient norm (optim.max_nonfinite_steps={limit}). The weights are those of "
                    f"the last finite update; the last checkpoint in {self.ckpt_root} is intact. Usual causes: "
                    f"fp16 overflow (train in bf16), a learning rate too high for this data, or a corrupt sample "
                    f"(data.* settings); optim.max_nonfinite_steps=0 disables the check.")
        else:
            self._nonfinite_run = 0
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # no wait for the optimizer's kernels here: the host goes on to log this step and to queue the next one's
        # data and forward while they run. The step's time is the time between two reads (each waits for its step's
        # backward, so in a run of steps the gap is one whole step, optimizer included); the first step after
        # setup or a checkpoint counts from its own start
        start = self._t_last_read if self._t_last_read is not None else t0
        self._t_last_read = t_read
        dt = max(t_read - start, 1e-9)
        self.drops.update(new)
        flops = (self._llm_mult * self._n_llm * tokens + self._vis_mult * self._n_vis * tiles * self._patches_per_tile)
        mfu = flops / dt / (self._peak * info.world_size) if self._peak else None
        return {"step": self.global_step + 1, "loss": loss, "grad_norm": gn, "lr": lr,
                "skipped_nonfinite": self.skipped_nonfinite,
                "tokens": int(tokens), "supervised": int(n_global), "tokens_per_s": tokens / dt,
                "mfu": mfu, "peak_mem_gb": _peak_memory_gb(info.device), "dropped": sum(self.drops.values()),
                "time_s": dt}

    def _oom_message(self, b: dict, i: int, n: int, e: BaseException) -> str:
        """What an out-of-memory error in a micro-batch says: where, how big the micro-batch was, what to change, and
        that the last checkpoint is intact (torch's own message follows it)."""
        cfg = self.cfg
        size = (f"data.max_tokens (now {cfg.data.max_tokens})" if self.packed else
                f"data.batch_size (now {cfg.data.batch_size})")
        last = ckpt.latest_checkpoint(self.ckpt_root)
        tiles = sum(b.get("num_tiles") or [])
        levers = [f"lower {size} and raise train.accum to keep the global batch"]
        if not cfg.train.activation_checkpointing:
            levers.append("set train.activation_checkpointing=true")
        if _ext.getenv("LLAVA_FAST_RECOMPUTE_ACT", "llm") == "llm" and "vision" in cfg.train.trainable:
            levers.append("set LLAVA_FAST_RECOMPUTE_ACT=1 (the trained vision tower recomputes its activations too)")
        return (f"out of GPU memory in step {self.global_step + 1}, micro-batch {i + 1} of {n} ({b['num_tokens']} "
                f"tokens, {tiles} image tiles; peak {_peak_memory_gb(self.dist.device):.1f} GB). To fit: "
                + "; ".join(levers) + ". " + (f"The last checkpoint, {last}, is intact: the same command resumes "
                                            f"from it. " if last else "No checkpoint was written yet. ")
                + f"(torch: {e})")

    def train(self, stop_at_step: int | None = None) -> dict:
        """Run until ``total_steps``; checkpoints, logs, exports. Returns a summary dict.

        ``stop_at_step``: save a checkpoint and return after that step (preemption; resume with a new Trainer)."""
        self._check_not_merged("train further")
        if not self._setup_done:
            self.setup()
        cfg, info = self.cfg, self.dist
        log_path = os.path.join(self.out, "train_log.jsonl")
        if info.is_main:
            _trim_log(log_path, self.global_step)
        jsonl = open(log_path, "a") if info.is_main else None
        sinks = _MetricSinks(cfg, self.out, self.global_step, self.log) if info.is_main else None
        bar = None
        if info.is_main and cfg.log.progress and not self.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.global_step, desc=f"train {cfg.recipe}",
                       unit="step", dynamic_ncols=True, file=sys.stdout)
        if info.device.type == "cuda" and self.global_step < self.total_steps:
            self.log("the first steps also compile the Triton kernels for this GPU and these shapes: they take "
                     "longer (the kernels are cached in $TRITON_CACHE_DIR, ~/.triton/cache, for later runs)")
        t_start = time.perf_counter()
        self._t_last_read = None
        # Ctrl-C / SIGTERM: finish the step, save a checkpoint, then stop (a second one stops at once)
        stop = _GracefulInterrupt(self.log)
        # what setup left (the model, the tokenizer, transformers' and torch's modules: ~400k objects for the demo's
        # tiny model) out of the garbage collector's sight for the run: its full collections, which Python starts on
        # its own now and then, took 0.4-0.6 s each on the dev CPU, the host stalled mid-step and the GPU idle; with
        # them frozen one takes ~0.1 ms (session 29). Also fewer copied pages in the DataLoader's forked workers
        # (objects a caller froze after this module's import stay frozen after the run; those frozen before it,
        # the interpreter's own on 3.12 among them, are unfrozen with the run's)
        unfreeze = gc.get_freeze_count() <= _FROZEN_AT_IMPORT
        gc.collect()
        gc.freeze()
        try:
            with stop, _deterministic_mode(cfg.train.deterministic):
                while self.global_step < self.total_steps:
                    self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                    if self.step_in_epoch == 0:  # counted once per epoch (a resumed epoch was counted before)
                        left = sum(len(mb) for mb in self.sampler.left_out())
                        if left:
                            self.drops["partial_last_step"] += left
                    n_steps = self.sampler.num_steps()
                    it = iter(self._loader())
                    per_rank = [len(self.sampler.rank_micro_batches(s)) for s in self.sampler.steps()]
                    while self.step_in_epoch < n_steps and self.global_step < self.total_steps:
                        try:
                            mbs = [next(it) for _ in range(per_rank[self.step_in_epoch])]
                        except Exception:
                            if not stop.requested or self.dist.enabled:
                                # (under torchrun the ranks could not agree on where to stop: each stops at once,
                                # the last checkpoint stands; torchrun's agent signals the ranks, not their workers)
                                raise
                            # a terminal's Ctrl-C reaches the DataLoader's workers too, which stop: the steps done
                            # so far are saved, the one being fetched had not begun
                            self._stop_on_interrupt()
                        m = self.train_step(mbs)
                        self.global_step += 1
                        self.step_in_epoch += 1
                        m["epoch"] = self.epoch
                        self.history.append({k: m[k] for k in ("step", "loss", "grad_norm", "lr")})
                        if jsonl is not None:  # strict JSON: a NaN/inf (a skipped step's loss) is written as null
                            jsonl.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                                    for k, v in m.items()}, allow_nan=False) + "\n")
                            jsonl.flush()
                        if sinks is not None:
                            sinks.log(m)
                        if bar is not None:  # the postfix first: update() draws the bar, with this step's numbers
                            post = dict(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tok_s=f"{m['tokens_per_s']:.0f}")
                            if m["mfu"] is not None:
                                post["mfu"] = f"{100 * m['mfu']:.1f}%"
                            bar.set_postfix(post, refresh=False)
                            bar.update(1)
                        elif info.is_main and not self.quiet and m["step"] % max(1, cfg.log.every_steps) == 0:
                            self.log(f"step {m['step']}/{self.total_steps} loss {m['loss']:.4f} grad_norm "
                                     f"{m['grad_norm']:.3f} lr {m['lr']:.2e} tok/s {m['tokens_per_s']:.0f} mem "
                                     f"{m['peak_mem_gb']:.2f} GiB dropped {m['dropped']}")
                        if cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0 \
                                and self.global_step < self.total_steps:
                            self.save()
                        if self._stop_agreed(stop):
                            self._stop_on_interrupt()
                        if stop_at_step is not None and self.global_step >= stop_at_step:
                            break
                    del it
                    if stop_at_step is not None and self.global_step >= stop_at_step:
                        if self.step_in_epoch >= n_steps:
                            self.epoch, self.step_in_epoch = self.epoch + 1, 0
                        break
                    if self.step_in_epoch >= n_steps:
                        self.epoch += 1
                        self.step_in_epoch = 0
        finally:
            if unfreeze:
                gc.unfreeze()
            if bar is not None:
                bar.close()
            if jsonl is not None:
                jsonl.close()
            if sinks is not None:
                sinks.close()
        elapsed = time.perf_counter() - t_start
        if stop_at_step is not None and self.global_step < self.total_steps:
            path = self.save()
            return {"steps": self.global_step, "loss": self.history[-1]["loss"] if self.history else None,
                    "elapsed_s": elapsed, "final": None, "checkpoint": path, "dropped": dict(self.drops),
                    "skipped_nonfinite": self.skipped_nonfinite}
        if self.drops:
            self.log("dropped samples: " + ", ".join(f"{k}={v}" for k, v in sorted(self.drops.items())))
        if self.skipped_nonfinite:
            self.log(f"{self.skipped_nonfinite} steps skipped for a NaN/inf loss or gradient norm")
        if cfg.checkpoint.every_steps:
            self.save()
        final = None
        if cfg.checkpoint.export:
            final = self.export(os.path.join(self.out, "final"))
        return {"steps": self.global_step, "loss": self.history[-1]["loss"] if self.history else None,
                "elapsed_s": elapsed, "final": final, "dropped": dict(self.drops),
                "skipped_nonfinite": self.skipped_nonfinite}

    # ------------------------------------------------------------------------------------------------------------
    def export(self, path: str) -> str:
        """A llava-hf folder (config.json, safetensors, tokenizer) that transformers and llava_fast load."""
        model = self.model
        if self.cfg.train.lora:
            from llava_fast.train.lora import merge_lora

            model = merge_lora(model)   # in place: the adapters are gone from self.model after this
            self._lora_merged = True
        sd = full_model_state(model, self.fsdp)
        if self.dist.is_main:
            write_llava_hf(model, sd, path, self.tokenizer,
                           getattr(self.dataset, "image_config", None) or self.image_spec(),
                           run_chat_template(self.cfg, self.tokenizer))
            self.log(f"exported llava-hf model to {path}")
        if self.dist.enabled:
            torch.distributed.barrier()
        return path


def run_image_spec(cfg: TrainConfig, model_config):
    """The image preprocessing a run of ``cfg`` trains with: the checkpoint folder's (its preprocessor_config.json) or
    the assembled model's, with ``data.pad_to_square`` applied (LLaVA-1.5 only)."""
    from llava_fast.data.images import checkpoint_image_config

    pad, mt = cfg.data.pad_to_square, model_config.model_type
    if pad is not None and mt != "llava":
        raise ValueError(f"data.pad_to_square={pad} is for LLaVA-1.5 (model type llava) models; a {mt} model's "
                         f"AnyRes tiles have their own padding: leave data.pad_to_square unset (none)")
    return checkpoint_image_config(cfg.model.path, model_config, **({} if pad is None else {"do_pad": pad}))


def run_chat_template(cfg: TrainConfig, tokenizer) -> str | None:
    """The chat template a run's export gets: one that writes ``data.template``'s format (the one the model learned;
    :func:`~llava_fast.data.templates.chat_template_for`), or for a stage-1 run (``plain``: no conversation format
    learned) the one of the checkpoint it started from that places images; None: the tokenizer's."""
    from llava_fast.chat import find_chat_template
    from llava_fast.data.templates import chat_template_for

    return chat_template_for(cfg.data.template) or (find_chat_template(tokenizer, cfg.model.path)
                                                    if cfg.model.path else None)


def write_llava_hf(model, state: dict, path: str, tokenizer, spec, chat_template=None) -> None:
    """Writes ``state`` (a full state dict of ``model``'s type and config, LoRA merged) as a llava-hf folder: fp32
    config.json + safetensors, the tokenizer, and the processor: the image processor of ``spec``, ``chat_template``."""
    from llava_fast.models.io import save_pretrained

    with torch.device("meta"):
        fresh = type(model)(model.config)
    fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=False, assign=True)
    fresh.tie_weights()
    save_pretrained(fresh, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    _save_image_processor(model.config, path, tokenizer, spec, chat_template)


class _MetricSinks:
    """Where the main rank sends each step's scalars besides ``train_log.jsonl``: TensorBoard (``OUT/tb``, when it is
    installed and ``log.tensorboard``) and Weights & Biases (``log.wandb=PROJECT``; the run id is kept in
    ``OUT/wandb_run_id`` so that a resumed run continues the same W&B run)."""

    KEYS = ("loss", "grad_norm", "lr", "tokens_per_s", "peak_mem_gb", "dropped", "mfu")

    def __init__(self, cfg, out: str, step: int, log=print):
        self.tb = self.wandb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # steps logged after the checkpoint resumed from, by a run that crashed: hidden, as in the jsonl
                self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=step + 1)
            except Exception as e:  # noqa: BLE001 - tensorboard not installed (the default asks for it)
                self.tb = None
                log(f"log.tensorboard: no TensorBoard logs in {os.path.join(out, 'tb')} ({type(e).__name__}: {e}); "
                    f"the same scalars are in train_log.jsonl. pip install tensorboard for them, or "
                    f"log.tensorboard=false for no such line")
        if cfg.log.wandb:
            import wandb  # LogSection checked that it is installed

            id_path = os.path.join(out, "wandb_run_id")
            run_id = None
            if os.path.isfile(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip() or None
            self.wandb = wandb.init(project=cfg.log.wandb, name=os.path.basename(os.path.abspath(out)), dir=out,
                                    config=cfg.to_dict(), id=run_id, resume="allow")
            if run_id is None:
                with open(id_path, "w") as f:
                    f.write(self.wandb.id)

    def log(self, m: dict) -> None:
        scalars = {f"train/{k}": m[k] for k in self.KEYS if m.get(k) is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, m["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=m["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _set_fused(opt: torch.optim.Optimizer, fused: bool) -> None:
    """``optim.fused`` may change on resume (docs/training.md: it does not change the arithmetic's meaning), but
    ``Optimizer.load_state_dict`` restores each group's ``fused`` flag from the checkpoint: a run resumed with
    ``fused=false`` kept running fused. Set the flag from the config and move AdamW's ``step`` counters where that
    implementation wants them (fused: a float32 tensor on the parameter's device; otherwise on the CPU)."""
    for g in opt.param_groups:
        if bool(g.get("fused")) == fused:
            continue
        g["fused"] = True if fused else None
        if fused:
            g["foreach"] = None  # fused and foreach exclude each other
        for p in g["params"]:
            state = opt.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)


def _trim_log(path: str, step: int) -> None:
    """Keep the records of ``train_log.jsonl`` up to ``step`` (the step training continues from). A run that crashed
    after its last checkpoint logged steps the resumed run trains again: appended as they were, the log would hold
    those steps twice (and a line cut by the crash would run into the next record). Rewritten atomically. At step 0 (a
    fresh run in an old output folder) the old log is renamed ``train_log.<time>.jsonl`` instead."""
    if not os.path.exists(path):
        return
    keep, changed = [], False
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                ok = line.endswith("\n") and int(rec["step"]) <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                changed = True
    if not changed:
        return
    if step == 0:
        # a fresh run in a folder that holds another run's log: keep that log (renamed), do not empty it
        os.replace(path, f"{path[:-len('.jsonl')]}.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _PadCollate:
    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, samples):
        from llava_fast.data import collate_padded

        return collate_padded(samples, self.pad_id)


class _NameDropped:
    """Adds ``batch["dropped_index"]``: (reason, dataset index) of each sample the workers could not load, so that
    :meth:`Trainer.train_step` counts a sample once however often it is loaded (the collators count loads)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        out = self.collate(samples)
        out["dropped_index"] = [(s["dropped"], s.get("index", s.get("sample_id"))) for s in samples if "dropped" in s]
        return out


class _FsdpCollate:
    """See :meth:`Trainer._fsdp_collate`. The filler is left out of the batch's sample and token counts."""

    def __init__(self, collate, filler: dict, need_media: bool):
        self.collate, self.filler, self.need_media = collate, filler, need_media

    def __call__(self, samples):
        good = [s for s in samples if "dropped" not in s]
        if good and (not self.need_media or any("pixel_values" in s or "pixel_values_videos" in s for s in good)):
            return self.collate(samples)
        out = self.collate(list(samples) + [self.filler])
        out["sample_ids"] = out["sample_ids"][:-1]
        out["num_samples"] -= 1
        out["num_tokens"] -= len(self.filler["input_ids"])
        return out


def _image_processor_class(name: str):
    """transformers' image processor class ``name``. Its default backend needs torchvision, which llava_fast does not
    require; without it, transformers 5 falls back to ``<name>Pil`` and warns on every first use (the demo printed
    it). Take ``<name>Pil`` directly then: it writes the same preprocessor_config.json (``image_processor_type`` is
    ``name`` for both), and loading the folder picks the backend of wherever it is loaded."""
    import importlib.util

    import transformers as tf

    if importlib.util.find_spec("torchvision") is None:
        pil = getattr(tf, name + "Pil", None)
        if pil is not None:
            return pil
    return getattr(tf, name)


def _save_image_processor(config, path: str, tokenizer=None, spec=None, chat_template=None) -> None:
    """preprocessor_config.json for transformers' image processor and, with the tokenizer, processor_config.json for
    its processor (patch size, feature strategy, extra CLS token: without them ``AutoProcessor`` loads but cannot
    expand an image's placeholder). ``spec``: the :class:`ImageProcessorConfig` trained with (default: the model
    config's); LLaVA-1.5 padded to a square is written as transformers' ``LlavaImageProcessor(do_pad=True)``, which
    pads as the original fine-tune did. ``chat_template``: the processor's (default: the tokenizer's). Best effort: the
    model loads without either."""
    try:
        from llava_fast.data.images import image_config

        spec = spec or image_config(config)
        t = spec.tile
        common = dict(image_mean=list(spec.image_mean), image_std=list(spec.image_std))
        cls = _image_processor_class
        if config.model_type == "llava":
            sizes = dict(size={"shortest_edge": spec.shortest_edge}, crop_size={"height": t, "width": t})
            proc = (cls("LlavaImageProcessor")(do_pad=True, **sizes, **common) if spec.do_pad else
                    cls("CLIPImageProcessor")(**sizes, **common))
        elif config.model_type == "llava_next":
            proc = cls("LlavaNextImageProcessor")(size={"shortest_edge": t}, crop_size={"height": t, "width": t},
                                                  image_grid_pinpoints=spec.image_grid_pinpoints, **common)
        else:
            proc = cls("LlavaOnevisionImageProcessor")(size={"height": t, "width": t},
                                                       image_grid_pinpoints=spec.image_grid_pinpoints, **common)
        proc.save_pretrained(path)
    except Exception:  # noqa: BLE001 - optional
        return
    if tokenizer is None:
        return
    try:
        import transformers as tf

        vc = config.vision_config
        strategy = config.vision_feature_select_strategy
        chat = chat_template or getattr(tokenizer, "chat_template", None)
        if config.model_type == "llava_onevision":
            t = spec.tile
            video = tf.LlavaOnevisionVideoProcessor(size={"height": t, "width": t}, image_mean=list(spec.image_mean),
                                                    image_std=list(spec.image_std))
            full = tf.LlavaOnevisionProcessor(image_processor=proc, tokenizer=tokenizer, video_processor=video,
                                              num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
                                              vision_feature_select_strategy=strategy, chat_template=chat)
        else:
            cls = tf.LlavaProcessor if config.model_type == "llava" else tf.LlavaNextProcessor
            # the CLIP tower's class token, which the "default" strategy drops again (transformers' convention)
            extra = 1 if vc.model_type == "clip_vision_model" else 0
            full = cls(image_processor=proc, tokenizer=tokenizer, patch_size=vc.patch_size,
                       vision_feature_select_strategy=strategy, num_additional_image_tokens=extra, chat_template=chat)
        full.save_pretrained(path)
    except Exception:  # noqa: BLE001 - optional (a transformers without these processors)
        pass
