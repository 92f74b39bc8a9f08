"""The benchmarks VITA-1.5 reports, as one `vita-jax eval` suite. ARG = the folder holding them
(default ./benchmarks), laid out as the public releases ship:

    ROOT/LibriSpeech/test-other/...      (LibriSpeech: SPEAKER/CHAPTER/*.flac + *.trans.txt)
    ROOT/MME.tsv                         (VLMEvalKit's MME TSV)
    ROOT/MMBench_DEV_EN.tsv              (VLMEvalKit's MMBench TSV; circular evaluation)
    ROOT/videomme/videomme.jsonl         (video, question, options, answer; videos beside it)

vita-jax eval --checkpoint VITA-1.5 --config=eval_vita15:/data/bench --out results/
One task: --config.evals.mme.max_examples=100 and the like.
"""
import os

import ml_collections


def get_config(arg=None):
    root = arg or "benchmarks"
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    return ml_collections.ConfigDict(dict(evals=dict(
        librispeech_test_other=dict(type="asr", data=j("LibriSpeech", "test-other"), max_new_tokens=128),
        mme=dict(type="yesno", data=j("MME.tsv"), max_new_tokens=8),
        mmbench_dev_en=dict(type="mcq", data=j("MMBench_DEV_EN.tsv"), circular=True, max_new_tokens=16),
        videomme=dict(type="video_mcq", data=j("videomme", "videomme.jsonl"), frames=16, max_new_tokens=16),
    )))
