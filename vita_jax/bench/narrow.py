"""``python -m vita_jax.bench narrow``: every stage's ``:narrow`` config (the full-size recipe and data shapes:
packed rows of 6200 tokens, two micro-batches, 448-px tiles, clips up to 3000 frames, the 152,064-entry
vocabulary; towers 2 layers deep and 64-128 wide) trained for a few steps, each stage in a process of its own,
on a VITA-like official-format mixture of real photos and speech (``bench mixture``; the speech-only stages
2.1a and 3.2 on their synthetic sets at the same shapes). Prints per stage: steps, last loss, seconds and the
process's peak resident memory (``peak_rss_gib``): what a CPU host needs to run the real-size paths.

``python -m vita_jax.bench narrow [--stages=1.1,2.2] [--steps=3] [--batch=8] [--n=64] [--tokenizer=DIR]
[--workdir=DIR] [--json=OUT]``: ``--tokenizer`` is a Qwen2.5 tokenizer folder (default: the fixtures' one when
``../shared`` is beside the checkout or the working folder).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

STAGES = ("1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.2")
MIXTURE_STAGES = ("1.1", "1.2", "1.3", "2.1b", "2.2")  # the LM stages read the official-format files


def _default_tokenizer() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.join(here, "..", "..")):
        p = os.path.normpath(os.path.join(root, "..", "shared", "fixtures", "qwen2.5-tokenizer"))
        if os.path.exists(os.path.join(p, "tokenizer.json")):
            return p
    return None


def run_one(a) -> dict:
    """One stage in this process: ``{stage, steps, loss, seconds, peak_rss_gib}``."""
    from vita_jax.train import stages, trainer  # the parent process never loads JAX
    c = stages.stage_config(a.one, "narrow")
    c.update(batch_size=a.batch, total_steps=a.steps, checkpoint_every=a.steps, keep_checkpoints=1)
    if a.one in MIXTURE_STAGES:
        c.data.mixture = [dict(json=a.mixture, media_root=os.path.dirname(a.mixture))]
        c.data.tokenizer = a.tokenizer
        c.data.calibration_examples = min(int(c.data.calibration_examples), 4 * a.n)
    t0 = time.perf_counter()
    trainer.train(c, a.workdir, log=lambda *_: None, progress=False, return_state=False)
    rows = [json.loads(line) for line in open(os.path.join(a.workdir, "metrics.jsonl"))]
    return dict(stage=a.one, steps=len(rows), loss=rows[-1]["loss"], seconds=round(time.perf_counter() - t0, 1),
                peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2))


def _child(a, stage: str, workdir: str) -> dict:
    cmd = [sys.executable, "-m", "vita_jax.bench", "narrow", f"--one={stage}", f"--steps={a.steps}",
           f"--batch={a.batch}", f"--n={a.n}", f"--mixture={a.mixture}", f"--tokenizer={a.tokenizer}",
           f"--workdir={workdir}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return dict(stage=stage, error=(r.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m vita_jax.bench narrow", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="rows a step (two micro-batches)")
    p.add_argument("--n", type=int, default=64, help="samples of the mixture written")
    p.add_argument("--tokenizer", default=_default_tokenizer())
    p.add_argument("--workdir", default=None, help="where the mixture and the runs go (default: a temporary folder)")
    p.add_argument("--mixture", default=None, help="an official-format JSON file instead of a written mixture")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one stage
    a = p.parse_args(argv)
    if a.one is not None:
        print(json.dumps(run_one(a)))
        return 0
    todo = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in todo if s not in STAGES]
    if bad or a.steps < 1 or a.batch < 2 or a.batch % 2:
        p.error(f"--stages from {', '.join(STAGES)}; --steps >= 1; --batch even and >= 2 (got {a.stages}, "
                f"{a.steps}, {a.batch})")
    if not a.tokenizer or not os.path.exists(os.path.join(a.tokenizer, "tokenizer.json")):
        p.error(f"--tokenizer {a.tokenizer}: no tokenizer.json there (a Qwen2.5 tokenizer folder)")
    root = a.workdir or tempfile.mkdtemp(prefix="vita_narrow_")
    if a.mixture is None:
        from vita_jax.bench import mixture  # writes photos and speech (scikit-image, soundfile): parent only
        a.mixture = mixture.write_mixture(os.path.join(root, "mixture"), a.n, 0)
    rows = []
    for stage in todo:
        rows.append(_child(a, stage, os.path.join(root, "run_" + stage)))
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if all("error" not in r for r in rows) else 1
