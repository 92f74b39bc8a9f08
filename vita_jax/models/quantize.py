"""Weight-only int8 / int4 inference through qwix's PTQ (the library LoRA and QLoRA already use, see
:mod:`vita_jax.models.lora`): the chosen dense kernels are stored quantized (qwix ``WithAux``: int values and a
float32 scale per output channel, per layer under ``nn.scan``) and dequantized inside each intercepted
``dot_general``; activations stay in the model's dtype. ``int8`` halves a bfloat16 LLM's weight bytes.

Targets are regular expressions over ``/``-joined parameter paths, as ``config.lora.targets``; by default every
linear layer of the LLM (attention q/k/v/o, MLP gate/up/down). The towers, the embeddings and the LM head stay
as they are unless named.
"""
from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import traverse_util

from vita_jax.models import lora

QTYPES = ("int8", "int4")
LLM_LINEAR = ("llm/model/layers/self_attn/(q|k|v|o)_proj/kernel", "llm/model/layers/mlp/(gate|up|down)_proj/kernel")


def check(qtype: str) -> str:
    if qtype not in QTYPES:
        raise ValueError(f"--quantize {qtype!r}: one of {', '.join(QTYPES)}")
    return qtype


def modules_of(params, targets: Sequence[str] = LLM_LINEAR) -> list[str]:
    """The module paths (``llm/model/layers/self_attn/q_proj``, ...) of the dense kernels ``targets`` match."""
    return lora.target_modules(lora.LoraSpec(rank=1, alpha=1.0, targets=tuple(targets)), params)


def wrap(module: nn.Module, modules: Sequence[str], qtype: str, prefix: str = "",
         methods: Sequence[str] = lora.METHODS) -> nn.Module:
    """``module`` (whose parameters sit under ``prefix`` of the whole model) with ``modules`` computing from
    quantized kernels; ``module`` itself when none is under ``prefix``."""
    mine = [m[len(prefix):] for m in modules if m.startswith(prefix)]
    if not mine:
        return module
    rule = qwix.QuantizationRule(module_path="|".join(re.escape(m) for m in mine), weight_qtype=qtype)
    return qwix.quantize_model(module, qwix.PtqProvider([rule]),
                               methods=[m for m in methods if hasattr(module, m)])


def quantize_params(config, params: dict, modules: Sequence[str], qtype: str) -> dict:
    """``params`` (the whole model's, float) with the kernels of ``modules`` quantized as the wrapped parts
    expect them (their abstract ``init`` says the scales' shapes)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for name, p in lora.init_parts(config).items():
        m = wrap(p.module, modules, qtype, name + "/")
        if m is p.module:
            continue
        abstract = jax.eval_shape(lambda m=m, p=p: m.init(jax.random.PRNGKey(0), *p.example)["params"])
        for k, a in traverse_util.flatten_dict(abstract, sep="/").items():
            key = f"{name}/{k}"
            if lora.is_quantized(a) and key in flat and not lora.is_quantized(flat[key]):
                flat[key] = lora.quantize_like(jnp.asarray(flat[key], jnp.float32), a)
    return traverse_util.unflatten_dict(flat, sep="/")


def model(config, params: dict, module: nn.Module, llm: nn.Module, qtype: str, targets: Sequence[str] = LLM_LINEAR):
    """``(params, module, llm)`` of a loaded model (the whole VITA and its LLM alone, as the API applies them)
    with ``targets``' kernels quantized to ``qtype`` and both modules computing from them."""
    check(qtype)
    modules = modules_of(params, targets)
    return (quantize_params(config, params, modules, qtype), wrap(module, modules, qtype),
            wrap(llm, modules, qtype, "llm/"))


def weight_bytes(params) -> int:
    """Bytes of every array leaf (quantized kernels: values + scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params) if hasattr(x, "dtype"))

