"""LoRA adapters (vita_jax/models/lora.py, through qwix): a new adapter leaves the model bitwise unchanged in
float32, merged adapters give the adapted model's outputs, targets are checked, adapters take their kernel's
logical axes, and with LoRA only the adapters train."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import one_line

QKV = r"llm/model/layers/self_attn/(q|k|v|o)_proj/kernel"


def _config():
    from vita_jax.train import stages
    c = stages.stage_config("2.2", "tiny")
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.lora.targets = [QKV, r"llm/model/layers/mlp/.*_proj/kernel", r"mm_projector/\d+/kernel"]
    return c


@pytest.fixture(scope="module")
def tiny():
    from vita_jax.models import lora, vita
    c = _config()
    spec = lora.spec_of(c)
    params = vita.init_params(c, seed=0)
    modules = lora.target_modules(spec, params)
    adapters = lora.init_adapters(spec, vita.parts(c), modules, seed=0)
    return c, spec, params, modules, adapters


def _with(params, extra):
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update(traverse_util.flatten_dict(extra, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def _random_b(tree, scale=0.05):
    flat = traverse_util.flatten_dict(tree, sep="/")
    for i, k in enumerate(sorted(flat)):
        if k.endswith("_lora_b"):
            flat[k] = scale * jax.random.normal(jax.random.PRNGKey(i), flat[k].shape)
    return traverse_util.unflatten_dict(flat, sep="/")


def test_targets_and_adapter_shapes(tiny):
    c, spec, params, modules, adapters = tiny
    assert "llm/model/layers/self_attn/q_proj" in modules and "mm_projector/0" in modules
    assert not any("norm" in m or "embed" in m or "vision_tower" in m for m in modules)
    flat = traverse_util.flatten_dict(adapters, sep="/")
    layers, e = int(c.llm.num_hidden_layers), int(c.llm.hidden_size)
    heads, dh = int(c.llm.num_attention_heads), e // int(c.llm.num_attention_heads)
    assert flat["llm/model/layers/self_attn/q_proj/kernel_lora_a"].shape == (layers, e, 4)
    assert flat["llm/model/layers/self_attn/q_proj/kernel_lora_b"].shape == (layers, 4, heads * dh)
    assert flat["llm/model/layers/self_attn/o_proj/kernel_lora_a"].shape == (layers, heads * dh, 4)
    assert all(not np.any(np.asarray(v)) for k, v in flat.items() if k.endswith("_lora_b"))  # B starts at zero
    assert all(np.std(np.asarray(v)) > 0 for k, v in flat.items() if k.endswith("_lora_a"))
    assert len(flat) == 2 * len(modules)


def test_new_adapters_leave_the_model_bitwise_unchanged(tiny):
    """The whole model's LM loss terms (spliced image + text batch) with zero B = the base model's, bitwise."""
    from vita_jax.data import synthetic
    from vita_jax.models import lora
    from vita_jax.train import step
    c, spec, params, modules, adapters = tiny
    batch = jax.tree.map(jnp.asarray, next(iter(synthetic.synthetic_data(c)[0])))
    base = jax.jit(step.make_loss(c))(params, batch)
    adapted = jax.jit(step.make_loss(c, modules))
    with_lora = adapted(_with(params, adapters), batch)
    assert jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), base, with_lora) == jax.tree.map(lambda _: True, base)
    # and a trained adapter does change it (the check above can fail)
    moved = adapted(_with(params, _random_b(adapters, 0.5)), batch)
    assert abs(float(moved[0]) - float(base[0])) > 1e-4 * abs(float(base[0]))
    assert lora.adapters_of(_with(params, adapters)).keys() == traverse_util.flatten_dict(adapters, sep="/").keys()


def test_merged_adapters_give_the_adapted_outputs(tiny):
    from vita_jax.models import lora, vita
    c, spec, params, modules, adapters = tiny
    full = _with(params, _random_b(adapters))
    llm = vita.parts(c)["llm"].module
    ids = jnp.arange(24).reshape(2, 12) % int(c.llm.vocab_size)
    adapted = lora.wrap(llm, spec, modules, "llm/").apply({"params": full["llm"]}, ids)[0]
    merged = llm.apply({"params": lora.merge(full, spec)["llm"]}, ids)[0]
    base = llm.apply({"params": params["llm"]}, ids)[0]
    err = float(jnp.abs(adapted - merged).max())
    assert err < 1e-5 * float(jnp.abs(adapted).max()) and float(jnp.abs(adapted - base).max()) > 1e3 * err
    assert not lora.adapters_of(lora.merge(full, spec))


@pytest.mark.parametrize("targets,names", [
    (["llm/.*/nothing_here/kernel"], ("config.lora.targets", "nothing_here", "matches no parameter")),
    ([r"llm/model/norm/weight"], ("config.lora.targets", "llm/model/norm/weight", "not a dense kernel")),
    (["llm/(unclosed"], ("config.lora.targets", "not a regular expression")),
    ([], ("config.lora.targets is empty",)),
])
def test_bad_targets_are_one_line_errors(targets, names):
    from vita_jax.models import lora
    from vita_jax.train import setup
    c = _config()
    params = setup.abstract_params(c)  # shapes only (with the config's adapters, which targets never match)
    c.lora.targets = targets
    with pytest.raises(ValueError) as e:
        lora.target_modules(lora.spec_of(c), params)
    one_line(e, *names)


def test_adapters_shard_like_their_kernel_and_alone_train(tiny):
    """Adapters take the kernel's logical axes (A: the input axes, B: the output ones), so the one rules table
    shards them; the train state holds the adapters only as trainable leaves."""
    from vita_jax import parallel
    from vita_jax.models import lora, vita
    from vita_jax.train import setup
    c, spec, params, modules, _ = tiny
    boxed = lora.abstract_adapters(spec, vita.parts(c), modules)
    flat = traverse_util.flatten_dict(boxed, sep="/")
    assert flat["llm/model/layers/mlp/up_proj/kernel_lora_a"].names == ("layers", "embed", None)
    assert flat["llm/model/layers/mlp/up_proj/kernel_lora_b"].names == ("layers", None, "mlp")
    mesh = parallel.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    sh = setup.model_param_shardings(c, mesh)
    assert "llm/model/layers/self_attn/v_proj/kernel_lora_b" in sh
    state, _, lab = setup.make_state_and_step(c, params)
    assert state.train and all(lora.is_adapter(k) for k in state.train)
    assert not any(lora.is_adapter(k) for k in state.frozen) and len(state.train) == 2 * len(modules)
    assert all(state.frozen[k].dtype == jnp.dtype(c.frozen_dtype) for k in state.frozen)
    assert all(state.train[k].dtype == jnp.float32 for k in state.train)


@pytest.mark.slow  # ~25 s each: outside the quick loop
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_qlora_base_is_quantized_per_layer_and_close(qtype):
    """QLoRA (config.lora.base_dtype): the adapted kernels are stored quantized in the frozen state, with one scale
    per layer and output channel (qwix's per-layer layout, under nn.scan too); the adapters stay float32 and alone
    trainable; with new adapters the loss stays within the quantization's error of the float model's."""
    from vita_jax.data import synthetic
    from vita_jax.models import lora, vita
    from vita_jax.train import setup, stages, step
    c = _config()
    c.lora.targets = [QKV, r"llm/model/layers/mlp/.*_proj/kernel"]
    c.lora.base_dtype = qtype
    params = vita.init_params(c, seed=0)
    state, _, _ = setup.make_state_and_step(c, params)
    q = {k: v for k, v in state.frozen.items() if lora.is_quantized(v)}
    assert len(q) == 7 and all(k.startswith("llm/model/layers/") for k in q)
    layers, e = int(c.llm.num_hidden_layers), int(c.llm.hidden_size)
    up = q["llm/model/layers/mlp/up_proj/kernel"].array
    assert up.qvalue.dtype == jnp.dtype(qtype) and up.scale.shape == (layers, 1, int(c.llm.intermediate_size))
    assert up.qvalue.shape == (layers, e, int(c.llm.intermediate_size))
    assert all(lora.is_adapter(k) and v.dtype == jnp.float32 for k, v in state.train.items())
    batch = jax.tree.map(jnp.asarray, next(iter(synthetic.synthetic_data(c)[0])))
    modules = lora.target_modules(lora.spec_of(c), params)
    base = float(jax.jit(step.make_loss(c))(params, batch)[0])
    quant = float(jax.jit(step.make_loss(c, modules))(stages.merge(state.train, state.frozen), batch)[0])
    assert base != quant and abs(quant - base) < {"int8": 1e-3, "int4": 3e-2}[qtype] * abs(base)
    # merged: dequantized kernel + delta, float32
    merged = traverse_util.flatten_dict(lora.merge(stages.merge(state.train, state.frozen), lora.spec_of(c)), sep="/")
    w = merged["llm/model/layers/mlp/up_proj/kernel"]
    ref = np.asarray(params["llm"]["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    bound = {"int8": 0.01, "int4": 0.2}[qtype] * np.abs(ref).max()
    assert w.dtype == jnp.float32 and np.abs(np.asarray(w) - ref).max() < bound
