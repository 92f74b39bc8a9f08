"""The command line and the benchmark entry point run end to end (no timing asserted)."""
import json

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


def test_bench_runs(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["llm", "--config=tiny", "--config.bench.steps=1", "--config.bench.seq_len=32",
                       "--config.bench.decode_tokens=4", "--config.bench.peak_tflops=1.0",
                       "--config.bench.hbm_gbps=10", f"--json={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["tokens_per_s"] > 0 and 0 < res["mfu"] < 1 and res["decode_roofline_fraction"] > 0
    assert "MFU" in capsys.readouterr().out
