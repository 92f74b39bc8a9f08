"""The codec the demo speaks with when no ``--codec`` is given: the fixtures' tiny official-layout
TiCodec when ``../shared`` is beside the checkout, else one of the same small shape with random weights."""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from vita_jax.convert import tts
from vita_jax.models import ticodec


def default_codec() -> str | None:
    """The tiny official-layout codec of ../shared/fixtures beside the working folder or the checkout, if there."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.join(here, "..", "..")):
        p = os.path.normpath(os.path.join(root, "..", "shared", "fixtures", "vita15-tiny", "vita_tts_ckpt", "codec"))
        if os.path.exists(os.path.join(p, "final.pt")):
            return p
    return None


def load_option(folder: str):
    """``--codec DIR``'s codec ``(config, raw, params)``, read before the demo starts: a missing or incomplete
    folder is one line naming the option and what it lacks (a damaged file: the reader's line naming it)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--codec {folder}: {'not a folder' if os.path.exists(folder) else 'does not exist'} "
                                "(give 'trained' or a codec folder: model.json + final.pt)")
    missing = [f for f in ("model.json", "final.pt") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"--codec {folder}: no {' or '.join(missing)} in it (a codec folder: model.json + "
                                "final.pt, as vita_tts_ckpt/codec)")
    return tts.load_codec(folder)


def random_codec(seed: int = 0):
    """A TiCodec of a small shape with random weights: ``(config, None, params)``."""
    cfg = ticodec.TiCodecConfig(upsample_initial_channel=64, n_codes=64)
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    gen = nn.unbox(ticodec.Generator(cfg, folded=True).init(k[0], jnp.zeros((1, cfg.code_dim, 4)),
                                                              jnp.zeros((1, 128))))
    enc = nn.unbox(ticodec.Encoder(cfg, folded=True).init(k[1], jnp.zeros((1, 1, cfg.hop * 4))))
    d = cfg.global_feature_conv[2] // cfg.global_code_num
    params = {"generator": gen, "encoder": enc, "codebook": jax.random.normal(k[2], (cfg.n_codes, cfg.code_dim)),
              "globaltokens": [jax.random.normal(jax.random.fold_in(k[3], j), (1024, d))
                               for j in range(cfg.global_code_num)]}
    return cfg, None, params
