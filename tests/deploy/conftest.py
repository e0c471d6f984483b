"""Shared by the deployment tests: the topology script as a module, and the binaries it needs (nginx,
Prometheus) — skipped where missing on a developer machine, a failure in CI (.ci/run installs them)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.components import need_binary

ROOT = Path(__file__).resolve().parents[2]


def load_topology():
    """scripts/topology.py imported as the module ``ptserve_topology`` (scripts/ is not a package)."""
    name = "ptserve_topology"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "topology.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is being built
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def topology_module():
    return load_topology()


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    return need_binary("nginx")
