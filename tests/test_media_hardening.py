"""Media hardening: 16-bit / float / palette / CMYK images become their 8-bit RGB; videos keep only the
frames used; audio length is checked on the header; bad files are one-line errors naming the file;
training media paths stay inside their media root; the CLI refuses bad media before loading a model."""
import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from vita_jax import cli
from vita_jax import config as config_lib
from vita_jax.data import audio as A
from vita_jax.data import image as I
from vita_jax.data import pipeline, sources
from vita_jax.data import video as V
from vita_jax.data.batch import Preprocess, preprocess_settings

from conftest import FIXTURES, write_video

U8 = (np.arange(24 * 40) * 37 % 256).astype(np.uint8).reshape(24, 40)  # every grey level 0..255 appears


def _rgb(grey):
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=-1)


def _one_line(exc_info, *names):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


# ---------------------------------------------------------------------------------------------- images
def _saved(tmp_path, im, name):
    im.save(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("case", ["I;16 png", "I;16 tiff", "I;16B", "I over 255", "I within 0..255", "F tiff"])
def test_deep_images_convert_as_their_8bit_equivalent(tmp_path, case):
    v16 = U8.astype(np.uint16) * 257  # 16-bit of the 8-bit image: exact
    v16[0, :4] = [128, 129, 65535 - 128, 65534]  # and the rounding: round(v / 257) -> 0, 1, 255, 255
    want16 = U8.copy()
    want16[0, :4] = [0, 1, 255, 255]
    im, want = {
        "I;16 png": (lambda: Image.open(_saved(tmp_path, Image.fromarray(v16), "a.png")), want16),
        "I;16 tiff": (lambda: Image.open(_saved(tmp_path, Image.fromarray(v16), "a.tif")), want16),
        "I;16B": (lambda: Image.frombytes("I;16B", (40, 24), v16.astype(">u2").tobytes()), want16),
        "I over 255": (lambda: Image.fromarray(v16.astype(np.int32)), want16),
        "I within 0..255": (lambda: Image.fromarray(U8.astype(np.int32)), U8),
        "F tiff": (lambda: Image.open(_saved(tmp_path, Image.fromarray(U8.astype(np.float32) / 255), "a.tif")), U8),
    }[case]
    im = im()
    assert im.mode in ("I;16", "I;16B", "I", "F")
    out = I.load_image(im)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), _rgb(want))
    if case != "I within 0..255":  # what Pillow alone gives: clipped to white / black
        assert not np.array_equal(np.asarray(im.convert("RGB")), _rgb(want))


@pytest.mark.parametrize("values, what", [([0.0, 2.0], "0..2"), ([0.0, np.nan], "NaN"), ([-0.5, 0.5], "-0.5..0.5")])
def test_float_outside_unit_range_refused(tmp_path, values, what):
    a = np.zeros((8, 8), np.float32)
    a[0, :2] = values
    path = _saved(tmp_path, Image.fromarray(a), "depth.tif")
    with pytest.raises(I.ImageError) as e:
        I.preprocess_image(path)
    _one_line(e, "depth.tif", what, "[0, 1]")


def test_int_outside_16bit_range_refused(tmp_path):
    path = _saved(tmp_path, Image.fromarray(np.asarray([[-3, 70000]], np.int32)), "signed.tif")
    with pytest.raises(I.ImageError) as e:
        I.load_image(path)
    _one_line(e, "signed.tif", "-3..70000")


