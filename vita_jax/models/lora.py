"""LoRA adapters on any dense layer of the model, through qwix (Google's JAX quantization library, which
also does LoRA / QLoRA for flax linen: it intercepts the layers' ``dot_general`` calls, so no model file
changes and the adapters take the logical axis names, hence the shardings, of the kernel they adapt).

``config.lora``: ``rank`` (0: off), ``alpha`` (the delta is scaled by ``alpha / rank``), ``targets``
(regular expressions, each matching whole ``/``-joined parameter paths of dense kernels, e.g.
``llm/model/layers/self_attn/(q|k|v|o)_proj/kernel``), ``dropout`` (on the adapters' input, training only).
Each adapted kernel ``W [..., in..., out...]`` gets ``W_lora_a [..., prod(in), rank]`` (He-uniform) and
``W_lora_b [..., rank, prod(out)]`` (zeros) beside it in the tree (``...``: the scanned ``layers`` axis),
so a new adapter leaves the model's outputs bitwise unchanged; :func:`merge` folds them into ``W``.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import traverse_util
from qwix._src.core import qarray  # qwix keeps its PTQ weight wrapper and its quantizer in private modules:
from qwix._src.providers.ptq import WithAux  # setup.py pins the qwix version this was written against

from vita_jax.models import vita

# qwix 0.1.8 checks for flax's removed nnx.VariableState alias on every intercepted call (its deprecation, not ours)
warnings.filterwarnings("ignore", message="'VariableState' was removed", category=DeprecationWarning)

SUFFIXES = ("_lora_a", "_lora_b")
# the model methods that training, evaluation and serving apply (qwix intercepts only the methods it is given)
METHODS = ("__call__", "hidden", "head", "embed", "encode_images", "encode_audio")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    base_dtype: str = ""  # "": the frozen base as it is; "int8" / "int4": the adapted kernels stored quantized (QLoRA)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_of(config) -> Optional[LoraSpec]:
    """``config.lora`` checked, or None when LoRA is off (no section or ``rank`` 0)."""
    lc = config.get("lora", None)
    if lc is None or int(lc.get("rank", 0)) == 0:
        return None
    rank, alpha, dropout = int(lc.rank), float(lc.alpha), float(lc.get("dropout", 0.0))
    targets = tuple(lc.targets)
    base_dtype = str(lc.get("base_dtype", "") or "")
    if base_dtype not in ("", "int8", "int4"):
        raise ValueError(f"config.lora.base_dtype = {base_dtype!r}: '' (as stored), 'int8' or 'int4'")
    if rank < 0:
        raise ValueError(f"config.lora.rank = {rank}: must be >= 1 (0: no LoRA)")
    if alpha <= 0:
        raise ValueError(f"config.lora.alpha = {alpha}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config.lora.dropout = {dropout}: must be in [0, 1)")
    if not targets:
        raise ValueError("config.lora.targets is empty: give regular expressions over parameter paths, e.g. "
                         "'llm/model/layers/self_attn/(q|k|v|o)_proj/kernel'")
    for t in targets:
        try:
            re.compile(t)
        except re.error as e:
            raise ValueError(f"config.lora.targets: {t!r} is not a regular expression ({e})") from None
    return LoraSpec(rank, alpha, targets, dropout, base_dtype)


def is_adapter(path: str) -> bool:
    return path.endswith(SUFFIXES)


def target_modules(spec: LoraSpec, params) -> list[str]:
    """The module paths (``part/.../q_proj``) whose ``kernel`` one of ``spec.targets`` matches, in ``params``
    (a whole-model tree, boxed, abstract or real). A target that matches nothing, or a parameter that is
    not a dense kernel, is a one-line error."""
    flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
    out = []
    for t in spec.targets:
        rx = re.compile(t)
        hits = [k for k in flat if not is_adapter(k) and rx.fullmatch(k)]
        if not hits:
            raise ValueError(f"config.lora.targets: {t!r} matches no parameter path (e.g. "
                             f"{next(k for k in flat if k.endswith('kernel'))!r})")
        bad = [k for k in hits if not k.endswith("/kernel") or len(flat[k].shape) < 2]
        if bad:
            raise ValueError(f"config.lora.targets: {t!r} matches {bad[0]!r}, which is not a dense kernel "
                             "(LoRA adapts '.../kernel' weights only)")
        out += [k.rsplit("/", 1)[0] for k in hits]
    return sorted(set(out))


def provider(spec: LoraSpec, modules: list[str], prefix: str = "") -> Optional[qwix.LoraProvider]:
    """A qwix provider adapting ``modules`` (whole-model module paths) as seen from a module whose own
    parameters sit under ``prefix`` (``""``: the whole model; ``"llm/"``: the LLM part alone); None when
    none of them is under it."""
    mine = [m[len(prefix):] for m in modules if m.startswith(prefix)]
    if not mine:
        return None
    rule = qwix.LoraRule(module_path="|".join(re.escape(m) for m in mine), rank=spec.rank, alpha=spec.alpha,
                         dropout=spec.dropout, weight_qtype=spec.base_dtype or None)
    return qwix.LoraProvider([rule])


def wrap(module: nn.Module, spec: Optional[LoraSpec], modules: list[str], prefix: str = "",
         train: bool = False) -> nn.Module:
    """``module`` with adapters on ``modules`` (under ``prefix``); ``module`` itself without any. The adapters'
    dropout applies only with ``train`` (it then needs a ``dropout`` rng)."""
    if spec is not None and not train:
        spec = dataclasses.replace(spec, dropout=0.0)
    p = provider(spec, modules, prefix) if spec is not None else None
    if p is None:
        return module
    return qwix.apply_lora_to_model(module, p, methods=[m for m in METHODS if hasattr(module, m)])


def init_parts(config) -> dict:
    """:func:`vita_jax.models.vita.parts` computing in float32, whatever ``config.dtype``: what adapters are created
    (and a QLoRA base quantized) from. Their ``init`` runs the forward, where a float32 adapter beside bfloat16
    activations would turn a scanned layer's carry into float32; the parameters' dtypes are ``param_dtype``'s."""
    c = config.copy_and_resolve_references()
    c.dtype = "float32"
    return vita.parts(c)


