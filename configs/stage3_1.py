"""Stage 3.1 of the VITA-1.5 curriculum: the TiCodec speech codec, trained as upstream TiCodec's
``train.py`` trains it (see vita_jax/train/codec_setup.py). `get_config("tiny")`: the tiny codec (tests,
the demo). Data: ``--config.data.train='["wavs/"]' --config.data.heldout='["dev/"]'`` (24 kHz wavs)."""
from vita_jax.train.codec_setup import stage_config


def get_config(arg=None):
    return stage_config(arg)
