"""A real-size path on CPU: stage 2.2's ``:narrow`` config (the full-size recipe and data shapes: packed rows of
6200 tokens, two micro-batches, ``budgets="auto"``, 448-px tiles, clips up to 3000 frames, the 152,064-entry
vocabulary; narrow, shallow towers) on an official-format mixture of real photos and speech
(``bench mixture``), through the CLI: its step's batch holds uint8 tiles and clip groups for both
micro-batches, a step trains to finite losses and checkpoints, and a second run resumes to step two."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HANG_S, QWEN_TOK, REPO

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")



@pytest.fixture(scope="module")
def mix(tmp_path_factory, big_memory):  # a 6200-token batch here, ~5 GB training runs beside
    from vita_jax.bench import mixture
    root = tmp_path_factory.mktemp("narrow_mix")
    return mixture.write_mixture(str(root), 24, 0)


def _overrides(mix, steps):
    return ["--config.batch_size=2", f"--config.total_steps={steps}", "--config.checkpoint_every=1",
            "--config.data.mixture=" + json.dumps([dict(json=mix, media_root=os.path.dirname(mix))]),
            f"--config.data.tokenizer={QWEN_TOK}", "--config.data.calibration_examples=48",
            "--config.data.workers=2"]


def test_narrow_batch_has_images_and_clip_groups(mix):
    from vita_jax import config as config_lib
    from vita_jax.data import pipeline
    from vita_jax.data.text import load_tokenizer
    from vita_jax.train import trainer
    c, _ = config_lib.parse_args(["--config=stage2_2:narrow", *_overrides(mix, 1)])
    assert (c.data.seq_len, c.grad_accum, c.llm.vocab_size, c.data.max_frames) == (6200, 2, 152064, 3000)
    data = pipeline.official_data(c, load_tokenizer(QWEN_TOK))
    b = trainer.next_batch(iter(data), c.grad_accum)
    assert np.shape(b["kind"]) == (2, 1, 6200)  # [micro-batches, rows, length]
    assert np.shape(b["pixels"])[0] == 2 and np.shape(b["pixels"])[-1] == 448
    assert b["pixels"].dtype == np.uint8  # normalised on the device
    # clips as a list of clip groups (one array per group; these 1-row micro-batches calibrate to one group, the
    # several-group case is tests/test_train_step_accumulation.py's), stacked per micro-batch
    feats = b["audio_feats"]
    assert isinstance(feats, list) and feats and all(np.shape(x)[0] == 2 for x in feats), [np.shape(x) for x in feats]


def test_narrow_stage_trains_and_resumes(mix, tmp_path):
    wd = tmp_path / "run"
    # the two runs share one persistent compilation cache in the test's folder: the resumed run reads back what the
    # first compiled, but not its step (total_steps 1 then 2: another schedule); a step's execution, ~60 s on 2 cores
    # (2 x 6200 tokens, the 152,064-entry output layer, the towers), is most of each run (2026-12-07)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

    def run(steps):
        cmd = [sys.executable, "-m", "vita_jax.cli", "train", "--config=stage2_2:narrow", *_overrides(mix, steps),
               "--no-progress", "--workdir", str(wd)]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    run(1)
    assert "1" in os.listdir(wd / "ckpt")
    out = run(2)
    rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert "resumed from step 1" in out and [r["step"] for r in rows] == [1, 2], out[-2000:]
    assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in rows), rows
    assert "2" in os.listdir(wd / "ckpt")
