"""vita_jax checkpoints of a model (orbax): ``params/`` (sharded arrays, restored straight into the
shardings of any mesh), ``vita_jax.json`` (the config and the source dtypes), tokenizer files and an
optional ``vita_tts_ckpt/``. Written into a temporary sibling folder and committed atomically.

The target may be a URL (``gs://bucket/run/model``, through :mod:`vita_jax.paths`). Object stores
cannot rename a folder atomically, so there the files are written in place and ``vita_jax.json``,
the mark of a checkpoint, goes last: a half-written export is never taken for one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vita_jax import parallel, paths
from vita_jax.convert import loader, release, target
from vita_jax.convert.safetensors_io import CheckpointError
from vita_jax.convert.target import ORBAX_META
from vita_jax.models import vita


def is_orbax_checkpoint(path: str) -> bool:
    return paths.exists(paths.join(path, ORBAX_META))


def is_complete(path: str) -> bool:
    """A finished export: the mark (written last) and the parameters."""
    return is_orbax_checkpoint(path) and paths.isdir(paths.join(path, "params"))


def save(dst: str, config, params: dict, source_dtypes: Optional[dict] = None, tokenizer_dirs: Sequence = (),
         write_extra=None, overwrite: bool = False, meta_extra: Optional[dict] = None) -> None:
    """``dst/params`` (orbax, sharded arrays written in parallel by every process), ``dst/vita_jax.json``
    (config and source dtypes), the tokenizer files of the first of ``tokenizer_dirs`` that has
    them, and whatever ``write_extra(folder)`` adds into a local folder (``vita_tts_ckpt``; process 0 only)."""
    multi = jax.process_count() > 1
    remote = not paths.is_local(dst)
    if multi or remote:  # one shared folder: every process writes its shards; process 0 does the rest
        tmp = dst if remote else os.path.abspath(dst) + ".partial"
        if jax.process_index() == 0:
            target.clean_leftovers(dst)
            target.check_overwrite(dst, overwrite)
            if remote:
                paths.rmtree(paths.join(dst, ORBAX_META))  # unmarked first: never a mix of old and new
            paths.rmtree(tmp)
            paths.makedirs(tmp)
        if multi:
            multihost_utils.sync_global_devices("vita_jax.save_orbax:prepared")
    else:
        tmp = target.prepare_target(dst, overwrite)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(paths.for_orbax(paths.join(tmp, "params")), params)
        ckptr.wait_until_finished()
        if multi and jax.process_index() != 0:
            multihost_utils.sync_global_devices("vita_jax.save_orbax:committed")
            return
        meta = {"format": "vita_jax", "version": 1, "config": json.loads(config.to_json()),
                "source_dtypes": {k: np.dtype(v).name for k, v in (source_dtypes or {}).items()}, **(meta_extra or {})}
        local = tempfile.mkdtemp(prefix="vita_jax-export-") if remote else tmp
        try:
            release.copy_tokenizer(local, *tokenizer_dirs)
            if write_extra is not None:
                write_extra(local)
            if remote:
                paths.upload_tree(local, tmp)
        finally:
            if remote:
                shutil.rmtree(local, ignore_errors=True)
        with paths.open(paths.join(tmp, ORBAX_META), "w") as f:  # last: the mark of a complete checkpoint
            json.dump(meta, f, indent=1)
        if not remote:
            target.commit(tmp, dst)
        if multi:
            multihost_utils.sync_global_devices("vita_jax.save_orbax:committed")
    except BaseException:
        paths.rmtree(tmp)
        raise


def load(path: str, dtype=None, mesh=None):
    """Returns ``(config, params, source_dtypes)`` of a checkpoint written by :func:`save`,
    restored straight into the shardings of ``mesh`` (or the default device)."""
    meta_path = paths.join(path, ORBAX_META)
    try:
        with paths.open(meta_path) as f:
            meta = json.load(f)
        config = ml_collections.ConfigDict(meta["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not {"config": {...}, ...}
        raise CheckpointError(f"{meta_path}: not a vita_jax checkpoint description ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged") from e
    if dtype is not None:
        config.dtype = config.param_dtype = np.dtype(dtype).name
    try:
        parts = vita.parts(config)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a config without the model's fields
        raise CheckpointError(f"{meta_path}: its config does not describe a model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged") from e
    target = {}
    for name, (module, example, _) in parts.items():
        boxed = vita.abstract_part(module, example)
        if mesh is not None:
            sh = nn.unbox(parallel.param_shardings(boxed, mesh))
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            sh = jax.tree.map(lambda _: dev, nn.unbox(boxed))
        target[name] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    nn.unbox(boxed), sh)
    ckptr = ocp.StandardCheckpointer()
    where = paths.for_orbax(paths.join(path, "params"))
    try:
        stored = ckptr.metadata(where).item_metadata
    except Exception as e:
        raise CheckpointError(f"{path}/params: cannot read the orbax checkpoint: {e}") from e
    _check_dtypes(path, stored, target)
    try:
        params = ckptr.restore(where, target)
    except Exception as e:
        raise CheckpointError(f"{path}/params: cannot restore the orbax checkpoint: {e}") from e
    dtypes = {k: np.dtype(ml_dtypes.bfloat16) if v == "bfloat16" else np.dtype(v)
              for k, v in meta.get("source_dtypes", {}).items()}
    return config, params, dtypes


def _check_dtypes(path: str, stored, target) -> None:
    """Each stored array's dtype against the model's (cast within float, never from integer/boolean)."""
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for k, want in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = jax.tree_util.keystr(k, simple=True, separator="/")
        got = getattr(flat.get(name), "dtype", None)
        if got is not None:
            loader.check_kind(got, want.dtype, f"{path}/params: array {name}")
