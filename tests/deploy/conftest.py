"""Shared by the deployment tests: the binaries the topology needs (nginx, Prometheus) — skipped where missing on
a developer machine, a failure in CI (.ci/run installs them) — and the parsed Dockerfile and compose file. The
topology itself is the package ``scripts.topology``, imported like any other module."""
from __future__ import annotations

import pytest
import yaml

from tests.components import need_binary
from tests.deploy.deploy_files import COMPOSE, DOCKERFILE, Instruction, parse_dockerfile


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    return need_binary("nginx")


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())
