"""Evaluators during training (``config.evals``) on a tiny stage with a word-level tokenizer and
the bundled speech, and ``vita-jax eval`` with 2 processes x 4 CPU devices = 1 process x 8."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from vita_jax import assets

from conftest import HANG_S, REPO

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")



def _bench(root):
    """A word-level tokenizer over the prompts, an ASR manifest and a held-out file of real speech."""
    from vita_jax.demo.data import build_tokenizer
    from vita_jax.evals.tasks import ASR_PROMPT
    clips = assets.speech_clips()[:3]
    build_tokenizer([ASR_PROMPT] + [t for _, _, t in clips], str(root / "tok"))
    rows, held = [], []
    for name, wav, text in clips:
        sf.write(str(root / f"{name}.wav"), wav, 16000)
        rows.append(json.dumps(dict(id=name, audio=f"{name}.wav", text=text)))
        held.append({"id": name, "audio": [f"{name}.wav"], "conversations": [
            {"from": "human", "value": "<audio>\n" + ASR_PROMPT}, {"from": "gpt", "value": text}]})
    (root / "asr.jsonl").write_text("\n".join(rows) + "\n")
    (root / "held.json").write_text(json.dumps(held))
    for h in held:  # the official reader resolves media against the file's folder
        h["audio"] = [str(root / h["audio"][0])]
    (root / "held.json").write_text(json.dumps(held))
    return root


def test_evals_run_during_training(tmp_path):
    """`vita-jax train` on tiny stage 2.2 with two evaluators given on the command line."""
    from vita_jax import cli
    b = _bench(tmp_path)
    evals = dict(asr=dict(type="asr", data=str(b / "asr.jsonl"), every=1, batch_size=2, max_new_tokens=2),
                 held=dict(type="loss", data=str(b / "held.json"), batch_size=4))
    wd = tmp_path / "wd"
    assert cli.run(["train", "--config=stage2_2:tiny", "--config.total_steps=2",
                    "--config.checkpoint_every=100", f"--config.data.tokenizer={b / 'tok'}",
                    f"--config.evals={json.dumps(evals)}", "--workdir", str(wd), "--no-progress"]) == 0
    rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    asr = [r for r in rows if "eval/asr/wer" in r]
    held = [r for r in rows if "eval/held/loss" in r]
    assert [r["step"] for r in asr] == [1, 2] and [r["step"] for r in held] == [2]  # every=1; 0 = at the end
    assert asr[0]["eval/asr/n"] == 3 and asr[0]["eval/asr/wer"] >= 0
    assert np.isfinite(held[0]["eval/held/loss"]) and held[0]["eval/held/tokens"] > 0
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the train lines are untouched
    for step, names in ((1, ["asr"]), (2, ["asr", "held"])):
        assert sorted(os.listdir(wd / "evals" / str(step))) == [f"{n}.jsonl" for n in names]
    preds = [json.loads(line) for line in open(wd / "evals" / "2" / "asr.jsonl")]
    assert [p["id"] for p in preds] == [n for n, _, _ in assets.speech_clips()[:3]]
    events = [f for f in os.listdir(wd / "tb") if f.startswith("events.out.tfevents")]
    blob = b"".join(open(wd / "tb" / f, "rb").read() for f in events)
    assert b"eval/asr/wer" in blob and b"eval/held/loss" in blob


def test_two_processes_equal_one(tmp_path):
    """`vita-jax eval` on a tiny release: 2 processes x 4 CPU devices give the predictions and
    metrics of 1 process x 8 devices (each process prepared its share of every batch)."""
    import shutil

    import vita_jax
    from vita_jax import config as config_lib
    b = _bench(tmp_path)
    rel = tmp_path / "rel"
    vita_jax.init_model(config_lib.load_config("tiny"), seed=1).save_pretrained(str(rel))
    shutil.copy(b / "tok" / "tokenizer.json", rel)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    outs = {}
    for name, prefix in (("one", []), ("two", [sys.executable, "launch/local.py", "--num-processes", "2",
                                                "--cpu-devices", "4", "--timeout", str(HANG_S), "--"])):
        outs[name] = {}
        for task, data in (("asr", "asr.jsonl"), ("loss", "held.json")):
            out = tmp_path / name / task
            cmd = prefix + [sys.executable, "-m", "vita_jax.cli", "eval", "--checkpoint", str(rel), "--task", task,
                            "--data", str(b / data), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3",
                            "--no-progress"]
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S + 60)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            outs[name][task] = ([json.loads(x) for x in open(out / "predictions.jsonl")],
                                json.load(open(out / "metrics.json"))["metrics"])
    for task in ("asr", "loss"):
        (p1, m1), (p2, m2) = outs["one"][task], outs["two"][task]
        assert len(p1) == 3
        if task == "asr":
            assert p1 == p2
        else:
            assert [p["id"] for p in p1] == [p["id"] for p in p2]
            assert [p["tokens"] for p in p1] == [p["tokens"] for p in p2]
            np.testing.assert_allclose([p["nll"] for p in p2], [p["nll"] for p in p1], rtol=1e-5)
        for k in m1:
            if k != "examples_per_s":
                np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
