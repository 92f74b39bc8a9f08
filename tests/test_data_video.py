"""Video frame sampling (official rule) and decoding with PyAV: only the frames used are kept, whatever the
header says; bad files are one line naming the file."""
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from vita_jax.data import image as I
from vita_jax.data import video as V

from conftest import one_line, write_video


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


# ------------------------------------------------------------------ media that cannot work: one line naming the file


def _reference(path, **kw):
    """Today's (pre-streaming) result: every frame decoded and kept, then sampled."""
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    idx = V.sample_frame_indices(len(frames), fps, **kw)
    return [frames[i] for i in idx], idx


@pytest.fixture
def passes(monkeypatch):
    """Records ``(frames decoded, frames kept)`` of every decoding pass."""
    seen, decode = [], V._Reader.decode

    def spy(self, *a, **k):
        out = decode(self, *a, **k)
        seen.append((out[2], len(out[3])))
        return out
    monkeypatch.setattr(V._Reader, "decode", spy)
    return seen


def test_long_video_keeps_only_the_frames_used(tmp_path, passes):
    """Memory is bounded by the frames used: a 40 s clip (1200 frames) keeps 16, not 1200."""
    path = str(tmp_path / "long.mp4")
    write_video(path, 1200, 30, size=(32, 24), step=1)
    frames, idx, fps = V.read_frames(path)
    assert passes == [(1200, 16)]  # one pass: every frame decoded (counted), 16 converted and kept
    want, want_idx = _reference(path)
    assert idx == want_idx and len(frames) == 16
    assert all(np.array_equal(np.asarray(f), w) for f, w in zip(frames, want))
    passes.clear()
    frames, idx, _ = V.read_frames(path, video_fps=3)  # the training loader's 3 fps: still 16 frames
    assert passes == [(1200, 16)] and idx == _reference(path, video_fps=3)[1]


@pytest.mark.parametrize("header", [None, 7, 5000])
def test_missing_or_wrong_header_count(tmp_path, monkeypatch, passes, header):
    """No frame count in the header (counting pass, then a selecting pass) or a wrong one: the frames
    of the decoded count, memory still bounded."""
    path = str(tmp_path / "clip.mp4")
    write_video(path, 90, 10, size=(32, 24), step=2)
    monkeypatch.setattr(V, "header_frames", lambda *a: header)
    frames, idx, _ = V.read_frames(path)
    want, want_idx = _reference(path)
    assert idx == want_idx and all(np.array_equal(np.asarray(f), w) for f, w in zip(frames, want))
    assert len(passes) == 2 and passes[1] == (90, len(set(idx))) and max(k for _, k in passes) <= 16


def test_mkv_without_frame_count(tmp_path, passes):
    path = str(tmp_path / "clip.mkv")
    write_video(path, 25, 10)
    frames, idx, _ = V.read_frames(path)  # the header has a duration, no frame count: 2.5 s x 10 fps
    assert idx == _reference(path)[1] == [0, 0, 10, 20] and passes == [(25, 3)]


def test_bad_video_files_are_one_line(tmp_path):
    good = tmp_path / "good.mp4"
    write_video(good, 25, 10)
    sf.write(tmp_path / "speech.wav", np.zeros(1600, np.float32), 16000)
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 3])
    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")  # FFmpeg would read it as a 1-frame video
    for name, what in [("zero.mp4", "empty file"), ("speech.wav", "no video stream"), ("noise.mp4", "cannot decode"),
                       ("cut.mp4", ""), ("nothere.mp4", "no such video file"), ("still.png", "still image")]:
        for fn in (V.read_frames, V.probe_video):
            with pytest.raises(V.VideoError) as e:
                fn(str(tmp_path / name))
            one_line(e, name, what)
    assert V.probe_video(str(good)) == (10.0, 25)
