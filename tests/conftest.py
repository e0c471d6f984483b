import os
import shutil
import socket
import time

import pytest

from tests.components import IN_CI, need_binary, ref_python

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)  # before skipif marks are read: under CI a missing reference must fail, not skip
def pytest_runtest_setup(item):
    if item.get_closest_marker("peft_ref") is not None:
        ref_python()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI no test may skip, whatever skipped it: a skip there means a component CI should have had. The one
    exception is hardware a CI machine may lack: tests marked ``gpu`` (``scripts/gpu_check.sh`` runs those where a
    GPU is, and fails without one)."""
    outcome = yield
    report = outcome.get_result()
    hardware = item.get_closest_marker("gpu") is not None
    if IN_CI and report.skipped and not hasattr(report, "wasxfail") and not hardware:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped under CI: {reason}. CI must run every test: install what it needs."


@pytest.fixture(scope="session")
def minilm():
    """The default backbone (all-MiniLM-L6-v2 from its PyPI package), loaded once for the session."""
    import torch

    from ptserve.server.backbone import load_backbone

    torch.set_num_threads(2)
    return load_backbone("minilm", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def minilm_engine(minilm):
    from ptserve.server.engine import Engine

    return Engine(minilm)


class RedisServer:
    """A throwaway ``redis-server`` on a loopback port; tests may kill and restart it. Without persistence,
    unless ``persistent``: then an append-only file fsync'd before every reply, so whatever Redis acknowledged
    survives even ``kill -9`` and a restart in the same directory loads it back."""

    def __init__(self, directory, port: int | None = None, persistent: bool = False):
        self.dir, self.port, self.proc = directory, port or _free_port(), None
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import subprocess

        import redis

        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """URL of a fresh redis-server for the session (without the binary: db 15 of the machine's, flushed).
    Tests share it: give each store a key prefix of its own (``redis_prefix``)."""
    if shutil.which("redis-server") is None:
        import redis

        url = "redis://127.0.0.1:6379/15"
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.kill()


@pytest.fixture
def redis_server_factory(tmp_path):
    """Start dedicated redis-servers (``RedisServer``) a test may kill and restart; all die afterwards.
    ``start(port, persistent=True)`` restarts one on its port with the data it had acknowledged. Without the
    binary: skipped, and a failure under CI (``tests.components``)."""
    need_binary("redis-server")
    servers: list[RedisServer] = []

    def start(port: int | None = None, persistent: bool = False) -> RedisServer:
        servers.append(RedisServer(tmp_path, port, persistent).start())
        return servers[-1]

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def redis_prefix(redis_server):
    """A key prefix of this test's own on the shared server (``?prefix=...``); its keys go afterwards."""
    import uuid

    import redis

    prefix = f"t{uuid.uuid4().hex}"
    yield prefix
    with redis.Redis.from_url(redis_server) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i:i + 1000])


SERVER_MODES = {"in-process": {}, "api-workers": {"PTSERVE_API_WORKERS": "1"}}


@pytest.fixture(scope="module", params=list(SERVER_MODES))
def server_modes(request):
    """Runs a module's HTTP tests against both servers: API and engine in one process, and an engine core process
    behind an API worker (one worker, so that a worker's /metrics sees every request of the test)."""
    from tests.factories import SERVER_MODE

    SERVER_MODE.clear()
    SERVER_MODE.update(SERVER_MODES[request.param])
    yield request.param
    SERVER_MODE.clear()
