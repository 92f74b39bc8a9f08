"""Stage 2.1a of the VITA-1.5 curriculum. The speech encoder with a CTC head: the whale encoder (not its CMVN
statistics) learns to transcribe (ASR pairs).

``get_config()``: VITA-1.5 at full size (``configs/vita15.py``); ``:narrow``: the same recipe and data shapes
with ``configs/narrow.py``'s narrow, shallow towers (a CPU runs it); ``:tiny``: the tiny model
(``configs/tiny.py``), which trains on a small synthetic dataset when no data is given (tests, the demo).
Defaults every stage shares: :func:`vita_jax.config.stage_defaults`."""
from vita_jax import config as config_lib


def get_config(arg=None):
    variant = config_lib.stage_variant("2.1a", arg)
    c = config_lib.stage_defaults(variant)
    c.stage = "2.1a"
    c.description = "speech encoder with a CTC head"
    c.trainable = [r"audio_encoder/encoder/(?!cmvn_).*", r"ctc/.*"]
    c.loss = "ctc"
    c.optim.update(lr=5e-4, group_lrs=[])  # group_lrs: [[pattern, lr], ...], the first match wins
    # 512 rows a step in 2 micro-batches; packed rows of 6200 tokens; 13 tiles an image, 3000 fbank frames (30 s) a clip
    c.update(batch_size=512, grad_accum=2, total_steps=10000, checkpoint_every=1000)
    c.data.update(seq_len=6200, packing=True, budgets="auto", max_tiles_per_sample=13, max_frames=3000)
    if variant == "narrow":  # configs/narrow.py's towers at these shapes; 8 rows a step, a CPU's batch
        c.batch_size = 8
    if variant == "tiny":  # a step: 4 unpacked rows of 128 tokens, one tile an image, clips up to 128 frames
        c.update(batch_size=4, grad_accum=1, total_steps=20, checkpoint_every=10, frozen_dtype="float32")
        c.data.update(seq_len=128, packing=False, budgets="fixed", max_tiles_per_sample=1, max_frames=128)
    return c
