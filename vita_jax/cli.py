"""``vita-jax`` command line: ``demo``, ``train``, ``generate``, ``eval``, ``convert``, ``bench``, ``compile``
and ``serve``; every subcommand answers ``--help``. Subcommands import the package when they run, so
``--help`` does not pay for loading JAX.

One error boundary (:func:`main`): a user mistake (a missing or unreadable file, a bad option or
config value, a checkpoint that does not match: the ``ValueError`` / ``KeyError`` / ``OSError``
families that vita_jax raises with the file, key or field named) prints one line
``vita-jax: error: ...`` and exits 2; ``--debug`` shows the traceback instead. Anything else is a
bug and keeps its traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


class UsageError(ValueError):
    """A command line that cannot work (reported as ``vita-jax: error: ...``, exit 2)."""


# what a user mistake raises (vita_jax's own CheckpointError / ImageError / AudioError / VideoError
# are ValueErrors; file problems are OSErrors; config overrides naming no field are KeyErrors)
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError,  # ImportError: an optional extra not installed (gcsfs for gs://, ...)
               FloatingPointError)  # the trainer's stop after max_nonfinite_steps non-finite steps in a row


def _dtype(text: str) -> str:
    """``--dtype``: one of the floating dtypes the model runs in."""
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DTYPES)}")
    return text


DTYPES = ("float32", "bfloat16", "float16")


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        raise UsageError(f"--ids: expected integers separated by commas or spaces, got {text!r}") from e
    if not ids:
        raise UsageError("--ids: no ids given (a raw prompt needs at least one)")
    return ids


def cmd_generate(a) -> int:
    import jax.numpy as jnp  # subcommands import late: --help stays fast
    from vita_jax import api  # (late, as above)
    from vita_jax.data import text as text_lib  # (late, as above)
    from vita_jax.infer import generate as gen  # (late, as above)
    path = a.checkpoint or a.path
    if not path:
        raise UsageError("give the model directory: vita-jax generate --checkpoint DIR (or as the first argument)")
    _check_generate_options(a, gen)
    t0 = time.perf_counter()
    m = api.from_pretrained(path, dtype=jnp.dtype(a.dtype))
    print(f"loaded {path}: {len(m.keys_read)} tensors, {m.config.llm.num_hidden_layers} layers, "
          f"hidden {m.config.llm.hidden_size}, vocab {m.config.llm.vocab_size} ({time.perf_counter() - t0:.1f} s)")
    sampling = dict(max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature, top_k=a.top_k,
                    top_p=a.top_p, seed=a.seed)
    t0 = time.perf_counter()
    if a.ids is not None:
        if a.image or a.video or a.audio:
            raise UsageError("--ids is a raw prompt: combine media with --prompt (the chat template is applied)")
        ids = _ids(a.ids)
        out = m.generate(np.asarray([ids]), **sampling)
        new = [int(t) for t in out[0] if t >= 0]
        print("prompt ids:", ids)
        print("new ids:   ", new)
        if m.tokenizer is not None:
            print("text:      ", m.tokenizer.decode(new))
    else:
        if m.tokenizer is None:
            raise UsageError(f"{path} has no tokenizer.json: give the prompt as --ids")
        if len(a.image) > 1:
            raise UsageError("one --image per prompt (the official demo takes one image)")
        reply = m.chat(a.prompt or "", image=a.image[0] if a.image else None, video=a.video, audio=a.audio,
                       **sampling)
        print(reply)
        if a.speak:
            _speak(m, reply, a.speak, a.seed, a.speech_max_tokens)
        state = reply[:1]
        print({text_lib.STATE_TEXT: "(state: text query)", text_lib.STATE_SPEECH: "(state: speech query)",
               text_lib.STATE_NEGATIVE: "(state: not addressed to the assistant)"}.get(state, ""))
    print(f"generated in {time.perf_counter() - t0:.2f} s (compilation included)")
    return 0


def _check_generate_options(a, gen) -> None:
    """Every option checked before a model is loaded; the message names the option."""
    try:
        gen.check_sampling(a.max_new_tokens, a.sample, a.temperature, a.top_k, a.top_p)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise UsageError(f"--{field.replace('_', '-')}: {e}") from e
    if a.video and a.image:
        raise UsageError("--video and --image: give one of them (the prompt holds one visual input)")
    if len(a.image) > 1:
        raise UsageError("one --image per prompt (the official demo takes one image)")
    if a.ids is not None:
        if a.image or a.video or a.audio:
            raise UsageError("--ids is a raw prompt: combine media with --prompt (the chat template is applied)")
        _ids(a.ids)
    elif not (a.prompt or "").strip() and not (a.image or a.video or a.audio):
        raise UsageError("--prompt is empty and no --image, --video or --audio is given: nothing to answer")
    elif os.path.isdir(a.checkpoint or a.path) and not os.path.exists(os.path.join(a.checkpoint or a.path,
                                                                                   "tokenizer.json")):
        raise UsageError(f"{a.checkpoint or a.path} has no tokenizer.json: give the prompt as --ids")
    if a.speech_max_tokens < 1:
        raise UsageError(f"--speech-max-tokens {a.speech_max_tokens}: must be at least 1")
    if a.speak:
        out_dir = os.path.dirname(os.path.abspath(a.speak))
        if not os.path.isdir(out_dir):
            raise UsageError(f"--speak {a.speak}: folder {out_dir} does not exist")
        if os.path.isdir(a.speak):
            raise UsageError(f"--speak {a.speak}: is a folder (give the .wav file to write)")
        if not os.path.isdir(os.path.join(a.checkpoint or a.path, "vita_tts_ckpt")) and \
                os.path.isdir(a.checkpoint or a.path):
            raise UsageError(f"--speak: {a.checkpoint or a.path} has no vita_tts_ckpt/ speech decoder")
    from vita_jax.data import batch as batch_lib  # late, as the subcommand's other imports
    for kind, path in (("image", a.image[0] if a.image else None), ("video", a.video), ("audio", a.audio)):
        if path is not None and not path.strip():
            raise UsageError(f"--{kind}: an empty path")
        if path:  # a cheap look at each file (the audio's length limit needs the model's config: after loading)
            try:
                batch_lib.check_media(kind, path, decode=False)
            except ValueError as e:
                raise UsageError(f"--{kind}: {e}") from e


def _speak(m, reply: str, out: str, seed: int, max_tokens: int) -> None:
    import soundfile as sf  # only with --speak
    if m.speech is None:
        raise UsageError("--speak: the checkpoint has no vita_tts_ckpt/ speech decoder")
    t0, first, segs = time.perf_counter(), None, []
    for seg in m.speak_stream(reply, seed=seed, max_tokens=max_tokens):
        if first is None:
            first = time.perf_counter() - t0
        segs.append(seg)
    wav = np.concatenate(segs) if segs else np.zeros(0, np.float32)
    sf.write(out, wav, m.speech.sample_rate, subtype="FLOAT")
    print(f"spoke {len(wav) / m.speech.sample_rate:.2f} s of audio to {out}; first chunk after "
          f"{'n/a' if first is None else f'{first:.2f} s'} (compilation included)")


def cmd_convert(a) -> int:
    import jax.numpy as jnp  # subcommands import late: --help stays fast
    from vita_jax import api  # (late, as above)
    from vita_jax.convert import target  # (late, as above)
    target.check_target(a.dst, a.src)  # before loading: the target must not be (in) the source,
    target.clean_leftovers(a.dst, print)  # and --overwrite must find only what vita_jax wrote there
    target.check_overwrite(a.dst, a.overwrite)
    t0 = time.perf_counter()
    m = api.from_pretrained(a.src, dtype=jnp.dtype(a.dtype) if a.dtype else jnp.float32)
    fmt = {"pytorch": "pytorch", "orbax": "orbax"}[a.to]
    m.save_pretrained(a.dst, format=fmt, overwrite=a.overwrite)
    print(f"converted {a.src} -> {a.dst} ({fmt}, {len(m.keys_read) or 'all'} tensors, {time.perf_counter() - t0:.1f} s)")
    return 0


def _stage_config(command: str, parsed):
    """The stage config of ``parse_args``'s ``(config, rest)``; left-over arguments or a model-only config
    are the user's mistake."""
    config, rest = parsed
    if rest:
        raise UsageError(f"vita-jax {command}: unrecognized arguments: {' '.join(rest)}")
    if "stage" not in config:
        raise UsageError("--config must be a stage config (stage1_1 ... stage3_2, or a file of that kind)")
    return config


