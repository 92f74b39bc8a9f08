"""``python -m vita_jax.bench accel`` on CPU with its small shapes: one JSON line with every part's figures, finite
(no timing asserted); a failing part is reported and the others run; a part that would not fit the budget is
skipped."""
import json
import math
import os

import pytest

from vita_jax import bench

from conftest import QWEN_TOK


def _numbers(d, where="") -> list:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _numbers(v, f"{where}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((where + k, v))
    return out


def _run(capsys, *args) -> dict:
    assert bench.main(["accel", "--small", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # one JSON line on stdout
    res = json.loads(lines[0])
    assert res["device"] and res["platform"] == "cpu" and res["jax"] and res["date"] and res["small"] is True
    return res


@pytest.mark.slow  # ~55 s on 2 busy cores (two tiny models compile)
def test_accel_train_and_decode(tmp_path, capsys):
    out = tmp_path / "accel.json"
    res = _run(capsys, "--parts=train,decode", f"--json={out}")
    assert json.loads(out.read_text()) == res
    t, d = res["train"], res["decode"]
    assert "error" not in t and "error" not in d, (t, d)
    assert all(math.isfinite(v) for _, v in _numbers(res)), _numbers(res)
    assert t["step_s"] > 0 and t["useful_tokens_per_s"] > 0 and math.isfinite(t["loss_last"])
    assert 0 < t["useful_tokens"] <= t["rows"] * t["seq_len"] and t["examples"] >= t["rows"]
    assert 0 < t["useful_tflops_per_step"] < t["allocated_tflops_per_step"]
    assert t["mfu"] is None and res["peak_tflops"] is None  # no CPU peak in the table: raw figures only
    for b in ("batch1", "batch8"):
        assert d[b]["ms_per_step"] > 0 and d[b]["kv_cache_bytes"] > 0 and d[b]["roofline_ms"] is None
    assert d["batch8"]["kv_cache_bytes"] == 8 * d["batch1"]["kv_cache_bytes"]
    assert d["weight_bytes"] == 2 * d["params"]  # bf16 weights


def test_accel_reports_a_failing_part_and_skips_what_does_not_fit(capsys, tmp_path):
    res = _run(capsys, "--parts=serve", f"--tokenizer={tmp_path}")
    assert "no tokenizer.json" in res["serve"]["error"] and "train" not in res
    res = _run(capsys, "--budget-s=1")
    assert all("skipped" in res[p] for p in ("train", "decode", "serve")), res


@pytest.mark.slow  # ~3 min on 2 busy cores: the serve loop's warm-up compiles, speech streamed at real time
@pytest.mark.skipif(not os.path.exists(os.path.join(QWEN_TOK, "tokenizer.json")), reason="no fixtures tokenizer")
def test_accel_serve(capsys):
    s = _run(capsys, "--parts=serve", f"--tokenizer={QWEN_TOK}")["serve"]
    assert "error" not in s, s
    assert s["turns"] >= 1 and s["failed"] == 0 and s["first_audio_p50_ms"] > 0 and s["first_text_p50_ms"] > 0
