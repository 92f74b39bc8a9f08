"""``vita-jax compile``: the tiny stages' train steps compiled ahead of time for a small TPU
topology from this CPU host (libtpu, no TPU). Each compile runs in a subprocess, so the TPU
topology backend never meets the other tests' CPU backend."""
import importlib.util
import json
import os

import pytest

from vita_jax.train import compile as compile_lib

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')


def _compile(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = run_cli("compile", *args, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    return r, (json.loads(lines[-1]) if lines else None)


@needs_libtpu
def test_tiny_stage_compiles_for_tpu_and_fits():
    # the packer's batch layout, 2 micro-batches (the leading accumulation axis), 2 rows per chip
    r, res = _compile("--config=stage2_2:tiny", "--topology=v5p:2x2x1", "--per-chip-batch=2",
                      "--config.grad_accum=2", "--config.data.packing=True", "--config.remat_policy=full")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("{")  # the JSON line is last
    assert res["topology"] == "v5p:2x2x1" and res["chips"] == 4 and res["device_kind"] == "TPU v5"
    assert res["hbm_capacity_gib"] == 95.0 and res["fits"] is True
    assert 0 < res["hbm_per_chip_gib"] < 1 and res["arguments_gib"] > 0 and res["compile_s"] > 0
    assert res["per_chip_batch"] == 2 and res["global_batch"] == 16 and res["grad_accum"] == 2
    assert res["seq_len"] == 128 and res["remat"] == "full" and res["stage"] == "2.2"
    assert "total" in r.stdout and "temporaries" in r.stdout


@needs_libtpu
def test_not_fitting_exits_nonzero_with_the_json_line():
    # one v5e chip: smaller than a host, which jax's topology API cannot describe alone (the host's chip is used)
    r, res = _compile("--config=stage1_1:tiny", "--topology=v5e:1x1", "--hbm-gib=0.001")
    assert r.returncode == 2, r.stderr[-3000:]
    assert res is not None and res["fits"] is False and res["chips"] == 1 and res["hbm_capacity_gib"] == 0.001
    assert res["device_kind"] == "TPU v5 lite" and res["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}, res
    err = [line for line in r.stderr.splitlines() if line.startswith("vita-jax: error:")]
    assert err and "does not fit v5e:1x1" in err[0] and "GiB per chip" in err[0], r.stderr[-2000:]


@needs_libtpu
def test_slices_smaller_than_a_host_are_that_hosts_chips():
    code = ("from vita_jax.train import compile as c\n"
            "for name in ('v5e:1x1', 'v5e:2x1', 'v5p:1x1x1', 'v5e:2x2'):\n"
            "    print(name, sorted(tuple(d.coords) for d in c.topology_devices(name)))\n"
            "try:\n    c.topology_devices('v5e:3x1')\nexcept ValueError as e:\n    print('error', e)\n")
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert lines["v5e:1x1"] == "[(0, 0, 0)]", p.stdout + p.stderr[-2000:]
    assert lines["v5e:2x1"] == "[(0, 0, 0), (1, 0, 0)]" and lines["v5p:1x1x1"] == "[(0, 0, 0)]", p.stdout
    assert lines["v5e:2x2"].count("(") == 4, p.stdout
    assert "--topology v5e:3x1: not a whole number of hosts" in lines["error"], p.stdout


@needs_libtpu
def test_compiler_out_of_hbm_is_a_result():
    # 65536 positions with the XLA attention (splash, the TPU default, never holds the scores): dense
    # attention scores alone are far over a v5e chip's 16 GiB
    r, res = _compile("--config=stage2_2:tiny", "--topology=v5e:2x2", "--config.data.seq_len=65536",
                      "--config.attention_impl=xla")
    assert r.returncode == 2, r.stderr[-3000:]
    assert res["fits"] is False and res["compiler_out_of_memory"] is True and res["hbm_per_chip_gib"] > 16
    assert res["hbm_capacity_gib"] == 16.0 and res["device_kind"] == "TPU v5 lite"
    assert "the compiler ran out of HBM" in r.stdout and "does not fit v5e:2x2" in r.stderr


def test_out_of_memory_message_is_read():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(284.29G) exceeds available HBM (95.74G).")
    assert compile_lib.out_of_memory_gib(msg) == 284.29
    assert compile_lib.out_of_memory_gib(msg.replace("284.29G", "512M")) == 0.5
    assert compile_lib.out_of_memory_gib("INTERNAL: something else") is None


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(compile_lib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[tpu\]"'):
        compile_lib.topology_devices("v5p:2x2x1")


def test_hbm_table_knows_the_chips():
    assert compile_lib.HBM_GIB["TPU v5"] == 95.0 and compile_lib.HBM_GIB["TPU v5 lite"] == 16.0
    assert compile_lib.HBM_GIB["TPU v6 lite"] == 32.0 and compile_lib.HBM_GIB["TPU v4"] == 32.0


@needs_libtpu
def test_serving_compiles_for_tpu_with_int8_weights():
    """``compile --serve``: the serve engine's prefill and decode programs for a topology, weights int8,
    sharded over a (data 2, tensor 2) mesh; a budget it cannot meet exits 2 with the JSON line."""
    r, res = _compile("--serve", "--config=tiny", "--topology=v5e:2x2", "--max-sessions=2", "--max-len=200",
                      "--max-prompt=100", "--quantize=int8", "--mesh=data=2,tensor=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert res["serve"] and res["quantize"] == "int8" and res["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    # rounded to 64 as the server rounds them (its cache; the top of its prompt ladder, serve/prompt.py)
    assert res["max_len"] == 256 and res["max_prompt"] == 128 and res["fits"] is True
    assert 0 < res["llm_weights_gib"] < res["decode"]["arguments_gib"] and res["prefill"]["total_gib"] > 0
    assert "decode program" in r.stdout and "(int8)" in r.stdout
    r, res = _compile("--serve", "--config=tiny", "--topology=v5e:2x2", "--hbm-gib=0.01")
    assert r.returncode == 2 and res["fits"] is False and res["quantize"] == ""
    assert "serving does not fit v5e:2x2" in r.stderr, r.stderr[-2000:]
