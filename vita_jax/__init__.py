"""vita_jax: VITA-1.5 (vision + speech in, text + speech out) in JAX/Flax."""
from vita_jax.api import VitaModel, from_pretrained, init_model, init_params, load_tokenizer  # noqa: F401
from vita_jax.data.text import encode_prompt, encode_sample  # noqa: F401
from vita_jax.infer.speech import load_speech  # noqa: F401

__version__ = "0.1.0"
