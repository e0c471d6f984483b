"""Every third-party module the code imports is declared where that code is installed: server/ and
adapters_store/ in the server distribution's dependencies, client/ in ptserve-client's, tests/ in the ``test``
extra, benchmarks/ in ``bench``, and scripts/ (the topology harness, which tests and benchmarks both import) in
both extras. Imports are read from the source (``ast``), so one inside a function counts too; a benchmark's
imports of test helpers (``tests.factories``) and of ``scripts`` are followed."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from functools import cache
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"ptserve", "tests", "benchmarks", "scripts"}
FOLLOWED = ("tests", "scripts")  # repository modules (not installed) whose imports travel with their importer


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip())[0]) for r in requirements}


@cache
def declared() -> dict[str, set[str]]:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    runtime, sdk = requirement_names(server["dependencies"]), requirement_names(client["dependencies"])
    extras = {name: requirement_names(reqs) for name, reqs in server["optional-dependencies"].items()}
    return {"server": runtime, "client": sdk, "test": runtime | sdk | extras["test"],
            "bench": runtime | sdk | extras["bench"], "scripts": runtime | sdk | (extras["test"] & extras["bench"])}


def imported(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every absolute import in ``path``; ``from a import b`` gives ``a`` and ``a.b`` (b may be
    a submodule)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return out


def repository_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def third_party_imports(folders: list[str], follow: bool) -> dict[str, str]:
    """Top-level third-party module -> where it is first imported (``file:line``)."""
    todo = [p for folder in folders
            for p in (sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else [ROOT / folder])]
    seen, found = set(todo), {}
    while todo:
        path = todo.pop(0)
        for module, line in imported(path):
            top = module.split(".")[0]
            if top in FIRST_PARTY:
                target = repository_file(module) if follow and top in FOLLOWED else None
                if target is not None and target not in seen:
                    seen.add(target)
                    todo.append(target)
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault(top, f"{path.relative_to(ROOT)}:{line}")
    return found


PLACES = {  # where the code is, which declaration installs it, whether its repository imports are followed
    "server": (["server", "adapters_store"], False),
    "client": (["client"], False),
    "test": (["tests"], False),
    "bench": (["benchmarks"], True),
    "scripts": (["scripts"], True),
}


@pytest.mark.parametrize("place", PLACES)
def test_every_import_is_declared_where_the_code_is_installed(place):
    folders, follow = PLACES[place]
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module, where in sorted(third_party_imports(folders, follow).items()):
        dists = {normalized(d) for d in distributions.get(module, [])}
        if not dists & declared()[place]:
            undeclared.append(f"{module} ({where}; distribution {sorted(dists) or 'not installed'})")
    assert not undeclared, f"imported by {'/'.join(folders)} but not declared for it: {undeclared}"


def test_the_reader_sees_imports_at_every_depth(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import a.b\nfrom c import d\nfrom . import e\ndef f():\n    import g\n")
    assert imported(source) == [("a.b", 1), ("c", 2), ("c.d", 2), ("g", 5)]


def test_a_benchmarks_repository_imports_are_followed():
    # bench_scaleout imports no yaml itself: its scripts.topology does (benchmarks/quality imports it directly)
    found = third_party_imports(["benchmarks/bench_scaleout.py"], follow=True)
    assert found["yaml"].startswith("scripts/topology/"), found["yaml"]
