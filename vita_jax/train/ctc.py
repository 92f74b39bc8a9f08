"""Stage 2.1(a): the whale encoder with a CTC head on speech-transcript pairs.

``python -m vita_jax.train.ctc`` overfits a tiny encoder on the bundled real CMU ARCTIC clips and
prints the loss curve and the greedy-decoding CER (the check that the CTC path learns).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vita_jax.data import audio as audio_lib
from vita_jax.data.units import UnitVocab, cer
from vita_jax.models import ctc, whale


class WhaleCTC(nn.Module):
    """Encoder (same Flax names as in the full model, so its params move over) + CTC head."""
    cfg: whale.WhaleConfig
    num_units: int

    @nn.compact
    def __call__(self, features, lengths):
        out, mask = whale.WhaleEncoder(self.cfg, name="encoder")(features, lengths)
        return ctc.CTCHead(self.num_units, name="ctc")(out), mask


def make_batch(waves: Sequence[np.ndarray], texts: Sequence[str], vocab: UnitVocab, frame_bucket: int = 64):
    feats, lengths = audio_lib.pad_batch([audio_lib.audio_features(w, 16000) for w in waves])
    t = -(-feats.shape[1] // frame_bucket) * frame_bucket
    feats = np.pad(feats, ((0, 0), (0, t - feats.shape[1]), (0, 0)))
    ids = [vocab.encode(s) for s in texts]
    labels = np.zeros((len(ids), max(len(i) for i in ids)), np.int32)
    label_mask = np.zeros_like(labels)
    for k, i in enumerate(ids):
        labels[k, :len(i)], label_mask[k, :len(i)] = i, 1
    return feats, lengths, labels, label_mask


def train_ctc(waves, texts, cfg: whale.WhaleConfig, steps: int = 300, lr: float = 2e-3, seed: int = 0,
              vocab: UnitVocab | None = None, log_every: int = 0) -> dict:
    """Trains encoder + head from scratch on ``waves``/``texts`` (CMVN statistics taken from the
    clips). Returns losses, the vocabulary, greedy hypotheses, CER and the parameters."""
    vocab = vocab or UnitVocab.train(texts)
    feats, lengths, labels, label_mask = make_batch(waves, texts, vocab)
    model = WhaleCTC(cfg, vocab.num_units)
    params = model.init(jax.random.PRNGKey(seed), feats[:1], lengths[:1])["params"]
    params = nn.unbox(params)
    real = np.concatenate([f[:n] for f, n in zip(feats, lengths)])
    params["encoder"]["cmvn_mean"] = jnp.asarray(real.mean(0))
    params["encoder"]["cmvn_istd"] = jnp.asarray(1.0 / np.maximum(real.std(0), 1e-5))
    # CMVN buffers are statistics, not trained (as in the official encoder)
    labels_tree = jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if any(getattr(k, "key", None) in ("cmvn_mean", "cmvn_istd") for k in p) else "train",
        params)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.05)
    opt = optax.multi_transform({"train": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0)),
                                 "frozen": optax.set_to_zero()}, labels_tree)
    state = opt.init(params)

    def loss_fn(p):
        logits, mask = model.apply({"params": p}, feats, lengths)
        per_seq = ctc.ctc_loss(logits, mask, labels, label_mask)
        return jnp.mean(per_seq / label_mask.sum(-1))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses, t0 = [], time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"step {i:4d}  ctc loss/unit {losses[-1]:.4f}", flush=True)
    logits, mask = jax.jit(model.apply)({"params": params}, feats, lengths)
    hyps = [vocab.decode(h) for h in ctc.greedy_decode(logits, np.asarray(mask).sum(-1))]
    return dict(losses=losses, vocab=vocab, hyps=hyps, refs=list(texts), cer=cer(texts, hyps), params=params,
                seconds=time.perf_counter() - t0)


def tiny_config(**kw) -> whale.WhaleConfig:
    base = dict(attention_dim=96, attention_heads=4, linear_units=192, num_blocks=3, llm_embed_dim=64)
    base.update(kw)
    return whale.WhaleConfig(**base)


def main(argv=None) -> int:
    from vita_jax import assets
    p = argparse.ArgumentParser(description="overfit a tiny whale encoder + CTC head on the bundled real clips")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    clips = assets.speech_clips()
    cfg = tiny_config()
    print(f"{len(clips)} real clips ({sum(len(w) for _, w, _ in clips) / 16000:.1f} s), encoder {dataclasses.asdict(cfg)['attention_dim']}-d "
          f"x {cfg.num_blocks} blocks")
    r = train_ctc([w for _, w, _ in clips], [t for _, _, t in clips], cfg, steps=a.steps, lr=a.lr, seed=a.seed,
                  log_every=max(1, a.steps // 10))
    for (name, _, _), h in zip(clips, r["hyps"]):
        print(f"{name:22s} {h}")
    print(f"units {r['vocab'].num_units} (blank included), CER {r['cer']:.3f}, "
          f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.4f}, {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
