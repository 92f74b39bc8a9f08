"""The training loop: initial parameters, data, the jitted step, metrics, checkpoints and resume.

Every logged step is appended to ``WORKDIR/metrics.jsonl``; checkpoints live in ``WORKDIR/ckpt``.
Re-running on the same work dir resumes from the newest complete checkpoint (state, data-iterator
position) and drops metric lines past it, so an interrupted run continues exactly where it was.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.train import checkpoint as ckpt_lib
from vita_jax.train import setup


def initial_params(config):
    """``config.init_from`` (a release directory or vita_jax checkpoint, parameters only) or a random
    model; plus the stage's extra heads (CTC head, speech decoder) when it needs them."""
    import flax.linen as nn
    import vita_jax
    from vita_jax import config as config_lib
    if config.init_from:
        m = vita_jax.from_pretrained(config.init_from)
        params = dict(m.params)
        if config.loss == "tts" and m.speech is not None:
            params["tts_decoder"] = m.speech.decoder_params
    else:
        params = dict(vita_jax.init_model(config, seed=int(config.seed)).params)
    if config.loss == "ctc" and "ctc" not in params:
        from vita_jax.train.ctc import WhaleCTC
        f = jnp.zeros((1, 64, config.audio.input_dim))
        params["ctc"] = nn.unbox(WhaleCTC(config_lib.audio_config(config), int(config.ctc_units)).init(
            jax.random.PRNGKey(config.seed), f, jnp.array([64]))["params"]["ctc"])
    if config.loss == "tts" and "tts_decoder" not in params:
        from vita_jax.models.tts_decoder import TTSDecoder
        from vita_jax.train.step import tts_config
        tc = tts_config(config)
        params["tts_decoder"] = nn.unbox(TTSDecoder(tc).init(
            jax.random.PRNGKey(config.seed + 1), jnp.zeros((1, 4, tc.idim)), jnp.array([4]),
            jnp.zeros((1, 2), jnp.int32), jnp.array([2]))["params"])
    return params


