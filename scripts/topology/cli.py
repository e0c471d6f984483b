"""``python -m scripts.topology``: ``up`` (the topology until Ctrl-C) and ``render-nginx``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import scripts.topology
from scripts.topology.configs import write_nginx_conf
from scripts.topology.harness import Topology


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
    parser = argparse.ArgumentParser(prog="python -m scripts.topology",
                                     description=scripts.topology.__doc__.split("\n\n")[0],
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
