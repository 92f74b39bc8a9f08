"""The stage recipes in configs/stage*.py: every stage at full size and ``:tiny`` builds exactly the config the
positional table of vita_jax/train/stages.py built before the recipes moved into files (tests/data/
stage_configs.json, dumped from that code), and every ``:narrow`` keeps the full-size recipe and data shapes."""
import json
import os

import jax
import numpy as np
import pytest

from vita_jax import config as config_lib
from vita_jax.train import program, setup, stages, trainer

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stage_configs.json")
NARROW = [s for s in stages.STAGES if s != "3.1"]


def _plain(o):
    """JSON's form of a config value, tuples marked (the snapshot's encoding)."""
    if isinstance(o, tuple):
        return {"__tuple__": [_plain(x) for x in o]}
    if isinstance(o, list):
        return [_plain(x) for x in o]
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    return o


def _diff(a, b, path=""):
    """The dotted fields where ``a`` and ``b`` differ (values and types: 1 is not 1.0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k, "<missing>"), b.get(k, "<missing>"),
                                                                 f"{path}.{k}".lstrip("."))]
    same = a == b and type(a) is type(b) and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return [] if same else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("stage", stages.STAGES)
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_same_values_as_before(stage, variant):
    want = json.load(open(SNAPSHOT))[f"{stage}:{variant}"]
    got = _plain(stages.stage_config(stage, variant or None).to_dict())
    assert _diff(got, want) == []


@pytest.mark.parametrize("stage", NARROW)
def test_narrow_has_the_full_size_shapes(stage):
    full, c = stages.stage_config(stage), stages.stage_config(stage, "narrow")
    assert (c.data.seq_len, c.grad_accum, c.data.packing, c.data.budgets) == (6200, 2, True, "auto")
    assert c.llm.vocab_size == 152064 and (c.bos_token_id, c.eos_token_id) == (151643, 151645)
    assert (c.image.size, c.vision.image_size, c.vision.patch_size) == (448, 448, 14)
    assert ((c.vision.image_size // c.vision.patch_size) // 2) ** 2 == 256  # tokens a tile after the pixel shuffle
    assert (c.image.max_dynamic_patch, c.image.use_thumbnail) == (12, True)
    assert c.data.max_tiles_per_sample == stages.tiles_per_image(c) == 13
    assert c.data.max_frames == 3000 and c.audio.input_dim == 80
    # the recipe is the full size's: trainables, loss, learning rates, schedule
    assert (c.trainable, c.loss, c.optim.to_dict()) == (full.trainable, full.loss, full.optim.to_dict())
    # every tower narrow and shallow
    assert c.llm.num_hidden_layers == c.vision.num_hidden_layers == c.audio.num_blocks == 2
    for width in (c.llm.hidden_size, c.llm.intermediate_size, c.vision.hidden_size, c.vision.intermediate_size,
                  c.audio.attention_dim, c.audio.linear_units):
        assert 64 <= width <= 128
    if stage == "3.2":
        assert c.tts.num_blocks == 2 and c.tts.idim == c.llm.hidden_size // 4 and c.tts.odim == 1024
    config_lib.check_model(c)


def test_variant_and_stage_errors():
    with pytest.raises(ValueError, match=r"stage 2.2: unknown config variant 'huge' \(none for the full size, "
                                         r"or :tiny, :narrow\)"):
        stages.stage_config("2.2", "huge")
    with pytest.raises(ValueError, match="unknown config variant 'narrow'"):
        stages.stage_config("3.1", "narrow")
    with pytest.raises(KeyError, match="unknown stage '4.1'"):
        stages.stage_config("4.1")


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
@pytest.mark.parametrize("stage", NARROW)
def test_narrow_model_builds(stage):
    """Every ``:narrow`` passes the trainer's checks and has a model (shapes only); 2.2's (every tower) initialises
    for real (the 152,064 x 128 embedding and head are most of the ~40 M parameters)."""
    c = stages.stage_config(stage, "narrow")
    c.ctc_units = 64 if stage == "2.1a" else c.ctc_units  # sized from the data in a run
    trainer.check_config(c)
    shapes = setup.abstract_params(c)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 39_000_000 < n < 45_000_000, n
    assert shapes["llm"]["model"]["embed_tokens"]["embedding"].shape == (152064, 128)
    if stage == "2.2":
        params = program.initial_params(c)
        assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, shapes)