def cmd_train(a, rest) -> int:
    """``vita-jax train --config=stage1_1[:tiny] [--config.x=y] --workdir DIR``."""
    import jax  # subcommands import late: --help stays fast
    from vita_jax import config as config_lib  # (late, as above)
    from vita_jax import parallel  # (late, as above)
    from vita_jax.train import trainer  # (late, as above)
    config = _stage_config("train", config_lib.parse_args(rest))
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(dict(config.mesh_shape)) if jax.device_count() > 1 else None
    out = trainer.train(config, a.workdir, mesh=mesh, progress=not a.no_progress, return_state=False)
    print(f"stage {config.stage}: {out['steps']} steps, last loss {out['last'].get('loss', float('nan')):.4f}")
    return 0


def cmd_compile(a, rest) -> int:
    """``vita-jax compile --config=stage2_2 --topology=v5p:4x4x2``: AOT, from a CPU host."""
    from vita_jax import config as config_lib  # subcommands import late: --help stays fast
    from vita_jax.train import compile as compile_lib  # (late, as above)
    config = _stage_config("compile", config_lib.parse_args(rest))
    r = compile_lib.compile_step(config, a.topology, per_chip_batch=a.per_chip_batch, hbm_gib=a.hbm_gib)
    print(compile_lib.report(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    if not r["fits"]:
        raise compile_lib.DoesNotFit(compile_lib.not_fitting_message(r))
    return 0


def cmd_eval(a, rest) -> int:
    """``vita-jax eval --checkpoint DIR --task TASK --data PATH --out OUT`` (or ``--config=FILE``)."""
    import jax  # subcommands import late: --help stays fast
    import jax.numpy as jnp  # (late, as above)
    from vita_jax import api, parallel  # (late, as above)
    from vita_jax import evals  # (late, as above)
    for opt, value, least in (("--max-examples", a.max_examples, 0), ("--batch-size", a.batch_size, 1),
                              ("--max-new-tokens", a.max_new_tokens, 1)):
        if value is not None and value < least:
            raise UsageError(f"{opt} {value}: must be at least {least}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UsageError(f"--out {a.out}: is a file (give the folder for predictions.jsonl and metrics.json)")
    suite = evals.runner.suite_from_args(a.config_file, a.task, a.data, rest, max_examples=a.max_examples,
                                         batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
    data = evals.runner.read_suite(suite)  # every task's data read and checked before the model is loaded
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}) if jax.device_count() > 1 else None
    engine = evals.Engine.from_model(api.from_pretrained(a.checkpoint, dtype=jnp.dtype(a.dtype), mesh=mesh))
    main = jax.process_index() == 0
    for name, s in suite.items():
        metrics, records = evals.evaluate(engine, s, name, progress=main and not a.no_progress, data=data[name])
        if main:
            evals.write_outputs(a.out if a.config_file is None else os.path.join(a.out, name), s["type"], metrics,
                                records)
            print(evals.log_line(s["type"], metrics), flush=True)
    return 0


def cmd_demo(a) -> int:
    from vita_jax.demo import run_demo  # subcommands import late: --help stays fast
    run_demo(a.workdir, a.budget_minutes, until=a.until, speech=a.speech, seed=a.seed, codec=a.codec,
             progress=not a.no_progress)
    return 0


def cmd_bench(a, rest) -> int:
    from vita_jax import bench  # subcommands import late: --help stays fast
    return bench.main([a.what] + ([f"--json={a.json}"] if a.json else []) + list(rest))


def cmd_serve(a) -> int:
    from vita_jax.serve import server  # subcommands import late: --help stays fast
    return server.main(a.checkpoint, a.host, a.port, a.max_sessions, a.dtype, a.max_new_tokens, a.max_prompt,
                       a.image_tiles, a.allow_origin, warmup=not a.no_warmup)


CONFIG_HELP = ("config: --config=NAME[:ARG] (shipped with vita_jax: stage1_1 ... stage3_2, tiny) or FILE.py[:ARG], "
               "and any number of --config.FIELD=VALUE overrides, e.g. --config.batch_size=8")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vita-jax", description="VITA-1.5 in JAX",
                                epilog="--debug (anywhere): show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="every training stage on a tiny model, CPU, offline; export; a spoken answer")
    d.add_argument("--workdir", default="vita_demo", help="where data, checkpoints, the export and summary.json go")
    d.add_argument("--budget-minutes", type=float, default=15.0, help="scales every stage's steps (15: the full demo)")
    d.add_argument("--speech", default="auto", choices=["auto", "espeak", "recordings"],
                   help="espeak-ng synthesis (auto: when installed) or the bundled CMU ARCTIC recordings")
    d.add_argument("--codec", default=None, help="'trained': the codec of the demo's stage 3.1 speaks (stage 3.2 "
                   "and the answer); or a vita_tts_ckpt/codec folder (default: the fixtures' tiny codec when "
                   "../shared is beside the checkout, else random weights)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--until", metavar="STAGE", help="stop after this stage (0, 1.1, ..., 3.2): no export, no answer")
    d.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("train", help="run (or resume) one curriculum stage",
                       description="Runs or resumes one stage in WORKDIR.", epilog=CONFIG_HELP)
    t.add_argument("--workdir", required=True,
                   help="checkpoints, metrics.jsonl, tb/ and the final model/ go here (a folder or a URL: gs://bucket/run)")
    t.add_argument("--no-progress", action="store_true")
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
    g.add_argument("--dtype", default="float32", type=_dtype, help="float32 | bfloat16 | float16")
    g.add_argument("--speak", metavar="OUT.wav", help="also speak the reply (needs vita_tts_ckpt/) into a wav file")
    g.add_argument("--speech-max-tokens", type=int, default=1000, help="codec ids at most (40 per second)")
    ev = sub.add_parser("eval", help="score a checkpoint on a benchmark: asr, mcq, yesno, vqa, video_mcq, spoken_qa, loss",
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
    ev.add_argument("--dtype", default="float32", type=_dtype, help="float32 | bfloat16 | float16")
    ev.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("convert", help="official release <-> vita_jax checkpoint")
    c.add_argument("--to", required=True, choices=["orbax", "pytorch"])
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default=None, type=_dtype, help="dtype to hold the weights in while converting (default float32)")
    c.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("bench", help="benchmarks: vita-jax bench llm|convert|data|pipeline|eval --config=NAME",
                       description="Train-step and decode speed (llm), conversion memory (convert), what the input "
                                   "pipeline fills with real data (data) for a config, or whether the trainer overlaps "
                                   "its input pipeline with the step (pipeline: tiny stage 2.2, slowed source and step); mixture "
                                   "--out=DIR [--n=400] writes a VITA-like official-format mixture (real photos, speech); eval "
                                   "--checkpoint=DIR [--n=24] [--batch=8] [--tokens=16]: batched evaluation generation "
                                   "against one chat call per example; codec, narrow (every stage's :narrow): --help.",
                       epilog=CONFIG_HELP)
    b.add_argument("what", choices=["llm", "convert", "data", "pipeline", "mixture", "eval", "serve", "codec",
                                    "narrow"])
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
    sv.add_argument("--dtype", default="float32", type=_dtype, help="float32 | bfloat16 | float16")
    sv.add_argument("--allow-origin", action="append", default=[],
                    help="another page origin allowed to connect, e.g. https://example.org (repeatable)")
    sv.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
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
    b.add_argument("--json", help="also write the results to this JSON file")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return run(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
        if "\n" in msg:  # a library's multi-line message (YAML or pickle context): its first line, the rest with --debug
            msg = msg.splitlines()[0] + " (more with --debug)"
        print(f"vita-jax: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vita-jax: interrupted", file=sys.stderr)
        return 130


def run(argv) -> int:
    """The command line without the error boundary: user mistakes raise (for programs and tests)."""
    p = parser()
    a, rest = p.parse_known_args(argv)
    if a.cmd == "train":
        return cmd_train(a, rest)
    if a.cmd == "bench":
        return cmd_bench(a, rest)
    if a.cmd == "compile":
        return cmd_compile(a, rest)
    if a.cmd == "eval":
        return cmd_eval(a, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.cmd == "demo":
        return cmd_demo(a)
    if a.cmd == "serve":
        return cmd_serve(a)
    return cmd_convert(a) if a.cmd == "convert" else cmd_generate(a)


if __name__ == "__main__":
    sys.exit(main())
