#!/usr/bin/env python3
"""The docker-compose topology without Docker, on loopback: redis-server, N ``ptserve serve`` replicas on the
Redis store, nginx in front (and Prometheus, when asked) — started from the same config files as the compose
stack, with loopback ports filled in:

- ``docker/redis/redis.conf`` (bind, port, dir and protected-mode overridden on redis-server's command line);
- the replicas' ``PTSERVE_*`` settings from ``docker-compose.yml`` (host, port, store, replica id, admin key
  replaced);
- ``docker/nginx/ptserve.conf.template`` rendered with loopback ``server`` lines, under a small main config;
- ``docker/prometheus/prometheus.yml`` with loopback targets.

    python scripts/topology.py up [--replicas 2] [--port 8080] [--dir DIR] [--admin-key KEY] [--prometheus]
    python scripts/topology.py render-nginx --dir DIR --port 8080 --upstream 127.0.0.1:8001 [--upstream ...]

``up`` runs until Ctrl-C. nginx and redis-server come from Debian packages; when missing and running as root,
they are installed with apt-get (``--no-install`` forbids that). Tests and benchmarks use ``Topology``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
NGINX_TEMPLATE = ROOT / "docker" / "nginx" / "ptserve.conf.template"
REDIS_CONF = ROOT / "docker" / "redis" / "redis.conf"
PROMETHEUS_CONF = ROOT / "docker" / "prometheus" / "prometheus.yml"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
# settings the topology decides per replica; everything else comes from docker-compose.yml
OWN_SETTINGS = {"PTSERVE_HOST", "PTSERVE_PORT", "PTSERVE_STORE", "PTSERVE_REPLICA_ID", "PTSERVE_ADMIN_KEY"}
PACKAGES = {"nginx": "nginx", "redis-server": "redis-server", "prometheus": "prometheus"}


# --- config files -------------------------------------------------------------------------------------------

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
    temp_paths = "".join(f"    {kind}_temp_path {tmp / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
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
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run_dir / "nginx-tmp" / kind).mkdir(parents=True, exist_ok=True)
    site = run_dir / "ptserve.conf"
    site.write_text(render_nginx(listen_port, upstreams, str(run_dir / "nginx-access.log")))
    main = run_dir / "nginx.conf"
    main.write_text(nginx_main_conf(run_dir, site))
    return main


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


# --- processes ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str, install: bool) -> str:
    """``name`` on PATH or in /usr/sbin; installs its Debian package when missing and allowed (root + apt)."""
    def which() -> str | None:
        return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")

    if found := which():
        return found
    package = PACKAGES.get(name, name)
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=True)
        if found := which():
            return found
    raise FileNotFoundError(f"{name} not found: install it first (apt-get install -y {package})")


@dataclass
class Process:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45.0) -> None:
        if not self.running:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(check, what: str, timeout: float, proc: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}):\n{proc.log_tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            tail = f":\n{proc.log_tail()}" if proc else ""
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s{tail}")
        time.sleep(0.1)


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


# --- command line -------------------------------------------------------------------------------------------

def _up(args: argparse.Namespace) -> int:
    run_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ptserve-topology-"))
    env = dict(kv.split("=", 1) for kv in args.env)
    topo = Topology(run_dir, replicas=args.replicas, proxy_port=args.port, admin_key=args.admin_key, env=env,
                    prometheus=args.prometheus, install=not args.no_install)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(f"starting redis-server, {args.replicas} ptserve replicas and nginx in {run_dir} ...", flush=True)
    with topo:
        print(f"proxy       {topo.proxy_url}   (send X-Ptserve-Adapter: tenant/name for adapter affinity)")
        for i in range(topo.replicas):
            print(f"{topo.replica_id(i):<11} {topo.replica_url(i)}")
        print(f"redis       {topo.redis_url}")
        if topo.prometheus:
            print(f"prometheus  {topo.prometheus_url}")
        print(f"logs        {run_dir / 'logs'}, nginx access log {topo.access_log}\nCtrl-C stops everything.",
              flush=True)
        try:
            while not stop:
                for name, proc in topo.procs.items():
                    if not proc.running:
                        print(f"{name} exited ({proc.proc.returncode}):\n{proc.log_tail()}", file=sys.stderr)
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _render_nginx(args: argparse.Namespace) -> int:
    conf = write_nginx_conf(Path(args.dir), args.port, args.upstream)
    print(conf)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the topology and keep it running until Ctrl-C")
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--port", type=int, default=8080, help="the proxy's port (0 = any free port)")
    up.add_argument("--dir", help="run directory (configs, logs, Redis data); default: a new temp dir")
    up.add_argument("--admin-key", default=os.environ.get("PTSERVE_ADMIN_KEY"))
    up.add_argument("--env", action="append", default=[], metavar="PTSERVE_X=V",
                    help="a setting for every replica")
    up.add_argument("--prometheus", action="store_true", help="also run Prometheus scraping every replica")
    up.add_argument("--no-install", action="store_true", help="never apt-get install nginx / redis-server")
    up.set_defaults(func=_up)
    render = sub.add_parser("render-nginx", help="write nginx.conf + ptserve.conf for loopback into --dir")
    render.add_argument("--dir", required=True)
    render.add_argument("--port", type=int, required=True)
    render.add_argument("--upstream", action="append", required=True, metavar="HOST:PORT")
    render.set_defaults(func=_render_nginx)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
