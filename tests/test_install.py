"""A wheel install, not a checkout: ``pip wheel --no-deps .`` then the wheel alone (``--no-deps``) in a fresh venv
outside the checkout that sees the test venv's packages (a ``.pth`` line naming its site-packages: the
dependencies, not its ``vita_jax``), run from another folder. The configs, the bundled speech and the web client
ship inside the package; ``vita-jax train --config=stage1_1:tiny`` finds its config by name and checkpoints, and
the demo (README's first command) runs its first stage."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import HANG_S, REPO

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

SOURCES = ("setup.py", "README.md", "vita_jax", "configs")  # what the wheel is built from


def _sh(cmd, cwd, env=None, timeout=HANG_S):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(python, vita-jax script, clean env, a work folder)`` of a fresh venv holding the built wheel."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: no build/ or .egg-info left in the checkout, no stale build/lib in the wheel
    src.mkdir()
    for name in SOURCES:
        p = os.path.join(REPO, name)
        if os.path.isdir(p):
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(p, src / name)
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", str(tmp)], src)
    wheel = next(tmp.glob("vita_jax-*.whl"))
    venv = tmp / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    py = venv / "bin" / "python"
    site = _sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip()
    with open(os.path.join(site, "test_venv.pth"), "w") as f:  # a plain path line: its .pth files stay unread
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    # the test venv's pip, run by the new venv's python: installs there; --ignore-installed: the test venv's
    # own vita_jax (on the path through the .pth line) is neither an obstacle nor touched
    _sh([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], tmp,
        env)
    work = tmp / "work"
    work.mkdir()
    return py, venv / "bin" / "vita-jax", env, work


def test_the_wheel_carries_its_files(installed):
    py, _, env, work = installed
    out = _sh([str(py), "-c", "import json, os, vita_jax, vita_jax.config as c; from vita_jax import assets; "
               "from vita_jax.serve import server; from vita_jax.train import stages; "
               "print(json.dumps(dict(pkg=vita_jax.__file__, configs=c.CONFIG_DIR, names=c.config_names(), "
               "speech=sorted(os.listdir(os.path.join(assets.ASSETS, 'speech'))), static=sorted(os.listdir("
               "server.STATIC)), stages=[stages.stage_config(s, 'tiny').stage for s in stages.STAGES])))"],
              work, env)
    got = json.loads(out.strip().splitlines()[-1])
    pkg = os.path.dirname(got["pkg"])
    assert not pkg.startswith(REPO) and pkg.startswith(str(installed[0].parent.parent)), got["pkg"]
    assert got["configs"] == os.path.join(pkg, "configs")
    assert {"stage1_1", "stage2_2", "stage3_1", "tiny", "vita15", "narrow"} <= set(got["names"])
    assert "arctic_a0009.wav" in got["speech"] and {"index.html", "worklet.js"} <= set(got["static"])
    assert got["stages"] == ["1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.1", "3.2"]  # the demo's stage configs


def test_train_by_name_from_another_folder(installed):
    _, script, env, work = installed
    out = _sh([str(script), "train", "--config=stage1_1:tiny", "--config.total_steps=2", "--no-progress",
               "--workdir", "run"], work, env)
    assert "stage 1.1: 2 steps" in out, out[-2000:]
    ckpt = work / "run" / "ckpt"
    assert os.path.isdir(ckpt) and "2" in os.listdir(ckpt), os.listdir(work / "run")
    r = subprocess.run([str(script), "train", "--config=stage9_9", "--workdir", "x"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "vita-jax: error: --config=stage9_9: no config named 'stage9_9'; the names are eval_vita15, narrow, "
        "qwen2p5_1p5b, stage1_1, stage1_2, stage1_3, stage2_1a, stage2_1b, stage2_2, stage3_1, stage3_2, tiny, vita15 "
        "(or give a file: FILE.py[:ARG])"], r.stderr


def test_demo_first_stage_from_another_folder(installed):
    """README's first command from the wheel: set-up (data, tokenizer) and stage 0 by the stage configs inside it."""
    _, script, env, work = installed
    out = _sh([str(script), "demo", "--workdir", "demo", "--budget-minutes", "5", "--speech", "recordings",
               "--until", "0", "--no-progress"], work, env)
    s = json.load(open(work / "demo" / "summary.json"))
    assert [r["stage"] for r in s["stages"]] == ["0"] and "export" not in s, s
    assert s["stages"][0]["after"] > s["stages"][0]["before"] and "VITA-1.5 demo summary" in out