def test_8bit_modes_as_pil_converts_them(tmp_path):
    """Palette (with transparency), 1-bit, LA, RGBA, CMYK: the official ``convert("RGB")``, checked
    against the 8-bit pixels each file holds; RGB and L files stay bit-identical to Pillow's."""
    rgb = np.stack([U8, U8[::-1], 255 - U8], -1)
    pal = Image.fromarray(U8 % 4).convert("L").convert("P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    pal.info["transparency"] = 0
    bits = U8 > 127
    cases = {
        "p.png": (pal, np.asarray([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)[U8 % 4]),
        "one.png": (Image.fromarray(bits), _rgb(bits * 255)),
        "la.png": (Image.fromarray(np.stack([U8, 255 - U8], -1), "LA"), _rgb(U8)),
        "rgba.png": (Image.fromarray(np.concatenate([rgb, U8[..., None]], -1)), rgb),
        "rgb.png": (Image.fromarray(rgb), rgb),
        "l.png": (Image.fromarray(U8), _rgb(U8)),
    }
    for name, (im, want) in cases.items():
        path = _saved(tmp_path, im, name)
        assert Image.open(path).mode == {"p.png": "P", "one.png": "1", "la.png": "LA", "rgba.png": "RGBA",
                                         "rgb.png": "RGB", "l.png": "L"}[name]
        out = np.asarray(I.load_image(path))
        np.testing.assert_array_equal(out, want, err_msg=name)
        np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")), err_msg=name)
    cmyk = _saved(tmp_path, Image.fromarray(rgb).convert("CMYK"), "cmyk.jpg")
    assert Image.open(cmyk).mode == "CMYK"
    np.testing.assert_array_equal(np.asarray(I.load_image(cmyk)), np.asarray(Image.open(cmyk).convert("RGB")))


def test_bad_image_files_are_one_line(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.stack([U8] * 3, -1)).resize((400, 300)).save(buf, "JPEG")
    files = {"zero.jpg": b"", "cut.jpg": buf.getvalue()[:len(buf.getvalue()) // 2],
             "notes.png": b"just some text\n" * 9, "garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(I.ImageError) as e:
            I.preprocess_image(str(tmp_path / name))
        _one_line(e, name)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(I.ImageError) as e:
        I.load_image(str(tmp_path / "folder.png"))
    _one_line(e, "folder.png")


# ---------------------------------------------------------------------------------------------- video
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
            _one_line(e, name, what)
    assert V.probe_video(str(good)) == (10.0, 25)


# ---------------------------------------------------------------------------------------------- audio
def test_audio_length_checked_on_the_header(tmp_path, monkeypatch):
    """A clip over the encoder's limit is refused naming the file and both lengths, never decoded."""
    path = tmp_path / "talk.flac"
    sf.write(path, np.zeros(3 * 22050, np.float32), 22050)  # 3 s at 22.05 kHz = 298 frames at 16 kHz
    assert A.fbank_frames_for(3 * 22050, 22050) == A.num_frames(48000) == 298

    def no_decoding(*a, **k):
        raise AssertionError("decoded")
    monkeypatch.setattr(A.sf, "read", no_decoding)
    c = config_lib.load_config("tiny")
    c.audio.max_positions = 50  # the encoder's position table: 4 x 50 + 3 = 203 fbank frames
    prep = preprocess_settings(c)
    assert prep.max_audio_frames == 203 and Preprocess().max_audio_frames == 20003  # VITA-1.5: 5000 rows, ~200 s
    with pytest.raises(A.AudioError) as e:
        prep.fbank(str(path))
    _one_line(e, "talk.flac", "3.0 s", "298 fbank frames", "203 frames", "config.audio.max_positions")
    with pytest.raises(A.AudioError) as e:  # a waveform: checked before resampling
        prep.fbank(np.zeros(3 * 22050, np.float32), 22050)
    _one_line(e, "298 fbank frames", "203 frames")
    monkeypatch.undo()
    assert prep.fbank(np.zeros(2 * 16000, np.float32) + 0.01, 16000).shape == (198, 80)  # under the limit: fine


def test_bad_audio_files_are_one_line(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(0, np.float32), 16000)  # a valid header, 0 samples
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "corrupt.mp3").write_bytes(b"this is not an mp3 file at all " * 20)
    (tmp_path / "folder.wav").mkdir()
    for name, what in [("silent.wav", "0 samples"), ("zero.wav", "empty file"), ("corrupt.mp3", "corrupt"),
                       ("folder.wav", "folder"), ("nothere.wav", "no such audio file")]:
        for fn in (A.audio_features, A.probe_audio):
            with pytest.raises(A.AudioError) as e:
                fn(str(tmp_path / name))
            msg = _one_line(e, name, what)
            assert "does not exist" not in msg and "System error" not in msg
    blob = io.BytesIO(b"")
    blob.name = "upload.wav"
    with pytest.raises(A.AudioError) as e:
        A.audio_features(blob)
    _one_line(e, "upload.wav")


# ---------------------------------------------------------------------------------------- media paths
@pytest.fixture
def tree(tmp_path):
    """``root/`` (media root: a.png, sub/b.png, a symlink out, a symlink in) beside ``outside/x.png``."""
    root, out = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    out.mkdir()
    for p in (root / "a.png", root / "sub" / "b.png", out / "x.png"):
        Image.new("RGB", (30, 20), (200, 10, 10)).save(p)
    os.symlink(out / "x.png", root / "link_out.png")
    os.symlink(root / "sub" / "b.png", root / "link_in.png")
    return root, out


def _sample(sid, image, **kw):
    return dict(id=sid, image=image, conversations=[{"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "Red."}], **kw)


@pytest.fixture(scope="module")
def transform():
    from vita_jax.data.text import load_tokenizer
    tok = load_tokenizer(os.path.join(FIXTURES, "qwen2.5-tokenizer"))
    return sources.OfficialExamples(tok, Preprocess(I.ImageProcessorConfig(size=28, crop_size=28), max_tiles=1))


def test_media_paths_stay_inside_the_media_root(tree, transform):
    root, out = tree
    samples = [_sample("abs", str(out / "x.png")), _sample("dotdot", "../outside/x.png"),
               _sample("link", "link_out.png"), _sample("set-escape", "x.png", set="../outside"),
               _sample("plain", "a.png"), _sample("inside", "sub/../sub/b.png"), _sample("link-in", "link_in.png"),
               _sample("set", "b.png", set="sub"), _sample("declared", "x.png", set="ext")]
    path = root / "data.json"
    path.write_text(json.dumps(samples))
    src = sources.OfficialJSON(str(path), str(root), sets={"ext": str(out)})
    got = {s["id"]: transform(src[i]) for i, s in enumerate(samples)}
    for sid in ("abs", "dotdot", "link", "set-escape"):
        assert set(got[sid]) == {"id", "bad"}, sid
        assert "outside the media root" in got[sid]["bad"] and "allow_outside_root" in got[sid]["bad"]
    assert "absolute" in got["abs"]["bad"] and str(out / "x.png") in got["link"]["bad"]
    for sid in ("plain", "inside", "link-in", "set", "declared"):  # a declared set folder is its own root
        assert "bad" not in got[sid] and got[sid]["pixels"].shape == (1, 3, 28, 28), got[sid]
    # allowed explicitly: the same samples all work
    src = sources.OfficialJSON(str(path), str(root), sets={"ext": str(out)}, allow_outside_root=True)
    assert all("bad" not in transform(src[i]) for i in range(len(samples)))


def test_mixture_option_per_entry_and_config(tree, transform):
    root, out = tree
    path = root / "data.json"
    path.write_text(json.dumps([_sample("dotdot", "../outside/x.png")]))
    entry = dict(json=str(path), media_root=str(root))
    assert "bad" in transform(pipeline.mixture([entry])[0])
    assert "bad" not in transform(pipeline.mixture([dict(entry, allow_outside_root=True)])[0])
    assert "bad" not in transform(pipeline.mixture([entry], allow_outside_root=True)[0])  # the config's default
    assert "bad" in transform(pipeline.mixture([dict(entry, allow_outside_root=False)], allow_outside_root=True)[0])
    from vita_jax.train import stages
    assert stages.stage_config("1.3", "tiny").data.allow_outside_media_root is False


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("opt, name, data", [("--image", "cut.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                                              ("--video", "speech.mp4", None), ("--audio", "empty.wav", b""),
                                              ("--audio", "bad.mp3", b"not an mp3 " * 30),
                                              ("--image", "missing.jpg", ...)])
def test_generate_refuses_bad_media_before_loading(tmp_path, capsys, opt, name, data):
    path = tmp_path / name
    if data is None:  # an audio-only file named .mp4
        sf.write(tmp_path / "s.wav", np.zeros(1600, np.float32), 16000)
        os.rename(tmp_path / "s.wav", path)
    elif data is not ...:
        path.write_bytes(data)
    rc = cli.main(["generate", "/no/such/model", "--prompt", "hi", opt, str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vita-jax: error: {opt}: ") and str(path) in lines[0], err
    assert "/no/such/model" not in lines[0]  # refused before the model was looked at


def test_chat_refuses_a_long_clip_before_decoding(tmp_path, monkeypatch):
    """After loading, the model's own limit (its config) is checked on the header before decoding."""
    from vita_jax import api
    from vita_jax.data.text import load_tokenizer
    c = config_lib.load_config("tiny")
    c.audio.max_positions = 20  # 83 fbank frames, under a second
    m = api.VitaModel(c, {}, load_tokenizer(os.path.join(FIXTURES, "qwen2.5-tokenizer")))  # host side only
    sf.write(tmp_path / "q.wav", np.zeros(16000, np.float32), 16000)
    monkeypatch.setattr(A.sf, "read", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(A.AudioError) as e:
        m.chat_inputs("hi", audio=str(tmp_path / "q.wav"))
    _one_line(e, "q.wav", "98 fbank frames", "83 frames")


def test_too_short_audio_is_refused_on_the_header(tmp_path, capsys, monkeypatch):
    """Under 7 fbank frames (85 ms) the speech encoder gives no token: refused from the header, naming the
    file, before the model is loaded (the CLI) and before decoding (the library); 7 frames are fine."""
    sf.write(tmp_path / "blip.wav", np.zeros(1300, np.float32) + 0.01, 16000)  # 6 frames
    sf.write(tmp_path / "ok.wav", np.zeros(1360, np.float32) + 0.01, 16000)  # 7 frames
    assert A.fbank_frames_for(1300, 16000) == 6 and A.fbank_frames_for(1360, 16000) == 7
    rc = cli.main(["generate", "/no/such/model", "--prompt", "hi", "--audio", str(tmp_path / "blip.wav")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "/no/such/model" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vita-jax: error: --audio: {tmp_path / 'blip.wav'}: "), err
    assert "6 fbank frames" in lines[0] and "7 frames" in lines[0]
    monkeypatch.setattr(A.sf, "read", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(A.AudioError) as e:
        preprocess_settings(config_lib.load_config("tiny")).fbank(str(tmp_path / "blip.wav"))
    _one_line(e, "blip.wav", "6 fbank frames")
    monkeypatch.undo()
    with pytest.raises(A.AudioError) as e:  # a waveform too
        Preprocess().fbank(np.zeros(1300, np.float32), 16000)
    _one_line(e, "<waveform>", "6 fbank frames")
    assert Preprocess().fbank(str(tmp_path / "ok.wav")).shape == (7, 80)
    assert A.load_audio(str(tmp_path / "blip.wav"))[0].shape == (1300,)  # a plain reader keeps no minimum
