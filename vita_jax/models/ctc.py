"""CTC head for stage 2.1(a) (speech encoder trained on speech-transcript pairs).

The official release has no CTC head or vocabulary; this one is a Linear from the encoder width to
the unit vocabulary plus a blank (id 0), as ESPnet/WeNet's ``ctc_lo``. Loss: ``optax.ctc_loss``;
decoding: greedy (best path, repeats merged, blanks removed)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from vita_jax.models import whale

BLANK = 0


class CTCHead(nn.Module):
    """``[B, T', d]`` encoder output -> ``[B, T', num_units]`` logits (unit 0 = blank)."""
    num_units: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_units, name="ctc_lo",
                        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(x)


class WhaleCTC(nn.Module):
    """Encoder (same Flax names as in the full model, so its params move over) + CTC head:
    ``[B, T, 80]`` fbank, ``[B]`` lengths -> ``(logits [B, T', num_units], mask [B, T'])``."""
    cfg: whale.WhaleConfig
    num_units: int

    @nn.compact
    def __call__(self, features, lengths):
        out, mask = whale.WhaleEncoder(self.cfg, name="encoder")(features, lengths)
        return CTCHead(self.num_units, name="ctc")(out), mask


def ctc_loss(logits, logit_mask, labels, label_mask):
    """Per-sequence CTC negative log-likelihood ``[B]`` (float32). Masks are 1 on real positions."""
    return optax.ctc_loss(logits.astype(jnp.float32), 1.0 - logit_mask.astype(jnp.float32), labels,
                          1.0 - label_mask.astype(jnp.float32), blank_id=BLANK)


def greedy_decode(logits, lengths) -> list[list[int]]:
    """Best path per row: argmax, merge repeats, drop blanks (host side)."""
    best = np.asarray(jnp.argmax(logits, axis=-1))
    out = []
    for row, n in zip(best, np.asarray(lengths)):
        seq, prev = [], None
        for t in row[:int(n)]:
            if t != prev and t != BLANK:
                seq.append(int(t))
            prev = t
        out.append(seq)
    return out
