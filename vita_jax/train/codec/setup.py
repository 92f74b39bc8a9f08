"""Stage 3.1 in the trainer (its config: configs/stage3_1.py): the TiCodec codec's initial state, sharded step,
data and export.

:func:`program` gives the trainer the stage's :class:`~vita_jax.train.setup.StageProgram`:
the state (a dict: generator side ``gp`` / ``gb``, discriminators ``dp`` / ``db``, both Adam states,
the step count and a non-finite counter), the jitted step ``(state, batch) -> (state, metrics)``
with explicit in / out shardings, ``place`` for the host batches, and the stage's data; plus
``params_of`` and ``export`` (:mod:`vita_jax.train.codec.files`'s official formats) and the held-out
mel evaluator (:mod:`vita_jax.train.codec.heldout`).

Sharding: every state leaf's first dimension (conv output channels; ConvTranspose input channels)
is the logical axis ``codec_rows`` (-> ``fsdp``) and the rows of a batch are ``batch`` (-> ``data`` x
``fsdp``), the rules table of :mod:`vita_jax.parallel`: the default mesh (all devices on ``data``) is
upstream's data parallelism with replicated weights; an ``fsdp`` axis also shards the parameters and
optimiser moments by rows.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
from jax.sharding import NamedSharding

from vita_jax import parallel, paths
from vita_jax.models import ticodec as tt
from vita_jax.train.codec import data as codec_data
from vita_jax.train.codec import files as codec_files
from vita_jax.train.codec import heldout as codec_heldout
from vita_jax.train.codec import step as cs
from vita_jax.train.setup import StageProgram


def train_config(config) -> tt.CodecTrainConfig:
    h = dict(config.codec.to_dict())
    h["batch_size"] = int(config.batch_size)
    return tt.CodecTrainConfig.from_dict(h, "config.codec")


def list_wavs(entries, field: str, origin: Optional[dict] = None) -> list:
    """Wav paths of ``config.data.<field>`` (folders, ``.lst`` lists, ``.wav`` files), each checked;
    ``origin``: filled with ``{path: "LIST line N"}`` for the wavs a list names."""
    out = []
    for e in entries:
        e = str(e)
        if os.path.isdir(e):
            out += codec_data.wav_folder(e)
        elif e.lower().endswith(".wav"):
            out.append(e)
        elif os.path.isfile(e):
            for path, n in codec_data.file_list_lines(e):
                out.append(path)
                if origin is not None:
                    origin.setdefault(path, f"{e} line {n}")
        else:
            raise ValueError(f"config.data.{field}: {e} does not exist")
    return out


def check_wavs(files: list, sr: int, field: str, origin: Optional[dict] = None) -> dict:
    """``{path: samples}`` from the headers (one line naming a file that is missing, unreadable or not at ``sr``,
    and the list line that names it, from ``origin``)."""
    lens = {}
    for f in files:
        where = f"config.data.{field}: " + (f"{origin[f]}: " if origin and f in origin else "")
        try:
            info = sf.info(f)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{where}{f}: not a readable audio file ({str(e).splitlines()[0]})") from None
        if info.samplerate != sr:
            raise ValueError(f"{where}{f}: sample rate {info.samplerate}, the codec wants {sr}")
        if info.frames == 0:
            raise ValueError(f"{where}{f}: no samples")
        lens[f] = int(info.frames)
    return lens


def _row_spec(shape, mesh, first):
    names = (first,) + (None,) * (len(shape) - 1) if len(shape) else ()
    return NamedSharding(mesh, parallel.logical_to_spec(names, shape, mesh))


def state_shardings(state, mesh):
    return jax.tree.map(lambda x: _row_spec(np.shape(x), mesh, "codec_rows"), state)


def batch_shardings(batch, mesh):
    return {k: _row_spec(np.shape(v), mesh, "batch") for k, v in batch.items()}


def train_step(M: cs.CodecModels):
    """The trainer's step: upstream's step (:func:`step.make_step`) with the batch's learning rate,
    the update skipped on a non-finite loss (the trainer stops after ``max_nonfinite_steps`` in a row), and
    the metrics the trainer logs (``loss`` = the generator's total, ``tokens`` = real audio samples)."""
    inner = cs.make_step(M)

    def step(state, batch):
        core = {k: v for k, v in state.items() if k not in ("nonfinite", "epoch")}
        new, met = inner(core, {"y": batch["y"], "y_global": batch["y_global"]}, batch["lr"])
        finite = jnp.isfinite(met["gen_loss_total"]) & jnp.isfinite(met["disc_loss_total"])
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, core)
        nf = jnp.where(finite, 0, state["nonfinite"] + 1)
        met = dict(met, loss=met["gen_loss_total"], finite=finite, nonfinite=nf, lr=batch["lr"],
                   tokens=jnp.sum(batch["samples"]).astype(jnp.float32))
        # the epoch of the batch trained on (the input pipeline runs ahead): what g_ / do_ files record
        return dict(new, nonfinite=nf, epoch=batch["epoch"]), met
    return step


