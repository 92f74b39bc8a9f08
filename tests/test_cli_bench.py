"""The command line and the benchmark entry point run end to end (no timing asserted)."""
import json

import pytest

from vita_jax import bench, cli
from vita_jax.models.qwen2 import Qwen2Config


def test_cli_generate(tiny_dir, capsys):
    assert cli.main(["generate", tiny_dir, "--ids", "501,11,10,79,334", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "121 tensors" in out
    new = out.split("new ids:")[1].splitlines()[0]
    assert len(json.loads(new.strip())) == 4


def test_training_flops_formula():
    cfg = Qwen2Config(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=8)
    # per token: qkv 4*(2+2)*2=32, o 16, mlp 96, head 40 -> 184 matmul params
    attn = 4 * 3 * 5 * 5 * 2 * 2 / 2
    assert bench.training_flops(cfg, 3, 5) == 6 * 184 * 15 + 3 * attn


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_bench_runs(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["llm", "--config=tiny", "--config.bench.steps=1", "--config.bench.seq_len=32",
                       "--config.bench.decode_tokens=4", "--config.bench.peak_tflops=1.0",
                       "--config.bench.hbm_gbps=10", f"--json={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["tokens_per_s"] > 0 and 0 < res["mfu"] < 1 and res["decode_roofline_fraction"] > 0
    assert "MFU" in capsys.readouterr().out


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_codec_bench_counts(tmp_path, capsys):
    """``bench codec``: parameters per part from the abstract state (real size: spec §2.4's count of the
    released codec), and the analytic forward FLOPs of every part against XLA's count (tiny fixture
    codec): the convolutions and matmuls, which XLA counts with the elementwise work, so a little below."""
    import jax
    import pytest

    from vita_jax.bench import codec
    from vita_jax.models import ticodec as tt
    from vita_jax.train.codec import step as cs

    from conftest import FIXTURES

    out = tmp_path / "c.json"
    assert bench.main(["codec", "--xla=none", "--batch=160", f"--json={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["params"] == dict(generator=15_379_970, encoder=47_350_304, quantizer=655_360, mpd=41_105_770,
                                 msd=29_618_821, mstftd=472_330)
    # 1 s x 160 at 24 kHz: XLA's count of the compiled step (CPU) is 115.98 TFLOP; the analytic one 115.62
    assert 114.8 < res["analytic_tflops_per_step"] < 116.0 and res["h100_tf32_s_per_step"] > 0
    assert "analytic TFLOP / step" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # 0.3 s = 7200 samples: not a multiple of the hop 600
        bench.main(["codec", "--xla=none", "--seconds=0.31"])
    assert "hop 600" in capsys.readouterr().err

    cfg = tt.CodecTrainConfig.from_model_json(FIXTURES + "/ticodec-train/model.json")
    M = cs.CodecModels.build(cfg)
    state = codec.abstract_state(M)
    p = codec.param_counts(state)
    leaves = jax.tree.leaves({k: state[k] for k in ("gp", "dp")})
    assert sum(p.values()) == sum(x.size for x in leaves)
    assert (p["generator"], p["encoder"], p["quantizer"]) == (2_869_698, 24_309_920, 40_960)
    x2, x4 = codec.xla_forward(M, state, 2), codec.xla_forward(M, state, 4)
    a = codec.analytic(cfg, 2)["parts"]
    for k, f in x2.items():  # the cost of 2 more samples (XLA's count includes weight-norm work on the parameters)
        assert 0.975 < a[k][0] / (x4[k] - f) < 1.0, (k, a[k][0], x4[k] - f)


def test_cli_and_module_offer_the_same_benchmarks():
    """``vita-jax bench NAME`` and ``python -m vita_jax.bench NAME`` accept the same names (the CLI keeps its own
    list so that ``--help`` never imports JAX)."""
    import argparse

    from vita_jax import cli_args
    sub = next(a for a in cli_args.parser()._actions if isinstance(a, argparse._SubParsersAction))
    what = next(a for a in sub.choices["bench"]._actions if a.dest == "what")
    assert tuple(what.choices) == bench.WHAT
