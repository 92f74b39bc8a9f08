"""LoRA training (``config.lora``) of stage 2.2 from the fixture release: the loss falls with the base frozen,
run checkpoints hold the adapters and their optimizer state only, resume is exact, resuming onto another base
is refused, and the export is the merged model (default) or the adapters alone, which ``from_pretrained``
merges into their base."""
import json
import os

import numpy as np
import pytest
from flax import traverse_util

from conftest import TINY, one_line

pytestmark = pytest.mark.slow  # four tiny training runs (~2 min)

STEPS = 6


def _config(**lora):
    from vita_jax.train import stages
    c = stages.stage_config("2.2", "tiny")
    c.init_from, c.total_steps, c.checkpoint_every = TINY, STEPS, 3
    c.optim.lr, c.optim.warmup_ratio = 5e-3, 0.0
    c.lora.update(dict(rank=4, alpha=8.0, **lora))
    return c


def _train(c, wd, **kw):
    from vita_jax.train import trainer
    lines = []
    out = trainer.train(c, str(wd), log=lines.append, progress=False, **kw)
    return out, lines


def _rows(wd):
    return [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("lora") / "run"
    out, lines = _train(_config(), wd)
    return wd, out, lines


def test_loss_falls_with_adapters_alone_trained(run):
    wd, out, lines = run
    losses = [r["loss"] for r in _rows(wd)]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    from vita_jax.models import lora
    state = out["state"]
    assert state.train and all(lora.is_adapter(k) for k in state.train)
    table = "\n".join(lines)
    assert "kernel_lora_a" in table or "lora" in table.lower(), table[:2000]


def test_run_checkpoint_holds_the_adapters_only(run):
    wd, out, _ = run
    with open(wd / "ckpt" / str(STEPS) / "state" / "_METADATA") as f:
        keys = list(json.load(f)["tree_metadata"])  # "('train', 'llm/.../kernel_lora_a')", ...
    assert any("kernel_lora_a" in k for k in keys) and any("base" in k for k in keys)
    assert not any("frozen" in k for k in keys)
    assert not any(k.endswith("/kernel')") for k in keys), keys[:20]
    ck_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(wd / "ckpt" / str(STEPS)) for f in fs)
    model_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(wd / "model") for f in fs)
    assert ck_bytes < model_bytes / 2, (ck_bytes, model_bytes)


def test_resume_is_exact_and_another_base_is_refused(run, tmp_path):
    wd, _, _ = run
    wd2 = tmp_path / "run"
    _train(_config(), wd2, stop_after=3)
    _, lines = _train(_config(), wd2)
    assert "resumed from step 3" in lines
    strip = lambda rows: [{k: v for k, v in r.items() if k in ("step", "loss", "grad_norm")} for r in rows]  # noqa: E731
    assert strip(_rows(wd2)) == strip(_rows(wd))
    # the finished run's folder, resumed for one more step onto a random base of the same shapes
    import shutil
    shutil.copytree(wd, tmp_path / "other")
    other = _config()
    other.init_from, other.total_steps = "", STEPS + 1
    with pytest.raises(ValueError) as e:
        _train(other, tmp_path / "other")
    one_line(e, "config.init_from", "base model")


def test_export_merged_and_adapters_only(run, tmp_path):
    """The default export is the merged model; ``merge = False`` writes the adapters alone, which
    ``from_pretrained(base, adapters=...)``, ``from_pretrained(adapters)`` and ``vita-jax convert --to pytorch``
    merge into the same weights."""
    import vita_jax
    from vita_jax.models import lora
    from vita_jax.train import program
    wd, out, _ = run
    c = _config()
    merged = program.model_params_of(c, out["state"])
    got = vita_jax.from_pretrained(str(wd / "model"))
    q = "llm/model/layers/self_attn/q_proj/kernel"
    a = traverse_util.flatten_dict(got.params, sep="/")[q]
    b = traverse_util.flatten_dict(merged, sep="/")[q]
    base = traverse_util.flatten_dict(vita_jax.from_pretrained(TINY).params, sep="/")[q]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-6 and np.abs(np.asarray(a) - np.asarray(base)).max() > 1e-4
    adapters_dir = tmp_path / "adapters"
    program.export_model(_config(merge=False), out["state"], str(adapters_dir))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(adapters_dir) for f in fs)
    assert size < sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(wd / "model") for f in fs) / 2
    for m in (vita_jax.from_pretrained(TINY, adapters=str(adapters_dir)), vita_jax.from_pretrained(str(adapters_dir))):
        x = traverse_util.flatten_dict(m.params, sep="/")[q]
        assert np.abs(np.asarray(x) - np.asarray(b)).max() < 1e-6
    assert not lora.adapters_of(m.params)
    # vita-jax convert --to pytorch of the adapters folder: the official layout of the merged model, read back equal
    from vita_jax import cli
    assert cli.main(["convert", "--to", "pytorch", str(adapters_dir), str(tmp_path / "pt")]) == 0
    back = traverse_util.flatten_dict(vita_jax.from_pretrained(str(tmp_path / "pt")).params, sep="/")[q]
    assert np.abs(np.asarray(back) - np.asarray(b)).max() < 1e-6


def test_qlora_trains_and_exports_the_merged_model(tmp_path):
    """An int8 base (QLoRA) under bfloat16 compute (the full-size configs' dtype: the float32 adapters meet bfloat16
    activations): the loss falls, the run checkpoint holds no base kernel, and the export is the dequantized base
    plus the adapters' delta."""
    import vita_jax
    from vita_jax.models import lora
    from vita_jax.train import program
    c = _config(base_dtype="int8")
    c.dtype = c.frozen_dtype = "bfloat16"
    out, _ = _train(c, tmp_path / "run")
    losses = [r["loss"] for r in _rows(tmp_path / "run")]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    assert any(lora.is_quantized(v) for v in out["state"].frozen.values())
    with open(tmp_path / "run" / "ckpt" / str(STEPS) / "state" / "_METADATA") as f:
        assert not any("frozen" in k for k in json.load(f)["tree_metadata"])
    q = "llm/model/layers/self_attn/q_proj/kernel"
    got = traverse_util.flatten_dict(vita_jax.from_pretrained(str(tmp_path / "run" / "model")).params, sep="/")[q]
    want = traverse_util.flatten_dict(program.model_params_of(c, out["state"]), sep="/")[q]
    assert np.abs(np.asarray(got) - np.asarray(want)).max() < 1e-6
