"""Video files (llava_fast.data.video): frames sampled as LLaVA-NeXT samples them, decoded by seeking, equal to an
in-order decode of the whole file; the dataset counts their tokens from the header and drops bad files by name."""
import os
import sys

import numpy as np
import pytest
import torch

from llava_fast.data import DataError, LlavaDataset, SampleError, collate_packed, image_config, video
from llava_fast.data.word_tokenizer import build_word_tokenizer
from llava_fast.ops import anyres
from utils import write_video

av = pytest.importorskip("av")  # in the test extras: CI has it

FRAMES, W, H = 40, 64, 48
# container, codec, encoder options: B-frames (decode order != presentation order) and a keyframe every 8 frames;
# webm and mkv have no frame count in the header (the packets are counted); avi's timestamps do not allow seeking
KINDS = {"mp4": ("libx264", {"bf": "2", "g": "8", "crf": "10"}), "webm": ("libvpx-vp9", {"g": "8"}),
         "mkv": ("libx264", {"bf": "2", "g": "8"}), "avi": ("mpeg4", {"bf": "2", "g": "8"})}


def decode_all(path):
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {k: write_video(d / f"clip.{k}", n=FRAMES, codec=c, opts=o, w=W, h=H) for k, (c, o) in KINDS.items()}


def test_sample_frames_as_llava_next():
    assert video.sample_frames(10, 32) == list(range(10))
    assert video.sample_frames(100, 32) == np.linspace(0, 99, 32, dtype=int).tolist()
    assert video.sample_frames(1, 1) == [0]
    # video_fps: one frame per second first (NXT process_video_with_decord), the linspace only when too many are left
    assert video.sample_frames(100, 32, fps=30.0, video_fps=1) == [0, 30, 60, 90]
    assert video.sample_frames(100, 3, fps=30.0, video_fps=1) == [0, 49, 99]
    assert video.sample_frames(100, 32, fps=29.97, video_fps=2) == list(range(0, 100, 15))
    with pytest.raises(ValueError, match="frame rate"):
        video.sample_frames(100, 32, fps=None, video_fps=1)
    with pytest.raises(ValueError, match="num_frames"):
        video.sample_frames(0, 32)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("upbound", [1, 7, FRAMES, 64])
def test_read_video_gives_the_frames_of_an_in_order_decode(videos, kind, upbound, monkeypatch):
    """Frame i is the i-th frame in presentation order (decord's indexing), bit for bit, whether it was reached by
    seeking to the keyframe before it or by decoding the file in order; containers whose timestamps allow it take the
    seeking path (an in-order decode there fails the test)."""
    path = videos[kind]
    ref = decode_all(path)
    assert len(ref) == FRAMES and video.probe_video(path).frames == FRAMES
    if kind != "avi":
        monkeypatch.setattr(video, "_decode_in_order", lambda *a: pytest.fail(f"{kind}: fell back to in-order"))
    got = video.read_video(path, frames_upbound=upbound)
    idx = video.sample_frames(FRAMES, upbound)
    assert got.dtype == np.uint8 and got.shape == (len(idx), H, W, 3)
    for g, i in zip(got, idx):
        np.testing.assert_array_equal(g, ref[i], err_msg=f"{kind}: frame {i}")


def test_seeking_decodes_only_the_gops_it_needs(tmp_path, monkeypatch):
    """A 2-frame sample of a 120-frame video with a keyframe every 10 frames decodes from the keyframe before each
    wanted frame, not the whole file (the point of seeking: a 32-frame sample of a long video)."""
    path = write_video(tmp_path / "long.mp4", n=120, opts={"g": "10", "keyint_min": "10", "sc_threshold": "0"})
    decoded = []
    real_open = video._open

    class Counting:   # a proxy for the container (PyAV 17's InputContainer is an immutable type: no patching it)
        def __init__(self, container):
            self._container = container

        def __getattr__(self, name):
            return getattr(self._container, name)

        def decode(self, *a, **k):
            for f in self._container.decode(*a, **k):
                decoded.append(f.pts)
                yield f

    def counting_open(path, reason):
        container, stream = real_open(path, reason)
        return Counting(container), stream

    monkeypatch.setattr(video, "_open", counting_open)
    got = video.read_video(path, frames_upbound=2)  # frames 0 and 119
    monkeypatch.undo()
    ref = decode_all(path)
    np.testing.assert_array_equal(got, np.stack([ref[0], ref[119]]))
    assert len(decoded) <= 1 + 10 + 4, len(decoded)  # frame 0, then the last GOP (plus the decoder's look-ahead)


