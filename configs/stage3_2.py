"""Stage 3.2 of the VITA-1.5 curriculum. The speech decoder: the NAR + AR decoder learns from the frozen LLM's
states to the codec's codes.

``get_config()``: VITA-1.5 at full size (``configs/vita15.py``); ``:narrow``: the same recipe and data shapes
with ``configs/narrow.py``'s narrow, shallow towers (a CPU runs it); ``:tiny``: the tiny model
(``configs/tiny.py``), which trains on a small synthetic dataset when no data is given (tests, the demo).
Defaults every stage shares: :func:`vita_jax.config.stage_defaults`."""
import ml_collections

from vita_jax import config as config_lib


def get_config(arg=None):
    variant = config_lib.stage_variant("3.2", arg)
    c = config_lib.stage_defaults(variant)
    c.stage = "3.2"
    c.description = "NAR + AR speech decoder, LLM frozen"
    c.trainable = [r"tts_decoder/.*"]
    c.loss = "tts"
    c.optim.update(lr=5e-4, group_lrs=[])  # group_lrs: [[pattern, lr], ...], the first match wins
    # the decoder reads the LLM's states: input width = LLM width / 4 (the release: 896), 1024 codec codes
    # its training forward: the prefix-LM mask as a rule with queries in blocks of 512 and every layer rematerialised
    # (layers/chunked.py): 4 rows of 1024 text tokens (6146 positions) a chip, where the dense mask kept
    # [rows, 14, 6146, 6146] float32 per layer (docs/scaling.md)
    c.tts = ml_collections.ConfigDict(dict(idim=c.llm.hidden_size // 4, odim=1024, attention_heads=14,
                                           linear_units=4864, num_blocks=4, attention_impl="chunked",
                                           attention_chunk=512, remat_policy="full"))
    # 512 rows a step in 2 micro-batches; packed rows of 6200 tokens; 13 tiles an image, 3000 fbank frames (30 s) a clip
    c.update(batch_size=512, grad_accum=2, total_steps=10000, checkpoint_every=1000)
    c.data.update(seq_len=6200, packing=True, budgets="auto", max_tiles_per_sample=13, max_frames=3000)
    if variant == "narrow":  # configs/narrow.py's towers at these shapes; 8 rows a step, a CPU's batch
        c.batch_size = 8
        c.tts.update(attention_heads=4, linear_units=128, num_blocks=2)
    if variant == "tiny":  # a step: 4 unpacked rows of 128 tokens, one tile an image, clips up to 128 frames
        c.update(batch_size=4, grad_accum=1, total_steps=20, checkpoint_every=10, frozen_dtype="float32")
        c.data.update(seq_len=128, packing=False, budgets="fixed", max_tiles_per_sample=1, max_frames=128)
        c.tts.update(odim=64, attention_heads=4, linear_units=64)
    return c
