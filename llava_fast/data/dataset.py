"""The LLaVA JSON/JSONL dataset: validated up front, token counts known before any pixel is decoded.

Record format (reference-spec.md 5.1)::

    {"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "clip.mp4" | "frames_dir" | ["f0.jpg", ...],
     "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}

At construction every record is tokenized with its template, every image header is read for its size, and the
number of LLM tokens (text + image tokens) is computed. Records that cannot be used are dropped with a reason that
is counted in :attr:`LlavaDataset.drops` and logged (or raise :class:`DataError` with ``strict=True``):

``bad_format``, ``empty_conversation``, ``bad_roles``, ``placeholder_mismatch`` (``<image>`` tags != images),
``missing_image``, ``unreadable_image``, ``image_too_large`` (over ``max_pixels``, or a thin strip whose
preprocessing buffers would be far larger than the image: ``ops.anyres.check_work``), ``no_supervised_tokens``,
``truncation_cuts_image`` (the sample is longer than ``max_len`` and cutting it would cut image tokens),
``truncated_no_labels``, ``bad_video``. Images that decode badly later, inside a DataLoader worker, are dropped as
``decode_error`` by the collator or raise with ``strict``; so is an image whose decoded size is not the size its
header had when the dataset was built (the file changed: its token count, and the pack plan, would no longer hold).
Such a sample is reloaded, and fails again, every epoch: the dropped dict names its dataset ``index`` so that the
trainer counts it once.

Samples longer than ``max_len`` that can be cut without cutting image tokens or every label are kept, cut at the
end; they are counted in :attr:`LlavaDataset.truncated` and logged (not a drop: the sample still trains).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from llava_fast.data.images import (DEFAULT_MAX_PIXELS, ImageProcessorConfig, cls_token_kept, image_config,
                                    image_tiles, image_tokens, load_image, load_image_u8,
                                    probe_size)
from llava_fast.data.templates import (IGNORE_INDEX, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, SampleError,
                                       check_template, encode_conversation, expand_placeholders)
from llava_fast.data.video import probe_video, read_video, sample_frames
from llava_fast.ops import anyres

_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _get_attr(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


class DataError(ValueError):
    """A bad sample in a ``strict`` run; the message names the sample and the reason."""


class DropStats:
    """Counts dropped samples by reason; keeps the first few messages per reason for the log."""

    def __init__(self, strict: bool = False, log=None, keep: int = 3):
        self.strict = strict
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.keep = keep
        self.log = log
        self.lines: list[str] = []  # what indexing logged about samples, in order (a cached index logs it again)

    def note(self, message: str) -> None:
        """Logs a line about a sample (a drop, a truncation) and keeps it in ``lines``."""
        self.lines.append(message)
        if self.log is not None:
            self.log(message)

    def drop(self, reason: str, sample_id, message: str) -> None:
        if self.strict:
            raise DataError(f"sample {sample_id!r}: {reason}: {message} (drop it from the data, or run without "
                            f"--strict to skip such samples)")
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.keep:
            ex.append(f"{sample_id}: {message}")
            self.note(f"dropped sample {sample_id!r} ({reason}): {message}")

    def update(self, counts) -> None:
        self.counts.update(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no samples dropped"
        return "dropped " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


def _is_mixture(path) -> bool:
    return str(path).lower().endswith((".yaml", ".yml"))


def _mixture(path: str) -> list[tuple[str, str]]:
    """(file, sampling strategy) of each dataset a LLaVA-NeXT YAML mixture lists::

        datasets:
          - json_path: llava_v1_5_mix665k.json
            sampling_strategy: all          # first:N, end:N or random:N; N a count or a percentage (10%)

    A relative ``json_path`` is taken from the current folder as LLaVA-NeXT does, else from the YAML's folder."""
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{path}: reading a YAML data mixture needs PyYAML (pip install pyyaml)") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected 'datasets:' with a list of entries (json_path, sampling_strategy), as "
                         f"LLaVA-NeXT's data mixtures")
    out = []
    for i, e in enumerate(entries):
        jp = e.get("json_path") if isinstance(e, dict) else None
        if not isinstance(jp, str) or not jp:
            raise ValueError(f"{path}: dataset {i} has no json_path")
        strategy = str(e.get("sampling_strategy", "all"))
        if strategy != "all" and not re.fullmatch(r"(first|end|random):\d+(\.\d+)?%?", strategy):
            raise ValueError(f"{path}: dataset {i} ({jp}): sampling_strategy {strategy!r}: expected all, first:N, "
                             f"end:N or random:N (N a count or a percentage such as 10%)")
        if _is_mixture(jp):
            raise ValueError(f"{path}: dataset {i} ({jp}) is a mixture itself; list its JSON/JSONL files instead")
        here = os.path.join(os.path.dirname(os.path.abspath(path)), jp)
        if not os.path.isfile(jp) and not os.path.isabs(jp) and os.path.isfile(here):
            jp = here
        if not os.path.isfile(jp):
            raise FileNotFoundError(f"{path}: dataset {i}: {jp} not found (relative paths are taken from the current "
                                    f"folder, then from the YAML's)")
        out.append((jp, strategy))
    return out


