"""docker-compose.yml and the configs it mounts agree with the settings and with each other: Redis durable, the
replicas alike but for their id and drained before being killed, nginx and Prometheus reaching every replica by
name, Grafana provisioned, every mount present, every ``$`` a valid interpolation. No Docker engine runs here:
the files are parsed (promtool checks the Prometheus config where it is installed)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ptserve.server.serving import AFTER_DRAIN_S
from scripts.topology.compose import INTERPOLATION
from tests.components import need_binary
from tests.deploy.deploy_files import (
    DOCKERFILE, ROOT, compose_env, effective_port, load_settings, mounts, replicas, resolve,
)


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
    promtool = need_binary("promtool", "prometheus")
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
