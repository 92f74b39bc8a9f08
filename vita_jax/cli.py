"""``vita-jax`` command line: ``demo``, ``train``, ``generate``, ``eval``, ``convert``, ``bench``, ``compile``
and ``serve``; every subcommand answers ``--help``. Subcommands import the package when they run, so
``--help`` does not pay for loading JAX.

One error boundary (:func:`main`): a user mistake (a missing or unreadable file, a bad option or
config value, a checkpoint that does not match: the ``ValueError`` / ``KeyError`` / ``OSError``
families that vita_jax raises with the file, key or field named) prints one line
``vita-jax: error: ...`` and exits 2; ``--debug`` shows the traceback instead. Anything else is a
bug and keeps its traceback."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from vita_jax.cli_args import parser


class UsageError(ValueError):
    """A command line that cannot work (reported as ``vita-jax: error: ...``, exit 2)."""


# what a user mistake raises (vita_jax's own CheckpointError / ImageError / AudioError / VideoError
# are ValueErrors; file problems are OSErrors; config overrides naming no field are KeyErrors)
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError,  # ImportError: an optional extra not installed (gcsfs for gs://, ...)
               FloatingPointError)  # the trainer's stop after max_nonfinite_steps non-finite steps in a row


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

    from vita_jax import api, parallel  # (late, as above)
    from vita_jax.data import text as text_lib  # (late, as above)
    from vita_jax.infer import generate as gen  # (late, as above)
    path = a.checkpoint or a.path
    if not path:
        raise UsageError("give the model directory: vita-jax generate --checkpoint DIR (or as the first argument)")
    _check_generate_options(a, gen)
    t0 = time.perf_counter()
    dtype = parallel.resolve_dtype(a.dtype)
    m = api.from_pretrained(path, dtype=jnp.dtype(dtype), mesh=_mesh(a))
    if a.quantize:
        m.quantize(a.quantize)
    print(f"loaded {path}: {len(m.keys_read)} tensors, {m.config.llm.num_hidden_layers} layers, "
          f"hidden {m.config.llm.hidden_size}, vocab {m.config.llm.vocab_size}, {dtype}"
          f"{', LLM weights ' + a.quantize if a.quantize else ''} ({time.perf_counter() - t0:.1f} s)")
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
    n = len(m.keys_read) or "all"
    print(f"converted {a.src} -> {a.dst} ({fmt}, {n} tensors, {time.perf_counter() - t0:.1f} s)")
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
    from vita_jax.train import preemption, trainer  # (late, as above)
    config = _stage_config("train", config_lib.parse_args(rest))
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(dict(config.mesh_shape)) if jax.device_count() > 1 else None
    try:
        out = trainer.train(config, a.workdir, mesh=mesh, progress=not a.no_progress, return_state=False)
    except preemption.Preempted as e:  # SIGTERM / SIGINT: saved; 128 + the signal's number, so retry loops rerun it
        if jax.process_index() == 0:
            print(f"vita-jax: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(f"stage {config.stage}: {out['steps']} steps, last loss {out['last'].get('loss', float('nan')):.4f}")
    return 0


def cmd_compile(a, rest) -> int:
    """``vita-jax compile --config=stage2_2 --topology=v5p:4x4x2``: AOT, from a CPU host."""
    from vita_jax import config as config_lib  # subcommands import late: --help stays fast
    from vita_jax.train import compile as compile_lib  # (late, as above)
    if a.serve:
        return _compile_serve(a, rest)
    config = _stage_config("compile", config_lib.parse_args(rest))
    r = compile_lib.compile_step(config, a.topology, per_chip_batch=a.per_chip_batch, hbm_gib=a.hbm_gib)
    print(compile_lib.report(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    if not r["fits"]:
        raise compile_lib.DoesNotFit(compile_lib.not_fitting_message(r))
    return 0


def parse_mesh(text: str) -> dict:
    """``--mesh tensor=2[,data=..,fsdp=..]`` -> a ``make_mesh`` shape; fsdp takes the remaining devices unless
    given (so ``tensor=N`` alone uses every device)."""
    out = {"data": 1, "fsdp": -1, "tensor": 1}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if name not in out or not size.lstrip("-").isdigit():
            raise UsageError(f"--mesh {text}: expected AXIS=N[,AXIS=N] with AXIS data, fsdp or tensor, e.g. tensor=2")
        out[name] = int(size)
    return out


def _mesh(a):
    """The ``--mesh`` option's mesh (None without one)."""
    if not getattr(a, "mesh", None):
        return None
    from vita_jax import parallel  # (late: as the commands)
    try:
        return parallel.make_mesh(parse_mesh(a.mesh))
    except ValueError as e:  # more devices asked for than there are, ...
        raise UsageError(f"--mesh {a.mesh}: {e}") from None


def _compile_serve(a, rest) -> int:
    """``vita-jax compile --serve --config=vita15 --topology=v5e:2x2 [--quantize int8]``."""
    from vita_jax import config as config_lib  # subcommands import late: --help stays fast
    from vita_jax.serve import compile as serve_compile  # (late, as above)
    from vita_jax.train import compile as compile_lib  # (late, as above)
    config, left = config_lib.parse_args(rest)
    if left:
        raise UsageError(f"vita-jax compile: unrecognized arguments: {' '.join(left)}")
    mesh = parse_mesh(a.mesh) if a.mesh else None
    r = serve_compile.compile_serve(config, a.topology, a.max_sessions, a.max_len, a.max_prompt, a.quantize, mesh,
                                    a.hbm_gib)
    print(serve_compile.report(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    if not r["fits"]:
        raise compile_lib.DoesNotFit(f"serving does not fit {r['topology']}: {r['hbm_per_chip_gib']:.2f} GiB per chip "
                                     f"> {r['hbm_capacity_gib']:g} GiB HBM ({r['max_sessions']} sessions x "
                                     f"{r['max_len']}, {r['dtype']}{', ' + r['quantize'] if r['quantize'] else ''})")
    return 0


def cmd_eval(a, rest) -> int:
    """``vita-jax eval --checkpoint DIR --task TASK --data PATH --out OUT`` (or ``--config=FILE``)."""
    import jax  # subcommands import late: --help stays fast
    import jax.numpy as jnp  # (late, as above)

    from vita_jax import (  # (late, as above)
        api,
        evals,  # (late, as above)
        parallel,
    )
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
    mesh = _mesh(a) or (parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}) if jax.device_count() > 1 else None)
    dtype = parallel.resolve_dtype(a.dtype)
    if jax.process_index() == 0:
        print(f"eval: {a.checkpoint} in {dtype}{', LLM weights ' + a.quantize if a.quantize else ''}", flush=True)
    model = api.from_pretrained(a.checkpoint, dtype=jnp.dtype(dtype), mesh=mesh)
    engine = evals.EvalEngine.from_model(model.quantize(a.quantize) if a.quantize else model)
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
                       a.image_tiles, a.allow_origin, warmup=not a.no_warmup, quantize=a.quantize, mesh=_mesh(a))


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
        if "\n" in msg:  # a library's multi-line message (YAML or pickle context): its first line; all with --debug
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
