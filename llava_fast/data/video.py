"""Video files (mp4, webm, mkv, avi, ...) for OneVision training: frame counts from the header, frames sampled as
LLaVA-NeXT samples them, and only the sampled frames decoded.

LLaVA-NeXT's training code reads videos with decord: frame ``i`` is the ``i``-th frame in presentation order, and it
takes ``np.linspace(0, n - 1, frames_upbound, dtype=int)`` of the ``n`` frames (or first one frame every
``round(fps / video_fps)`` frames, when ``video_fps`` is set, and that only when more than ``frames_upbound`` are left).
Here PyAV (``pip install av``: its wheels bundle FFmpeg) does the reading:

* :func:`probe_video` reads the container header (frame count, rate, size) without decoding, so the dataset knows
  each video's token count when it is built. Containers without a frame count in the header (webm, mkv) have their
  packets counted (read, not decoded).
* :func:`read_video` lists the packets (their presentation timestamps and which are keyframes), picks the frames,
  and decodes from the keyframe before each wanted frame up to it, seeking forward when the next wanted frame is
  past another keyframe: a 32-frame sample of a long video decodes a few GOPs, not the whole file. Every returned
  frame is checked to be the frame with the wanted timestamp; when a container's timestamps cannot be trusted
  (missing or repeated, or a seek that lands elsewhere) the whole video is decoded in order instead, which gives the
  same frames.

Frames are converted to RGB by a single-threaded ``VideoReformatter`` of this process's own. PyAV 19 scales with
threads by default, through one reformatter shared by every frame; a DataLoader worker forked after the parent had
converted a frame inherited that reformatter's thread pool without its threads and hung forever at its next frame
(``avpriv_slicethread_free``; found on Python 3.12, whose pip gets PyAV 19).

Errors are :class:`~llava_fast.data.templates.SampleError` naming the file (``bad_video`` when probing,
``decode_error`` when reading), so the dataset counts and drops the sample; a missing PyAV is an ``ImportError`` that
says how to install it.
"""
from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass

import numpy as np

from llava_fast.data.templates import SampleError

_INSTALL = ("reading video files needs PyAV: pip install av (or pip install 'llava-fast[video]'); or give the "
            "sample's 'video' as a folder of frames or a list of frame files")


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What the header says: frame count, frames per second (None when unknown), frame height and width."""
    frames: int
    fps: float | None
    height: int
    width: int


def sample_frames(num_frames: int, frames_upbound: int = 32, fps: float | None = None,
                  video_fps: float | None = None) -> list[int]:
    """The indices of the frames LLaVA-NeXT trains on, of a video of ``num_frames`` frames.

    ``video_fps=None``: every frame when there are at most ``frames_upbound``, else
    ``np.linspace(0, num_frames - 1, frames_upbound, dtype=int)`` (truncated, as NXT). ``video_fps``: first one frame
    every ``round(fps / video_fps)`` (NXT ``process_video_with_decord``), then the linspace when that leaves more
    than ``frames_upbound``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frames_upbound < 1:
        raise ValueError(f"frames_upbound must be >= 1, got {frames_upbound}")
    idx = list(range(num_frames))
    if video_fps is not None:
        if fps is None:
            raise ValueError("video_fps needs the video's frame rate, and the file does not give one; leave "
                             "video_fps unset (data.video_fps) to sample frames_upbound frames uniformly")
        idx = idx[:: max(1, round(fps / video_fps))]
    if len(idx) > frames_upbound:
        idx = np.linspace(0, num_frames - 1, frames_upbound, dtype=int).tolist()
    return idx


