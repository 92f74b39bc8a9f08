"""TFDS array_record sources: official JSON -> write_tfds -> TFDSSource gives the same samples and,
through OfficialExamples, bitwise the same examples; samples with bad media are not written; mixtures."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vita_jax import assets
from vita_jax import config as config_lib
from vita_jax.data import image as image_lib
from vita_jax.data import pipeline, sources
from vita_jax.data.batch import Preprocess
from vita_jax.data.tfds_source import TFDSSource, write_tfds

from conftest import write_video


def _conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _write_video(path, n_frames=6, fps=6, size=(64, 48)):
    write_video(path, n_frames, fps, size, step=40)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(json path, media dir, samples, TFDS version folder)."""
    tmp = tmp_path_factory.mktemp("tfds")
    media = tmp / "media"
    media.mkdir()
    Image.new("RGB", (90, 60), (200, 30, 30)).save(media / "red.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 150, 3), np.uint8)).save(media / "noise.png")
    shutil.copy(os.path.join(assets.SPEECH, "arctic_a0009.wav"), media / "q.wav")
    _write_video(media / "clip.mp4")
    samples = [
        {"id": "img-red", "image": "red.png", "conversations": _conv("<image>\nWhat colour?", "Red.")},
        {"id": "img-two", "image": ["noise.png", "red.png"], "end_tag": True,
         "conversations": _conv("<image>\n<image>\nCompare.", "Different.")},
        {"id": "audio", "audio": ["q.wav"], "inserted_id": 1, "conversations": _conv("<audio>\n", "Sure.")},
        {"id": "text", "conversations": _conv("Hello?", "Hi there.")},
        {"id": "video", "video": "clip.mp4", "conversations": _conv("<video>\nWhat happens?", "It fades.")},
        {"id": "missing-audio", "audio": ["nothere.wav"], "conversations": _conv("<audio>\n", "Ok.")},
    ]
    path = tmp / "train.json"
    path.write_text(json.dumps(samples))
    return str(path), str(media), samples, write_tfds(str(path), str(tmp / "tfds"), media_root=str(media))


@pytest.fixture(scope="module")
def transform(qwen_tokenizer):
    im = config_lib.load_config("tiny").image
    proc = image_lib.ImageProcessorConfig(size=im.size, crop_size=im.crop_size, mean=tuple(im.mean), std=tuple(im.std))
    return sources.OfficialExamples(qwen_tokenizer, Preprocess(proc, max_tiles=3, video_fps=3.0))


def _public(s):
    return {k: v for k, v in s.items() if not k.startswith("_")}


def test_source_round_trip(data):
    path, media, samples, ds_dir = data
    assert os.path.isfile(os.path.join(ds_dir, "dataset_info.json"))
    assert any(".array_record" in f for f in os.listdir(ds_dir))
    js, tf = sources.OfficialJSON(path, media), TFDSSource(ds_dir)
    assert len(js) == len(samples) and len(tf) == len(samples) - 1  # the sample whose audio is missing: not written
    for i in range(len(tf)):
        assert _public(tf[i]) == _public(js[i]) == samples[i]  # ids, conversations, names, extra fields
        assert "_bad" not in tf[i]
    # media bytes are the files' bytes
    with open(os.path.join(media, "red.png"), "rb") as f:
        assert tf[0]["_media"]["image"] == [f.read()]
    # the same dataset opened by dataset folder (newest version) and by name + data_dir
    root = os.path.dirname(ds_dir)
    assert TFDSSource(root)[3] == tf[3]
    assert TFDSSource("vita_sft:1.0.0", data_dir=os.path.dirname(root))[4] == tf[4]


def test_examples_equal_json(data, transform):
    path, media, samples, ds_dir = data
    js, tf = sources.OfficialJSON(path, media), TFDSSource(ds_dir)
    missing = transform(js[5])
    assert set(missing) == {"id", "bad"} and missing["id"] == "missing-audio" and "nothere.wav" in missing["bad"]
    for i, s in enumerate(samples[:5]):
        a, b = transform(js[i]), transform(tf[i])
        assert "bad" not in a, a
        assert set(a) == set(b) and a["id"] == b["id"] == s["id"]
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        if "pixels" in a:
            assert a["pixels"].dtype == b["pixels"].dtype and a["pixels"].tobytes() == b["pixels"].tobytes()
        if "audio" in a:
            assert len(a["audio"]) == len(b["audio"])
            assert all(x.tobytes() == y.tobytes() for x, y in zip(a["audio"], b["audio"]))
    assert {k for k in ("pixels", "audio") if k in transform(tf[4])} == {"pixels"}  # video frames
    assert len(transform(tf[1])["pixels"]) > 2  # two images, several tiles


def test_unusable_samples_are_not_written(tmp_path, caplog):
    """Missing, corrupt, wrong-kind and outside-the-root media: skipped and reported by id (default),
    or the whole write refused with every problem listed; nothing half-written is left either way."""
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    shutil.copy(tmp_path / "ok.png", tmp_path / "image_as.wav")
    (tmp_path.parent / f"{tmp_path.name}-secret.png").write_bytes((tmp_path / "ok.png").read_bytes())
    samples = [{"id": "gone", "image": "gone.png", "conversations": _conv("<image>\nWhat?", "No.")},
               {"id": "broken", "image": ["broken.png"], "conversations": _conv("<image>\nWhat?", "No.")},
               {"id": "not-audio", "audio": ["image_as.wav"], "conversations": _conv("<audio>\n", "No.")},
               {"id": "not-video", "video": "ok.png", "conversations": _conv("<video>\n", "No.")},
               {"id": "escape", "image": f"../{tmp_path.name}-secret.png", "conversations": _conv("<image>\nA?", "B.")},
               {"id": "good", "image": "ok.png", "conversations": _conv("<image>\nWhat?", "Black.")}]
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        write_tfds(samples, str(out), name="mini", media_root=str(tmp_path), on_bad="refuse")
    msg = str(e.value)
    assert "\n" not in msg and "5 of 6" in msg
    for sid, file in (("gone", "gone.png"), ("broken", "broken.png"), ("not-audio", "image_as.wav"),
                      ("not-video", "ok.png"), ("escape", "secret.png")):
        assert f"{sid}: " in msg and file in msg
    assert os.listdir(out) == []  # refused: nothing written, no temporary folder left
    with caplog.at_level(logging.WARNING):
        d = write_tfds(samples, str(out), name="mini", media_root=str(tmp_path))
    summary = [r.getMessage() for r in caplog.records if "samples not written" in r.getMessage()]
    assert len(summary) == 1 and "5 of 6" in summary[0] and all(s["id"] in summary[0] for s in samples[:5])
    assert [TFDSSource(d)[i]["id"] for i in range(len(TFDSSource(d)))] == ["good"]
    assert sorted(os.listdir(out)) == ["mini"]  # the temporary folder is gone
    with pytest.raises(FileExistsError, match="mini"):
        write_tfds(samples, str(out), name="mini", media_root=str(tmp_path))
    with pytest.raises(ValueError, match="5 of 5 samples are unusable"):  # nothing usable: refused
        write_tfds(samples[:5], str(out), name="none", media_root=str(tmp_path))
    assert sorted(os.listdir(out)) == ["mini"]
    # the escape is allowed only when asked for
    d = write_tfds(samples[4:], str(out), name="outside", media_root=str(tmp_path), allow_outside_root=True)
    assert len(TFDSSource(d)) == 2


def test_open_errors_name_the_dataset(data, tmp_path):
    _, _, _, ds_dir = data
    with pytest.raises(ValueError, match=r"'validation'.*cannot open"):
        TFDSSource(ds_dir, split="validation")
    with pytest.raises(ValueError, match=r"no_such_dataset.*cannot open"):
        TFDSSource("no_such_dataset", data_dir=str(tmp_path))


def _ids(ds, n=24):
    return [ds[i]["id"] for i in range(n)]


def test_mixture_with_tfds(data):
    path, media, samples, ds_dir = data
    files = [{"json": path, "media_root": media, "weight": 1.0}]
    tf = [{"name": ds_dir, "split": "train", "weight": 1.0}]
    a = pipeline.mixture(files, seed=3, tfds=tf)
    items = [a[i] for i in range(24)]
    from_tfds = ["_media" in s for s in items]
    assert any(from_tfds) and not all(from_tfds)  # both sources
    assert _ids(pipeline.mixture(files, seed=3, tfds=tf)) == _ids(a)
    assert _ids(pipeline.mixture(files, seed=4, tfds=tf)) != _ids(a)
    only = pipeline.mixture([], seed=0, tfds=tf)  # no JSON file at all
    written = [s["id"] for s in samples if s["id"] != "missing-audio"]
    assert sorted(only[i]["id"] for i in range(len(written))) == sorted(written)
    assert _ids(pipeline.mixture(tfds=tf, seed=0), 12) == _ids(only, 12)
    assert _ids(pipeline.mixture(tfds=tf, seed=1), 12) != _ids(only, 12)
    with pytest.raises(ValueError, match="no JSON file"):
        pipeline.mixture([])


def test_a_killed_writes_folder_is_removed_by_the_next(tmp_path, caplog):
    """A write killed half-way leaves ``.NAME-VERSION.writing-XXXXXXXX``: the next write of that dataset removes
    it (one warning each); other folders, even similar names, are kept."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    out = tmp_path / "out"
    killed = out / ".mini-1.0.0.writing-k1ll3d_x"
    (killed / "mini").mkdir(parents=True)
    for keep in (".mini-1.0.0.writing-notes", ".other-1.0.0.writing-abcdefgh", "mine"):
        (out / keep).mkdir()
    samples = [{"id": "good", "image": "ok.png", "conversations": _conv("<image>\nWhat?", "Black.")}]
    with caplog.at_level(logging.WARNING):
        d = write_tfds(samples, str(out), name="mini", media_root=str(tmp_path))
    said = [r.getMessage() for r in caplog.records if "interrupted write" in r.getMessage()]
    assert said == [f"write_tfds: removing {killed}, left by an interrupted write"]
    assert sorted(os.listdir(out)) == [".mini-1.0.0.writing-notes", ".other-1.0.0.writing-abcdefgh", "mine", "mini"]
    assert len(TFDSSource(d)) == 1