class Batches:
    """Host batches of the trainer: :class:`codec_data.CodecData`'s crops plus the epoch's learning rate
    (``lr0 · lr_decay ** epoch``, epochs counted from ``epoch0``: an official run's) and the real sample
    count of every row; ``get_state`` / ``set_state`` for exact resume."""

    def __init__(self, data: codec_data.CodecData, cfg: tt.CodecTrainConfig, epoch0: int = 0):
        self.data, self.cfg, self.epoch0 = data, cfg, int(epoch0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = next(self.data)
        b["lr"] = np.float32(codec_files.lr_at(self.cfg, self.epoch))
        b["epoch"] = np.int32(self.epoch)
        return b

    @property
    def epoch(self) -> int:
        """The epoch of the batch drawn last (the trainer's input pipeline draws ahead of the step)."""
        return self.epoch0 + self.data.epoch

    def get_state(self) -> dict:
        return self.data.get_state()

    def set_state(self, state: dict) -> None:
        self.data.set_state(state)


def _official_pair(folder: str):
    """The newest ``g_XXXXXXXX`` of ``folder`` and its ``do_`` (None when missing)."""
    gs = sorted(glob.glob(os.path.join(folder, "g_[0-9]*")))
    if not gs:
        final = os.path.join(folder, "final.pt")
        if os.path.isfile(final):
            return final, None
        raise ValueError(f"config.init_from = {folder}: no g_XXXXXXXX or final.pt (a TiCodec training or codec folder)")
    do = os.path.join(folder, "do_" + os.path.basename(gs[-1])[2:])
    return gs[-1], (do if os.path.isfile(do) else None)


def initial_state(config, M: cs.CodecModels, log):
    """``(state, epoch0)``: fresh weights, or ``config.init_from``'s (its model.json must describe the same codec)."""
    def fresh():  # jitted: eager init dispatches (and compiles) op by op, several times slower
        return jax.jit(lambda: cs.init_variables(M, int(config.seed)))()
    if not config.init_from:
        return cs.new_state(*fresh()), 0
    folder = str(config.init_from)
    mj = os.path.join(folder, "model.json")
    if not os.path.isfile(mj):
        raise ValueError(f"config.init_from = {folder}: no model.json")
    theirs = tt.CodecTrainConfig.from_model_json(mj)
    if theirs.codec != M.cfg.codec:
        diff = [k for k, v in M.cfg.codec.to_model_json().items() if theirs.codec.to_model_json().get(k) != v
                and k != "global_tokens"]
        if diff:
            raise ValueError(f"config.init_from = {folder}: model.json's {', '.join(diff)} differ from config.codec's")
    g_path, do_path = _official_pair(folder)
    _, state, info = codec_files.load_official(mj, g_path, do_path)
    if do_path is None:  # a codec folder or a lone g_ file: fresh discriminators and optimisers
        _, _, dp, db = fresh()
        state = cs.new_state(state["gp"], state["gb"], dp, db)
        log(f"generator side from {g_path}; fresh discriminators")
        return state, 0
    log(f"resuming upstream's run from {g_path} / {do_path} (update {info['steps']}, epoch {info['epoch']})")
    return state, max(0, info["epoch"])


def program(config, mesh, log) -> StageProgram:
    """Stage 3.1's :class:`~vita_jax.train.setup.StageProgram`: its state, step, data, held-out mel
    evaluator and export (upstream's ``g_`` / ``do_`` files and ``vita_tts_ckpt/codec``)."""
    cfg = train_config(config)
    M = cs.CodecModels.build(cfg)
    origin: dict = {}  # wav -> the .lst line that names it (for errors)
    train_files = list_wavs(config.data.train, "train", origin)
    if not train_files:
        raise ValueError("config.data.train: no wav files (give wav folders, .lst file lists or .wav files)")
    lens = check_wavs(train_files, cfg.sampling_rate, "train", origin)
    held = list_wavs(config.data.heldout, "heldout", origin)
    held_lens = check_wavs(held, cfg.sampling_rate, "heldout", origin)
    data = codec_data.CodecData(train_files, cfg.segment_size, cfg.batch_size, cfg.sampling_rate, lengths=lens)
    heldout = codec_heldout.Heldout(M, held, held_lens, config, log)  # checked before the model is built
    state, epoch0 = initial_state(config, M, log)
    state = dict(state, nonfinite=jnp.zeros((), jnp.int32), epoch=jnp.asarray(epoch0, jnp.int32))
    step = train_step(M)
    n_proc, pid = jax.process_count(), jax.process_index()
    if cfg.batch_size % n_proc:
        raise ValueError(f"config.batch_size = {cfg.batch_size}: not divisible by the {n_proc} processes")
    rows = cfg.batch_size // n_proc
    count = lambda t: sum(int(np.size(x)) for x in jax.tree.leaves(t))  # noqa: E731
    table = (f"generator side {count(state['gp']):,} parameters (generator, encoder, quantizer); "
             f"discriminators {count(state['dp']):,} (MPD, MSD, MS-STFT)")
    shard = None
    if mesh is None:
        place = lambda b: jax.tree.map(jnp.asarray, b)  # noqa: E731
        step_fn = jax.jit(step, donate_argnums=0)
    else:
        shard = state_shardings(state, mesh)
        state = jax.device_put(state, shard)

        def place(b):  # every process draws the whole batch (upstream's order); each places its rows
            sh = batch_shardings(b, mesh)
            return {k: jax.make_array_from_process_local_data(sh[k], np.asarray(v)[pid * rows:(pid + 1) * rows]
                                                              if np.ndim(v) else np.asarray(v), np.shape(v))
                    for k, v in b.items()}
        jitted = {}

        def step_fn(s, b):
            if "f" not in jitted:
                jitted["f"] = jax.jit(step, in_shardings=(shard, {k: v.sharding for k, v in b.items()}),
                                      out_shardings=(shard, None), donate_argnums=0)
            with parallel.use_mesh(mesh):
                return jitted["f"](s, b)

    def export(s, folder: str) -> None:
        codec_files.export_run(folder, M, s, int(s["epoch"]), heldout)
    return StageProgram(state=state, step=step_fn, place=place, data=Batches(data, cfg, epoch0), table=table,
                        params_of=lambda s: s, export=export, evals=heldout, shardings=shard,
                        complete=lambda folder: paths.is_local(folder) and codec_files.export_complete(folder))