def data_files(path: str) -> list[str]:
    """The files a data path reads: itself, and for a YAML mixture every file it lists (what a cached index of it
    depends on)."""
    return [path] + [jp for jp, _ in _mixture(path)] if _is_mixture(path) else [path]


def _sampled(records: list, strategy: str) -> list:
    """LLaVA-NeXT's ``sampling_strategy`` of one mixture entry; ``random:N`` draws with a fixed seed (the same
    records every run; the original's draw follows its ``--seed``)."""
    if strategy == "all":
        return records
    how, n = strategy.split(":")
    k = math.ceil(float(n[:-1]) * len(records) / 100) if n.endswith("%") else int(n)
    k = min(k, len(records))
    if how == "first":
        return records[:k]
    if how == "end":
        return records[len(records) - k:]
    import random

    picked = list(records)
    random.Random(0).shuffle(picked)
    return picked[:k]


def read_records(path: str) -> list[dict]:
    """Records of a .json (list) or .jsonl file, or of the files of a LLaVA-NeXT YAML mixture (``.yaml``: each
    file's records sampled by its ``sampling_strategy``, in the order listed)."""
    if _is_mixture(path):
        return [r for jp, strategy in _mixture(path) for r in _sampled(read_records(jp), strategy)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            out = []
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg} at column {e.colno}); fix or "
                                     f"remove that line") from None
            return out
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples (or a .jsonl file), got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class VideoFile:
    """A video file of a sample and the number of frames sampled from it (``len``: what the token count uses)."""
    path: str
    frames: int

    def __len__(self) -> int:
        return self.frames


@dataclass
class Item:
    """One validated sample: pre-expansion ids/labels and everything needed to count and load it."""
    sample_id: str
    ids: np.ndarray          # int32, with IMAGE/VIDEO placeholders
    labels: np.ndarray       # int32
    images: list             # absolute paths
    sizes: list              # (h, w) per image from the header
    image_tokens: list       # LLM tokens per image
    video: list | VideoFile  # frame paths (empty when none), or a video file
    video_tokens: int
    n_tokens: int            # expanded length after truncation
    n_supervised: int        # labels[1:] != -100 after truncation (what the loss counts)
    n_tiles: int
    n_cut: int = 0           # tokens cut from the end (max_len)