def adapters_of(tree) -> dict:
    """``{"a/b/W_lora_a": leaf, ...}``: the adapter leaves of a (nested) tree."""
    return {k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items() if is_adapter(k)}


def abstract_adapters(spec: LoraSpec, parts: dict, modules: list[str]) -> dict:
    """The boxed (logically partitioned) abstract adapters ``{part: {...}}`` of every part with targets
    (``parts``: :func:`vita_jax.models.vita.parts`)."""
    spec = dataclasses.replace(spec, base_dtype="")  # (qwix's PTQ init creates no adapter on a DenseGeneral)
    out = {}
    for name, p in parts.items():
        m = wrap(p.module, spec, modules, name + "/")
        if m is p.module:
            continue
        tree = jax.eval_shape(lambda m=m, p=p: m.init(jax.random.PRNGKey(0), *p.example)["params"])
        flat = {k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items() if is_adapter(k)}
        out[name] = traverse_util.unflatten_dict(flat, sep="/")
    return out


def init_adapters(spec: LoraSpec, parts: dict, modules: list[str], seed: int = 0) -> dict:
    """New adapters ``{part: {...}}`` (A He-uniform, B zeros), part ``i`` of ``parts`` drawn from ``seed + i``
    as its base parameters are. Only the adapters are computed (XLA drops the base initialisers)."""
    spec = dataclasses.replace(spec, base_dtype="")  # the same adapters as without QLoRA (see abstract_adapters)
    out = {}
    for i, (name, p) in enumerate(parts.items()):
        m = wrap(p.module, spec, modules, name + "/")
        if m is p.module:
            continue

        def init(key, m=m, p=p):
            tree = nn.unbox(m.init({"params": key, "dropout": key}, *p.example)["params"])
            return traverse_util.unflatten_dict(adapters_of(tree), sep="/")
        out[name] = jax.jit(init)(jax.random.PRNGKey(seed + i))
    return out


