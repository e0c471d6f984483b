"""Servers the client tests drive: a real ``ptserve serve`` on MiniLM (admin key set: auth and keys are real),
one
on a tiny random GPT-2 for generation, and a scripted HTTP server we control for retry and streaming edge
cases."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.factories import make_adapter, running_server, save_tiny_decoder

ADMIN = "admin-secret-for-client-tests"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    env = {"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('client-store')}", "PTSERVE_ADMIN_KEY": ADMIN}
    with running_server(env) as url:
        yield url


@pytest.fixture(scope="session")
def gen_server(tmp_path_factory):
    """(url, adapter id) of a tiny GPT-2 server holding one generate adapter."""
    from ptserve.adapters_store.fingerprint import fingerprint_from_config
    from ptserve.adapters_store.format import encode_blob
    from ptserve.client import Client
    from ptserve.server import hf_compat

    folder = save_tiny_decoder("gpt2", tmp_path_factory.mktemp("gpt2"))
    fp = fingerprint_from_config(hf_compat.load_config(str(folder), True))
    env = {
        "PTSERVE_BACKBONE": str(folder),
        "PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('gen-store')}",
        "PTSERVE_ADMIN_KEY": ADMIN,
    }
    with running_server(env) as url:
        with Client(url, ADMIN) as c:
            c.upload("acme/poet", encode_blob(make_adapter(fp, 5, seed=5, task="generate")))
        yield url, "acme/poet"


CUT_SHORT = "x-test-cut-short"  # a script header: send half the body, then close (a replica that died mid-answer)


@dataclass
class Scripted:
    """Answers requests from a script of (status, headers, body) and records what it received."""

    responses: list = field(default_factory=list)
    requests: list = field(default_factory=list)
    times: list = field(default_factory=list)
    url: str = ""

    def script(self, *responses) -> None:
        self.responses[:] = list(responses)
        self.requests.clear()
        self.times.clear()


@pytest.fixture
def scripted():
    state = Scripted()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            state.requests.append((self.command, self.path, dict(self.headers), body))
            state.times.append(time.monotonic())
            status, headers, payload = (
                state.responses.pop(0) if state.responses else (500, {}, b"script ran out")
            )
            if isinstance(payload, (dict, list)):
                payload, headers = (
                    json.dumps(payload).encode(),
                    {"content-type": "application/json", **headers},
                )
            elif isinstance(payload, str):
                payload = payload.encode()
            cut = headers.pop(CUT_SHORT, None) is not None  # the body stops half-way and the connection closes
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2] if cut else payload)
            if cut:
                self.wfile.flush()
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def error_body(type_: str, message: str) -> dict:
    return {"error": {"type": type_, "message": message}}