class _IndexCache:
    """The index of a data file kept on disk: a dataset of millions of records takes minutes to tokenize and probe, at
    every start and every resume, on every rank; from the cache it loads in seconds.

    The file (``index-<fingerprint>.npz``, compressed numpy arrays and JSON text only: loading runs no code) is named
    by a hash of everything the index depends on: the data file (path, size, modification time; a YAML mixture's and
each file it lists), the image folder,
    the tokenizer (its full serialization), every dataset setting, and the source of the library's data code
    (templates, token counts, probing). Any change gives another name, so a stale index is never read. Images that
    change on disk after indexing are still caught when loaded (their decoded size no longer matches: a
    ``decode_error`` drop). A cache file that cannot be read is rebuilt, with a log line. Written under a temporary
    name and renamed."""

    VERSION = 1

    def __init__(self, folder: str, ds: "LlavaDataset", data):
        import hashlib

        import llava_fast

        files = []
        for f in data_files(data):
            st = os.stat(f)
            files += [os.path.realpath(f), st.st_size, st.st_mtime_ns]
        tok = ds._tok
        tok_text = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok)
        here = os.path.dirname(os.path.abspath(__file__))
        code = [os.path.join(here, f) for f in ("dataset.py", "templates.py", "images.py", "video.py")]
        code.append(os.path.join(os.path.dirname(here), "ops", "anyres.py"))
        h = hashlib.sha256()
        for part in (self.VERSION, llava_fast.__version__, *files, os.path.realpath(ds.image_root), tok_text,
                     ds.template, ds.image_token_id, ds.video_token_id, ds.max_len, ds.strict, ds.max_pixels,
                     ds.frames_upbound, ds.video_fps, ds.cls_token, repr(ds.image_config)):
            h.update(repr(part).encode() + b"\0")
        for f in code:
            with open(f, "rb") as fh:
                h.update(fh.read())
        self.path = os.path.join(folder, f"index-{h.hexdigest()[:24]}.npz")
        self.folder = folder

    def load(self, ds: "LlavaDataset") -> bool:
        if not os.path.isfile(self.path):
            return False
        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                ids, off = z["ids"], z["offsets"]
                # labels are the ids where supervised, IGNORE_INDEX elsewhere: stored as a bit per token
                labels = (np.where(np.unpackbits(z["supervised"], count=len(ids)).astype(bool), ids, IGNORE_INDEX)
                          .astype(np.int32) if "supervised" in z.files else z["labels"])
            items = []
            for k, m in enumerate(meta["items"]):
                v = m["video"]
                video = VideoFile(v["file"], v["frames"]) if isinstance(v, dict) else v
                items.append(Item(m["id"], ids[off[k]:off[k + 1]].copy(), labels[off[k]:off[k + 1]].copy(),
                                  m["images"], [tuple(x) for x in m["sizes"]], m["image_tokens"], video,
                                  m["video_tokens"], m["n_tokens"], m["n_supervised"], m["n_tiles"], m["n_cut"]))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: index anew
            ds.drops.log(f"dataset index cache {self.path} could not be read ({type(e).__name__}: {e}); indexing "
                         "the data again")
            return False
        ds.items, ds.num_records, ds.truncated = items, meta["num_records"], meta["truncated"]
        ds.drops.counts.update(meta["drops"])
        ds.drops.examples.update(meta["drop_examples"])
        for line in meta["lines"]:  # what indexing logged, as it logged it
            ds.drops.note(line)
        ds.drops.log(f"dataset index loaded from {self.path}: {len(items)} samples of {ds.num_records} records "
                     f"({ds.drops.summary()})")
        return True

    def save(self, ds: "LlavaDataset") -> None:
        items = ds.items
        off = np.zeros(len(items) + 1, dtype=np.int64)
        off[1:] = np.cumsum([len(it.ids) for it in items])
        cat = (lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32))
        meta = {"num_records": ds.num_records, "truncated": ds.truncated,
                "lines": ds.drops.lines, "drops": dict(ds.drops.counts),
                "drop_examples": ds.drops.examples,
                "items": [{"id": it.sample_id, "images": it.images, "sizes": [list(x) for x in it.sizes],
                           "image_tokens": [int(x) for x in it.image_tokens],
                           "video": ({"file": it.video.path, "frames": it.video.frames}
                                     if isinstance(it.video, VideoFile) else list(it.video)),
                           "video_tokens": int(it.video_tokens), "n_tokens": int(it.n_tokens),
                           "n_supervised": int(it.n_supervised), "n_tiles": int(it.n_tiles), "n_cut": int(it.n_cut)}
                          for it in items]}
        ids, labels = cat([it.ids for it in items]), cat([it.labels for it in items])
        sup = labels != IGNORE_INDEX
        tokens = ({"supervised": np.packbits(sup)} if np.array_equal(labels[sup], ids[sup]) else {"labels": labels})
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}.npz"
        try:
            np.savez_compressed(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), ids=ids, offsets=off,
                                **tokens)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only or full disk: the run goes on, indexing again next time
            ds.drops.log(f"could not write the dataset index cache {self.path} ({e}); the next run indexes again")
            if os.path.exists(tmp):
                os.remove(tmp)