def is_quantized(x) -> bool:
    return isinstance(x, WithAux)


def dequantize(x):
    """A QLoRA base kernel back in float32 (anything else as it is)."""
    return qwix.dequantize(x.array).astype(jnp.float32) if is_quantized(x) else x


def quantize_like(w, abstract: WithAux) -> WithAux:
    """``w`` quantized as ``abstract`` (the adapted model's abstract kernel) says. Under ``nn.scan`` qwix works out
    how to quantize one layer (its channel axes) while the tree holds all layers stacked: each layer is then
    quantized on its own (vmap over the leading axis), which gives the abstract tree's per-layer scales."""
    want = tuple(nn.unbox(abstract.array.scale).shape)
    q = qarray.quantize(w, abstract.how)
    if tuple(q.scale.shape) != want:
        q = jax.vmap(lambda x: qarray.quantize(x, abstract.how))(w)
    if tuple(q.scale.shape) != want:
        raise ValueError(f"LoRA base quantization: scale {tuple(q.scale.shape)} for a kernel {tuple(w.shape)}, "
                         f"the model wants {want}")
    return abstract.replace(array=q)


def quantize_base(spec: LoraSpec, parts: dict, modules: list[str], params: dict) -> dict:
    """``params`` with the adapted kernels stored as ``spec.base_dtype`` (QLoRA; qwix ``WithAux`` leaves: int
    values and float32 scales, per output channel); unchanged without a ``base_dtype``."""
    if not spec.base_dtype:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    for name, p in parts.items():
        m = wrap(p.module, spec, modules, name + "/")
        if m is p.module:
            continue
        abstract = jax.eval_shape(lambda m=m, p=p: m.init(jax.random.PRNGKey(0), *p.example)["params"])
        for k, a in traverse_util.flatten_dict(abstract, sep="/").items():
            if is_quantized(a) and f"{name}/{k}" in flat and not is_quantized(flat[f"{name}/{k}"]):
                flat[f"{name}/{k}"] = quantize_like(jnp.asarray(flat[f"{name}/{k}"], jnp.float32), a)
    return traverse_util.unflatten_dict(flat, sep="/")


def merge(params: dict, spec: LoraSpec, dtype=None) -> dict:
    """``params`` (with adapter leaves) -> the same tree without them, each adapted kernel replaced by
    ``W + alpha / rank * (A @ B)`` reshaped to ``W`` (computed in float32, stored in ``W``'s dtype or
    ``dtype``)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for k in [k for k in flat if k.endswith("_lora_a")]:
        w_key = k[:-len("_lora_a")]
        w, a, b = flat[w_key], flat[k], flat[w_key + "_lora_b"]
        dt = dtype or (jnp.float32 if is_quantized(w) else w.dtype)
        w = dequantize(w)
        delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        merged = jnp.asarray(w, jnp.float32) + spec.scale * delta.reshape(w.shape)
        out[w_key] = merged.astype(dt)
    return traverse_util.unflatten_dict(out, sep="/")


def fingerprint(tree) -> jax.Array:
    """``[leaves, 2]`` float32: the sum and the sum of squares of every leaf of ``tree`` (sorted by path): what
    a LoRA run checkpoint keeps of its frozen base, to refuse resuming onto another one."""
    flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else dict(enumerate(tree))
    leaves = [leaf for k in sorted(flat) for leaf in jax.tree.leaves(flat[k])]  # a QLoRA kernel: values and scales

    @jax.jit
    def sums(xs):
        return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                          for x in xs]) if xs else jnp.zeros((0, 2), jnp.float32)
    return sums(leaves)


def same_base(saved, current, rtol: float = 1e-4) -> bool:
    """Whether two :func:`fingerprint` s are of the same base (float32 sums in another reduction order, e.g. on
    another mesh, differ by rounding only)."""
    a, b = np.asarray(saved, np.float64), np.asarray(current, np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * np.maximum(np.abs(b), 1e-6)))
