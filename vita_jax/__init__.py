"""vita_jax: VITA-1.5 (vision + speech in, text + speech out) in JAX/Flax.

The names below load on first use (PEP 562), so ``import vita_jax.config`` or ``vita-jax --help``
does not pay for JAX, Flax and the model code."""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "VitaModel": "vita_jax.api", "from_pretrained": "vita_jax.api", "init_model": "vita_jax.api",
    "init_params": "vita_jax.api", "load_tokenizer": "vita_jax.api",
    "encode_prompt": "vita_jax.data.text", "encode_sample": "vita_jax.data.text",
    "load_speech": "vita_jax.infer.speech",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:  # submodules as attributes (``vita_jax.config`` after ``import vita_jax``)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from e
