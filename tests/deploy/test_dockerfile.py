"""docker/Dockerfile and .dockerignore: a multi-stage build on python:3.11-slim that runs as uid 10001, picks
torch's index by VARIANT (run for real against a fake pip), keeps local state out of the build context, and sets
only real settings — the same port as docker-compose.yml. No Docker engine runs here: the file is parsed."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.deploy.deploy_files import (
    COMPOSE, DEFAULT_PORT, DOCKERFILE, DOCKERIGNORE, ENV_NAME, ROOT, SETTINGS_ENV_NAMES, Instruction,
    arg_defaults, compose_env, effective_port, env_pairs, final_stage, load_settings, only, replicas,
)


def test_dockerfile_is_multi_stage_on_python_slim(dockerfile):
    defaults = arg_defaults([i for i in dockerfile if i.stage == -1])
    bases = [i.args.split()[0] for i in dockerfile if i.keyword == "FROM"]
    assert len(bases) >= 2, "build in one stage, copy the venv into the final one"
    for base in bases:
        assert re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], base) == "python:3.11-slim"
    final = final_stage(dockerfile)
    assert any(i.keyword == "COPY" and i.args.startswith("--from=") and "/opt/venv" in i.args for i in final)
    assert only(final, "WORKDIR").args == "/app"
    assert json.loads(only(final, "CMD").args) == ["ptserve", "serve"]


def test_dockerfile_runs_as_non_root_uid_10001(dockerfile):
    final = final_stage(dockerfile)
    user = only(final, "USER").args.split(":")[0]
    assert user not in {"root", "0"}
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert re.search(rf"useradd\b.*--uid 10001\b.*\b{re.escape(user)}\b", runs) or user == "10001"
    keywords = [i.keyword for i in final]
    assert keywords.index("USER") < keywords.index("CMD"), "USER must come before the server starts"


def torch_install_run(dockerfile: list[Instruction]) -> str:
    runs = [i.args for i in dockerfile if i.keyword == "RUN" and "torch==" in i.args]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize(
    ("build_args", "index"),
    [
        ({}, "https://download.pytorch.org/whl/cpu"),
        ({"VARIANT": "cpu"}, "https://download.pytorch.org/whl/cpu"),
        ({"VARIANT": "cuda"}, "https://pypi.org/simple"),
        ({"VARIANT": "cuda", "TORCH_INDEX": "https://example.invalid/simple"}, "https://example.invalid/simple"),
        ({"VARIANT": "rocm"}, None),
    ],
)
def test_dockerfile_variant_picks_torch_index(tmp_path, dockerfile, build_args, index):
    fake_pip = tmp_path / "pip"
    fake_pip.write_text('#!/bin/sh\necho "pip $*"\n')
    fake_pip.chmod(0o755)
    builder = [i for i in dockerfile if i.stage == 0]
    env = {**os.environ, **arg_defaults(builder), **build_args, "PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin"}
    done = subprocess.run(["sh", "-c", torch_install_run(dockerfile)], env=env, capture_output=True,
                          text=True, timeout=30)
    if index is None:
        assert done.returncode != 0, "an unknown VARIANT must stop the build"
        return
    assert done.returncode == 0, done.stderr
    version = arg_defaults(builder)["TORCH_VERSION"]
    assert done.stdout.split() == ["pip", "install", "--index-url", index, f"torch=={version}"]


def dockerignore_patterns() -> set[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def test_dockerignore_keeps_local_state_out_but_not_sources(dockerfile):
    patterns = dockerignore_patterns()
    for needed in (".git", ".venv", ".venv-ref", "data"):
        assert needed in patterns, needed
    assert any("__pycache__" in p for p in patterns)
    sources = [
        token
        for i in dockerfile
        if i.keyword == "COPY" and not i.args.startswith("--from")
        for token in i.args.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert source not in patterns, f"COPY {source} but .dockerignore excludes it"


def test_dockerfile_env_is_valid_settings(monkeypatch, dockerfile):
    settings = load_settings(monkeypatch, env_pairs(final_stage(dockerfile)))
    assert settings.host == "0.0.0.0", "inside a container the server must listen beyond loopback"
    assert settings.store == "file:///data/adapters"
    volumes = [i.args for i in final_stage(dockerfile) if i.keyword == "VOLUME"]
    assert any("/data" in v for v in volumes), "the adapter store must sit on a volume"


def test_ports_agree(dockerfile, compose):
    final = final_stage(dockerfile)
    port = effective_port(env_pairs(final))
    assert port == DEFAULT_PORT == 8000
    exposed = {p.split("/")[0] for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {str(port)}

    for ptserve in replicas(compose).values():
        assert {str(p) for p in ptserve["expose"]} == {str(effective_port(compose_env(ptserve)))}


@pytest.mark.parametrize("path", [DOCKERFILE, COMPOSE], ids=lambda p: p.name)
def test_every_ptserve_env_name_is_a_setting(path):
    names = set(ENV_NAME.findall(path.read_text()))
    assert names, f"{path.name} names no PTSERVE_* variable"
    unknown = names - SETTINGS_ENV_NAMES
    assert not unknown, f"{path.name} uses {sorted(unknown)}, not fields of ptserve.server.settings.Settings"
