"""Stage 2.1a of the VITA-1.5 curriculum (see vita_jax/train/stages.py). `get_config("tiny")` uses the
tiny model and trains on a small synthetic dataset when no data path is given."""
from vita_jax.train.stages import stage_config


def get_config(arg=None):
    return stage_config("2.1a", arg)
