"""Weight-only int8 / int4 inference (vita_jax/models/quantize.py, VitaModel.quantize, --quantize): the
LLM's linear kernels stored quantized, every entry point computing from them, outputs near the float model's."""
import os

import numpy as np
import pytest

import vita_jax
from vita_jax.models import lora
from vita_jax.models import quantize as q

from conftest import rel_err

pytestmark = pytest.mark.slow  # compiles for minutes in all: outside the quick loop (pytest -m "not slow")


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """The fixture release as loaded, and int8 / int4 copies (fresh loads: the session's tiny_model is shared)."""
    return (vita_jax.from_pretrained(tiny_dir), vita_jax.from_pretrained(tiny_dir).quantize("int8"),
            vita_jax.from_pretrained(tiny_dir).quantize("int4"))


def _fwd(tiny_dir):
    f = np.load(os.path.join(tiny_dir, "reference/forward.npz"))
    return (f["input_ids"], f["attention_mask"]), dict(pixel_values=f["images"][:3], audio_features=f["audio_feats"],
                                                       audio_lengths=f["audio_lengths"])


def test_kernels_are_stored_quantized(pair):
    """Every LLM linear kernel (7 per layer stack) is a qwix int8 array with a float32 scale per layer and
    output channel; embeddings, norms, the LM head and the towers stay float; int8 is about a quarter of
    the float32 bytes of what it replaces."""
    from flax import traverse_util
    base, m8, m4 = pair
    flat8 = traverse_util.flatten_dict(m8.params, sep="/")
    flat = traverse_util.flatten_dict(base.params, sep="/")
    quant = sorted(k for k, v in flat8.items() if lora.is_quantized(v))
    assert len(quant) == 7 and all(k.startswith("llm/model/layers/") for k in quant), quant
    for k in quant:
        w, qa = flat[k], flat8[k].array
        assert str(qa.qvalue.dtype) == "int8" and qa.qvalue.shape == w.shape and str(qa.scale.dtype) == "float32"
        assert qa.scale.shape[0] == w.shape[0] and qa.scale.size < w.size / 8, (k, qa.scale.shape)
        assert rel_err(np.asarray(lora.dequantize(flat8[k])), np.asarray(w)) < 1e-2, k
    assert not any(lora.is_quantized(v) for k, v in flat8.items() if not k.startswith("llm/model/layers/"))
    replaced = sum(flat[k].size * 4 for k in quant)
    saved = q.weight_bytes(base.params) - q.weight_bytes(m8.params)
    assert saved > 0.7 * replaced
    assert str(traverse_util.flatten_dict(m4.params, sep="/")[quant[0]].array.qvalue.dtype) == "int4"


def test_outputs_stay_near_the_float_model(pair, tiny_dir):
    """Logits of the fixture's multimodal batch (images and audio spliced), max error over the largest
    logit: int8 2.3e-2, int4 0.36 measured on this random 64-wide model (its per-channel steps are coarse
    next to a trained 7B's): int8 under 5e-2, and its error the rounding noise of a step 127 / 7 = 18x
    finer than int4's (over 8x smaller)."""
    base, m8, m4 = pair
    (ids, mask), media = _fwd(tiny_dir)
    ref = base.forward(ids, mask, **media)
    e8, e4 = rel_err(m8.forward(ids, mask, **media), ref), rel_err(m4.forward(ids, mask, **media), ref)
    assert 0 < e8 < 5e-2 and 8 * e8 < e4 < 1.0, (e8, e4)


def test_greedy_choices_differ_only_on_near_ties(pair, tiny_dir):
    """int8's greedy continuation of the fixture's text prompt, scored by the float model (teacher forced):
    every int8 choice is the float model's best token or within twice the int8 logit error of it (on this
    random model the top logits are close, so the continuations themselves may part)."""
    base, m8, _ = pair
    ids = np.load(os.path.join(tiny_dir, "reference/forward_textonly.npz"))["input_ids"]
    new = m8.generate(ids, max_new_tokens=8, stop_ids=[])
    seq = np.concatenate([ids, new], 1)
    f, g = np.asarray(base.forward(seq), np.float64)[0], np.asarray(m8.forward(seq), np.float64)[0]
    err = np.abs(f - g).max()
    pos = np.arange(ids.shape[1] - 1, seq.shape[1] - 1)
    assert np.array_equal(g[pos].argmax(-1), new[0])  # generate = its own forward's argmax
    gap = f[pos].max(-1) - f[pos, new[0]]
    assert (gap <= 2 * err).all() and err < 5e-2 * np.abs(f).max(), (gap, err)


def test_bad_requests(tiny_dir, pair):
    with pytest.raises(ValueError, match="--quantize 'int3': one of int8, int4"):
        vita_jax.from_pretrained(tiny_dir).quantize("int3")
    with pytest.raises(ValueError, match="already quantized"):
        pair[1].quantize("int8")
    with pytest.raises(ValueError, match="matches no parameter path"):
        vita_jax.from_pretrained(tiny_dir).quantize("int8", targets=["llm/nothing/kernel"])


def test_serve_engine_decodes_the_quantized_model(chat_release_dir):
    """The live server's batched decode over int8 weights gives model.generate's ids (the quantized model's)."""
    import threading

    from vita_jax.serve import engine as engine_lib
    m = vita_jax.from_pretrained(chat_release_dir).quantize("int8")
    ex = m.chat_inputs("What is the weather like on Mars today?")
    out = m.generate(ex["input_ids"][None], max_new_tokens=8)[0]
    want = [int(t) for t in out if t >= 0 and t not in m.stop_ids]
    e = engine_lib.ServeEngine(m, slots=2, max_new_tokens=12, max_prompt=512)
    try:
        got, done = [], threading.Event()
        e.submit(engine_lib.Request(lambda: (ex["input_ids"], None, []), got.append, lambda r, i: done.set(),
                                    max_new_tokens=8))
        assert done.wait(600)
    finally:
        e.close()
    assert got == want and want


def test_a_quantized_model_is_not_saved(pair, tmp_path):
    """save_pretrained of a quantized model: a one-line error naming the target, nothing written (it raised an
    IndexError from inside the exporter)."""
    _, m8, _ = pair
    with pytest.raises(ValueError, match="is quantized \\(int8\\).*quantize after loading"):
        m8.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
