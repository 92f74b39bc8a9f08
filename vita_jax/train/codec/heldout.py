"""Stage 3.1's held-out measure: the codec's mel L1 on clips it never trains on.

Each held-out clip's first ``heldout_seconds`` (cut to the shortest clip and to whole codec frames,
so one compiled shape serves every evaluation) goes through the encoder (BatchNorm in eval mode,
running statistics), the quantizer and the generator, as upstream's validation does; the metrics are
the mean |mel(y) − mel(ŷ)| at the config resolution (``fmax_for_loss``: upstream's ``mel_spec_error``)
and at (512, 120), (256, 60), (128, 30), and their mean (``mel_l1_multires``). Written to
``metrics.jsonl`` (``heldout/...``) and TensorBoard by the trainer's evaluation hook.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.models import ticodec as tt
from vita_jax.train.codec import data as codec_data
from vita_jax.train.codec import losses as L
from vita_jax.train.codec import step as cs

RESOLUTIONS = (512, 256, 128)


class Heldout:
    """The trainer's evaluation hook for stage 3.1 (``due`` / ``run`` as :class:`TrainingEvals`), also run
    before the first step (``at_start``: the untrained codec's value is step 0's line)."""
    at_start = True

    def __init__(self, M: cs.CodecModels, files: list, lengths: dict, config, log: Callable = print):
        self.M, self.files, self.log = M, list(files), log
        self.every = int(config.data.get("heldout_every", 0) or 0)
        self.y = None
        if self.files:
            hop, sr = M.cfg.codec.hop, M.cfg.sampling_rate
            n = min(min(lengths[f] for f in self.files), int(float(config.data.heldout_seconds) * sr)) // hop * hop
            if n < max(M.cfg.n_fft, 512):
                raise ValueError(f"config.data.heldout: clips of {n} samples are too short for the mels "
                                 f"(shortest clip or heldout_seconds: at least {max(M.cfg.n_fft, 512)} samples)")
            self.y = np.stack([codec_data.load_wav(f, sr)[:n] for f in self.files])
            self._fn = jax.jit(self._measure)

    def __bool__(self) -> bool:
        return self.y is not None

    def due(self, step: int, total: int) -> list:
        if self.y is None or not self.every:
            return []
        return ["heldout"] if step % self.every == 0 or step == total else []  # step 0 included

    def _measure(self, gp, gb, y):
        M, cfg = self.M, self.M.cfg
        c, g1, _ = M.encoder.apply({"params": gp["encoder"], "buffers": gb["encoder"]}, y[:, None])
        q, _, _, gq, tokens, _ = tt.quantize(gp["quantizer"], c, g1, cfg.codec, cfg.codebook_loss_lambda,
                                             cfg.commitment_loss_lambda)
        y_hat = M.generator.apply({"params": gp["generator"]}, q, gq)[:, 0]
        out = {"mel_l1": L.l1(cs.mels(cfg, y), cs.mels(cfg, y_hat))}
        for n in RESOLUTIONS:
            out[f"mel_l1_{n}"] = L.l1(cs.mels(cfg, y, n, n * 30 // 128), cs.mels(cfg, y_hat, n, n * 30 // 128))
        out["mel_l1_multires"] = sum(out.values()) / (1 + len(RESOLUTIONS))
        return out, tokens

    def measure(self, state) -> tuple:
        """``({metric: value}, global tokens [clips, G])`` of ``state``'s codec on the held-out clips."""
        met, tokens = self._fn(state["gp"], state["gb"], jnp.asarray(self.y))
        return {k: float(v) for k, v in jax.device_get(met).items()}, np.asarray(jax.device_get(tokens))

    def global_tokens(self, state) -> Optional[list]:
        """The first held-out clip's global tokens (the exported codec's fixed voice); None without clips."""
        return None if self.y is None else [int(t) for t in self.measure(state)[1][0]]

    def run(self, step: int, total: int, params_fn: Callable, metrics_file=None, tb=None) -> Optional[dict]:
        if not self.due(step, total):
            return None
        met, _ = self.measure(params_fn())
        if jax.process_index() == 0:
            if metrics_file is not None:
                metrics_file.write(json.dumps({"step": step, **{f"heldout/{k}": v for k, v in met.items()}}) + "\n")
                metrics_file.flush()
            if tb is not None:
                for k, v in met.items():
                    tb.add_scalar(f"heldout/{k}", v, step)
            self.log(f"step {step}: held-out mel L1 {met['mel_l1']:.4f} "
                     f"(multi-resolution {met['mel_l1_multires']:.4f})")
        return {"heldout": met}
