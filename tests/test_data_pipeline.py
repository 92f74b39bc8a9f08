"""grain pipeline over the official data format: a run completes with bad samples skipped by id."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vita_jax import assets
from vita_jax.train import stages, trainer

from conftest import QWEN_TOK


def _dataset(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (90, 60), colour).save(media / f"img{k}.png")
    (media / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    shutil.copy(os.path.join(assets.SPEECH, "arctic_a0009.wav"), media / "q.wav")

    def conv(q, a):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    samples = [
        {"id": "good-img-0", "image": "img0.png", "conversations": conv("<image>\nWhat colour?", "Red.")},
        {"id": "good-img-1", "image": "img1.png", "conversations": conv("What colour?\n<image>", "Green.")},
        {"id": "good-audio", "audio": ["q.wav"], "conversations": conv("<audio>\n", "Sure.")},
        {"id": "good-text", "conversations": conv("Hello?", "Hi there.")},
        {"id": "bad-broken-image", "image": "broken.png", "conversations": conv("<image>\nWhat?", "Blue.")},
        {"id": "bad-missing-audio", "audio": ["nothere.wav"], "conversations": conv("<audio>\n", "Ok.")},
        {"id": "bad-two-placeholders", "image": "img2.png",
         "conversations": conv("<image>\n<image>\nCompare.", "Same.")},
        {"id": "good-img-2", "image": "img2.png", "conversations": conv("<image>\nColour?", "Blue.")},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(samples))
    return str(path), str(media)


@pytest.mark.parametrize("source", ["json", "tfds", "packed"])
@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_run_completes_with_bad_samples_counted(tmp_path, source):
    data, media = _dataset(tmp_path)
    c = stages.stage_config("1.3", "tiny")
    c.llm.vocab_size = 152064  # the real tokenizer's ids
    c.total_steps = 4
    c.checkpoint_every = 100
    c.batch_size = 4
    c.data.seq_len = 256
    c.data.max_frames = 320
    c.data.max_tiles_per_sample = 3
    c.image.max_dynamic_patch = 3  # training tiles like inference: at most 3 tiles (2 + thumbnail here)
    c.data.tokenizer = QWEN_TOK
    c.data.packing = source == "packed"  # several examples per row
    if source in ("json", "packed"):
        c.data.mixture = [dict(json=data, media_root=media, weight=1.0)]
    else:  # the same samples, media embedded, in a TFDS array_record dataset
        from vita_jax.data.tfds_source import write_tfds
        c.data.tfds = [dict(name=write_tfds(data, str(tmp_path / "tfds"), media_root=media), split="train")]
    logs = []
    out = trainer.train(c, str(tmp_path / "wd"), log=logs.append, progress=False)
    assert out["steps"] == 4
    if source == "tfds":  # write_tfds stores no sample whose media fail (reported when it was written)
        assert set(out["skipped"]) == {"bad-two-placeholders"}
    else:
        assert set(out["skipped"]) == {"bad-broken-image", "bad-missing-audio", "bad-two-placeholders"}
        assert "broken.png" in out["skipped"]["bad-broken-image"]
        assert "nothere.wav" in out["skipped"]["bad-missing-audio"]
    assert "6 <image> positions for 3 tiles" in out["skipped"]["bad-two-placeholders"]  # 2 x 3 tiles
    assert any(f"skipped {len(out['skipped'])} bad sample(s)" in line for line in logs)
    rows = [json.loads(line) for line in open(tmp_path / "wd" / "metrics.jsonl")]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)


# --------------------------------------------- refused early, nothing lost (slow, as the old test_hardening.py was)


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_weights_and_ids_of_any_kind(tmp_path):
    from vita_jax.data import pipeline
    with pytest.raises(ValueError, match=r"config.data.mixture\[0\]: weight -1"):
        pipeline.mixture([{"json": "x.json", "weight": -1}])
