"""Helpers shared by the models: config dataclasses from ConfigDicts, rematerialisation policies."""
from __future__ import annotations

import dataclasses

import jax
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


_REMAT = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": lambda: jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj"),
}


def remat_policy(name: str):
    """A ``jax.checkpoint`` policy by name (config field ``remat_policy``)."""
    if name not in _REMAT:
        raise ValueError(f"remat_policy {name!r}: choose none or one of {sorted(_REMAT)}")
    return _REMAT[name]()
