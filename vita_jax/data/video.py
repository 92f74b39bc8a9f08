"""Video frames for VITA-1.5: decode with PyAV, sample frames as the official ``_get_rawvideo_dec``,
one CLIP-processed tile per frame (no tiling).

Sampling: every ``round(fps / video_fps)``-th frame; more than ``max_frames`` (16) -> 16 picked by
``np.linspace(..., dtype=int)``; fewer than ``min_frames`` (4) -> 4 by linspace (repeats allowed).
At the default ``video_fps = 1`` this is the paper's rule (< 4 s: 4 frames, 4-16 s: 1 fps,
> 16 s: 16 frames uniformly) and the demo's behaviour. Known discrepancy: the official *training*
loader defaults to ``video_framerate = 3`` (3 fps before the 16-frame cap); pass ``video_fps=3``
to reproduce it. Which one produced the released weights is not documented.

Decoding streams: only the sampled frames are converted and kept (at most ``max_frames``), so
memory does not grow with the clip's length (:func:`read_frames`).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from vita_jax.data.image import ImageProcessorConfig, clip_tile
from vita_jax.models.internvit import normalise_pixels

MAX_FRAMES = 16
MIN_FRAMES = 4


class VideoError(ValueError):
    """A video cannot be used; the message names the file."""


def sample_frame_indices(num_frames: int, fps: float, video_fps: float = 1.0, max_frames: int = MAX_FRAMES,
                         min_frames: int = MIN_FRAMES) -> list[int]:
    """Frame indices (of ``0..num_frames-1``) exactly as the official loader picks them."""
    if num_frames <= 0:
        return []
    stride = max(1, int(round(float(fps) / int(video_fps))))
    all_pos = list(range(0, num_frames, stride))
    if len(all_pos) > max_frames:
        return [all_pos[i] for i in np.linspace(0, len(all_pos) - 1, num=max_frames, dtype=int)]
    if len(all_pos) < min_frames:
        return [all_pos[i] for i in np.linspace(0, len(all_pos) - 1, num=min_frames, dtype=int)]
    return all_pos


def _name(src) -> str:
    return str(getattr(src, "name", "<video bytes>")) if hasattr(src, "read") else os.fspath(src)


def header_frames(container, stream, fps: float) -> Optional[int]:
    """The frame count the container's header gives: the stream's frame count, else its duration
    x fps, else the container's duration x fps; None when it gives none of them."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base) * fps))
    if container.duration:
        return int(round(container.duration / 1e6 * fps))  # container.duration is in microseconds (AV_TIME_BASE)
    return None


class _Reader:
    """Decoding passes over one video; a pass keeps (as uint8 RGB arrays) only the frames asked for."""

    def __init__(self, src):
        self.src, self.name = src, _name(src)
        self.is_file = hasattr(src, "read")
        self.start = src.tell() if self.is_file else 0
        if not self.is_file and os.path.isfile(self.name) and os.path.getsize(self.name) == 0:
            raise VideoError(f"{self.name}: empty file (0 bytes), not a video")

    def decode(self, wanted_for: Callable[[Optional[int], float], Sequence[int]], stop_after: int = -1):
        """One pass -> ``(fps, header frame count or None, frames decoded, {index: [H, W, 3]
        uint8})``; ``wanted_for(header frame count or None, fps)`` names the indices to keep;
        ``stop_after`` > 0 stops after that many frames (a probe)."""
        import av  # PyAV: slow import, only when a video is read
        if self.is_file:
            self.src.seek(self.start)
        try:
            with av.open(self.src if self.is_file else self.name) as container:
                if not container.streams.video:
                    raise VideoError(f"{self.name}: no video stream (audio only?)")
                fmt = container.format.name
                if fmt.endswith("_pipe") or fmt.startswith("image2"):  # FFmpeg reads a still image as 1 frame
                    raise VideoError(f"{self.name}: a still image ({fmt.replace('_pipe', '')}), not a video")
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 0)
                if fps <= 0:
                    raise VideoError(f"{self.name}: unknown frame rate")
                header = header_frames(container, stream, fps)
                wanted, kept, n = set(wanted_for(header, fps)), {}, 0
                for n, frame in enumerate(container.decode(stream), 1):
                    if n - 1 in wanted:  # every frame is decoded (to count them); only these are kept
                        kept[n - 1] = frame.to_ndarray(format="rgb24")
                    if n == stop_after:
                        break
        except VideoError:
            raise
        except FileNotFoundError as e:
            raise VideoError(f"{self.name}: no such video file") from e
        except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
            msg = " ".join(str(getattr(e, "strerror", None) or e).split())  # FFmpeg's reason, without the path again
            raise VideoError(f"{self.name}: cannot decode video (not a video, truncated or corrupt?): {msg}") from e
        if n == 0:
            raise VideoError(f"{self.name}: no decodable frames")
        return fps, header, n, kept


def probe_video(path) -> tuple[float, int]:
    """A cheap check that ``path`` is a video (a video stream, a frame rate, a first frame that
    decodes) -> ``(fps, header frame count or 0)``; :class:`VideoError` naming the file if not."""
    fps, header, _, _ = _Reader(path).decode(lambda *_: (), stop_after=1)
    return fps, header or 0


def read_frames(path: str, video_fps: float = 1.0, max_frames: int = MAX_FRAMES, min_frames: int = MIN_FRAMES):
    """Decodes ``path`` (a path, or a binary file object such as ``io.BytesIO`` of the file, named
    in errors by its ``name`` if set) -> ``(frames: list of RGB PIL images, indices, fps)``.

    Memory is bounded by the frames used, not the clip's length: the indices are picked from the
    header's frame count (:func:`header_frames`) and one streaming pass keeps only those frames
    while counting the decoded ones. The result is that of sampling from the number of frames that
    actually decode: when the header's count is missing or wrong and the frames kept are not the
    ones needed, a second pass keeps the right ones (memory still bounded)."""
    reader = _Reader(path)
    sample = functools.partial(sample_frame_indices, video_fps=video_fps, max_frames=max_frames, min_frames=min_frames)
    fps, _, n, kept = reader.decode(lambda header, fps: sample(header, fps) if header else ())
    idx = sample(n, fps)
    if not set(idx) <= kept.keys():  # the header's count was missing or not what decodes
        _, _, n2, kept = reader.decode(lambda *_: idx)
        if n2 != n or not set(idx) <= kept.keys():
            raise VideoError(f"{reader.name}: {n} frames decoded on the first pass, {n2} on the second")
    return [Image.fromarray(kept[i]) for i in idx], idx, fps


def preprocess_video(path: str, cfg: ImageProcessorConfig | None = None, video_fps: float = 1.0,
                     max_frames: int = MAX_FRAMES, min_frames: int = MIN_FRAMES, normalise: bool = True) -> np.ndarray:
    """``path`` (or a binary file object) -> ``[frames, 3, S, S]``, one ``<image>`` placeholder
    per frame: float32 pixel values, or with ``normalise=False`` uint8 RGB tiles (as
    :func:`~vita_jax.data.image.preprocess_image`)."""
    cfg = cfg or ImageProcessorConfig()
    frames, _, _ = read_frames(path, video_fps, max_frames, min_frames)
    pixels = np.stack([clip_tile(f, cfg) for f in frames])
    return normalise_pixels(pixels, cfg.mean, cfg.std) if normalise else pixels