_FORKED = None   # (dataset, records) that the worker processes of LlavaDataset._index_all inherit


def _index_in_worker(start: int) -> list:
    ds, records = _FORKED
    return list(_index_chunk(ds, start, records[start:start + ds.CHUNK]))


def _index_chunk(ds, start: int, records: list):
    """(sample id, Item or SampleError) of ``records``, the ``start``-th record of the file first."""
    for k, rec in enumerate(records, start):
        sid = rec.get("id", k) if isinstance(rec, dict) else k
        try:
            yield sid, ds._index(rec, sid)
        except SampleError as e:
            yield sid, e


class LlavaDataset(torch.utils.data.Dataset):
    """Validated LLaVA samples. ``self[i]`` decodes the images and returns a dict of tensors (or a drop marker).

    Args:
        data: path of a .json/.jsonl file, or a list of records.
        image_root: folder the ``image``/``video`` paths are relative to.
        tokenizer: a fast tokenizer (see :func:`llava_fast.data.load_tokenizer`).
        image_config: the model's :class:`~llava_fast.ops.anyres.ImageProcessorConfig` (see
            :func:`llava_fast.data.image_config`, or :meth:`LlavaDataset.for_model`); tiles and token counts come from
            ``llava_fast.ops.anyres``, so the counts used for packing are the ones the model produces.
        template: ``plain`` | ``vicuna_v1`` | ``qwen`` | ``llama3``.
        image_token_id / video_token_id: the model's placeholder ids (``config.image_token_id``).
        max_len: samples longer than this are truncated at the end, unless that would cut image tokens or every
            label (then dropped); truncated samples are counted in ``self.truncated`` and logged.
        cls_token: the model keeps the vision tower's CLS token (LLaVA-1.5 with the ``full`` feature strategy).
        strict: raise :class:`DataError` on the first bad sample instead of dropping it.
        context_len: the model's context (``max_position_embeddings``; :meth:`for_model` passes it): ``max_len``
            above it raises (packed samples would otherwise run past the positions the model was trained for).
        frames_upbound / video_fps: how many frames of a video are used (:func:`llava_fast.data.video.sample_frames`:
            at most ``frames_upbound``, uniformly; with ``video_fps``, first one frame every ``fps / video_fps``, as
            LLaVA-NeXT). A video file is read with PyAV (``pip install av``); a folder of frames or a list of frame
            files needs nothing more (``video_fps`` does not apply: frames carry no rate).
        cache_dir: keep the index (token counts, sizes, drops) of a data file in this folder, and load it from there
            while the data file, tokenizer, settings and this library's data code are unchanged (:class:`_IndexCache`);
            ``self.from_cache`` says whether it was.
        index_workers: processes that index the records (None: one per core, up to 16, for files of 20,000 records
            or more; 1 below); the index is the same either way.
        progress: progress bars (stderr) for reading the image headers and indexing the records, for files of
            ``PROGRESS_MIN`` records or more (a 665k-record mix: minutes on a network file system).
    """

    def __init__(self, data, image_root: str, tokenizer, image_config: ImageProcessorConfig, template: str,
                 image_token_id: int, video_token_id: int | None = None, max_len: int = 4096, strict: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, frames_upbound: int = 32, probe_threads: int = 8,
                 log=None, cls_token: bool = False, context_len: int | None = None, video_fps: float | None = None,
                 cache_dir: str | None = None, index_workers: int | None = None, progress: bool = False):
        self.progress = bool(progress)
        if context_len is not None and int(max_len) > int(context_len):
            raise ValueError(f"max_len={max_len} is longer than the model's context (max_position_embeddings="
                             f"{context_len}); set max_len (data.max_len) <= {context_len}")
        if not isinstance(image_config, ImageProcessorConfig):
            raise ValueError(f"image_config must be a llava_fast.ops.anyres.ImageProcessorConfig, got "
                             f"{type(image_config).__name__}; build it with llava_fast.data.image_config(model.config)")
        check_template(tokenizer, template, "template (data.template)")
        self._tok = tokenizer
        self.image_root = image_root
        self.image_config = image_config
        # pixel limits are this dataset's (checked from the header, a too-large image is a counted drop)
        self._pp_config = dataclasses.replace(image_config, max_pixels=None)
        self._work_config = dataclasses.replace(image_config, max_pixels=max_pixels)
        self.cls_token = bool(cls_token)
        self.template = template
        self.image_token_id = int(image_token_id)
        self.video_token_id = None if video_token_id is None else int(video_token_id)
        self.max_len = int(max_len)
        self.strict = strict
        self.max_pixels = max_pixels
        self.frames_upbound = frames_upbound
        self.video_fps = video_fps
        self.drops = DropStats(strict, log if log is not None else (lambda m: print(m, file=sys.stderr)))
        self.items: list[Item] = []
        self.truncated = 0  # samples kept but cut at max_len (never in their image tokens)
        cache = _IndexCache(cache_dir, self, data) if cache_dir and isinstance(data, (str, os.PathLike)) else None
        self.from_cache = cache is not None and cache.load(self)
        if not self.from_cache:
            self._build_index(data, probe_threads, index_workers)
            if cache is not None:
                cache.save(self)
        if self.truncated:
            self.drops.log(f"{self.truncated} samples longer than max_len={self.max_len} were truncated at the end "
                           "(raise max_len to keep them whole)")
        if not self.items:
            raise DataError(f"no usable samples among {self.num_records} records ({self.drops.summary()})")
        frames = {}
        for it in self.items:
            if it.video:
                frames.setdefault(len(it.video), it.sample_id)
        if len(frames) > 1:  # the model takes (videos, frames, ...): a batch holding two of them fails to collate
            lo, hi = min(frames), max(frames)
            self.drops.log(f"videos have different numbers of frames (sample {frames[lo]!r}: {lo}, sample "
                           f"{frames[hi]!r}: {hi}); a batch holding two such videos cannot be collated: sample "
                           f"every video to the same number of frames (frames_upbound, data.frames_upbound of "
                           f"llava-fast train, <= {lo})")

    PARALLEL_MIN = 20_000   # records from which indexing runs in several processes by default
    CHUNK = 1000            # records per task
    PROGRESS_MIN = 5_000    # records from which ``progress`` shows bars

    def _bar(self, total: int, desc: str, unit: str):
        """A tqdm bar on stderr, or None (``progress`` off, or a small file)."""
        if not self.progress or self.num_records < self.PROGRESS_MIN:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def _index_all(self, records: list, workers: int | None):
        """(sample id, Item or SampleError) of every record, in order. A large file is indexed in ``workers``
        processes (default: one per core up to 16 from PARALLEL_MIN records on, on Linux; tokenizing is CPU bound,
        ~3,000 records/s per core). They are forked (spawn would run the user's main module again, which fails in a
        script without an ``if __name__ == "__main__"`` guard): they inherit this dataset and the records and send back
        the items of chunks of them. ``TOKENIZERS_PARALLELISM`` is false while they start, so the tokenizers library
        does not warn in each of them about a fork after its thread pool was used."""
        global _FORKED
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = min(16, cores) if len(records) >= self.PARALLEL_MIN else 1
        if workers <= 1 or len(records) <= self.CHUNK or not sys.platform.startswith("linux"):
            yield from _index_chunk(self, 0, records)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        env = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _FORKED = (self, records)
        ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            yield from itertools.chain.from_iterable(ex.map(_index_in_worker, range(0, len(records), self.CHUNK)))
        finally:  # (a strict run stopping at a bad sample does not wait for the chunks not begun)
            ex.shutdown(wait=True, cancel_futures=True)
            _FORKED = None
            if env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = env

    def _build_index(self, data, probe_threads: int, index_workers: int | None = None) -> None:
        """Reads the records, probes every image and video header, and indexes each record (or counts its drop)."""
        records = read_records(data) if isinstance(data, (str, os.PathLike)) else list(data)
        self.num_records = len(records)
        max_pixels = self.max_pixels
        # Probe every image and video header once, in threads (I/O bound).
        paths = {p for r in records if isinstance(r, dict) for p in self._image_paths(r, check=False)}
        videos = {p for r in records if isinstance(r, dict) for p in [self._video_file(r)] if p}
        self._sizes: dict[str, object] = {}

        def probe(p):
            try:
                return p, (probe_video(p, max_pixels) if p in videos else probe_size(p, max_pixels))
            except SampleError as e:
                return p, e

        todo = sorted(paths | videos)
        bar = self._bar(len(todo), "data: image headers", "file")
        with ThreadPoolExecutor(max(1, probe_threads)) as ex:
            for p, r in ex.map(probe, todo):
                self._sizes[p] = r
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        bar = self._bar(len(records), "data: index", "record")
        try:
            for sid, it in self._index_all(records, index_workers):
                if bar is not None:
                    bar.update(1)
                if isinstance(it, SampleError):
                    self.drops.drop(it.reason, sid, str(it))
                    continue
                self.items.append(it)
                if it.n_cut:
                    self.truncated += 1
                    if self.truncated <= self.drops.keep:
                        self.drops.note(f"truncated sample {it.sample_id!r}: {it.n_tokens + it.n_cut} tokens > "
                                        f"max_len={self.max_len}, the last {it.n_cut} cut ({it.n_supervised} "
                                        f"supervised left)")
        finally:
            if bar is not None:
                bar.close()

    @classmethod
    def for_model(cls, model_config, data, image_root: str, tokenizer, template: str, spec=None,
                  **kwargs) -> "LlavaDataset":
        """The dataset for a model: its image config (``spec``, default :func:`image_config` of the model config),
        image/video token ids and CLS-token rule from its config."""
        kwargs.setdefault("video_token_id", _get_attr(model_config, "video_token_id"))
        kwargs.setdefault("context_len", _get_attr(_get_attr(model_config, "text_config"), "max_position_embeddings"))
        return cls(data, image_root, tokenizer, spec or image_config(model_config), template,
                   image_token_id=_get_attr(model_config, "image_token_id"), cls_token=cls_token_kept(model_config),
                   **kwargs)

    # -- indexing ---------------------------------------------------------------------------------------------
    def _image_paths(self, rec, check=True) -> list[str]:
        img = rec.get("image")
        if img is None:
            return []
        if isinstance(img, str):
            img = [img]
        if not isinstance(img, list) or not all(isinstance(x, str) for x in img):
            if check:
                raise SampleError("bad_format", f"'image' must be a path or a list of paths, got {img!r:.80}")
            return []
        return [os.path.join(self.image_root, x) for x in img]

    def _video_file(self, rec) -> str | None:
        """The path of the sample's video when it is a file (not a folder of frames or a list of them)."""
        v = rec.get("video")
        p = os.path.join(self.image_root, v) if isinstance(v, str) else None
        return p if p is not None and os.path.isfile(p) else None

    def _video_frames(self, rec) -> list[str] | VideoFile:
        v = rec.get("video")
        if v is None:
            return []
        if isinstance(v, str):
            p = os.path.join(self.image_root, v)
            if os.path.isdir(p):
                frames = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(_IMG_EXT))
            elif os.path.isfile(p):
                info = self._sizes.get(p) or probe_video(p, self.max_pixels)
                if isinstance(info, SampleError):
                    raise info
                try:
                    n = len(sample_frames(info.frames, self.frames_upbound, info.fps, self.video_fps))
                except ValueError as e:
                    raise SampleError("bad_video", f"video {p}: {e}") from None
                return VideoFile(p, n)
            else:
                raise SampleError("bad_video", f"video not found: {p} (neither a video file nor a folder of frames)")
        elif isinstance(v, list) and all(isinstance(f, str) for f in v):
            frames = [os.path.join(self.image_root, f) for f in v]
        else:
            raise SampleError("bad_video", f"'video' must be a folder or a list of frame paths, got {v!r:.80}")
        if not frames:
            raise SampleError("bad_video", f"video {v!r} has no frames")
        if len(frames) > self.frames_upbound:  # uniform sampling, like NXT frames_upbound (dtype=int: truncated)
            idx = np.linspace(0, len(frames) - 1, self.frames_upbound, dtype=int)
            frames = [frames[i] for i in idx]
        return frames

    def _index(self, rec, sid) -> Item:
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise SampleError("bad_format", "a sample needs a 'conversations' list")
        paths = self._image_paths(rec)
        frames = self._video_frames(rec)
        if frames and self.video_token_id is None:
            raise SampleError("bad_video", "the model has no video token (only OneVision takes videos)")
        sizes = []
        for p in paths:
            s = self._sizes.get(p)
            if s is None:
                s = probe_size(p, self.max_pixels)
            if isinstance(s, SampleError):
                raise s
            sizes.append(s)
        enc = encode_conversation(self._tok, rec["conversations"], self.template, len(paths),
                                  1 if frames else 0)
        multi = len(paths) > 1
        if self.max_pixels is not None:
            # the strip guard of ops.anyres (encode_tiles runs without limits here: they are the dataset's): a thin
            # strip passes max_pixels but its pad-to-square canvas or resize intermediate can take tens of GB
            single = multi and self.image_config.variant == "llava_onevision"
            for p, s in zip(paths, sizes):
                try:
                    anyres.check_work(s, self._work_config, single_tile=single, index=p)
                except ValueError as e:
                    raise SampleError("image_too_large", f"{e} (here: the dataset's max_pixels)") from None
        img_tok = [image_tokens(self.image_config, s, multi, self.cls_token) for s in sizes]
        n_tiles = sum(image_tiles(self.image_config, s, multi) for s in sizes)
        vid_tok = anyres.num_video_tokens(len(frames), self.image_config.tokens_per_side) if frames else 0
        ids = np.asarray(enc.input_ids, dtype=np.int32)
        labels = np.asarray(enc.labels, dtype=np.int32)
        n = len(ids) - len(paths) - (1 if frames else 0) + sum(img_tok) + vid_tok
        ex_labels, n_full = None, n
        if n > self.max_len:
            # Where does the last media token end once expanded?
            pos, last_media_end, k = 0, 0, 0
            for t in ids:
                if t == IMAGE_PLACEHOLDER:
                    pos += img_tok[k]
                    k += 1
                    last_media_end = pos
                elif t == VIDEO_PLACEHOLDER:
                    pos += vid_tok
                    last_media_end = pos
                else:
                    pos += 1
            if last_media_end > self.max_len:
                raise SampleError("truncation_cuts_image", f"{n} tokens > max_len={self.max_len} and the image "
                                  f"tokens end at {last_media_end}: raise max_len or use fewer/smaller images")
            n = self.max_len
        _, ex_labels = expand_placeholders(ids.tolist(), labels.tolist(), img_tok, 0, [vid_tok] if frames else [], 0)
        ex_labels = ex_labels[:n]
        n_sup = sum(1 for x in ex_labels[1:] if x != IGNORE_INDEX)
        if n_sup == 0:
            raise SampleError("truncated_no_labels", f"truncation to max_len={self.max_len} leaves no supervised "
                              "token")
        return Item(str(sid), ids, labels, paths, sizes, img_tok, frames, vid_tok, n, n_sup, n_tiles, n_full - n)

    def _video_frame(self, frame_u8) -> torch.Tensor:
        """One decoded video frame -> (3, T, T), as :func:`~llava_fast.ops.anyres.preprocess_video` makes it."""
        return anyres.preprocess_video([frame_u8], self._pp_config)[0]

    # the tokenizer is only needed while indexing; keep it out of worker pickles
    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_tok", None)
        return d

    # -- sizes known before loading ---------------------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        """Expanded token count of every sample (text + image tokens, after truncation)."""
        return [it.n_tokens for it in self.items]

    @property
    def modality_lengths(self) -> list[int]:
        """Token count, positive for samples with images/video, negative for text-only (the original uses
        whitespace words, reference-spec.md 5.5; tokens are known here and are what packing needs)."""
        out = []
        for it in self.items:
            n = max(1, int(it.n_tokens))
            out.append(n if (it.images or it.video) else -n)
        return out

    @property
    def supervised(self) -> list[int]:
        return [it.n_supervised for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    # -- loading ------------------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        try:
            imgs = [load_image_u8(p, self.max_pixels) for p in it.images]  # uint8 (3, H, W)
            if isinstance(it.video, VideoFile):  # the frames the token count was planned with, each resized and
                # normalized as it is decoded (one full-size frame in memory at a time: 4K videos)
                frames = torch.stack(read_video(it.video.path, self.frames_upbound, self.video_fps, self.max_pixels,
                                                expect_frames=it.video.frames, each=self._video_frame))
            else:
                frames = [load_image(p, self.max_pixels) for p in it.video]
        except SampleError as e:
            if self.strict:
                raise DataError(f"sample {it.sample_id!r}: {e.reason}: {e}") from None
            return {"dropped": e.reason, "sample_id": it.sample_id, "index": i, "message": str(e)}
        multi = len(imgs) > 1
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in imgs]
        if sizes != [tuple(s) for s in it.sizes]:
            # the file changed since indexing: other token counts than planned (packing, truncation): drop it
            k = next(j for j, (a, b) in enumerate(zip(sizes, it.sizes)) if tuple(a) != tuple(b))
            msg = (f"image {it.images[k]} decodes to {sizes[k][0]}x{sizes[k][1]} (h x w) but its header said "
                   f"{it.sizes[k][0]}x{it.sizes[k][1]} when the dataset was built (the file changed?)")
            if self.strict:
                raise DataError(f"sample {it.sample_id!r}: decode_error: {msg}")
            return {"dropped": "decode_error", "sample_id": it.sample_id, "index": i, "message": msg}
        ids, labels = expand_placeholders(it.ids.tolist(), it.labels.tolist(), it.image_tokens, self.image_token_id,
                                          [it.video_tokens] if len(frames) else [], self.video_token_id)
        ids, labels = ids[: it.n_tokens], labels[: it.n_tokens]
        out = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
               "sample_id": it.sample_id}
        if imgs:
            # the C++ tile encoder (bit-identical to preprocess_images; its PyTorch reference when _C is missing),
            # one thread inside a DataLoader worker (the workers are the parallelism), all cores otherwise
            threads = 1 if torch.utils.data.get_worker_info() is not None else None
            pp = anyres.encode_tiles(imgs, self._pp_config, multi_image=multi, num_threads=threads)
            out["pixel_values"] = pp["pixel_values"]
            out["image_sizes"] = [tuple(hw) for hw in pp["image_sizes"].tolist()]
            out["num_tiles"] = pp["num_tiles"]
            if self.image_config.variant == "llava_onevision":  # the model needs it to pick the multi-image path
                out["batch_num_images"] = [len(imgs)]
        if isinstance(frames, torch.Tensor):
            out["pixel_values_videos"] = frames
        elif frames:
            out["pixel_values_videos"] = anyres.preprocess_video(frames, self._pp_config)
        return out
