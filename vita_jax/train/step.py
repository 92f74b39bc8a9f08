"""The jitted, sharded train step: losses of every stage, gradient accumulation, the NaN guard.

State: ``train`` (trainable leaves, fp32 master weights), ``frozen`` (never differentiated; may be
stored in bf16), ``opt_state`` (over ``train`` only), ``step``. Gradients are taken with respect to
``train`` alone, so XLA runs no backward pass below the lowest trainable module (a frozen ViT under
a trainable projector is forward-only). Losses are sums with a token count; the mean is formed
after accumulation, so any split into micro-batches or devices gives the same update.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from vita_jax.models import ctc as ctc_lib
from vita_jax.models import lora, tts_decoder, vita
from vita_jax.models.ctc import WhaleCTC
from vita_jax.models.vita import VITA
from vita_jax.train import stages


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    train: dict
    frozen: dict
    opt_state: Any
    nonfinite: jax.Array  # consecutive non-finite steps (the guard stops the run after K)


def lm_loss(module: VITA, params, batch, rngs=None):
    """Official LM loss pieces on the spliced batch: ``(sum CE, (tokens, correct))``; the logits
    exist ``module.loss_chunk`` positions at a time (:func:`vita_jax.models.vita.lm_row_terms`). ``rngs``:
    the LoRA adapters' dropout key (``{"dropout": key}``), else None."""
    nll, count, hits = vita.lm_row_terms(module, params, batch["labels"], batch["kind"], batch["text_ids"],
                                         batch["src"], batch.get("pixels"), batch.get("audio_feats"),
                                         batch.get("audio_lens"), batch.get("segment_ids"), batch.get("positions"),
                                         rngs=rngs)
    return jnp.sum(nll), (jnp.sum(count), jnp.sum(hits))


def ctc_loss(module: WhaleCTC, params, batch, rngs=None):
    """Stage 2.1(a): summed CTC NLL; 'tokens' = label units."""
    p = {"encoder": params["audio_encoder"]["encoder"], "ctc": params["ctc"]}
    logits, mask = module.apply({"params": p}, batch["feats"], batch["lengths"], rngs=rngs)
    per = ctc_lib.ctc_loss(logits, mask, batch["labels"], batch["label_mask"])
    n = jnp.sum(batch["label_mask"])
    return jnp.sum(per), (n, jnp.zeros((), jnp.int32))


def tts_loss(module: tts_decoder.TTSDecoder, params, batch, rngs=None):
    """Stage 3.2: summed CE of the speech decoder; input = the frozen LLM embedding rows of the
    text, each split into 4 vectors."""
    table = params["llm"]["model"]["embed_tokens"]["embedding"]
    idim = module.cfg.idim
    x = jnp.take(table, batch["text_ids"], axis=0)
    b, n, e = x.shape
    x = x.reshape(b, n * (e // idim), idim)
    x = jnp.where((jnp.arange(x.shape[1]) < batch["text_lens"][:, None] * (e // idim))[..., None], x, 0.0)
    logits, loss, targets = module.apply({"params": params["tts_decoder"]}, x, batch["text_lens"] * (e // idim),
                                         batch["codes"], batch["code_lens"], rngs=rngs)
    valid = targets != module.cfg.pad
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) & valid)
    return loss, (jnp.sum(valid), correct)


def make_loss(config, lora_modules=()) -> Callable:
    """``loss(params, batch, rngs=None) -> (sum, (count, correct))`` for the stage's ``config.loss``; with
    ``lora_modules`` (whole-model module paths) the model carries LoRA adapters on them."""
    spec = lora.spec_of(config) if lora_modules else None
    if config.loss == "lm":
        module = lora.wrap(VITA.from_config(config), spec, lora_modules, train=True)
        return lambda p, b, rngs=None: lm_loss(module, p, b, rngs)
    if config.loss == "ctc":
        # WhaleCTC's tree is {encoder, ctc}: the whole model's audio_encoder/encoder/... and ctc/...
        modules = [m.removeprefix("audio_encoder/") for m in lora_modules]
        module = lora.wrap(WhaleCTC(vita.audio_config(config), int(config.ctc_units)), spec, modules, train=True)
        return lambda p, b, rngs=None: ctc_loss(module, p, b, rngs)
    if config.loss == "tts":
        module = lora.wrap(tts_decoder.TTSDecoder(vita.tts_config(config)), spec, lora_modules, "tts_decoder/",
                           train=True)
        return lambda p, b, rngs=None: tts_loss(module, p, b, rngs)
    raise ValueError(f"unknown loss {config.loss!r} (lm, ctc, tts)")


def init_state(train: dict, frozen: dict, opt: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), train, frozen, opt.init(train), jnp.zeros((), jnp.int32))


def make_step(loss_fn: Callable, opt: optax.GradientTransformation, lr_fn: Callable, accum: int = 1,
              compute_dtype=jnp.float32, dropout_seed: int | None = None):
    """``step(state, batch) -> (state, metrics)``. With ``accum > 1`` every batch leaf carries a
    leading micro-batch axis ``[accum, ...]`` (the pipeline lays each micro-batch out on its own:
    its tiles and clips belong to its rows), and the update equals one step on all of them. ``dropout_seed``:
    the LoRA adapters' dropout draws a key from it, the step and the micro-batch (None: no dropout key)."""

    def loss_of(train, frozen, mb, key):
        frozen = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
        # LoRA adapters meet the activations in the compute dtype (flax layers cast their own parameters; qwix's
        # adapter product does not, and float32 adapters would make a bfloat16 layer's output float32)
        train = {k: v.astype(compute_dtype) if lora.is_adapter(k) else v for k, v in train.items()}
        return loss_fn(stages.merge(train, frozen), mb, None if key is None else {"dropout": key})

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def key_of(step, micro):
        if dropout_seed is None:
            return None
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(dropout_seed), step), micro)

    def step(state: TrainState, batch):
        if accum > 1:
            def body(carry, xs):
                g_acc, tot, cnt, cor = carry
                mb, i = xs
                (total, (count, correct)), g = grad_fn(state.train, state.frozen, mb, key_of(state.step, i))
                return (jax.tree.map(jnp.add, g_acc, g), tot + total, cnt + count, cor + correct), None

            zeros = jax.tree.map(jnp.zeros_like, state.train)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
            (g, total, count, correct), _ = jax.lax.scan(body, init, (batch, jnp.arange(accum)))
        else:  # no loop around one micro-batch: XLA:CPU runs a backward inside a while loop ~8x slower
            (total, (count, correct)), g = grad_fn(state.train, state.frozen, batch, key_of(state.step, 0))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda x: x / denom, g)
        loss = total / denom
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        # a batch without target tokens (every sample bad) must not move the weights by momentum alone
        apply = finite & (count > 0)
        updates, new_opt = opt.update(grads, state.opt_state, state.train)
        new_train = optax.apply_updates(state.train, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        new_state = TrainState(state.step + 1, keep(new_train, state.train), state.frozen,
                               keep(new_opt, state.opt_state), jnp.where(finite, 0, state.nonfinite + 1))
        metrics = dict(loss=loss, grad_norm=gnorm, lr=lr_fn(state.step), tokens=count,
                       accuracy=correct / denom, finite=finite, nonfinite=new_state.nonfinite)
        return new_state, metrics

    return step
