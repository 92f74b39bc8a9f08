"""The ``vita-jax`` argument parser, one function a subcommand (the commands themselves: :mod:`vita_jax.cli`)."""
from __future__ import annotations

import argparse

MESH_HELP = "shard the weights over devices, e.g. tensor=2 (AXIS=N over data, fsdp, tensor; fsdp takes the rest)"
QUANTIZE_HELP = "weight-only int8 | int4 for the LLM's linear layers (qwix; int8 halves bf16 weight bytes)"


def _dtype(text: str) -> str:
    """``--dtype``: one of the floating dtypes the model runs in."""
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DTYPES)}")
    return text


DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = "auto (bfloat16 on GPU / TPU, float32 on CPU, where it is faster) | float32 | bfloat16 | float16"


CONFIG_HELP = ("config: --config=NAME[:ARG] (shipped with vita_jax: stage1_1 ... stage3_2, tiny) or FILE.py[:ARG], "
               "and any number of --config.FIELD=VALUE overrides, e.g. --config.batch_size=8")


def _demo(sub) -> None:
    d = sub.add_parser("demo", help="every training stage on a tiny model, CPU, offline; export; a spoken answer")
    d.add_argument("--workdir", default="vita_demo", help="where data, checkpoints, the export and summary.json go")
    d.add_argument("--budget-minutes", type=float, default=15.0, help="scales every stage's steps (15: the full demo)")
    d.add_argument("--speech", default="auto", choices=["auto", "espeak", "recordings"],
                   help="espeak-ng synthesis (auto: when installed) or the bundled CMU ARCTIC recordings")
    d.add_argument("--codec", default=None, help="'trained': the codec of the demo's stage 3.1 speaks (stage 3.2 "
                   "and the answer); or a vita_tts_ckpt/codec folder (default: the fixtures' tiny codec when "
                   "../shared is beside the checkout, else random weights)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--until", metavar="STAGE",
                   help="stop after this stage (0, 1.1, ..., 2.2, lora, 3.1, 3.2): no export, no answer")
    d.add_argument("--no-progress", action="store_true")


def _train(sub) -> None:
    t = sub.add_parser("train", help="run (or resume) one curriculum stage",
                       description="Runs or resumes one stage in WORKDIR.", epilog=CONFIG_HELP)
    t.add_argument("--workdir", required=True,
                   help="checkpoints, metrics.jsonl, tb/ and the final model/ go here (a folder or a URL: "
                        "gs://bucket/run)")
    t.add_argument("--no-progress", action="store_true")


def _generate(sub) -> None:
    g = sub.add_parser("generate", help="answer a prompt (text, image, video, speech) or continue raw ids")
    g.add_argument("path", nargs="?", help="release directory or vita_jax checkpoint (same as --checkpoint)")
    g.add_argument("--checkpoint", help="release directory (config.json + safetensors) or vita_jax orbax checkpoint")
    g.add_argument("--prompt", help="question text; the official chat template is applied")
    g.add_argument("--image", action="append", default=[], help="image file")
    g.add_argument("--video", help="video file")
    g.add_argument("--audio", help="speech file (the spoken question)")
    g.add_argument("--ids", help="raw prompt token ids, e.g. 501,11,10,79 (no template)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", type=_dtype, help=DTYPE_HELP)
    g.add_argument("--quantize", choices=("int8", "int4"), default=None, help=QUANTIZE_HELP)
    g.add_argument("--mesh", default=None, help=MESH_HELP)
    g.add_argument("--speak", metavar="OUT.wav", help="also speak the reply (needs vita_tts_ckpt/) into a wav file")
    g.add_argument("--speech-max-tokens", type=int, default=1000, help="codec ids at most (40 per second)")


def _eval(sub) -> None:
    ev = sub.add_parser("eval", help="score a checkpoint on a benchmark: asr, mcq, yesno, vqa, video_mcq, spoken_qa, "
                                     "loss",
                        description="Runs one task (--task, --data) or a suite (--config=eval_vita15[:ROOT] or "
                                    "FILE.py) on a release folder or vita_jax checkpoint, in batches with greedy "
                                    "decoding; writes OUT/predictions.jsonl and OUT/metrics.json (a suite: "
                                    "OUT/NAME/...) and ends with one JSON line {task, n, metrics} per task.",
                        epilog="settings: --config.FIELD=VALUE sets one of the task's settings (prompt, language, "
                               "circular, frames, prompt_suffix, do_sample, temperature, top_k, top_p, seed); with "
                               "--config=FILE use --config.evals.NAME.FIELD=VALUE")
    ev.add_argument("--checkpoint", required=True, help="release directory or vita_jax orbax checkpoint")
    ev.add_argument("--task", help="asr | mcq | yesno | vqa | video_mcq | spoken_qa | loss")
    ev.add_argument("--data", help="the benchmark's file or folder (see docs/evaluation.md)")
    ev.add_argument("--out", required=True, help="folder for predictions.jsonl and metrics.json")
    ev.add_argument("--config", dest="config_file", default=None, help="a suite: eval_vita15[:ROOT], FILE.py")
    ev.add_argument("--max-examples", type=int, default=None, help="only the first N examples (MCQ: questions)")
    ev.add_argument("--batch-size", type=int, default=None, help="rows per batch (default 8)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit (default 64)")
    ev.add_argument("--dtype", default="auto", type=_dtype, help=DTYPE_HELP)
    ev.add_argument("--quantize", choices=("int8", "int4"), default=None, help=QUANTIZE_HELP)
    ev.add_argument("--mesh", default=None, help=MESH_HELP)
    ev.add_argument("--no-progress", action="store_true")


