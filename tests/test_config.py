"""ml_collections configs and big_vision-style command-line overrides; model sizes that cannot build are named."""
import pytest

from vita_jax import config as config_lib
from vita_jax.models.qwen2 import Qwen2Config

from conftest import cli_error


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


# ---------------------------------------------------------- refused early, one line naming the file, field or option


@pytest.mark.parametrize("override, named", [
    ("llm.hidden_size=-64", "config.llm.hidden_size = -64: must be an integer >= 1"),
    ("llm.vocab_size=0", "config.llm.vocab_size = 0"),
    ("llm.num_attention_heads=3", "config.llm.num_attention_heads = 3 is not a multiple of"),
    ("vision.patch_size=5", "config.vision.image_size = 56 is not a multiple of config.vision.patch_size = 5"),
    ("mm_hidden_size=100", "config.mm_hidden_size = 100: must be 4 x config.vision.hidden_size = 256"),
    ("audio.attention_heads=5", "config.audio.attention_dim = 32 is not a multiple of config.audio.attention_heads"),
])
def test_model_sizes_that_cannot_build_are_named(capsys, tmp_path, override, named):
    line = cli_error(capsys, "train", "--config=stage1_1:tiny", f"--config.{override}", "--workdir",
                      str(tmp_path / "wd"))
    assert named in line
    assert not (tmp_path / "wd").exists()  # refused before the work dir was made


def test_heads_need_an_even_width():
    from vita_jax.train import stages
    c = stages.stage_config("1.1", "tiny")
    c.llm.hidden_size = 60  # 4 heads of 15: rotary embedding needs an even width
    with pytest.raises(ValueError, match="config.llm.hidden_size = 60 / num_attention_heads = 4"):
        config_lib.check_model(c)
    c.llm.hidden_size = 72  # 4 heads of 18: fine
    config_lib.check_model(c)
    for stage in ("1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.2"):  # every shipped config passes
        config_lib.check_model(stages.stage_config(stage))
        config_lib.check_model(stages.stage_config(stage, "tiny"))