def _read_in_forked_child(path, frames_upbound):
    """read_video in a forked process (as a DataLoader worker runs it); its frames, or None when it did not finish in
    60 s (it is killed then)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(video.read_video(path, frames_upbound=frames_upbound)))
    p.start()
    try:
        return q.get(timeout=60)
    except Exception:  # noqa: BLE001 - queue.Empty: the child hung
        return None
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: Linux and macOS")
def test_forked_worker_converts_frames_after_the_parent_did(videos):
    """PyAV 19 converts frames with threads by default, through one reformatter shared by every frame: a DataLoader
    worker forked after the parent had converted a frame inherited it without its threads and hung forever
    (OneVision training on video with num_workers > 0 on Python 3.12). read_video converts with a single-threaded
    reformatter of its process's own. The parent here converts with threads first, as PyAV 19 does by default."""
    path = videos["mp4"]
    with av.open(path) as c:
        f = next(iter(c.decode(c.streams.video[0])))
        try:
            f.to_ndarray(format="rgb24", threads=0)    # the shared reformatter, with a thread pool
        except TypeError:   # a PyAV without the thread option
            f.to_ndarray(format="rgb24")
    want = video.read_video(path, frames_upbound=4)
    got = _read_in_forked_child(path, 4)
    assert got is not None, "read_video hung in a forked child"
    np.testing.assert_array_equal(got, want)
    # the reformatter is this process's own, single-threaded where PyAV takes a thread count
    assert video._REFORMATTER is not None and video._REFORMATTER[0] == os.getpid()
    assert video._THREADS in ({"threads": 1}, {})


def test_bad_video_files_name_the_file(tmp_path, videos):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 100)
    for path, match in [(str(junk), "cannot read video .*junk.mp4"), (str(tmp_path / "nope.mp4"), "not found")]:
        with pytest.raises(SampleError, match=match) as e:
            video.probe_video(path)
        assert e.value.reason == "bad_video"
    with pytest.raises(SampleError, match=r"clip.mp4: frames of 64x48 = 3072 pixels > max_pixels=3000"):
        video.probe_video(videos["mp4"], max_pixels=3000)
    # the reading side says decode_error (a worker-time failure) and names the file
    with pytest.raises(SampleError, match="junk.mp4") as e:
        video.read_video(str(junk))
    assert e.value.reason == "decode_error"
    with pytest.raises(SampleError, match=r"gives 32 frames .* but 40 were planned"):
        video.read_video(videos["mp4"], frames_upbound=32, expect_frames=40)


OV = anyres.ImageProcessorConfig.for_variant("llava_onevision", tile=28, patch_size=14,
                                             image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
                                             vision_aspect_ratio="anyres_max_2")
IMG_ID, VID_ID = 4, 5  # "<image>", "<video>" in the word tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer("what happens in it a cat runs".split())


def conv(q="<video>\nwhat happens in it ?", a="a cat runs"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.mark.parametrize("upbound,video_fps", [(8, None), (64, None), (32, 5.0)])
def test_dataset_reads_video_files(videos, tok, upbound, video_fps):
    """A sample's 'video' may be a file: its token count comes from the header when the dataset is built, and the
    sample carries the sampled frames, preprocessed as OneVision preprocesses frames."""
    root = os.path.dirname(videos["mp4"])
    ds = LlavaDataset([{"id": "v", "video": "clip.mp4", "conversations": conv()}], root, tok, OV, "vicuna_v1",
                      IMG_ID, video_token_id=VID_ID, frames_upbound=upbound, video_fps=video_fps)
    idx = video.sample_frames(FRAMES, upbound, 25.0, video_fps)
    assert len(ds.items[0].video) == len(idx) == {(8, None): 8, (64, None): 40, (32, 5.0): 8}[(upbound, video_fps)]
    s = ds[0]
    ref = decode_all(videos["mp4"])
    torch.testing.assert_close(s["pixel_values_videos"], anyres.preprocess_video([ref[i] for i in idx], OV),
                               rtol=0, atol=0)
    assert int((s["input_ids"] == VID_ID).sum()) == anyres.num_video_tokens(len(idx), OV.tokens_per_side)
    assert len(s["input_ids"]) == ds.lengths[0]


def test_dataset_drops_bad_video_files(tmp_path, videos, tok):
    """Unreadable, missing and oversized video files are counted bad_video drops naming the file; a file that changes
    after the dataset was built (another frame count: the planned token count no longer holds) is a decode_error drop
    in the worker, or raises with strict."""
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 500)
    write_video(tmp_path / "ok.mp4", n=12)
    recs = [{"id": "junk", "video": "junk.mp4", "conversations": conv()},
            {"id": "gone", "video": "gone.mp4", "conversations": conv()},
            {"id": "ok", "video": "ok.mp4", "conversations": conv()}]
    logs = []
    ds = LlavaDataset(recs, str(tmp_path), tok, OV, "vicuna_v1", IMG_ID, video_token_id=VID_ID, log=logs.append)
    assert [it.sample_id for it in ds.items] == ["ok"] and ds.drops.counts == {"bad_video": 2}
    assert any("'junk'" in m and "junk.mp4" in m for m in logs) and any("gone.mp4" in m for m in logs), logs
    with pytest.raises(DataError, match="no usable samples.*bad_video"):
        LlavaDataset(recs[2:], str(tmp_path), tok, OV, "vicuna_v1", IMG_ID, video_token_id=VID_ID, max_pixels=1000,
                     log=logs.append)
    assert any("ok.mp4: frames of 64x48 = 3072 pixels > max_pixels=1000" in m for m in logs), logs
    write_video(tmp_path / "ok.mp4", n=5)  # the file changes: 5 frames where 12 were planned
    s = ds[0]
    assert s["dropped"] == "decode_error" and "12 were planned" in s["message"]
    strict = LlavaDataset(recs[2:], str(tmp_path), tok, OV, "vicuna_v1", IMG_ID, video_token_id=VID_ID, strict=True)
    write_video(tmp_path / "ok.mp4", n=7)
    with pytest.raises(DataError, match="ok.mp4.*5 were planned"):
        strict[0]


