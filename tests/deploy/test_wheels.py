"""The two wheels, built as ``pip wheel . --no-deps --no-build-isolation`` (and ``./client``) build them:
every module under the one import root ``ptserve/`` (a PEP 420 namespace: neither wheel ships
``ptserve/__init__.py``, so the two install side by side), no top-level ``server/``, ``client/`` or
``adapters_store/``; the server wheel holds every module of ``server/`` and ``adapters_store/`` and requires
the client; the client wheel holds only ``ptserve/client/...`` and requires no torch, transformers or numpy.

The sources are copied out first: setuptools writes ``build/`` and ``*.egg-info`` beside them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_STACK = {"torch", "transformers", "numpy"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")


def build_wheel(source: Path, out: Path) -> zipfile.ZipFile:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, zipfile.ZipFile]:
    src = tmp_path_factory.mktemp("src")
    for name in ("server", "adapters_store", "client"):
        shutil.copytree(ROOT / name, src / name, ignore=IGNORE)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheels")
    return {"server": build_wheel(src, out / "server"), "client": build_wheel(src / "client", out / "client")}


def modules(zf: zipfile.ZipFile) -> set[str]:
    return {n for n in zf.namelist() if n.endswith(".py")}


def requires(zf: zipfile.ZipFile) -> set[str]:
    (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    names = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
    return {re.split(r"[\s;\[<>=!~]", n, maxsplit=1)[0].lower() for n in names}


def sources(folder: str) -> set[str]:
    """The modules of a source folder as the wheel names them (``server/x.py`` -> ``ptserve/server/x.py``)."""
    base = ROOT / folder
    return {
        f"ptserve/{folder}/{p.relative_to(base).as_posix()}"
        for p in base.rglob("*.py")
        if "__pycache__" not in p.parts and "build" not in p.relative_to(base).parts
    }


@pytest.mark.parametrize("kind", ["server", "client"])
def test_every_module_is_under_the_ptserve_root(wheels, kind):
    tops = {n.split("/")[0] for n in wheels[kind].namelist()}
    assert tops == {"ptserve", *(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "ptserve/__init__.py" not in wheels[kind].namelist()  # the namespace is shared by both wheels


def test_the_server_wheel_holds_every_server_and_store_module_and_requires_the_client(wheels):
    shipped = modules(wheels["server"])
    assert shipped == sources("server") | sources("adapters_store")
    assert "ptserve-client" in requires(wheels["server"]) and "torch" in requires(wheels["server"])


def test_the_client_wheel_is_the_client_alone_without_the_model_stack(wheels):
    assert modules(wheels["client"]) == sources("client")
    assert all(n.startswith(("ptserve/client/", "ptserve_client-")) for n in wheels["client"].namelist())
    needs = requires(wheels["client"])
    assert needs == {"httpx", "typer", "rich"} and not needs & MODEL_STACK
