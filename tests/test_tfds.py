"""TFDS array_record sources: official JSON -> write_tfds -> TFDSSource gives the same samples and,
through OfficialExamples, bitwise the same examples; bad media become {"id", "bad"}; mixtures."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, write_video
from PIL import Image

from vita_jax import assets
from vita_jax import config as config_lib
from vita_jax.data import image as image_lib
from vita_jax.data import pipeline, sources
from vita_jax.data.batch import Preprocess
from vita_jax.data.tfds_source import TFDSSource, write_tfds


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
def transform():
    from vita_jax.data.text import load_tokenizer
    im = config_lib.load_config("tiny").image
    proc = image_lib.ImageProcessorConfig(size=im.size, crop_size=im.crop_size, mean=tuple(im.mean), std=tuple(im.std))
    tok = load_tokenizer(os.path.join(FIXTURES, "qwen2.5-tokenizer"))  # vita15-tiny has no tokenizer.json
    return sources.OfficialExamples(tok, Preprocess(proc, max_tiles=3, video_fps=3.0))


def _public(s):
    return {k: v for k, v in s.items() if not k.startswith("_")}


def test_source_round_trip(data):
    path, media, samples, ds_dir = data
    assert os.path.isfile(os.path.join(ds_dir, "dataset_info.json"))
    assert any(".array_record" in f for f in os.listdir(ds_dir))
    js, tf = sources.OfficialJSON(path, media), TFDSSource(ds_dir)
    assert len(tf) == len(js) == len(samples)
    for i in range(len(js)):
        assert _public(tf[i]) == _public(js[i]) == samples[i]  # ids, conversations, names, extra fields
    # media bytes are the files' bytes; the missing file is stored empty and the sample marked bad
    with open(os.path.join(media, "red.png"), "rb") as f:
        assert tf[0]["_media"]["image"] == [f.read()]
    assert "nothere.wav" in tf[5]["_bad"] and "_bad" not in tf[0]
    # the same dataset opened by dataset folder (newest version) and by name + data_dir
    root = os.path.dirname(ds_dir)
    assert TFDSSource(root)[3] == tf[3]
    assert TFDSSource("vita_sft:1.0.0", data_dir=os.path.dirname(root))[4] == tf[4]


def test_examples_equal_json(data, transform):
    path, media, samples, ds_dir = data
    js, tf = sources.OfficialJSON(path, media), TFDSSource(ds_dir)
    for i, s in enumerate(samples):
        a, b = transform(js[i]), transform(tf[i])
        if s["id"] == "missing-audio":
            assert set(a) == set(b) == {"id", "bad"} and a["id"] == b["id"] == "missing-audio"
            assert "nothere.wav" in a["bad"] and "nothere.wav" in b["bad"]
            continue
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


def test_missing_media_warns_and_corrupt_bytes_are_bad(tmp_path, caplog, transform):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    samples = [{"id": "gone", "image": "gone.png", "conversations": _conv("<image>\nWhat?", "No.")},
               {"id": "broken", "image": ["broken.png"], "conversations": _conv("<image>\nWhat?", "No.")}]
    with caplog.at_level(logging.WARNING):
        d = write_tfds(samples, str(tmp_path / "out"), name="mini", media_root=str(tmp_path))
    assert any("gone" in r.getMessage() and "gone.png" in r.getMessage() for r in caplog.records)
    src = TFDSSource(d)
    gone, broken = transform(src[0]), transform(src[1])
    assert set(gone) == {"id", "bad"} and gone["id"] == "gone" and "gone.png" in gone["bad"]
    assert set(broken) == {"id", "bad"} and "broken.png" in broken["bad"]  # error names the file
    with pytest.raises(FileExistsError, match="mini"):
        write_tfds(samples, str(tmp_path / "out"), name="mini", media_root=str(tmp_path))


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
    assert sorted(only[i]["id"] for i in range(len(samples))) == sorted(s["id"] for s in samples)
    assert _ids(pipeline.mixture(tfds=tf, seed=0), 12) == _ids(only, 12)
    assert _ids(pipeline.mixture(tfds=tf, seed=1), 12) != _ids(only, 12)
    with pytest.raises(ValueError, match="no JSON file"):
        pipeline.mixture([])
