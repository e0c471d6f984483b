"""The image's HEALTHCHECK and compose's healthcheck, run for real against a stub server: they probe /healthz on
the server's port (the default one when PTSERVE_PORT is unset) and fail on an unhealthy answer."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.deploy.deploy_files import COMPOSE, DEFAULT_PORT, DOCKERFILE, final_stage, only, parse_dockerfile


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
