"""Helpers shared by the model config dataclasses."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def config_from_mapping(cls, mapping, **overrides):
    """``cls(**fields)`` from a ConfigDict / dict (unknown keys ignored, dtype names resolved)."""
    names = {f.name for f in dataclasses.fields(cls)}
    vals = {k: v for k, v in dict(mapping).items() if k in names}
    vals.update(overrides)
    for k in ("dtype", "param_dtype"):
        if isinstance(vals.get(k), str):
            vals[k] = jnp.dtype(vals[k])
    return cls(**vals)
