"""What the topology reads from docker-compose.yml: the replicas' ``PTSERVE_*`` settings, with compose's
``${VAR}`` interpolation applied."""
from __future__ import annotations

import os
import re

import yaml

from scripts.topology.paths import COMPOSE

INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
# settings the topology decides per replica; everything else comes from docker-compose.yml
OWN_SETTINGS = {"PTSERVE_HOST", "PTSERVE_PORT", "PTSERVE_STORE", "PTSERVE_REPLICA_ID", "PTSERVE_ADMIN_KEY"}


def resolve_interpolation(value: str, environ: dict[str, str]) -> str | None:
    """Compose ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``; None when a required variable is unset."""
    missing = False

    def one(m: re.Match) -> str:
        nonlocal missing
        name, op, arg = m.group("name"), m.group("op") or "", m.group("arg") or ""
        have = environ.get(name)
        if have or (have is not None and not op.startswith(":")):
            return have
        if "-" in op:
            return arg
        missing = missing or "?" in op
        return ""

    out = INTERPOLATION.sub(one, value).replace("$$", "$")
    return None if missing else out


def compose_replica_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``PTSERVE_*`` settings of the first replica service in docker-compose.yml, interpolated from
    ``environ``, minus those the topology sets per replica."""
    environ = dict(os.environ if environ is None else environ)
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    name = sorted(n for n in services if re.fullmatch(r"ptserve-\d+", n))[0]
    env = services[name].get("environment") or {}
    out = {}
    for key, value in env.items():
        if key in OWN_SETTINGS:
            continue
        resolved = resolve_interpolation(str(value), environ)
        if resolved is not None:
            out[key] = resolved
    return out
