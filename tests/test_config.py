"""ml_collections configs and big_vision-style command-line overrides."""
import pytest

from vita_jax import config as config_lib
from vita_jax.models.qwen2 import Qwen2Config


def test_real_dimensions():
    c = config_lib.load_config("vita15")
    q = Qwen2Config.from_config(c.llm)
    assert (q.num_hidden_layers, q.hidden_size, q.num_attention_heads, q.num_key_value_heads, q.dim_head,
            q.intermediate_size, q.vocab_size, q.rope_theta, q.rms_norm_eps, q.tie_word_embeddings) == \
        (28, 3584, 28, 4, 128, 18944, 152064, 1e6, 1e-6, False)
    assert q.num_params() == 7_615_616_512  # the LLM's parameter count in the spec


def test_1p5b_size():
    q = Qwen2Config.from_config(config_lib.load_config("qwen2p5_1p5b").llm)
    assert q.num_params() == 1_543_714_304  # Qwen2.5-1.5B (tied embeddings)


def test_overrides():
    c, rest = config_lib.parse_args(["--config=tiny", "--config.llm.hidden_size=128", "--config.dtype=bfloat16",
                                     "--config.llm.tie_word_embeddings=true", "--config.llm.rope_theta=10000",
                                     "--config.mesh_shape.tensor", "2", "--other=1"])
    assert c.llm.hidden_size == 128 and c.dtype == "bfloat16" and c.llm.tie_word_embeddings is True
    assert c.llm.rope_theta == 10000.0 and isinstance(c.llm.rope_theta, float)
    assert c.mesh_shape.tensor == 2 and rest == ["--other=1"]
    with pytest.raises(KeyError, match="hidden_sise"):
        config_lib.parse_args(["--config=tiny", "--config.llm.hidden_sise=1"])
    with pytest.raises((ValueError, TypeError)):
        config_lib.parse_args(["--config=tiny", "--config.llm.hidden_size=wide"])
    c2, _ = config_lib.parse_args(["--config=qwen2p5_1p5b:4096"])
    assert c2.bench.seq_len == 4096


def test_mesh_shape_errors():
    from vita_jax import parallel
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.make_mesh(dict(data=3, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="unknown axes"):
        parallel.make_mesh(dict(pipeline=1))
