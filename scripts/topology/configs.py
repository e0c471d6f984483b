"""The compose stack's nginx and Prometheus configs rendered for loopback: the nginx template filled in as the
nginx image's envsubst does, under a small main config of its own; prometheus.yml with loopback targets."""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from scripts.topology.paths import NGINX_TEMPLATE, PROMETHEUS_CONF

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_template(text: str, values: dict[str, str]) -> str:
    """envsubst as the nginx image runs it, strictly: every ``${UPPER_CASE}`` placeholder must have a value
    (nginx's own ``$variables`` are lower case and stay as they are)."""
    missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise KeyError(f"no value for template placeholders {missing}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def upstream_lines(addresses: list[str]) -> str:
    return "\n".join(f"    server {address};" for address in addresses)


def render_nginx(listen_port: int, upstreams: list[str], access_log: str) -> str:
    values = {"LISTEN_PORT": str(listen_port), "UPSTREAM_SERVERS": upstream_lines(upstreams),
              "ACCESS_LOG": access_log}
    return render_template(NGINX_TEMPLATE.read_text(), values)


def nginx_main_conf(run_dir: Path, site_conf: Path) -> str:
    """The main config around the shared http-context file: pid, logs and temp files under ``run_dir``."""
    tmp = run_dir / "nginx-tmp"
    # As root, workers would drop to an unprivileged user that cannot write temp files under a private dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp_paths = "".join(f"    {kind}_temp_path {tmp / kind};\n" for kind in _TEMP_KINDS)
    return (
        f"{user}worker_processes 1;\npid {run_dir / 'nginx.pid'};\n"
        f"error_log {run_dir / 'nginx-error.log'} notice;\n"
        "daemon off;\n\nevents {\n    worker_connections 1024;\n}\n\nhttp {\n"
        f"{temp_paths}    include {site_conf};\n}}\n"
    )


def write_nginx_conf(run_dir: Path, listen_port: int, upstreams: list[str]) -> Path:
    """Write ``ptserve.conf`` (the rendered template) and ``nginx.conf`` into ``run_dir``; return nginx.conf's
    path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for kind in _TEMP_KINDS:
        (run_dir / "nginx-tmp" / kind).mkdir(parents=True, exist_ok=True)
    site = run_dir / "ptserve.conf"
    site.write_text(render_nginx(listen_port, upstreams, str(run_dir / "nginx-access.log")))
    main = run_dir / "nginx.conf"
    main.write_text(nginx_main_conf(run_dir, site))
    return main


def prometheus_conf(targets: dict[str, str], scrape_interval: str = "1s") -> dict:
    """docker/prometheus/prometheus.yml, the ptserve job's targets replaced: ``{replica_id: host:port}``."""
    conf = yaml.safe_load(PROMETHEUS_CONF.read_text())
    conf["global"]["scrape_interval"] = scrape_interval
    conf["global"]["scrape_timeout"] = scrape_interval
    for job in conf["scrape_configs"]:
        if job["job_name"] == "ptserve":
            job["static_configs"] = [{"targets": [address], "labels": {"replica": rid}}
                                     for rid, address in targets.items()]
    conf["scrape_configs"] = [job for job in conf["scrape_configs"] if job["job_name"] == "ptserve"]
    return conf
