"""What the deployment-file tests share: the repository's deployment files, a small Dockerfile parser, and the
reading of docker-compose.yml (environment, replicas, bind mounts, interpolation with nothing set)."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ptserve.server.settings import Settings
from scripts.topology.compose import INTERPOLATION

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
CI_RUN = ROOT / ".ci" / "run"

SETTINGS_ENV_NAMES = {f"PTSERVE_{name.upper()}" for name in Settings.model_fields}
DEFAULT_PORT = Settings.model_fields["port"].default
ENV_NAME = re.compile(r"PTSERVE_[A-Z0-9_]+")


# --- Dockerfile parsing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    stage: int  # 0 = first FROM
    keyword: str  # upper-case, e.g. "RUN"
    args: str  # continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: comment lines dropped (also inside continuations), backslash-newlines joined."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or (not raw.strip() and not pending):
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical, pending = (pending + line).strip(), ""
        if not logical:
            continue
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def env_pairs(instructions: list[Instruction]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"use the ENV key=value form: {ins.args!r}"
                pairs[key] = value
    return pairs


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


# --- compose --------------------------------------------------------------------------------------------

def resolve(value: str) -> str:
    """Compose interpolation with every variable unset: defaults apply, required ones get a dummy."""

    def one(m: re.Match) -> str:
        op = m.group("op") or ""
        return m.group("arg") if "-" in op else "dummy-value"

    return INTERPOLATION.sub(one, value)


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def replicas(compose: dict) -> dict[str, dict]:
    """The ptserve replica services (ptserve-1, ptserve-2, ...)."""
    return {name: svc for name, svc in compose["services"].items() if re.fullmatch(r"ptserve-\d+", name)}


def mounts(service: dict) -> dict[str, str]:
    """Bind mounts of a service: container path -> host path (relative to the repository root)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            out[target] = source
    return out


def effective_port(env: dict[str, str]) -> int:
    return int(env.get("PTSERVE_PORT", DEFAULT_PORT))


def load_settings(monkeypatch, env: dict[str, str]) -> Settings:
    for key in list(os.environ):
        if key.startswith("PTSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("PTSERVE_"):
            monkeypatch.setenv(key, value)
    return Settings()