def layout(config) -> dict:
    """How the global batch splits: ``config.batch_size`` examples per step = ``grad_accum``
    micro-batches, each spread over the processes; ``local`` = examples per process per
    micro-batch, ``index`` / ``count`` = this process and the number of processes."""
    b, accum, n = int(config.batch_size), int(config.grad_accum), jax.process_count()
    if b % (accum * n):
        raise ValueError(f"batch_size {b} must be divisible by grad_accum {accum} x processes {n}")
    return dict(local=b // accum // n, index=jax.process_index(), count=n, accum=accum)


def _lm_collator(config, lay):
    from vita_jax import config as config_lib
    from vita_jax.data import audio as audio_lib
    from vita_jax.data import pipeline
    d = config.data
    vc = config_lib.vision_config(config)
    tpt = (vc.image_size // vc.patch_size // 2) ** 2
    tiles, clips = d.max_tiles_per_sample * lay["local"], d.max_clips_per_sample * lay["local"]
    return pipeline.LMCollator(tpt, d.seq_len, tiles, clips, d.max_frames, vc.image_size, audio_lib.llm_length,
                               tile_offset=lay["index"] * tiles, clip_offset=lay["index"] * clips)


def official_transform(config, tokenizer):
    """The host preprocessing of one official sample (tiles, frames, fbank, ids, labels)."""
    from vita_jax.data import image as image_lib
    from vita_jax.data import sources
    d, im = config.data, config.image
    proc = image_lib.ImageProcessorConfig(size=im.size, crop_size=im.crop_size, mean=tuple(im.mean), std=tuple(im.std))
    return sources.OfficialExamples(tokenizer, proc, max_tiles=int(d.max_tiles_per_sample),
                                    video_fps=float(im.video_fps), dither=float(config.audio.dither))


def official_data(config, tokenizer):
    """``config.data.mixture`` (official JSON files) and ``config.data.tfds`` (array_record datasets
    written by :func:`~vita_jax.data.tfds_source.write_tfds`) -> a checkpointable iterator of this
    process's micro-batches."""
    from vita_jax.data import pipeline, sources
    d = config.data
    lay = layout(config)
    transform = official_transform(config, tokenizer)
    col = _lm_collator(config, lay)
    files = [dict(m) for m in d.mixture]
    tfds = [dict(t) for t in d.tfds]
    it = pipeline.make_iterator(sources.mixture(files, int(d.shuffle_seed), tfds=tfds), lay["local"], col,
                                transform=transform, shard=(lay["index"], lay["count"]))
    it.collator = col
    return it


def synthetic_data(config):
    """The tiny configs' on-the-fly dataset for the stage's loss -> a checkpointable iterator of this
    process's micro-batches."""
    from vita_jax import config as config_lib
    from vita_jax.data import pipeline
    d = config.data
    lay = layout(config)
    if config.loss == "lm":
        vc = config_lib.vision_config(config)
        src = pipeline.SyntheticLM(size=d.synthetic_size, image_size=vc.image_size, frames=min(120, d.max_frames),
                                   vocab=config.llm.vocab_size, seed=int(d.shuffle_seed))
        return pipeline.make_iterator(src, lay["local"], _lm_collator(config, lay), seed=int(d.shuffle_seed),
                                      shard=(lay["index"], lay["count"]))
    if config.loss == "ctc":
        return _ctc_data(config)
    if config.loss == "tts":
        return _tts_data(config)
    raise ValueError(f"no synthetic data for loss {config.loss!r}")


class IndexedBatches:
    """A checkpointable iterator over ``make(i)`` for i = 0, 1, ... (state: the next index).
    ``make`` builds the global micro-batch; this process keeps its rows (``rows = (index, count)``)."""

    def __init__(self, make, rows=(0, 1)):
        self.make, self.i, self.rows = make, 0, rows

    def __iter__(self):
        return self

    def __next__(self):
        b = self.make(self.i)
        self.i += 1
        index, count = self.rows
        if count > 1:
            n = len(next(iter(b.values()))) // count
            b = {k: v[index * n:(index + 1) * n] for k, v in b.items()}
        return b

    def get_state(self):
        return {"next_index": self.i}

    def set_state(self, state):
        self.i = int(state["next_index"])


def _ctc_data(config):
    """Stage 2.1a on the bundled real CMU ARCTIC clips (the unit vocabulary trained from their
    transcripts sets ``config.ctc_units``); batches of ``batch_size`` clips in a seeded order."""
    from vita_jax import assets
    from vita_jax.data.units import UnitVocab
    from vita_jax.train.ctc import make_batch
    clips = assets.speech_clips()
    vocab = UnitVocab.train([t for *_, t in clips])
    config.ctc_units = vocab.num_units
    lay = layout(config)
    bs = int(config.batch_size) // lay["accum"]

    def make(i):
        order = np.random.default_rng((int(config.data.shuffle_seed), i)).permutation(len(clips))[:bs]
        f, n, lab, lm = make_batch([clips[k][1] for k in order], [clips[k][2] for k in order], vocab, frame_bucket=512)
        width = max(len(vocab.encode(t)) for *_, t in clips)  # fixed shapes: one compilation
        pad = ((0, 0), (0, width - lab.shape[1]))
        return dict(feats=f, lengths=n, labels=np.pad(lab, pad), label_mask=np.pad(lm, pad))
    return IndexedBatches(make, (lay["index"], lay["count"]))


def _tts_data(config):
    """Stage 3.2, tiny: random text ids whose codes are a fixed function of the text (2 codes per
    token), so the decoder can learn the mapping."""
    from vita_jax.train.step import tts_config
    tc = tts_config(config)
    lay = layout(config)
    bs, n_text = int(config.batch_size) // lay["accum"], 6

    def make(i):
        rng = np.random.default_rng((int(config.data.shuffle_seed), i))
        lens = rng.integers(3, n_text + 1, bs)
        ids = rng.integers(30, min(500, config.llm.vocab_size), (bs, n_text))
        codes = np.full((bs, 2 * n_text), -1, np.int64)
        for b in range(bs):
            c = np.stack([(ids[b, :lens[b]] * 7) % tc.odim, (ids[b, :lens[b]] * 13 + 5) % tc.odim], 1).reshape(-1)
            codes[b, :len(c)] = c
        return dict(text_ids=ids.astype(np.int32), text_lens=lens.astype(np.int32), codes=codes.astype(np.int32),
                    code_lens=(2 * lens).astype(np.int32))
    return IndexedBatches(make, (lay["index"], lay["count"]))


def export_model(config, state, path: str) -> None:
    """The stage's final parameters as a vita_jax checkpoint (the model parts; a trained speech
    decoder also goes to ``path/vita_tts_ckpt`` in the official format)."""
    import vita_jax
    from vita_jax.convert import release
    from vita_jax.train import stages
    params = stages.merge(state.train, state.frozen)
    parts = release.build_parts(config)
    pdt = jnp.dtype(config.param_dtype)
    model_params = {k: jax.tree.map(lambda x: x.astype(pdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params[k])
                    for k in parts if k in params}
    m = vita_jax.VitaModel(config, model_params)
    m.save_pretrained(path, format="orbax", overwrite=True)
    if "tts_decoder" in params:
        from vita_jax.infer.speech import SpeechModel
        from vita_jax.train.step import tts_config
        tts = params["tts_decoder"]
        if jax.process_count() > 1:  # the official .pt is written by one process from host copies
            from jax.experimental import multihost_utils
            tts = multihost_utils.process_allgather(tts, tiled=True)
        if jax.process_index() == 0:
            SpeechModel(tts_config(config), tts).save(os.path.join(path, "vita_tts_ckpt"))


def next_batch(data, accum: int) -> dict:
    """One step's host batch: ``accum`` micro-batches stacked on a leading axis (none when 1)."""
    if accum == 1:
        return next(data)
    mbs = [next(data) for _ in range(accum)]
    return {k: np.stack([np.asarray(mb[k]) for mb in mbs]) for k in mbs[0]}


def _tensorboard(workdir: str):
    """A TensorBoard writer on process 0 (None elsewhere or without tensorboardX)."""
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(workdir, "tb"))


def _peak_flops():
    from vita_jax.bench import device_peaks
    return device_peaks(jax.devices()[0].device_kind)[0]


def _trim_metrics(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def train(config, workdir: str, mesh=None, data=None, log: Callable = print, progress: bool = True,
          stop_after: Optional[int] = None) -> dict:
    """Runs (or resumes) ``config``'s stage in ``workdir``. ``data``: an iterator of host batches
    with ``get_state``/``set_state`` (default: the synthetic set of the tiny configs)."""
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0  # one process writes the metrics and logs, draws the bar
    if not main:
        log, progress = (lambda *a, **k: None), False
    has_files = bool(len(config.data.mixture) or len(config.data.tfds))
    if data is None and not has_files:
        data = synthetic_data(config)  # first: the CTC stage sizes its head from the unit vocabulary
    params = initial_params(config)
    state, step_fn, info = setup.build(config, params, mesh=mesh)
    del params
    log(f"stage {config.stage}: {config.description}\n{info['table']}")
    log(f"processes: {jax.process_count()}, devices: {jax.device_count()} ({jax.local_device_count()} local), "
        f"mesh: {dict(mesh.shape) if mesh is not None else 'none'}")
    if data is None and has_files:
        from vita_jax.data.text import load_tokenizer
        tok_dir = config.data.tokenizer or config.init_from
        tok = load_tokenizer(tok_dir) if tok_dir else None
        if tok is None:
            raise ValueError("config.data.mixture / config.data.tfds need a tokenizer: set config.data.tokenizer (or init_from)")
        data = official_data(config, tok)
    data = data if data is not None else synthetic_data(config)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"), keep=int(config.keep_checkpoints),
                               every=int(config.checkpoint_every))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    start = ck.latest_step() or 0
    if start:
        state, data_state = ck.restore(start, state)
        data.set_state(data_state)
        log(f"resumed from step {start}")
    if main:
        _trim_metrics(metrics_path, start)
    else:
        metrics_path = os.devnull
    total = int(config.total_steps)
    accum = int(config.grad_accum)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc=f"stage {config.stage}", leave=False)
    last, t0 = {}, time.perf_counter()
    tb = _tensorboard(workdir)
    peak = _peak_flops()
    with open(metrics_path, "a") as mf:
        for i in range(start, total):
            batch = next_batch(data, accum)
            if mesh is None:
                batch = jax.tree.map(jnp.asarray, batch)
            t_step = time.perf_counter()
            state, met = step_fn(state, batch)
            met = {k: float(v) for k, v in jax.device_get(met).items()}
            dt = time.perf_counter() - t_step
            met["step"] = i + 1
            met["seconds"] = time.perf_counter() - t0
            met["tokens_per_s"] = met["tokens"] / dt
            if config.loss == "lm" and "kind" in batch:
                from vita_jax.train.flops import step_flops
                b, L = np.shape(batch["kind"])[-2:]
                copies = accum * jax.process_count()  # this process holds 1/copies of the step's rows
                fl = step_flops(config, b * copies, L, tiles=int(np.shape(batch["pixels"])[-4]) * copies,
                                audio_frames=int(np.asarray(batch["audio_lens"]).sum()) * jax.process_count())
                met["tflops_per_s"] = fl / dt / 1e12
                if peak:
                    met["mfu"] = fl / dt / (peak * jax.device_count())
            if tb is not None:
                for k, v in met.items():
                    if k not in ("step", "finite"):
                        tb.add_scalar(f"train/{k}", v, i + 1)
            mf.write(json.dumps(met) + "\n")
            mf.flush()
            last = met
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{met['loss']:.4f}")
            if met["finite"] and not met["tokens"]:
                log(f"step {i + 1}: no target tokens in the batch (every sample skipped), update skipped")
            if not met["finite"]:
                log(f"step {i + 1}: non-finite loss or gradient, update skipped")
                if int(state.nonfinite) >= int(config.max_nonfinite_steps):
                    ck.close()
                    raise FloatingPointError(f"{int(state.nonfinite)} non-finite steps in a row; stopping")
            ck.save(i + 1, state, data.get_state(), config, force=(i + 1 == total))
            if stop_after is not None and i + 1 >= stop_after:
                break
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    ck.close()
    if last.get("step") == total:
        export_model(config, state, os.path.join(workdir, "model"))
        log(f"final parameters written to {os.path.join(workdir, 'model')} (use it as the next stage's init_from)")
    skipped = dict(getattr(getattr(data, "collator", None), "skipped", {}) or {})
    if skipped:
        log(f"skipped {len(skipped)} bad sample(s): " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    return dict(last=last, state=state, steps=last.get("step", start), skipped=skipped)
