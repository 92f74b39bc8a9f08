"""The CLI's error boundary: a user mistake is one line ``vita-jax: error: ...`` naming the file,
option or field, exit code 2, no traceback; ``--debug`` shows the traceback."""
import os
import subprocess
import sys

import pytest

from conftest import HANG_S, TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vita_jax.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_S, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args, named", [
    (("generate", "--checkpoint", "/no/such/model", "--prompt", "hi"), "/no/such/model"),
    (("convert", "--to", "orbax", "/no/such/release", "out"), "/no/such/release"),
    (("generate", TINY, "--prompt", "hi"), "tokenizer.json"),
    (("train", "--config=no_such_stage", "--workdir", "wd"), "no config named 'no_such_stage'; the names are "),
    (("train", "--config=my/no_such_stage.py:tiny", "--workdir", "wd"), "config file my/no_such_stage.py does not"),
    (("train", "--config=stage1_1:tiny", "--config.llm.hidden_sise=3", "--workdir", "wd"),
     "llm.hidden_sise"),
    (("train", "--config=tiny", "--workdir", "wd"), "stage config"),
    (("train", "--config=stage1_1:tiny", "--config.checkpoint_every=0", "--workdir", "wd"),
     "config.checkpoint_every = 0: must be at least 1"),
    (("train", "--config=stage1_1:tiny", "--config.optim.schedule=cosin", "--workdir", "wd"),
     "config.optim.schedule = 'cosin'"),
])
def test_user_mistake_is_one_line(tmp_path, args, named):
    r = _run(*[a.replace("wd", str(tmp_path / "wd")) if a == "wd" else a for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("vita-jax: error: ")
    assert named in r.stderr
    assert not os.path.exists(tmp_path / "wd")  # nothing was started


def test_debug_shows_the_traceback():
    r = _run("convert", "--to", "orbax", "/no/such/release", "out", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_error_right_after_opening_the_checkpoints_is_one_line(tmp_path):
    """A tokenizer that cannot load stops the run just after WORKDIR/ckpt is opened: one stderr line, no
    asyncio / orbax noise from the checkpoint manager's cleanup thread at interpreter shutdown."""
    data = tmp_path / "d.json"
    data.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}]')
    r = _run("train", "--config=stage1_1:tiny", '--config.data.mixture=[{"json": "%s"}]' % data,
             "--config.data.tokenizer=/no/such/tok", "--workdir", str(tmp_path / "wd"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == ["vita-jax: error: /no/such/tok: cannot load tokenizer: No such file or "
                                             "directory (os error 2)"], r.stderr[-3000:]
