"""``ptserve serve`` with API workers: one engine core process and N API worker processes behind one listening
socket (bound here, inherited by every worker, so the kernel spreads connections over them).

A child that dies is started again (after a short back-off when it keeps dying); while the engine core is down,
workers answer 503 ``engine_unavailable`` and its resident adapters reload from the store on first use (or
``PTSERVE_PRELOAD``). SIGTERM (or SIGINT) drains: the workers first (each finishes the requests it accepted, its
engine core still running), then the engine core; the supervisor exits 0 when every child did. A second signal
stops every child at once.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from ptserve.server import metrics
from ptserve.server.settings import Settings

log = logging.getLogger(__name__)
SETTINGS_ENV = "PTSERVE_SETTINGS_JSON"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
POLL_S = 0.1
SETTLED_S = 10.0  # a child that ran this long before dying is restarted at once; sooner, after a back-off
MAX_BACKOFF_S = 10.0


def default_api_workers(cpus: int) -> int:
    """``PTSERVE_API_WORKERS=auto``: in process below 4 usable cpus (a separate core process and a worker then
    fight over the same two cores for little gain; docs/design.md), else one worker per 4 cpus, at most 8."""
    return 0 if cpus < 4 else min(8, cpus // 4)


@dataclass
class Child:
    name: str
    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0  # quick deaths in a row
    restart_at: float = 0.0
    exits: list[int] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        # Its own session: a terminal's Ctrl-C reaches the supervisor only, which drains children in order.
        self.proc = subprocess.Popen(self.argv, env=env, pass_fds=self.pass_fds, start_new_session=True)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings: Settings, workers: int):
        self.settings, self.workers = settings, workers
        self.stopping = False
        self.force = False
        self.metrics_dir = ""

    def _metrics_dir(self, tmp: str) -> str:
        """One /metrics for every process: prometheus-client's multiprocess mode over a fresh directory
        (``ptserve.server.metrics`` aggregates it; any process's scrape shows them all)."""
        self.metrics_dir = os.path.join(tmp, "metrics")
        metrics.prepare_multiprocess_dir(self.metrics_dir)
        return self.metrics_dir

    def _signal(self, sig: int, frame) -> None:
        if self.stopping:
            self.force = True
        self.stopping = True

    def run(self) -> int:
        s = self.settings
        tmp = tempfile.mkdtemp(prefix="ptserve-core-")
        address = f"ipc://{os.path.join(tmp, 'engine-core.sock')}"
        sock = bind(s.host, s.port)
        env = {**os.environ, SETTINGS_ENV: s.model_dump_json(), METRICS_ENV: self._metrics_dir(tmp)}
        py = sys.executable
        core = Child("engine core", [py, "-m", "ptserve.server.engine_core.core_proc", address])
        workers = [Child(f"API worker {i}", [py, "-m", "ptserve.server.engine_core.worker_proc", str(sock.fileno()),
                                             address], pass_fds=(sock.fileno(),)) for i in range(self.workers)]
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        log.info("supervisor: engine core + %d API workers on %s:%d", self.workers, s.host, s.port)
        try:
            for child in [core, *workers]:
                child.start(env)
            while not self.stopping:
                for child in [core, *workers]:
                    self._keep_alive(child, env)
                time.sleep(POLL_S)
            return self._drain(core, workers)
        finally:
            for child in [core, *workers]:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
            sock.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def _keep_alive(self, child: Child, env: dict[str, str]) -> None:
        now = time.monotonic()
        if child.proc is not None:
            code = child.proc.poll()
            if code is None:
                return
            child.exits.append(code)
            metrics.mark_process_dead(child.proc.pid, self.metrics_dir)  # its live gauges leave the sums
            quick = now - child.started < SETTLED_S
            child.failures = child.failures + 1 if quick else 0
            delay = min(MAX_BACKOFF_S, 0.25 * 2 ** (child.failures - 1)) if quick else 0.0
            log.warning("%s (pid %d) exited with %d; restarting in %.1f s", child.name, child.proc.pid, code, delay)
            child.proc, child.restart_at = None, now + delay
        if now >= child.restart_at:
            child.start(env)

    def _drain(self, core: Child, workers: list[Child]) -> int:
        """Workers first (their engine core still answers), then the core; 0 when every child exited 0."""
        limit = self.settings.drain_timeout_s + 15.0
        codes = self._stop([w for w in workers if w.proc is not None], limit)
        codes += self._stop([core] if core.proc is not None else [], limit)
        log.info("supervisor: children exited with %s", codes)
        return 0 if all(c == 0 for c in codes) else 1

    def _stop(self, children: list[Child], limit: float) -> list[int]:
        for child in children:
            child.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + limit
        codes = []
        for child in children:
            while child.proc.poll() is None and time.monotonic() < end and not self.force:
                time.sleep(POLL_S)
            if child.proc.poll() is None:
                log.warning("%s did not stop in time; killing it", child.name)
                child.proc.kill()
            codes.append(child.proc.wait())
        return codes


def exit_with_parent() -> None:
    """In a child: when the supervisor is gone (killed), drain and exit instead of serving on as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ptserve-parent-watch", daemon=True).start()
