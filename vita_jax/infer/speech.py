"""Speech output: the NAR+AR decoder's code generation (and, with the codec, waveforms).

``load_speech(folder)`` reads a ``vita_tts_ckpt`` folder (``decoder/{model.json,final.pt}``,
``codec/{model.json,final.pt}``; ``.pt`` files only with ``weights_only=True``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.convert import loader
from vita_jax.convert.torch_io import TorchReader
from vita_jax.models import tts_decoder as dec


class SpeechModel:
    """``decoder_cfg`` / ``decoder_params`` (and the codec once loaded)."""

    def __init__(self, decoder_cfg: dec.TTSDecoderConfig, decoder_params, path: Optional[str] = None):
        self.decoder_cfg, self.decoder_params, self.path = decoder_cfg, decoder_params, path
        self.decoder = dec.TTSDecoder(decoder_cfg)
        m = self.decoder
        self._forward = jax.jit(lambda p, *a: m.apply({"params": p}, *a)[:2])
        self._prefill = jax.jit(lambda p, x, k, v: m.apply({"params": p}, x, k, v, method=dec.TTSDecoder.prefill))
        self._step = jax.jit(lambda p, t, i, k, v: m.apply({"params": p}, t, i, k, v, method=dec.TTSDecoder.step))

    # ------------------------------------------------------------------ decoder
    def decoder_forward(self, x, x_lens, y, y_lens):
        """Teacher-forced: ``x [B, 4·n_text, idim]`` (zero-padded), ``y [B, max_codes]`` padded
        with -1 -> ``(logits [B, max_codes+1, V+4], summed CE loss)`` (float32 numpy / float)."""
        logits, loss = self._forward(self.decoder_params, jnp.asarray(x, jnp.float32), jnp.asarray(x_lens, jnp.int32),
                                     jnp.asarray(y, jnp.int32), jnp.asarray(y_lens, jnp.int32))
        return np.asarray(logits, np.float32), float(loss)

    def _cache(self, length: int, max_tokens: int):
        c = self.decoder_cfg
        slots = -(-(length + 2 + max_tokens) // 64) * 64
        shape = (c.num_blocks, 1, slots, c.attention_heads, c.idim // c.attention_heads)
        return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)

    def iter_codes(self, x, top_k: int = 2, max_tokens: int = 1000, seed: int = 0, penalty_window: int = -1,
                   penalty: float = 1.1, replay: Optional[Sequence[int]] = None, record: Optional[list] = None):
        """Yields code ids one at a time (EOS ends the stream and is not yielded). ``x [L, idim]``
        or ``[1, L, idim]``. ``replay`` feeds given ids instead of sampling (to check
        distributions); ``record`` collects ``(logits, probs)`` per step."""
        c = self.decoder_cfg
        x = jnp.asarray(x, jnp.float32)
        x = x[None] if x.ndim == 2 else x
        if x.shape[0] != 1:
            raise ValueError(f"generation takes one sequence, got a batch of {x.shape[0]}")
        if x.shape[1] == 0:
            return
        k, v = self._cache(x.shape[1], max_tokens)
        k, v = self._prefill(self.decoder_params, x, k, v)
        index = x.shape[1] + 1
        key = jax.random.PRNGKey(seed)
        token, history = c.sos, [c.sos]
        for step in range(max_tokens):
            logits, k, v = self._step(self.decoder_params, jnp.asarray([token], jnp.int32), jnp.int32(index), k, v)
            logits = np.asarray(logits[0])
            probs = dec.sampling_distribution(logits, top_k, history, penalty_window, penalty)
            if record is not None:
                record.append((logits, probs))
            if replay is not None:
                if step >= len(replay):
                    return
                token = int(replay[step])
            elif top_k == 1:
                token = int(np.argmax(probs))
            else:
                key, sub = jax.random.split(key)
                token = int(jax.random.choice(sub, probs.shape[0], p=jnp.asarray(probs)))
            if token == c.eos:
                return
            history.append(token)
            index += 1
            yield token

    def generate_codes(self, x, top_k: int = 2, max_tokens: int = 1000, seed: int = 0, penalty_window: int = -1,
                       penalty: float = 1.1) -> np.ndarray:
        """Code ids ``[n]`` (int64) without EOS; at most ``max_tokens``."""
        return np.asarray(list(self.iter_codes(x, top_k, max_tokens, seed, penalty_window, penalty)), np.int64)


def load_decoder(folder: str):
    """``(config, params)`` from ``decoder/model.json`` + ``decoder/final.pt``."""
    cfg = dec.TTSDecoderConfig.from_model_json(os.path.join(folder, "model.json"))
    module = dec.TTSDecoder(cfg)
    x = jnp.zeros((1, 4, cfg.idim))
    abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, jnp.array([4]),
                                                           jnp.zeros((1, 2), jnp.int32), jnp.array([2]))["params"]))
    params, _ = loader.load(dec.key_table(cfg), TorchReader(os.path.join(folder, "final.pt")), abstract)
    return cfg, params


def load_speech(path: str) -> SpeechModel:
    """A ``vita_tts_ckpt`` folder (``decoder/`` and ``codec/``) -> :class:`SpeechModel`."""
    if not os.path.isdir(os.path.join(path, "decoder")):
        raise FileNotFoundError(f"{path}: no decoder/ folder (expected a vita_tts_ckpt folder)")
    cfg, params = load_decoder(os.path.join(path, "decoder"))
    return SpeechModel(cfg, params, path)