def _convert(sub) -> None:
    c = sub.add_parser("convert", help="official release <-> vita_jax checkpoint")
    c.add_argument("--to", required=True, choices=["orbax", "pytorch"])
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default=None, type=_dtype,
                   help="dtype to hold the weights in while converting (default float32)")
    c.add_argument("--overwrite", action="store_true")


def _bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: vita-jax bench NAME (llm, convert, data, pipeline, mixture, eval, "
                                     "serve, codec, narrow, accel)",
                       description="Train-step and decode speed (llm), conversion memory (convert), what the input "
                                   "pipeline fills with real data (data) for a config, or whether the trainer overlaps "
                                   "its input pipeline with the step (pipeline: tiny stage 2.2, slowed source and "
                                   "step); mixture --out=DIR [--n=400] writes a VITA-like official-format mixture "
                                   "(real photos, speech); eval --checkpoint=DIR [--n=24] [--batch=8] [--tokens=16]: "
                                   "batched evaluation generation against one chat call per example; serve, codec, "
                                   "narrow (every stage's :narrow), accel (train step and decode on the device "
                                   "present): their own --help.",
                       epilog=CONFIG_HELP)
    b.add_argument("what", choices=["llm", "convert", "data", "pipeline", "mixture", "eval", "serve", "codec",
                                    "narrow", "accel"])
    b.add_argument("--json", help="also write the results to this JSON file")


def _serve(sub) -> None:
    sv = sub.add_parser("serve", help="live voice + vision: a page at / and the WebSocket protocol at /ws",
                        description="Loads the model once and serves browser sessions (microphone, camera) and "
                                    "WebSocket clients: VAD, streamed text and speech, barge-in (docs/serving.md). "
                                    "Needs pip install -e \".[serve]\".")
    sv.add_argument("--checkpoint", required=True, help="release directory or vita_jax checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    sv.add_argument("--port", type=int, default=8765)
    sv.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions = decode slots of the batch")
    sv.add_argument("--max-new-tokens", type=int, default=128, help="LLM tokens per answer at most")
    sv.add_argument("--max-prompt", type=int, default=None,
                    help="spliced prompt positions at most (default min(tokenizer_model_max_length, 2048))")
    sv.add_argument("--image-tiles", type=int, default=1, help="tiles of a camera frame (1 = one 448 px tile)")
    sv.add_argument("--dtype", default="auto", type=_dtype, help=DTYPE_HELP)
    sv.add_argument("--quantize", choices=("int8", "int4"), default=None, help=QUANTIZE_HELP)
    sv.add_argument("--mesh", default=None, help=MESH_HELP)
    sv.add_argument("--allow-origin", action="append", default=[],
                    help="another page origin allowed to connect, e.g. https://example.org (repeatable)")
    sv.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")


def _compile(sub) -> None:
    co = sub.add_parser("compile", help="compile a stage's train step for a TPU topology from a CPU host (AOT)",
                        description="Builds the stage's state and batch abstractly (no weights, no TPU), compiles the "
                                    "sharded train step for --topology with libtpu (pip install -e \".[tpu]\") and "
                                    "prints the memory per chip against its HBM; ends with one JSON line; exits "
                                    "non-zero when it does not fit.", epilog=CONFIG_HELP)
    co.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x2 (v5p-64), v5p:2x2x1, v5e:2x2, "
                                                      "v6e:4x4")
    co.add_argument("--per-chip-batch", type=int, default=None,
                    help="rows per chip per micro-batch (sets batch_size; default: the config's batch_size)")
    co.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip to fit (default: the chip's)")
    co.add_argument("--json", help="also write the result to this JSON file")
    sv = co.add_argument_group("serving (--serve: the live server's prefill and decode programs, --config a model "
                               "config such as vita15)")
    sv.add_argument("--serve", action="store_true", help="compile for serving instead of a train step")
    sv.add_argument("--max-sessions", type=int, default=4, help="decode slots per model copy")
    sv.add_argument("--max-len", type=int, default=4096, help="KV-cache positions per session")
    sv.add_argument("--max-prompt", type=int, default=None, help="prefill positions (default min(max-len, 2048))")
    sv.add_argument("--quantize", choices=("int8", "int4"), default=None, help=QUANTIZE_HELP)
    sv.add_argument("--mesh", default=None, help="e.g. tensor=2 (default data=chips: a whole copy per chip)")


def parser() -> argparse.ArgumentParser:
    """The whole command line: ``vita-jax {demo,train,generate,eval,convert,bench,serve,compile} ...``."""
    p = argparse.ArgumentParser(prog="vita-jax", description="VITA-1.5 in JAX",
                                epilog="--debug (anywhere): show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_demo, _train, _generate, _eval, _convert, _bench, _serve, _compile):
        add(sub)
    return p
