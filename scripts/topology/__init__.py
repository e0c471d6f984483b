"""The docker-compose topology without Docker, on loopback: redis-server, N ``ptserve serve`` replicas on the
Redis store, nginx in front (and Prometheus, when asked) — started from the same config files as the compose
stack, with loopback ports filled in:

- ``docker/redis/redis.conf`` (bind, port, dir and protected-mode overridden on redis-server's command line);
- the replicas' ``PTSERVE_*`` settings from ``docker-compose.yml`` (host, port, store, replica id, admin key
  replaced);
- ``docker/nginx/ptserve.conf.template`` rendered with loopback ``server`` lines, under a small main config;
- ``docker/prometheus/prometheus.yml`` with loopback targets.

    python -m scripts.topology up [--replicas 2] [--port 8080] [--dir DIR] [--admin-key KEY] [--prometheus]
    python -m scripts.topology render-nginx --dir DIR --port 8080 --upstream 127.0.0.1:8001 [--upstream ...]

(from the repository root). ``up`` runs until Ctrl-C. nginx and redis-server come from Debian packages; when
missing and running as root, they are installed with apt-get (``--no-install`` forbids that). Tests and
benchmarks use ``Topology``. One module per concern: ``paths`` (the repository's config files), ``compose``
(docker-compose.yml and its interpolation), ``configs`` (nginx and Prometheus configs rendered for loopback),
``install`` (finding or apt-installing a binary), ``processes`` (a supervised child process), ``harness`` (the
``Topology``), ``cli``.
"""
from scripts.topology.compose import compose_replica_env, resolve_interpolation
from scripts.topology.configs import prometheus_conf, render_nginx, render_template, write_nginx_conf
from scripts.topology.harness import Topology
from scripts.topology.install import find_binary
from scripts.topology.processes import Process, free_port, wait_until

__all__ = [
    "Process", "Topology", "compose_replica_env", "find_binary", "free_port", "prometheus_conf", "render_nginx",
    "render_template", "resolve_interpolation", "wait_until", "write_nginx_conf",
]
