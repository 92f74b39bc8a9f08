"""Stage 3.1, TiCodec training, in one place (its config: ``configs/stage3_1.py``).

* :mod:`~vita_jax.train.codec.data`: upstream ``MelDataset``'s crops and batches.
* :mod:`~vita_jax.train.codec.losses`: the mel front-end and upstream's loss terms.
* :mod:`~vita_jax.train.codec.step`: one upstream ``train.py`` step, jitted (both updates, both Adams).
* :mod:`~vita_jax.train.codec.heldout`: the held-out mel L1.
* :mod:`~vita_jax.train.codec.files`: state <-> upstream's ``g_`` / ``do_`` files; the codec export.
* :mod:`~vita_jax.train.codec.setup`: the stage's :class:`~vita_jax.train.setup.StageProgram` for the trainer.

The model stays in ``models`` (below ``convert`` and ``infer``, which load and run it too): the one
TiCodec (:mod:`vita_jax.models.ticodec`: weight norm live for training, folded at load for the speech
output), its PyTorch-layout layers and the discriminators.
"""