def _open(path: str, reason: str):
    av = _av()
    try:
        container = av.open(path)
    except FileNotFoundError:
        raise SampleError(reason, f"video not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - FFmpeg errors come in many types
        raise SampleError(reason, f"cannot read video {path}: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise SampleError(reason, f"video {path} has no video stream")
    return container, container.streams.video[0]


def _packets(container, stream) -> list:
    """(pts, is_keyframe) of every frame packet, in file order (read, not decoded)."""
    return [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and not p.is_discard]


def _size_checked(path: str, stream, max_pixels: int | None, reason: str) -> tuple[int, int]:
    h, w = int(stream.codec_context.height), int(stream.codec_context.width)
    if h <= 0 or w <= 0:
        raise SampleError(reason, f"video {path} has an empty frame size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise SampleError(reason, f"video {path}: frames of {w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    return h, w


def probe_video(path: str, max_pixels: int | None = None) -> VideoInfo:
    """Frame count, rate and size of a video file from its header (packets counted when the header has no count);
    SampleError ``bad_video`` naming the file when it is missing, unreadable, empty or over ``max_pixels``."""
    container, stream = _open(path, "bad_video")
    try:
        h, w = _size_checked(path, stream, max_pixels, "bad_video")
        rate = stream.average_rate or stream.guessed_rate
        n = int(stream.frames or 0)
        if n <= 0:
            try:
                n = len(_packets(container, stream))
            except Exception as e:  # noqa: BLE001
                raise SampleError("bad_video", f"cannot read video {path}: {type(e).__name__}: {e}") from None
        if n <= 0:
            raise SampleError("bad_video", f"video {path} has no frames")
        return VideoInfo(n, float(rate) if rate else None, h, w)
    finally:
        container.close()


def read_video(path: str, frames_upbound: int = 32, video_fps: float | None = None,
               max_pixels: int | None = None, expect_frames: int | None = None, each=None):
    """The sampled frames of a video file (:func:`sample_frames` of its frame count) as uint8 ``(F, H, W, 3)`` RGB,
    what :func:`llava_fast.ops.anyres.preprocess_video` takes.

    ``expect_frames``: the number of frames the dataset planned with (from :func:`probe_video`); a file that now gives
    another number (it changed, or its header count was wrong) is a ``decode_error``, since its token count no longer
    holds. Any decoding failure is a ``decode_error`` SampleError naming the file.

    ``each``: a function applied to every frame (uint8 ``(H, W, 3)``) as soon as it is decoded; then the list of its
    results is returned instead, and only one full-size frame is held at a time (32 frames of a 4K video are 800 MB;
    the dataset resizes each to the tile as it comes). It should have no side effects: when seeking gives up part way
    (a timestamp that does not match) the frames are decoded again in order and passed to it again.
    """
    container, stream = _open(path, "decode_error")
    try:
        _size_checked(path, stream, max_pixels, "decode_error")
        try:
            packets = _packets(container, stream)
            if not packets:
                raise SampleError("decode_error", f"video {path} has no frames")
            rate = stream.average_rate or stream.guessed_rate
            idx = sample_frames(len(packets), frames_upbound, float(rate) if rate else None, video_fps)
            if expect_frames is not None and len(idx) != expect_frames:
                raise SampleError("decode_error", f"video {path} gives {len(idx)} frames ({len(packets)} in the file) "
                                  f"but {expect_frames} were planned when the dataset was built (the file changed?)")
            frames = _decode_seeking(container, stream, packets, idx, each)
            if frames is None:  # timestamps that cannot be trusted: decode everything, in order
                container.seek(0, stream=stream)
                frames = _decode_in_order(container, stream, idx, each)
        except SampleError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SampleError("decode_error", f"cannot decode video {path}: {type(e).__name__}: {e}") from None
        if len(frames) != len(idx):
            raise SampleError("decode_error", f"video {path} ended after {len(frames)} of the {len(idx)} frames "
                              f"wanted (frame indices {idx[:4]}...; {len(packets)} packets)")
        return frames if each is not None else np.stack(frames)
    finally:
        container.close()


def _decode_seeking(container, stream, packets, idx, each=None):
    """Frames ``idx`` (presentation order) decoded from the keyframe before each; None when the timestamps do not
    allow it (missing or repeated pts, or a decoded frame that is not the one wanted)."""
    pts = [p for p, _ in packets]
    if any(p is None for p in pts):
        return None
    order = sorted(pts)
    if any(a == b for a, b in zip(order, order[1:])):
        return None
    keys = sorted(p for p, k in packets if k)
    if not keys or keys[0] != order[0]:
        return None  # frames before the first keyframe: only an in-order decode reaches them
    out, frames, last = [], None, -math.inf
    for t in (order[i] for i in idx):
        key = keys[bisect.bisect_right(keys, t) - 1]
        if frames is None or key > last:  # a keyframe lies between the decoder's position and t: jump to it
            container.seek(key, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for f in frames:
            last = f.pts if f.pts is not None else last
            if f.pts is None or f.pts >= t:
                break
        else:
            return None
        if f.pts != t:
            return None
        out.append(_frame(f, each))
    return out


_REFORMATTER = None            # (pid, VideoReformatter): this process's own, see the module docstring
_THREADS = {"threads": 1}      # {} with a PyAV whose reformat takes no thread count (single-threaded there)


def _reformatter():
    global _REFORMATTER
    if _REFORMATTER is None or _REFORMATTER[0] != os.getpid():   # a forked child makes its own
        from av.video.reformatter import VideoReformatter

        _REFORMATTER = (os.getpid(), VideoReformatter())
    return _REFORMATTER[1]


def _frame(f, each):
    global _THREADS
    r = _reformatter()
    try:
        rgb = r.reformat(f, format="rgb24", **_THREADS)
    except TypeError:
        if not _THREADS:
            raise
        _THREADS = {}
        rgb = r.reformat(f, format="rgb24")
    a = rgb.to_ndarray()
    return a if each is None else each(a)


def _decode_in_order(container, stream, idx, each=None) -> list:
    want, out = set(idx), []
    for i, f in enumerate(container.decode(stream)):
        if i in want:
            out.append(_frame(f, each))
            if len(out) == len(want):
                break
    return out
