"""``bench accel``'s serve part: the live serve loop (:mod:`vita_jax.bench.serve`: one simulated client talking
real speech over a WebSocket to ``vita-jax serve`` in this process) on a VITA of the 7B shape (Qwen2.5-7B LLM,
InternViT-300M, the whale encoder, the release's speech decoder size and a TiCodec of the release's shape), random
bf16 weights, the real Qwen2.5 tokenizer: speech end -> first text and -> first audio (p50 / p95 over the
measured turns). ``small``: stage 3.2's tiny model and a small random codec (CPU)."""
from __future__ import annotations

import contextlib
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax import api, parallel
from vita_jax import config as config_lib
from vita_jax.bench import serve as serve_bench
from vita_jax.data.text import load_tokenizer
from vita_jax.infer.speech import SpeechModel
from vita_jax.models import ticodec, vita


def default_tokenizer() -> str:
    """The fixtures' Qwen2.5 tokenizer (``$VITA_SHARED/fixtures`` or ``../shared/fixtures`` beside the checkout)."""
    return os.path.join(serve_bench.default_fixtures(), "qwen2.5-tokenizer")


def random_codec(small: bool, seed: int = 0):
    """A TiCodec with random weights, ``(config, None, params)``: the release's shape (1024 codes, 512 channels),
    or a small one of 64 codes (``small``). Every leaf is drawn from its shape (``eval_shape``: initialising the
    modules runs their forward, which takes minutes on a CPU); a speed benchmark needs no trained values."""
    cfg = ticodec.TiCodecConfig(upsample_initial_channel=64, n_codes=64) if small else ticodec.TiCodecConfig()
    g, e = ticodec.Generator(cfg, folded=True), ticodec.Encoder(cfg, folded=True)
    shapes = {"generator": jax.eval_shape(lambda: g.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.code_dim, 4)),
                                                         jnp.zeros((1, 128)))),
              "encoder": jax.eval_shape(lambda: e.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, cfg.hop * 4))))}
    rng = np.random.default_rng(seed)

    def draw(path, x):  # PyTorch layouts: kernels [out, in, k] ~ N(0, 1 / fan-in); norms at identity, biases 0
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if not jnp.issubdtype(x.dtype, jnp.floating) or name in ("bias", "running_mean"):
            return jnp.zeros(x.shape, x.dtype)
        if len(x.shape) < 2:
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(x.shape[1:])), x.shape).astype(x.dtype))
    params = jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))
    post = params["generator"]["params"]["conv_post"]  # louder: the server drops a reply's samples below 0.03 first
    post["weight"] = post["weight"] * 30
    d = cfg.global_feature_conv[2] // cfg.global_code_num
    params.update(codebook=draw((), jax.ShapeDtypeStruct((cfg.n_codes, cfg.code_dim), jnp.float32)),
                  globaltokens=[draw((), jax.ShapeDtypeStruct((1024, d), jnp.float32))
                                for _ in range(cfg.global_code_num)])
    return cfg, None, params


def serve_model(small: bool, layers: int, tokenizer: str) -> api.VitaModel:
    """The random VITA (7B shape, or stage 3.2's tiny model with the full vocabulary) with its speech decoder and
    codec; ``layers`` (if set) cuts the LLM's layers."""
    tok = load_tokenizer(tokenizer)
    if tok is None:
        raise FileNotFoundError(f"{tokenizer}: no tokenizer.json (a Qwen2.5 tokenizer folder: --tokenizer=DIR)")
    c = config_lib.load_config("stage3_2:tiny" if small else "stage3_2")
    c.llm.vocab_size, c.bos_token_id, c.eos_token_id = 152064, 151643, 151645
    if layers:
        c.llm.num_hidden_layers = int(layers)
    if not small:
        c.dtype = c.param_dtype = "bfloat16"
    mesh = parallel.make_mesh(dict(c.mesh_shape)) if jax.device_count() > 1 else None
    params = vita.init_params(c, seed=3, mesh=mesh)
    tts = jax.jit(lambda: vita.init_heads(c, {}, seed=3)["tts_decoder"])()  # jitted: eager runs its forward op by op
    speech = SpeechModel(vita.tts_config(c), tts, codec=random_codec(small))
    return api.VitaModel(c, params, tok, mesh, speech=speech)


def bench_serve(small: bool, layers: int, tokenizer: str, turns: int = 2) -> dict:
    """One client, ``turns`` turns after the warm-up (the last one interrupted): the serve bench's row."""
    model = serve_model(small, layers, tokenizer)
    lc = model.llm_cfg
    with contextlib.redirect_stdout(sys.stderr):  # the serve bench prints its rows: one JSON line is ours
        rows = serve_bench.run(model, clients=(1,), turns=turns, max_new_tokens=16 if small else 24,
                               tts_max_tokens=40 if small else 80)
    return dict(llm=dict(layers=lc.num_hidden_layers, hidden=lc.hidden_size, vocab=lc.vocab_size),
                dtype=str(model.config.dtype), **rows[0])
