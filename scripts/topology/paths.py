"""The repository's deployment files the topology starts from (the same ones the compose stack mounts)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NGINX_TEMPLATE = ROOT / "docker" / "nginx" / "ptserve.conf.template"
REDIS_CONF = ROOT / "docker" / "redis" / "redis.conf"
PROMETHEUS_CONF = ROOT / "docker" / "prometheus" / "prometheus.yml"
