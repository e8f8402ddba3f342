"""Training a OneVision model on video files, end to end: the dataset's header frame counts, DataLoader workers
decoding the sampled frames, the packed collator, the trainer and the export."""
from __future__ import annotations

import json
import math

import pytest
import torch

from llava_fast.train import Trainer, get_recipe
from utils import tiny_onevision, write_video

pytest.importorskip("av")


@pytest.mark.parametrize("start_method", [None, "forkserver"])
def test_onevision_trains_on_video_files(tmp_path, monkeypatch, start_method):
    """``forkserver``: Python 3.14's default start method on Linux. The DataLoader's workers are forked there too (it
    pickled the collate for each worker and stopped at the first batch: "Can't pickle local object")."""
    if start_method is not None:
        import multiprocessing
        import sys

        if not sys.platform.startswith("linux"):
            pytest.skip("the workers are forked on Linux only")
        monkeypatch.setattr(multiprocessing.context._default_context, "_actual_context",
                            multiprocessing.get_context(start_method))
    model = tiny_onevision(tmp_path / "model")
    media = tmp_path / "media"
    media.mkdir()
    answers = ["a cat runs", "a cat jumps", "a cat sits"]
    recs = []
    for k in range(6):
        name = f"clip{k}.{'mp4' if k % 2 else 'webm'}"
        write_video(media / name, n=10 + 3 * k, codec="libx264" if k % 2 else "libvpx-vp9", w=40, h=30)
        recs.append({"id": f"v{k}", "video": name, "conversations": [
            {"from": "human", "value": "<video>\nwhat happens in the clip ?"},
            {"from": "gpt", "value": answers[k % 3]}]})
    (tmp_path / "data.json").write_text(json.dumps(recs))
    cfg = get_recipe("onevision-stage2", "llava_onevision")
    cfg.model.path = str(model)
    cfg.data.data, cfg.data.images = str(tmp_path / "data.json"), str(media)
    cfg.data.template, cfg.data.frames_upbound = "vicuna_v1", 4   # every clip has >= 10 frames: 4 each
    cfg.data.max_len = cfg.data.max_tokens = 2048
    cfg.data.num_workers = 2  # the items (VideoFile) go to worker processes; they decode there
    cfg.data.group_by_modality_length = False
    cfg.train.device, cfg.train.activation_checkpointing = "cpu", False
    cfg.schedule.max_steps = 2
    cfg.checkpoint.out = str(tmp_path / "out")
    cfg.log.tensorboard = cfg.log.progress = False
    tr = Trainer(cfg, quiet=True).setup()
    assert {len(it.video) for it in tr.dataset.items} == {4} and len(tr.dataset.items) == 6
    before = tr.model.model.vision_tower.embeddings.patch_embedding.weight.detach().clone()
    r = tr.train()
    assert r["steps"] == 2 and r["dropped"] == {} and all(math.isfinite(h["loss"]) for h in tr.history)
    # only the frames reach the tower: its weights moved, so the videos were decoded and trained on
    after = tr.model.model.vision_tower.embeddings.patch_embedding.weight.detach()
    assert not torch.equal(before, after)
    assert r["final"] and (tmp_path / "out" / "final" / "config.json").is_file()
