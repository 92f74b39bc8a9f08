"""Stage 3.1 of the VITA-1.5 curriculum: the TiCodec speech codec (generator + encoder + quantizer against MPD /
MSD / MS-STFT discriminators), trained as upstream TiCodec's ``train.py`` trains it (the trainer's side:
vita_jax/train/codec/setup.py). Data: ``--config.data.train='["wavs/"]' --config.data.heldout='["dev/"]'``
(24 kHz wavs: folders, .lst file lists or .wav files).

``get_config()``: VITA-1.5's codec (``vita_tts_ckpt/codec/model.json``) with the upstream recipe: batches of 160
one-second crops over 8 GPUs, Adam 2e-4 (0.5, 0.9) decayed x0.98 an epoch; ``:tiny``: the tiny codec (tests, the
demo). No ``:narrow``: the codec has no LLM, vocabulary or token shapes to keep; ``:tiny`` is its narrow form."""
import ml_collections

from vita_jax import config as config_lib
from vita_jax.models import ticodec

# model.json's fields: the architecture and the upstream recipe (learning_rate, adam_b1/b2, lr_decay per epoch);
# one source: ticodec.real_size_config
RELEASE = dict(ticodec.real_size_config().to_model_json(), num_gpus=8)


def get_config(arg=None):
    variant = config_lib.stage_variant("3.1", arg, variants=("tiny",))
    c = ml_collections.ConfigDict()
    c.stage, c.loss = "3.1", "codec"
    c.description = "TiCodec speech codec: generator + encoder + quantizer against MPD / MSD / MS-STFT (GAN)"
    c.codec = ml_collections.ConfigDict(RELEASE)
    c.batch_size = c.codec.batch_size  # global batch (all processes)
    c.total_steps, c.checkpoint_every, c.keep_checkpoints = 400000, 5000, 3
    c.grad_accum = 1  # (the LM stages' micro-batches; one batch a step here, as upstream)
    c.max_nonfinite_steps, c.max_empty_steps = 5, 20
    c.seed = 0  # initial weights (the crops follow upstream's seed 1234)
    # "": fresh weights; an official training folder (model.json + g_XXXXXXXX [+ do_XXXXXXXX], the newest pair)
    # resumes upstream's run with both optimisers; a codec folder (model.json + final.pt) starts the generator side
    c.init_from = ""
    # data parallel as upstream's DDP (the codec is 134 M parameters with its discriminators); fsdp > 1 also
    # shards every leaf's rows (the codec_rows rule), at the price of gathers XLA inserts around the convolutions
    c.mesh_shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.evals = ml_collections.ConfigDict()
    # train / heldout: wav folders, .lst file lists (one wav path a line, relative to the list) or .wav files
    c.data = ml_collections.ConfigDict(dict(train=[], heldout=[], heldout_every=5000, heldout_seconds=4.0, prefetch=2))
    if variant == "tiny":  # one resblock kernel, a 64-entry codebook, discriminators at 1/8 width, 0.1 s crops
        c.codec.update(batch_size=4, upsample_initial_channel=256, resblock_kernel_sizes=[3],
                       resblock_dilation_sizes=[[1, 3, 5]], n_codes=64, global_feature_conv=[128, 16, 128, 3, 1],
                       global_tokens=[0] * 8, segment_size=2400, learning_rate=1e-3, disc_div=8)
        c.batch_size = c.codec.batch_size
        c.total_steps, c.checkpoint_every = 20, 10
        c.data.update(heldout_every=10, heldout_seconds=0.5)
    return c
