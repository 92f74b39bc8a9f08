"""``python -m vita_jax.bench accel`` on CPU with its small shapes: one JSON line with every part's figures, finite
(no timing asserted); a failing part is reported and the others run; a part that would not fit the budget is
skipped."""
import json
import math

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


@pytest.mark.slow  # 30-80 s on 2 cores, as busy as they are (two tiny models compile)
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


@pytest.mark.slow  # ~65 s on 2 busy cores: the serve loop's warm-up compiles, speech streamed at real time
def test_accel_serve(capsys):
    s = _run(capsys, "--parts=serve", f"--tokenizer={QWEN_TOK}")["serve"]
    assert "error" not in s, s
    assert s["turns"] >= 1 and s["failed"] == 0 and s["audio_s_per_turn"] > 0, s  # the random codec is audible
    assert s["first_audio_p50_ms"] > 0 and s["first_text_p50_ms"] > 0


def test_accel_full_size_traces_with_the_gpu_choices(monkeypatch):
    """What a GPU session runs, traced on CPU (nothing compiled): the full-size train step (1.5B LLM, real towers,
    2 packed rows of 4096) as ``auto`` builds it on an sm90 GPU (tokamax's kernels through its ``cross_compile``)
    holds no ``[.., 4096, 4096]`` value; the 7B-shaped decode (prefill and a step at batch 8) traces."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vita_jax import parallel
    from vita_jax.bench import accel
    from vita_jax.infer import generate as gen
    from vita_jax.layers import attention
    from vita_jax.models import qwen2, vita
    from vita_jax.train import setup
    tokamax = pytest.importorskip("tokamax")
    from tokamax._src import gpu_utils

    cfg = vita.llm_config(accel.decode_config(False, 0))
    module = qwen2.Qwen2ForCausalLM(cfg)
    params = jax.eval_shape(lambda: vita.init_module(module))
    assert 7.6e9 < sum(x.size for x in jax.tree.leaves(params)) < 7.7e9
    kw = dict(do_sample=False, top_k=0, vocab_limit=None, temperature=jnp.float32(1), top_p=jnp.float32(1))
    cache = jax.eval_shape(lambda: qwen2.KVCache.init(cfg, 8, 578))
    ids, key = jax.ShapeDtypeStruct((8, 512), jnp.int32), jax.random.PRNGKey(0)
    tok, cache, _ = jax.eval_shape(lambda p, i, c: gen.prefill(module, p, i, jnp.ones_like(i), c, key, **kw),
                                   params, ids, cache)
    tok, _, _ = jax.eval_shape(lambda p, t, c: gen.decode_step(module, p, t, c, key, **kw), params, tok, cache)
    assert tok.shape == (8,)

    c = accel.train_config(False, 4096, 2)
    mesh = parallel.make_mesh(dict(c.mesh_shape))
    host = accel.packed_batch(c, 2)
    state, fn, _ = setup.abstract_state(c, mesh)  # the parameters' shapes before the GPU choices
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), host)
    monkeypatch.setattr(gpu_utils, "is_sm90", lambda device=None: True)
    monkeypatch.setattr(attention.parallel, "current_platform", lambda: "gpu")
    with tokamax.config.cross_compile(True), parallel.use_mesh(mesh):
        jaxpr = jax.make_jaxpr(fn)(state, batch)
    assert "4096,4096]" not in str(jaxpr).replace(" ", "")  # with attention_impl="xla" the mask is there
    u, a = accel.useful_flops(c, host)
    assert 0.85 * a < u < a  # rows filled to ~94 %


def test_accel_watchdog_writes_what_was_measured_and_exits(tmp_path):
    """A part still running at ``--hard-s``: the JSON line comes anyway (that part timed out), exit status 3.

    The decode part is made to hang for real (its function replaced by a wait that never ends, in the subprocess),
    so the verdict does not rest on how fast this machine decodes (a warm compile cache once made it finish in 2 s).
    """
    import subprocess
    import sys
    out = tmp_path / "a.json"
    code = ("import sys, threading; from vita_jax.bench import accel; "
            "accel.bench_decode = lambda *a, **k: threading.Event().wait(); "
            "sys.exit(accel.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "--small", "--parts=decode", "--hard-s=2", f"--json={out}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == res
    assert "timed out" in res["decode"]["error"] and "running" not in res
