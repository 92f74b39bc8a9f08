"""Every command written in README.md and docs/*.md still parses: ``vita-jax ...`` lines through the CLI's
own parser, with a stage's ``--config=NAME[:ARG]`` and ``--config.FIELD=VALUE`` overrides resolved as
``train`` / ``compile`` resolve them; ``python -m vita_jax.bench NAME`` names a benchmark. A renamed
option, config or field fails here instead of in a reader's terminal. Nothing is run."""
import glob
import os
import re
import shlex

import pytest

from conftest import REPO

PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _commands(path):
    """``(line number, argv)`` of each command in the page's fenced blocks (continuations joined,
    comments dropped, ``[--opt value]`` optional groups taken)."""
    out, fence, pending, start = [], False, "", 0
    for n, line in enumerate(open(path, encoding="utf-8"), start=1):
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            continue
        text = (pending + " " + line.strip()) if pending else line.strip()
        start = start if pending else n
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        if re.match(r"^(\.venv/bin/)?(vita-jax|python3? -m vita_jax\.bench) ", text):
            text = re.sub(r"\[(--[^\]]*)\]", r"\1", text)
            out.append((start, shlex.split(text, comments=True)))
    return out


CASES = [(os.path.relpath(p, REPO), n, argv) for p in PAGES for n, argv in _commands(p)]


def test_the_docs_have_commands():
    pages = {p for p, _, _ in CASES}
    assert len(CASES) >= 15 and "README.md" in pages and len(pages) >= 5, pages


@pytest.mark.parametrize("page,line,argv", CASES, ids=[f"{p}:{n}" for p, n, _ in CASES])
def test_command_parses(page, line, argv):
    from vita_jax import bench, cli
    from vita_jax import config as config_lib
    where = f"{page}:{line}: {' '.join(argv)}"
    if argv[0].endswith("python") or argv[0].endswith("python3"):
        assert argv[1:3] == ["-m", "vita_jax.bench"] and argv[3] in bench.WHAT, where
        return
    try:
        a, rest = cli.parser().parse_known_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"{where}: the CLI refuses it ({e})")
    if a.cmd == "compile" and a.serve:  # a model config (vita15), nothing left over
        assert not config_lib.parse_args(rest)[1], where
    elif a.cmd in ("train", "compile"):
        cli._stage_config(a.cmd, config_lib.parse_args(rest))
    elif a.cmd == "eval":
        assert all(r.startswith("--config.") for r in rest), where
    elif a.cmd == "bench" and a.what not in ("serve", "codec", "narrow"):
        config_lib.parse_args([r for r in rest if r.startswith("--config")], default="tiny")
    else:
        assert not rest or a.cmd == "bench", f"{where}: unrecognized {rest}"