def test_without_pyav_a_video_file_says_how_to_install_it(videos, tok, monkeypatch):
    """Without PyAV a dataset with a video file fails when it is built (every such sample would be dropped), naming
    the package; frame folders and images need no PyAV."""
    monkeypatch.setitem(sys.modules, "av", None)
    root = os.path.dirname(videos["mp4"])
    with pytest.raises(ImportError, match=r"pip install av"):
        LlavaDataset([{"id": "v", "video": "clip.mp4", "conversations": conv()}], root, tok, OV, "vicuna_v1",
                     IMG_ID, video_token_id=VID_ID)


def test_video_fps_is_a_checked_train_setting():
    from llava_fast.train.config import DataSection, TrainConfig, apply_overrides

    assert DataSection().video_fps is None and DataSection(video_fps=1).video_fps == 1
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="data.video_fps"):
            DataSection(video_fps=bad)
    assert apply_overrides(TrainConfig(), ["data.video_fps=2"]).data.video_fps == 2.0
    assert apply_overrides(TrainConfig(), ["data.video_fps=none"]).data.video_fps is None


def test_video_file_sample_trains_the_onevision_model(videos, tok, tmp_path):
    """End to end: a video-file sample through the dataset, the packed collator and the OneVision model (the model
    checks that its video tokens match the frames' features), with a finite loss and gradients."""
    import llava_fast
    from models.tiny import VIDEO_TOKEN, save_tiny

    _, path = save_tiny(tmp_path, "llava_onevision")
    model = llava_fast.from_pretrained(path, dtype=torch.float32)
    assert model.config.video_token_id == VIDEO_TOKEN
    root = os.path.dirname(videos["mp4"])
    ds = LlavaDataset.for_model(model.config, [{"id": "v", "video": "clip.mp4", "conversations": conv()},
                                               {"id": "w", "video": "clip.webm", "conversations": conv()}],
                                root, tok, "vicuna_v1", frames_upbound=4)
    b = collate_packed([ds[0], ds[1]])
    assert b["pixel_values_videos"].shape == (2, 4, 3, 28, 28)
    assert image_config(model.config).tile == 28
    out = model(input_ids=b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"], pixel_values_videos=b["pixel_values_videos"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # the frames reach the loss: the projector and the tower's patch embedding get gradients
    grads = {n: p.grad for n, p in model.named_parameters() if "multi_modal_projector" in n or "patch_embedding" in n}
    assert len(grads) == 6, sorted(grads)  # two linears and the patch embedding, weights and biases
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


def test_index_cache_keeps_video_files(videos, tok, tmp_path):
    """A video-file item (path and planned frame count) comes back from the dataset index cache as it was."""
    import json

    root = os.path.dirname(videos["mp4"])
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "v", "video": "clip.mp4", "conversations": conv()},
                                {"id": "w", "video": "clip.webm", "conversations": conv()}]))
    kw = dict(video_token_id=VID_ID, frames_upbound=6, cache_dir=str(tmp_path / "c"), log=lambda m: None)
    a = LlavaDataset(str(data), root, tok, OV, "vicuna_v1", IMG_ID, **kw)
    b = LlavaDataset(str(data), root, tok, OV, "vicuna_v1", IMG_ID, **kw)
    assert not a.from_cache and b.from_cache
    assert [it.video for it in b.items] == [it.video for it in a.items] == [
        video_file(os.path.join(root, "clip.mp4"), 6), video_file(os.path.join(root, "clip.webm"), 6)]
    torch.testing.assert_close(b[1]["pixel_values_videos"], a[1]["pixel_values_videos"], rtol=0, atol=0)


def video_file(path, frames):
    from llava_fast.data.dataset import VideoFile

    return VideoFile(path, frames)


def test_read_video_each_frame_as_it_is_decoded(videos):
    """``each`` sees every sampled frame once, in order, as it is decoded (the dataset resizes 4K frames one at a
    time instead of holding 32 of them)."""
    seen = []
    got = video.read_video(videos["mp4"], frames_upbound=5, each=lambda a: seen.append(a.copy()) or a.mean())
    ref = video.read_video(videos["mp4"], frames_upbound=5)
    assert len(seen) == 5 and all(np.array_equal(a, b) for a, b in zip(seen, ref))
    assert got == [float(a.mean()) for a in ref]
