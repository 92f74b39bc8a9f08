"""Video frame sampling (official rule) and decoding with PyAV."""
import numpy as np
import pytest

from vita_jax.data import image as I
from vita_jax.data import video as V

from conftest import write_video


@pytest.mark.parametrize("seconds,expected", [(1, 4), (3, 4), (3.9, 4), (4, 4), (7, 7), (16, 16), (17, 16), (120, 16)])
def test_paper_rule_frame_counts(seconds, expected):
    fps = 30
    idx = V.sample_frame_indices(int(seconds * fps), fps)
    assert len(idx) == expected
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] < seconds * fps


def test_official_index_choice():
    # 3 s at 30 fps: positions 0, 30, 60 (stride 30) -> 4 by linspace(0, 2, 4, dtype=int) = 0, 0, 1, 2
    assert V.sample_frame_indices(90, 30) == [0, 0, 30, 60]
    # 20 s: 20 positions -> 16 by linspace(0, 19, 16, dtype=int)
    expect = [30 * i for i in np.linspace(0, 19, 16, dtype=int)]
    assert V.sample_frame_indices(600, 30) == expect
    # the training loader's 3 fps default (a known difference from the paper/demo's 1 fps)
    assert V.sample_frame_indices(150, 30, video_fps=3) == list(range(0, 150, 10))[:15]


def _write_video(path, n_frames, fps, size=(64, 48)):
    write_video(path, n_frames, fps, size)


def test_decode_and_preprocess(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, 25, 10)  # 2.5 s -> positions 0, 10, 20 -> 4 frames 0, 0, 10, 20
    frames, idx, fps = V.read_frames(str(path))
    assert fps == 10 and idx == [0, 0, 10, 20]
    means = [np.asarray(f).mean() for f in frames]
    assert abs(means[2] - 90) < 6 and abs(means[3] - 180) < 6  # the right frames were kept
    cfg = I.ImageProcessorConfig(size=56, crop_size=56)
    px = V.preprocess_video(str(path), cfg)
    assert px.shape == (4, 3, 56, 56) and px.dtype == np.float32


def test_bad_video_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 20)
    with pytest.raises(V.VideoError, match="broken.mp4"):
        V.read_frames(str(bad))
    with pytest.raises(V.VideoError, match="nothere.mp4"):
        V.read_frames(str(tmp_path / "nothere.mp4"))
