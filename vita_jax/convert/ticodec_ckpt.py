"""TiCodec's official *training* checkpoints, both directions, bitwise for every tensor and Adam moment.

* ``g_XXXXXXXX``: ``{'generator', 'encoder', 'quantizer'}`` state dicts (also the layout of VITA's
  ``codec/final.pt``).
* ``do_XXXXXXXX``: ``{'mpd', 'msd', 'mstftd', 'optim_g', 'optim_d', 'steps', 'epoch'}``; the Adam
  parameter order is ``generator, encoder, quantizer`` / ``msd, mpd, mstftd`` (state-dict order inside
  each module), state only for parameters that received a gradient (never ``encoder.linear.0``).

The key table is structural: a leaf's official key is its Flax path joined by ``.``
(:mod:`vita_jax.models.ticodec`); ``params`` and ``buffers`` of a module together make its
state dict, written in PyTorch's state-dict order (:func:`torch_order`).
"""
from __future__ import annotations

import collections
import os
from typing import Optional

import numpy as np
from flax import traverse_util

from vita_jax.convert.torch_io import _to_numpy, torch_load

G_PARTS = ("generator", "encoder", "quantizer")
D_PARTS = ("mpd", "msd", "mstftd")
D_OPT_ORDER = ("msd", "mpd", "mstftd")   # train.py chains msd, mpd, mstftd into optim_d
UNUSED = ("encoder", "linear.0.")        # defined but never in forward: no gradient, no Adam state

# PyTorch state-dict order: a module's own parameters, then its buffers, then its children in
# registration order (upstream's __init__ order; one list serves all modules of the three files)
_CHILD_RANK = {n: i for i, n in enumerate(
    ("spec_transform", "conv_pre", "normalize", "ups", "resblocks", "convs1", "convs2", "convs", "conv", "conv_post",
     "linear", "GlobalTokenEncoder", "fn", "discriminators", "quantizer_modules", "quantizer_modules_globaltokens",
     "embedding"))}
_LEAF_RANK = {n: i for i, n in enumerate(("weight", "bias", "weight_orig", "weight_g", "weight_v", "window",
                                          "running_mean", "running_var", "num_batches_tracked"))}


def _sort_key(key: str, sn_modules: set):
    parts = key.split(".")
    out = []
    for i, p in enumerate(parts):
        if i == len(parts) - 1:
            mod = ".".join(parts[:-1])
            if mod in sn_modules:  # spectral norm: bias, weight_orig (parameters), weight_u, weight_v (buffers)
                rank = {"bias": 0, "weight_orig": 1, "weight_u": 2, "weight_v": 3}[p]
            else:
                rank = _LEAF_RANK.get(p, 50)
            out.append((0, rank, 0))
        elif p.isdigit():
            out.append((1, int(p), 0))
        else:
            out.append((1, _CHILD_RANK.get(p, 99), 0))
    return out


def torch_order(keys) -> list:
    """Official keys of one module in PyTorch's ``state_dict()`` order."""
    keys = list(keys)
    sn = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_orig")}
    return sorted(keys, key=lambda k: _sort_key(k, sn))


def flat(tree: dict) -> dict:
    """Nested Flax dict -> ``{official key: leaf}``."""
    return {".".join(p): v for p, v in traverse_util.flatten_dict(tree).items()}


def unflat(sd: dict, template: dict, where: str) -> dict:
    """``{official key: array}`` -> the nested layout of ``template`` (shapes checked, dtypes kept)."""
    out = {}
    for path, t in traverse_util.flatten_dict(template).items():
        key = ".".join(path)
        if key not in sd:
            raise ValueError(f"{where}: tensor {key!r} is missing")
        v = np.asarray(sd[key])
        if tuple(v.shape) != tuple(np.shape(t)):
            raise ValueError(f"{where}: tensor {key!r} has shape {tuple(v.shape)}, "
                             f"the config expects {tuple(np.shape(t))}")
        out[path] = v
    return traverse_util.unflatten_dict(out)


def state_dict(params: dict, buffers: dict) -> dict:
    """One module's official state dict (numpy), PyTorch order."""
    sd = {**flat(params), **flat(buffers)}
    return {k: np.asarray(sd[k]) for k in torch_order(sd)}


def param_order(params: dict, parts) -> list:
    """``[(part, key)]`` of an optimiser's parameters, its index order."""
    return [(p, k) for p in parts for k in torch_order(flat(params[p]))]


def read(path: str, parts) -> dict:
    """A ``g_`` / ``do_`` file -> ``{part: {key: numpy}}`` for ``parts`` + the other entries as loaded."""
    raw = torch_load(path)
    if not isinstance(raw, dict) or any(p not in raw for p in parts):
        raise ValueError(f"{path}: expected a TiCodec training checkpoint with parts {list(parts)}")
    out = {k: ({n: _to_numpy(t.detach().cpu().contiguous()) for n, t in v.items()} if k in parts else v)
           for k, v in raw.items()}
    out["_metadata"] = {p: getattr(raw[p], "_metadata", None) for p in parts}  # kept when written back
    return out


