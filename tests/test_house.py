"""The package's shape: imports run one way, no cycles, function-level imports say why, small files,
every subcommand answers --help.

Layers, low to high (a module imports only its own package or lower layers; ``convert`` sits beside
``data`` and may import it, never the other way round)::

    config, paths, assets <- parallel <- layers <- models <- data <- convert <- infer <- evals <- train
                   <- api <- serve <- {bench, demo} <- cli_args <- cli <- the package root (lazy re-exports)
"""
import ast
import os
import subprocess
import sys

import pytest

from conftest import HANG_S

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vita_jax")
RANK = {"config": 0, "paths": 0, "assets": 0, "sizes": 0, "parallel": 1, "layers": 2, "models": 3, "data": 4,
        "convert": 5, "infer": 6, "evals": 7, "train": 8, "api": 9, "serve": 10, "bench": 11, "demo": 11,
        "cli_args": 12, "cli": 13, "": 14}
MAX_LINES = 400


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The vita_jax module an imported dotted name refers to (the longest existing prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in MODULES:
            return cand
    return None


def _imports(module: str):
    """``(imported module, line, function-level?, source line)`` for every import of a vita_jax module,
    plus ``(None, line, True, source)`` for function-level imports of anything else."""
    path = MODULES[module]
    src = open(path).read()
    lines = src.splitlines()
    tree = ast.parse(src)
    top = {id(n) for n in tree.body}
    is_pkg = path.endswith("__init__.py")
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            names = [f"{mod}.{a.name}" for a in node.names]  # resolves to mod when a.name is not a module
        else:
            continue
        local = id(node) not in top and not _under_type_checking(tree, node)
        hit = False
        for n in names:
            target = _resolve(n) if n.split(".")[0] == "vita_jax" else None
            if target is not None and target != module:
                hit = True
                yield target, node.lineno, local, lines[node.lineno - 1]
        if local and not hit:
            yield None, node.lineno, local, lines[node.lineno - 1]


def _under_type_checking(tree, node) -> bool:
    return False


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


EDGES = [(m, t, line, local, text) for m in MODULES for t, line, local, text in _imports(m)]


def test_imports_point_down():
    bad = []
    for m, t, line, _, text in EDGES:
        if t is None:
            continue
        a, b = _package(m), _package(t)
        if a not in RANK or b not in RANK:
            bad.append(f"{m}:{line}: package {a or b!r} has no layer in RANK (tests/test_house.py)")
        elif a != b and RANK[b] >= RANK[a]:
            bad.append(f"{m}:{line} imports {t} ({b} is not below {a}): {text.strip()}")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods, pkgs = {}, {}
    for m, t, *_ in EDGES:
        if t is None:
            continue
        # a module importing its own package's __init__ is not an edge between modules
        if not (m.startswith(t + ".") and t in MODULES and MODULES[t].endswith("__init__.py")):
            mods.setdefault(m, set()).add(t)
        if _package(m) != _package(t):
            pkgs.setdefault(_package(m), set()).add(_package(t))
    assert _cycles(mods) == [], "module import cycles"
    assert _cycles(pkgs) == [], "package import cycles"


def test_function_level_imports_say_why():
    """A function-level import is for import cost or an optional dependency: its line says which."""
    bad = [f"{m}:{line}: {text.strip()}" for m, _, line, local, text in EDGES if local and "#" not in text]
    assert not bad, "function-level imports without a reason:\n" + "\n".join(sorted(set(bad)))


def test_checker_sees_violations(tmp_path):
    """The checks above can fail: an upward import and a cycle are found in a made-up graph."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert RANK["data"] > RANK["models"] and RANK["convert"] > RANK["data"]
    assert _resolve("vita_jax.models.vita.VITA") == "vita_jax.models.vita"
    assert ("vita_jax.models.vita", "vita_jax.data.batch") not in {(m, t) for m, t, *_ in EDGES}


def test_files_are_small():
    big = {m: n for m, p in MODULES.items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}"


@pytest.mark.parametrize("sub", ["", "demo", "train", "generate", "eval", "convert", "bench", "compile", "serve"])
def test_every_subcommand_has_help(sub):
    r = subprocess.run([sys.executable, "-m", "vita_jax.cli"] + ([sub] if sub else []) + ["--help"],
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0 and r.stdout.startswith("usage: vita-jax") and "Traceback" not in r.stderr, r.stderr


def test_ruff_clean():
    """``ruff check`` with the project's ``.ruff.toml`` (pyflakes, import order, lines <= 120) finds nothing."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format=concise", "."],
                       cwd=os.path.dirname(PKG), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
