"""The topology as a test harness: ``Topology`` starts redis-server, the replicas, nginx (and Prometheus) in a
run directory, waits for each to be ready, and lets a test kill and restart any of them."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from scripts.topology.compose import compose_replica_env
from scripts.topology.configs import prometheus_conf, write_nginx_conf
from scripts.topology.install import find_binary
from scripts.topology.paths import REDIS_CONF
from scripts.topology.processes import Process, free_port, wait_until


@dataclass
class Topology:
    """redis-server + ``replicas`` × ``ptserve serve`` + nginx (+ Prometheus) on loopback, in ``run_dir``."""

    run_dir: Path
    replicas: int = 2
    proxy_port: int = 0  # 0 = a free port
    admin_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra PTSERVE_* settings for every replica
    prometheus: bool = False
    install: bool = True  # apt-get install missing nginx / redis-server (root only)
    ready_timeout: float = 180.0
    redis_port: int = 0
    replica_ports: list[int] = field(default_factory=list)
    prometheus_port: int = 0
    procs: dict[str, Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.proxy_port = self.proxy_port or free_port()
        self.redis_port = self.redis_port or free_port()
        self.replica_ports = self.replica_ports or [free_port() for _ in range(self.replicas)]
        self.prometheus_port = self.prometheus_port or (free_port() if self.prometheus else 0)

    # addresses
    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[i]}"

    def replica_id(self, i: int) -> str:
        return f"ptserve-{i + 1}"  # the compose service names

    # lifecycle
    def start(self) -> "Topology":
        try:
            self.start_redis()
            for i in range(self.replicas):
                self.start_replica(i, wait=False)
            for i in range(self.replicas):
                self.wait_replica(i)
            self.start_nginx()
            if self.prometheus:
                self.start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """The proxy first, then every replica at once (each drains), then Redis."""
        order = [p for p in self.procs.values() if p.name in ("nginx", "prometheus")]
        replicas = [p for p in self.procs.values() if p.name.startswith("ptserve-")]
        for proc in order:
            proc.stop()
        for proc in replicas:
            proc.send(signal.SIGTERM)
        for proc in replicas:
            proc.stop()
        if "redis" in self.procs:
            self.procs["redis"].stop()

    def __enter__(self) -> "Topology":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        old = self.procs.get(name)
        if old is not None and old.running:
            raise RuntimeError(f"{name} is already running")
        proc = Process(name, argv, env or dict(os.environ), self.run_dir / "logs" / f"{name}.log").start()
        self.procs[name] = proc
        return proc

    # redis
    def start_redis(self) -> Process:
        data = self.run_dir / "redis"
        data.mkdir(exist_ok=True)
        argv = [find_binary("redis-server", self.install), str(REDIS_CONF), "--bind", "127.0.0.1",
                "--protected-mode", "yes", "--port", str(self.redis_port), "--dir", str(data)]
        proc = self._spawn("redis", argv)

        def pong() -> bool:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(pong, "redis-server", 20, proc)
        return proc

    def kill_redis(self, sig: int = signal.SIGKILL) -> None:
        self.procs["redis"].stop(sig)

    # replicas
    def replica_env(self, i: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PTSERVE_ADMIN_KEY"}
        env.update(compose_replica_env())
        env.update({
            "PTSERVE_HOST": "127.0.0.1", "PTSERVE_PORT": str(self.replica_ports[i]),
            "PTSERVE_STORE": self.redis_url, "PTSERVE_REPLICA_ID": self.replica_id(i),
            "PTSERVE_LOG_FORMAT": "json",
        })
        if self.admin_key:
            env["PTSERVE_ADMIN_KEY"] = self.admin_key
        env.update(self.env)
        return env

    def start_replica(self, i: int, wait: bool = True) -> Process:
        exe = Path(sys.executable).parent / "ptserve"
        argv = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "ptserve.server.cli", "serve"]
        proc = self._spawn(self.replica_id(i), argv, self.replica_env(i))
        if wait:
            self.wait_replica(i)
        return proc

    def wait_replica(self, i: int) -> None:
        url = f"{self.replica_url(i)}/readyz"
        wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, self.replica_id(i),
                   self.ready_timeout, self.procs[self.replica_id(i)])

    def kill_replica(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.procs[self.replica_id(i)].stop(sig)

    # nginx
    def nginx_upstreams(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.replica_ports]

    def start_nginx(self) -> Process:
        nginx = find_binary("nginx", self.install)
        conf = write_nginx_conf(self.run_dir, self.proxy_port, self.nginx_upstreams())
        error_log = str(self.run_dir / "nginx-error.log")
        checked = subprocess.run([nginx, "-t", "-q", "-e", error_log, "-c", str(conf)], capture_output=True,
                                 text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        proc = self._spawn("nginx", [nginx, "-e", error_log, "-c", str(conf)])
        healthz = f"{self.proxy_url}/healthz"
        wait_until(lambda: httpx.get(healthz, timeout=2).status_code == 200, "nginx", 20, proc)
        return proc

    @property
    def access_log(self) -> Path:
        return self.run_dir / "nginx-access.log"

    # prometheus
    def start_prometheus(self) -> Process:
        prometheus = find_binary("prometheus", self.install)
        targets = {self.replica_id(i): f"127.0.0.1:{port}" for i, port in enumerate(self.replica_ports)}
        conf = self.run_dir / "prometheus.yml"
        conf.write_text(yaml.safe_dump(prometheus_conf(targets)))
        argv = [prometheus, f"--config.file={conf}", f"--storage.tsdb.path={self.run_dir / 'prometheus'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}"]
        proc = self._spawn("prometheus", argv)
        ready = f"{self.prometheus_url}/-/ready"
        wait_until(lambda: httpx.get(ready, timeout=2).status_code == 200, "prometheus", 60, proc)
        return proc
