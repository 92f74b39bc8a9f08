"""``--mesh`` for generate / eval / serve: the fixture release on 8 CPU devices (fsdp 4 x tensor 2) gives one
device's logits (1e-5) and greedy ids through forward, generate and the serve engine (in a subprocess: the
8-device CPU backend must be set before jax starts)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HANG_S, REPO

pytestmark = pytest.mark.slow  # a subprocess that loads and compiles the model twice


def test_eight_devices_serve_as_one(tiny_dir):
    p = subprocess.run([sys.executable, os.path.join(REPO, "tests", "serve_mesh_check.py"), tiny_dir], cwd=REPO,
                       capture_output=True, text=True, timeout=HANG_S)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(line[0][7:])
    assert r["devices"] == 8 and r["q_spec"] == ["None", "fsdp", "tensor"]  # really sharded
    assert r["rel_err"] <= 1e-5 and r["generate_equal"]
    assert r["served_one"] == r["served_mesh"] == [r["generated"]] * 2 and r["generated"]
    # the prompt ladder compiles nothing after its warm-up on one device or on the mesh, and agrees
    assert r["prompt_compiles"] == [0, 0] and r["prompt_rel_err"] <= 1e-5, r
    assert r["prompt_positions"][1] > r["prompt_positions"][0] > 0


def test_mesh_option_errors():
    from vita_jax.cli import UsageError, parse_mesh
    assert parse_mesh("tensor=2") == {"data": 1, "fsdp": -1, "tensor": 2}
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "fsdp": -1, "tensor": 4}
    for bad in ("tensor", "tensor=x", "model=2"):
        with pytest.raises(UsageError, match="--mesh"):
            parse_mesh(bad)
