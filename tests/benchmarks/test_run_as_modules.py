"""The benchmarks and the topology harness run as modules from the repository root (``python -m
benchmarks.bench_generate``, ``python -m scripts.topology``), with no hand-made ``sys.path`` anywhere: each
entry point gets as far as its ``--help`` in a fresh interpreter started there, and no module of the repository
touches ``sys.path``."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = [*sorted(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("bench_*.py")),
                "scripts.topology"]
FOLDERS = ("server", "adapters_store", "client", "tests", "benchmarks", "scripts")

# One interpreter for all of them (torch and transformers load once): each runs as ``python -m NAME --help``
# would, and must exit 0 having printed its usage.
RUN_ALL = """
import contextlib, io, runpy, sys
for name in sys.argv[1:]:
    sys.argv, out = [name, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code in (0, None), (name, e.code)
    assert "usage:" in out.getvalue(), (name, out.getvalue()[:200])
    print("ok", name)
"""


@pytest.mark.slow
def test_every_entry_point_runs_as_a_module_from_the_repository_root():
    assert len(ENTRY_POINTS) >= 8
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the working directory helps
    done = subprocess.run([sys.executable, "-c", RUN_ALL, *ENTRY_POINTS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.split() == [w for name in ENTRY_POINTS for w in ("ok", name)]


def touches_sys_path(tree: ast.AST) -> list[int]:
    """Lines that read or change ``sys.path`` (as ``sys.path`` or an alias ``from sys import path``)."""
    lines = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
             and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    lines += [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "sys"
              and any(a.name == "path" for a in n.names)]
    return lines


def test_no_module_of_the_repository_touches_sys_path():
    paths = [path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))]
    found = [f"{path.relative_to(ROOT)}:{line}" for path in paths
             for line in touches_sys_path(ast.parse(path.read_text()))]
    assert not found, found


def test_the_check_sees_a_sys_path_edit():
    assert touches_sys_path(ast.parse("import sys\nsys.path.insert(0, '.')\n")) == [2]
    assert touches_sys_path(ast.parse("from sys import path\npath.append('x')\n")) == [1]
    assert touches_sys_path(ast.parse("import os\nos.path.join('a')\n")) == []
