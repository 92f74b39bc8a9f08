"""What a stage gives the training loop: a typed :class:`~vita_jax.train.setup.StageProgram` (state, jitted
step, placement, data, evaluator, export), built by the stage's own builder. The loop (:mod:`vita_jax.train.trainer`)
runs any program the same way; which builder makes it is decided here, once, from ``config.loss``:
the LM stages (``lm``, ``ctc``, ``tts``: :func:`lm_program`) and stage 3.1 (``codec``:
:func:`vita_jax.train.codec.setup.program`).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vita_jax import paths
from vita_jax.convert import lora_io, model_checkpoint, orbax_io
from vita_jax.convert import tts as tts_io
from vita_jax.data import pipeline, synthetic
from vita_jax.data.text import load_tokenizer
from vita_jax.models import lora, vita
from vita_jax.train import setup, stages
from vita_jax.train.codec import files as codec_files
from vita_jax.train.codec import setup as codec_setup
from vita_jax.train.setup import StageProgram


def build(config, data, mesh, log, evals=None, ck=None, done: int = 0) -> StageProgram:
    """The program of ``config``'s stage. Checked first: data files, tokenizer size, and (resuming at step
    ``done``) that ``ck``'s run is this config's."""
    if config.get("loss") == "codec":
        if done:
            ck.check_same_run(done, config)
        prog = codec_setup.program(config, mesh, log)
        prog.data = data or prog.data
        return prog
    return lm_program(config, data, mesh, log, evals, ck, done)


def export_complete(config, model_dir: str) -> bool:
    """Whether the stage's ``WORKDIR/model`` export is finished (asked before any program is built)."""
    if config.get("loss") == "codec":
        return paths.is_local(model_dir) and codec_files.export_complete(model_dir)
    return orbax_io.is_complete(model_dir)


