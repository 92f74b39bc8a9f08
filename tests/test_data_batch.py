"""Training and inference preprocess alike: the same official-format sample (an image of several
tiles, a video, a speech clip) through the training path (``pipeline.official_transform`` +
``lm_collator``) and through ``chat`` / ``generate``'s preprocessing (``VitaModel.chat_inputs`` +
``VitaModel.batch``) gives identical ids, labels, splice plan, pixels and fbank."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vita_jax import api, assets
from vita_jax.data import pipeline
from vita_jax.models.vita import AUDIO, IGNORE_INDEX, IMAGE, PAD
from vita_jax.train import stages

from conftest import write_video

QUESTION = "What is shown here?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, qwen_tokenizer):
    d = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 150, 3), np.uint8)).save(d / "wide.png")  # 2 x 1 grid + thumbnail
    write_video(d / "clip.mp4", 25, 10)
    shutil.copy(os.path.join(assets.SPEECH, "arctic_a0009.wav"), d / "q.wav")
    tok = qwen_tokenizer
    c = stages.stage_config("2.2", "tiny")
    c.llm.vocab_size = 152064  # the real tokenizer's ids
    c.data.update(seq_len=512, max_frames=320, max_tiles_per_sample=stages.tiles_per_image(c))  # 6 + thumbnail
    model = api.VitaModel(c, {}, tok)  # host-side preprocessing only: no parameters needed
    return d, tok, c, model


def _sample(kind, d):
    media = {"image": {"image": "wide.png"}, "video": {"video": "clip.mp4"}}[kind]
    tag = "<image>" if kind == "image" else "<video>"
    return dict(id=kind, audio=["q.wav"], **media,
                conversations=[{"from": "human", "value": f"{tag}\n{QUESTION}<audio>"},
                               {"from": "gpt", "value": "A picture."}])


def _training(c, tok, sample, d):
    src = pipeline.sources.OfficialJSON([sample], media_root=str(d))
    ex = pipeline.official_transform(c, tok)(src[0])
    assert "bad" not in ex, ex
    batch = pipeline.lm_collator(c, dict(local=1, index=0, count=1, accum=1))([ex])
    return ex, batch


@pytest.mark.parametrize("kind", ["image", "video"])
def test_training_and_inference_preprocess_alike(setup, kind):
    d, tok, c, model = setup
    sample = _sample(kind, d)
    ex, tb = _training(c, tok, sample, d)
    media = dict(image=str(d / "wide.png")) if kind == "image" else dict(video=str(d / "clip.mp4"))
    inf = model.chat_inputs(QUESTION, audio=str(d / "q.wav"), **media)

    # pixels and fbank: bitwise the same, and the image is really tiled (2 x 1 + thumbnail; video: 4 frames)
    assert np.array_equal(ex["pixels"], inf["pixels"])
    assert len(ex["pixels"]) == (3 if kind == "image" else 4)
    assert len(ex["audio"]) == len(inf["audio"]) == 1 and np.array_equal(ex["audio"][0], inf["audio"][0])
    # ids: the generation prompt is the training sample up to the assistant's reply
    n = len(inf["input_ids"])
    assert np.array_equal(ex["input_ids"][:n], inf["input_ids"])
    assert (ex["labels"][:n] == IGNORE_INDEX).all() and (ex["labels"][n:] != IGNORE_INDEX).any()

    # the splice plan and labels: the inference batch builder on the same example == the training batch
    arrays, plan = model.batch(ex["input_ids"][None], None, ex["labels"][None], inf["pixels"],
                               inf["audio"][0][None], [len(inf["audio"][0])])
    real = int(plan.lengths[0])
    assert real == int((tb["kind"][0] != PAD).sum())
    for k in ("kind", "text_ids", "src", "labels"):
        assert np.array_equal(arrays[k][0, :real], tb[k][0, :real]), k
    assert (tb["kind"][0, :real] == IMAGE).sum() == len(ex["pixels"]) * model.tokens_per_tile
    assert (tb["kind"][0, :real] == AUDIO).sum() == int(model.whale_cfg.llm_length(len(ex["audio"][0])))
    n_tiles = len(ex["pixels"])
    assert np.array_equal(arrays["pixels"][:n_tiles], tb["pixels"][:n_tiles])
    frames = len(ex["audio"][0])
    assert np.array_equal(arrays["audio_feats"][0, :frames], tb["audio_feats"][0, :frames])
    assert arrays["audio_lens"][0] == tb["audio_lens"][0] == frames


def test_preprocess_settings_follow_the_config(setup):
    """A change of ``config.image`` reaches training and inference alike (one mapping)."""
    d, tok, c, _ = setup
    c2 = c.copy_and_resolve_references()
    c2.image.max_dynamic_patch = 1  # one tile, no thumbnail
    ex, _ = _training(c2, tok, _sample("image", d), d)
    inf = api.VitaModel(c2, {}, tok).chat_inputs(QUESTION, image=str(d / "wide.png"), audio=str(d / "q.wav"))
    assert len(ex["pixels"]) == len(inf["pixels"]) == 1