def split(sd_parts: dict, templates: dict, where: str) -> tuple:
    """``{part: state dict}`` -> ``(params, buffers)`` in the layout of ``templates = {'params', 'buffers'}``."""
    params = {p: unflat(sd_parts[p], templates["params"][p], f"{where} [{p}]") for p in templates["params"]}
    buffers = {p: unflat(sd_parts[p], templates["buffers"].get(p, {}), f"{where} [{p}]") for p in templates["params"]}
    return params, buffers


def optimizer_from_torch(osd: dict, params: dict, parts, where: str) -> Optional[tuple]:
    """An Adam ``state_dict()`` -> ``(count, mu, nu)`` trees like ``params`` (zeros where it has no
    state); None when it has no state at all (a fresh optimiser)."""
    order = param_order(params, parts)
    groups = osd.get("param_groups", [])
    n = sum(len(g["params"]) for g in groups)
    if n != len(order):
        raise ValueError(f"{where}: optimizer has {n} parameters, the model {len(order)}")
    if not osd.get("state"):
        return None
    mu = {p: {k: np.zeros(np.shape(v), np.float32) for k, v in flat(params[p]).items()} for p in parts}
    nu = {p: {k: np.zeros(np.shape(v), np.float32) for k, v in flat(params[p]).items()} for p in parts}
    steps = set()
    for i, st in osd["state"].items():
        p, k = order[int(i)]
        mu[p][k] = _to_numpy(st["exp_avg"].contiguous())
        nu[p][k] = _to_numpy(st["exp_avg_sq"].contiguous())
        steps.add(int(float(st["step"])))
    if len(steps) != 1:
        raise ValueError(f"{where}: parameters at different Adam steps {sorted(steps)} are not supported")
    return (steps.pop(), {p: unflat(mu[p], params[p], where) for p in parts},
            {p: unflat(nu[p], params[p], where) for p in parts})


def optimizer_to_torch(count: int, mu: dict, nu: dict, params: dict, parts, lr: float, initial_lr: float,
                       betas, group: Optional[dict] = None) -> dict:
    """``torch.optim.Adam.state_dict()`` (with ExponentialLR's ``initial_lr``) for ``count`` steps."""
    import torch  # optional dependency (the [torch] extra): .pt files are written with torch
    order = param_order(params, parts)
    fm = {p: flat(mu[p]) for p in parts}
    fv = {p: flat(nu[p]) for p in parts}
    state = {}
    if count > 0:
        for i, (p, k) in enumerate(order):
            if (p, k.startswith(UNUSED[1])) == (UNUSED[0], True):
                continue
            state[i] = {"step": torch.tensor(float(count)), "exp_avg": torch.from_numpy(np.array(fm[p][k], np.float32)),
                        "exp_avg_sq": torch.from_numpy(np.array(fv[p][k], np.float32))}
    g = dict(group) if group else dict(
        betas=tuple(betas), eps=1e-08, weight_decay=0, amsgrad=False, maximize=False, foreach=None,
        capturable=False, differentiable=False, fused=None, decoupled_weight_decay=False)
    g = {"lr": lr, **{k: v for k, v in g.items() if k not in ("lr", "params", "initial_lr")},
         "initial_lr": initial_lr, "params": list(range(len(order)))}
    return {"state": state, "param_groups": [g]}


def _module_sd(params, buffers, metadata=None):
    import torch  # optional dependency (the [torch] extra)
    sd = collections.OrderedDict((k, torch.from_numpy(np.array(v, copy=True)))
                                 for k, v in state_dict(params, buffers).items())
    if metadata is not None:
        sd._metadata = metadata
    return sd


def _to_int64(buffers: dict) -> dict:
    return {k: (np.asarray(v, np.int64) if k.endswith("num_batches_tracked") else v) for k, v in flat(buffers).items()}


def write_g(path: str, params: dict, buffers: dict, metadata: Optional[dict] = None) -> None:
    """``g_`` file (or ``codec/final.pt``): generator, encoder, quantizer state dicts."""
    import torch  # optional dependency (the [torch] extra)
    metadata = metadata or {}
    obj = {p: _module_sd(params[p], _to_int64(buffers.get(p, {})), metadata.get(p)) for p in G_PARTS}
    _atomic_save(torch, obj, path)


def sn_metadata(msd_keys) -> collections.OrderedDict:
    """State-dict ``_metadata`` that marks MSD[0]'s spectral norm as version 1 (else torch's loader
    tries to rebuild ``weight_v`` from a ``weight`` key that is not there)."""
    md = collections.OrderedDict()
    for k in msd_keys:
        if k.endswith(".weight_orig"):
            md[k.rsplit(".", 1)[0]] = {"version": 1, "spectral_norm": {"weight.version": 1}}
    return md


def write_do(path: str, params: dict, buffers: dict, optim_g: dict, optim_d: dict, steps: int, epoch: int,
             metadata: Optional[dict] = None) -> None:
    """``do_`` file: discriminators, both Adam state dicts, ``steps`` (last completed update), ``epoch``."""
    import torch  # optional dependency (the [torch] extra)
    metadata = dict(metadata or {})
    metadata.setdefault("msd", sn_metadata(flat(params["msd"])))
    obj = {p: _module_sd(params[p], buffers.get(p, {}), metadata.get(p)) for p in D_PARTS}
    obj.update(optim_g=optim_g, optim_d=optim_d, steps=int(steps), epoch=int(epoch))
    _atomic_save(torch, obj, path)


def _atomic_save(torch, obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