# ------------------------------------------------------------------------------------ the LM stages
def initial_params(config, ck: Optional[model_checkpoint.Checkpoint] = None) -> dict:
    """``config.init_from`` (a release directory or vita_jax checkpoint, parameters only; ``ck`` if
    already opened) or a random model; plus the stage's extra heads (CTC head, speech decoder)."""
    if config.init_from:
        ck = ck or model_checkpoint.load(config.init_from)
        params = dict(ck.params)
        want = jax.eval_shape(lambda: vita.init_params(config, seed=0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(want):
            node = params
            for k in path:
                node = node.get(k.key) if hasattr(node, "get") else None
            if node is not None and tuple(node.shape) != tuple(leaf.shape):
                raise ValueError(f"config.init_from = {config.init_from}: {jax.tree_util.keystr(path)} has shape "
                                 f"{tuple(node.shape)}, the config's model wants {tuple(leaf.shape)} (another model "
                                 "size?)")
        if config.loss == "tts" and ck.tts is not None:
            params["tts_decoder"] = ck.tts[1]
    else:
        params = vita.init_params(config, seed=int(config.seed))
    return vita.init_heads(config, params, seed=int(config.seed))


def model_params_of(config, state) -> dict:
    """The whole-model parameters of a train state: LoRA adapters folded into their kernels (float32)."""
    params = stages.merge(state.train, state.frozen)
    spec = lora.spec_of(config)
    return params if spec is None else lora.merge(params, spec, dtype=jnp.float32)


def export_model(config, state, path: str) -> None:
    """The stage's final parameters as a vita_jax checkpoint (the model parts; a trained speech
    decoder also goes to ``path/vita_tts_ckpt`` in the official format). A LoRA stage with
    ``config.lora.merge = False`` writes its adapters alone (:mod:`vita_jax.convert.lora_io`)."""
    if lora.spec_of(config) is not None and not config.lora.get("merge", True):
        lora_io.save(path, config, stages.merge(state.train, {}))
        return
    params = model_params_of(config, state)
    pdt = jnp.dtype(config.param_dtype)
    model_params = {k: jax.tree.map(lambda x: x.astype(pdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params[k])
                    for k in vita.parts(config) if k in params}
    extra = None
    if "tts_decoder" in params:
        tts = params["tts_decoder"]
        if jax.process_count() > 1:  # the official .pt is written by one process from host copies
            tts = multihost_utils.process_allgather(tts, tiled=True)
        tc = vita.tts_config(config)
        extra = lambda tmp: tts_io.write(os.path.join(tmp, "vita_tts_ckpt"), tc, tts)  # noqa: E731
    orbax_io.save(path, config, model_params, write_extra=extra, overwrite=True)


def check_vocab(config, tok) -> None:
    """A tokenizer with more ids than the model's vocabulary is refused (those ids train to NaN)."""
    if tok is not None and len(tok) > int(config.llm.vocab_size):
        name = f"config.data.tokenizer = {config.data.tokenizer}" if config.data.tokenizer else \
            f"the tokenizer of config.init_from = {config.init_from}"
        raise ValueError(f"{name} has {len(tok)} tokens, more than config.llm.vocab_size = {config.llm.vocab_size} "
                         "(ids past the model's vocabulary train to NaN): "
                         "use the model's tokenizer or a larger vocab_size")


def lm_step_size(config, host: dict) -> Optional[tuple]:
    """``(rows, length, tiles, audio frames)`` of the global LM step for the FLOPs count (else None)."""
    if config.loss != "lm" or "kind" not in host:
        return None
    accum = int(config.grad_accum)
    b, L = np.shape(host["kind"])[-2:]
    copies = accum * jax.process_count()  # this process holds 1/copies of the step's rows
    return (b * copies, L, int(np.shape(host["pixels"])[-4]) * copies,
            sum(int(np.asarray(n).sum()) for n in jax.tree.leaves(host["audio_lens"])) * jax.process_count())


def lm_data(config, data, evals):
    """The LM stages' batches: the caller's, the official files of ``config.data`` (opened and checked
    before any model is built), or the tiny configs' synthetic set."""
    has_files, given = bool(len(config.data.mixture) or len(config.data.tfds)), data is not None
    if data is None and not has_files:
        data, units = synthetic.synthetic_data(config)
        if units is not None:  # the CTC head is sized by the unit vocabulary of the synthetic clips
            config.ctc_units = units
    tok_dir = config.data.tokenizer or config.init_from or None
    check_vocab(config, evals.tokenizer if evals else None)
    if data is None:
        tok = load_tokenizer(tok_dir) if tok_dir else None
        if tok is None:
            raise ValueError("config.data.mixture / config.data.tfds need a tokenizer: set config.data.tokenizer (or "
                             f"init_from){f'; {tok_dir} has no tokenizer.json' if tok_dir else ''}")
        data = pipeline.official_data(config, tok)
        check_vocab(config, tok)
    if given and not evals and config.data.tokenizer:  # the caller's batches were made with it
        check_vocab(config, load_tokenizer(config.data.tokenizer))
    return data


def lm_program(config, data, mesh, log, evals=None, ck=None, done: int = 0) -> StageProgram:
    """The program of an LM stage (``lm``, ``ctc``, ``tts``): its data, initial parameters (``init_from``
    or random, plus the stage's heads), the state and step of :func:`vita_jax.train.setup.build`."""
    data = lm_data(config, data, evals)
    if done:  # a checkpoint of another model or stage is refused before the model is built
        ck.check_same_run(done, config)
    ck_in = model_checkpoint.load(config.init_from) if config.init_from else None
    params = initial_params(config, ck_in)
    state, step_fn, info = setup.build(config, params, mesh=mesh)
    del params, ck_in
    log(f"processes: {jax.process_count()}, devices: {jax.device_count()} ({jax.local_device_count()} local), "
        f"mesh: {dict(mesh.shape) if mesh is not None else 'none'}")
    prog = StageProgram(state=state, step=step_fn, place=info["place"], data=data, table=info["table"],
                        params_of=lambda s: model_params_of(config, s),
                        export=lambda s, path: export_model(config, s, path), complete=orbax_io.is_complete,
                        step_size=lambda host: lm_step_size(config, host), shardings=info.get("shardings"))
    if lora.spec_of(config) is not None:
        prog.to_checkpoint, prog.from_checkpoint = adapter_checkpoints(config, state, mesh)
    return prog


def adapter_checkpoints(config, state, mesh):
    """``(to_checkpoint, from_checkpoint)`` of a LoRA run: a run checkpoint holds the adapters, their optimizer
    state and the step, plus the frozen base's fingerprint (the base itself is ``config.init_from``, read again
    on resume); resuming onto another base is a one-line error."""
    base = lora.fingerprint(state.frozen)
    if mesh is not None:
        base = jax.device_put(base, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def to_checkpoint(s):
        return dict(step=s.step, train=s.train, opt_state=s.opt_state, nonfinite=s.nonfinite, base=base)

    def from_checkpoint(saved, s):
        if not lora.same_base(saved["base"], base):
            raise ValueError(f"config.init_from = {config.init_from or '(none: a random base)'} is not the base "
                             "model the checkpoint's LoRA adapters were trained on: use that base, or another "
                             "--workdir")
        return s.replace(step=saved["step"], train=saved["train"], opt_state=saved["opt_state"],
                         nonfinite=saved["nonfinite"])
    return to_checkpoint, from_checkpoint
