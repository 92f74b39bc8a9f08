"""Reads official tensors one at a time into a (sharded) Flax parameter tree.

Every shape is checked from the headers before any data is read, so a bad checkpoint fails fast
with the offending key; then each Flax leaf is assembled from its tensor(s) (layers stacked on the
scan axis), cast, and placed straight into its sharded slots with ``jax.make_array_from_callback``.
The host holds at most one leaf at a time.
"""
from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
from flax import traverse_util

from vita_jax.convert.safetensors_io import CheckpointError
from vita_jax.models.keys import KeyRule


def _flat(tree) -> dict[tuple, object]:
    return traverse_util.flatten_dict(tree)


def kind(dtype) -> str:
    """``"float"`` (bf16 and float8 included), ``"integer"``, ``"boolean"`` or ``"complex"``: a weight may be
    cast within its kind (bf16 -> f32), never across (an integer tensor is no float weight)."""
    d = np.dtype(dtype)
    if d == np.bool_:
        return "boolean"
    if np.issubdtype(d, np.integer):
        return "integer"
    return "complex" if np.issubdtype(d, np.complexfloating) else "float"


def check_kind(got, want, where: str) -> None:
    """``CheckpointError`` naming ``where`` (file and key) when a stored dtype is of another kind than the model's."""
    if kind(got) != kind(want):
        raise CheckpointError(f"{where}: stored as {np.dtype(got).name} ({kind(got)}), the model's weight is "
                              f"{np.dtype(want).name} ({kind(want)}): not this model's checkpoint, or a corrupted one")


def check(rules: Iterable[KeyRule], reader, abstract) -> tuple[dict[tuple, KeyRule], list[str]]:
    """Verifies that every Flax leaf has a rule and every rule's tensors exist with the right
    shapes and dtypes of the same kind (float, integer, boolean: :func:`kind`). ``abstract`` is a tree
    of ``jax.ShapeDtypeStruct`` (or arrays). Returns
    ``(path -> rule, every official key the rules name)``."""
    flat = _flat(abstract)
    by_path: dict[tuple, KeyRule] = {}
    all_keys: list[str] = []
    for rule in rules:
        if rule.flax_path not in flat:
            raise CheckpointError(f"key table names Flax path {'/'.join(rule.flax_path)} "
                                  f"(for {rule.torch_key}) that the model does not have")
        leaf = flat[rule.flax_path]
        n = leaf.shape[0] if rule.stacked else 1
        want = rule.transform.torch_shape(tuple(leaf.shape[1:] if rule.stacked else leaf.shape))
        for key in rule.keys(n):
            all_keys.append(key)
            got = reader.shape(key)  # raises naming the key when missing
            if tuple(got) != tuple(want):
                raise CheckpointError(f"tensor {key!r} in {reader.source}: shape {tuple(got)}, the model "
                                      f"needs {tuple(want)} (Flax {'/'.join(rule.flax_path)})")
            check_kind(reader.dtype(key), leaf.dtype, f"tensor {key!r} in {reader.file(key)}")
        by_path[rule.flax_path] = rule
    missing = [p for p in flat if p not in by_path]
    if missing:
        raise CheckpointError("no checkpoint key maps to Flax parameter(s): "
                              + ", ".join("/".join(p) for p in missing))
    return by_path, all_keys


def _normalize(index, shape) -> tuple:
    index = tuple(index) if index is not None else ()
    index = index + (slice(None),) * (len(shape) - len(index))
    return tuple(ix if isinstance(ix, slice) else slice(ix, ix + 1) for ix in index)


def leaf_slice(rule: KeyRule, reader, shape, dtype, index=None) -> np.ndarray:
    """The part ``index`` (a tuple of slices over the Flax leaf, None = all) of one Flax leaf,
    read lazily: only the layers in the slice are read, one at a time, from the memory map."""
    index = _normalize(index, shape)
    if not rule.stacked:
        return np.array(rule.transform.to_flax(reader.get(rule.torch_key))[index], dtype=dtype)
    layers = range(*index[0].indices(shape[0]))
    inner = np.broadcast_to(np.empty((), np.uint8), shape[1:])[index[1:]].shape
    out = np.empty((len(layers),) + inner, dtype=dtype)
    for j, i in enumerate(layers):
        out[j] = rule.transform.to_flax(reader.get(rule.torch_key.format(i=i)))[index[1:]]
    return out


def load(rules: Iterable[KeyRule], reader, abstract, shardings=None):
    """Returns ``(params, keys_read)``: the tree of ``abstract`` filled from ``reader``, each leaf
    with the dtype of its abstract leaf, placed with the matching entry of ``shardings`` (a tree
    of ``jax.sharding.Sharding``; None = the default device). Each device's slot is assembled from
    just the tensors (and the slices of them) it holds, so host memory stays near one device shard
    (one leaf without a mesh)."""
    by_path, _ = check(rules, reader, abstract)
    flat_abs = _flat(abstract)
    flat_sh = _flat(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out, keys_read = {}, []
    for path, leaf in flat_abs.items():
        rule = by_path[path]
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        keys_read += rule.keys(shape[0] if rule.stacked else 1)
        out[path] = jax.make_array_from_callback(
            shape, flat_sh.get(path) or default,
            lambda idx, r=rule, s=shape, d=dtype: leaf_slice(r, reader, s, d, idx))
    return traverse_util.unflatten_dict(out), keys_read


def official_tensors(rules: Iterable[KeyRule], params):
    """The inverse of :func:`load`: yields ``(official key, numpy tensor in the PyTorch layout)``
    one at a time, gathering one Flax leaf to the host at a time."""
    flat = _flat(params)
    for rule in rules:
        leaf = np.asarray(jax.device_get(flat[rule.flax_path]))
        for i in (range(leaf.shape[0]) if rule.stacked else [None]):
            key = rule.torch_key.format(i=i) if rule.stacked else rule.torch_key
            yield key, np.array(rule.transform.to_torch(leaf[i] if rule.stacked else leaf), copy=True, order="C")
        del leaf
