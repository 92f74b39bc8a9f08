"""``python -m vita_jax.bench eval --checkpoint=DIR [--n=24] [--batch=8] [--tokens=16]``: batched
evaluation generation (:mod:`vita_jax.evals`: one jitted prefill and a device-side decode loop
per batch) against one ``chat`` call per example, on the bundled CMU ARCTIC recordings as an ASR
set (``n`` examples, cycled), greedy, the same reply length limit. Both are run once to compile
first; the timed pass is the second. Reports examples/s of each and the speed-up."""
from __future__ import annotations

import json
import os
import tempfile
import time

import soundfile as sf

from vita_jax import api, assets
from vita_jax.evals import EvalEngine, evaluate
from vita_jax.evals.tasks import ASR_PROMPT


def bench_eval(checkpoint: str, n: int = 24, batch: int = 8, tokens: int = 16) -> dict:
    m = api.from_pretrained(checkpoint)
    if m.tokenizer is None:
        raise ValueError(f"{checkpoint}: no tokenizer.json (bench eval needs a release folder with one)")
    clips = assets.speech_clips()
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for k in range(n):
            name, wav, text = clips[k % len(clips)]
            path = os.path.join(d, f"{k}.wav")
            sf.write(path, wav, 16000)
            rows.append(json.dumps(dict(id=str(k), audio=path, text=text)))
        manifest = os.path.join(d, "asr.jsonl")
        with open(manifest, "w") as f:
            f.write("\n".join(rows) + "\n")
        eng = EvalEngine.from_model(m)
        settings = dict(type="asr", data=manifest, batch_size=batch, max_new_tokens=tokens)
        evaluate(eng, settings)  # compile every batch shape
        t0 = time.perf_counter()
        _, recs = evaluate(eng, settings)
        batched = time.perf_counter() - t0
        paths = [os.path.join(d, f"{k}.wav") for k in range(n)]
        for p in paths[:len(clips)]:  # compile every per-example shape
            m.chat(ASR_PROMPT, audio=p, max_new_tokens=tokens)
        t0 = time.perf_counter()
        replies = [eng.decode(m.tokenizer.encode(m.chat(ASR_PROMPT, audio=p, max_new_tokens=tokens))) for p in paths]
        single = time.perf_counter() - t0
    same = sum(r["prediction"] == s for r, s in zip(recs, replies))
    return dict(examples=n, batch=batch, max_new_tokens=tokens, batched_examples_per_s=n / batched,
                chat_examples_per_s=n / single, speedup=single / batched, same_replies=same)
