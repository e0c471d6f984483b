"""docker/nginx/ptserve.conf.template: it agrees with the app and the settings, `nginx -t` accepts its
loopback rendering, and a real nginx in front of stub replicas routes and retries as docker/README.md promises
— affinity by X-Ptserve-Adapter, round robin without it, retries on connection failures, inference retried
even after it was sent, tenant-key creation never retried once sent, 503 answers never retried."""
from __future__ import annotations

import http.server
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from ptserve.server.api.app import create_app
from ptserve.server.settings import Settings
from scripts.topology.configs import PLACEHOLDER, render_nginx, render_template, write_nginx_conf
from scripts.topology.paths import NGINX_TEMPLATE
from scripts.topology.processes import free_port
from tests.deploy.nginx_conf import Directive, parse

INFERENCE_PATHS = {"/v1/classify", "/v1/generate", "/v1/completions"}


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Directive:
    text = render_nginx(8080, ["127.0.0.1:9001", "127.0.0.1:9002"], "/dev/null")
    return parse(text)


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory) -> set[tuple[str, str]]:
    store = tmp_path_factory.mktemp("store")
    paths = create_app(Settings(store=f"file://{store}")).openapi()["paths"]
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


def location(server: Directive, *args: str) -> Directive:
    found = [d for d in server.all("location") if d.args == list(args)]
    assert len(found) == 1, f"location {' '.join(args)}"
    return found[0]


def values(block: Directive, name: str) -> list[str]:
    return block.one(name).args


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


def size_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, value
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]


# --- the template, read -------------------------------------------------------------------------------------

def test_template_placeholders_are_exactly_the_documented_three():
    text = NGINX_TEMPLATE.read_text()
    assert set(PLACEHOLDER.findall(text)) == {"LISTEN_PORT", "UPSTREAM_SERVERS", "ACCESS_LOG"}
    with pytest.raises(KeyError):
        render_template(text, {"LISTEN_PORT": "1"})


def test_upstream_hashes_the_adapter_header_consistently(conf):
    upstream = conf.one("upstream")
    assert values(upstream, "hash") == ["$http_x_ptserve_adapter", "consistent"]
    assert [d.args[0] for d in upstream.all("server")] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert upstream.all("zone"), "a shared zone: compose's `resolve` needs it; workers share failure state"


def test_upstream_keepalive_closes_before_uvicorn_does(conf):
    # A request sent on a connection the replica is closing fails; nginx must give idle connections up first.
    keepalive = seconds(values(conf.one("upstream"), "keepalive_timeout")[0])
    assert keepalive < uvicorn.Config(app=None).timeout_keep_alive


def test_inference_location_is_exactly_the_side_effect_free_post_routes(conf, app_routes):
    server = conf.one("server")
    inference = [d for d in server.all("location") if d.args[0] == "~"]
    assert len(inference) == 1
    pattern = re.compile(inference[0].args[1])
    posts = {path for method, path in app_routes if method == "POST"}
    assert {p for p in posts if pattern.search(p)} == INFERENCE_PATHS
    assert INFERENCE_PATHS <= posts, "the proxy names routes the app does not have"
    assert "/v1/tenants/{tenant}/keys" in posts - INFERENCE_PATHS  # a POST that must not be retried


def test_retry_policy(conf):
    server = conf.one("server")
    assert values(server, "proxy_next_upstream") == ["error", "timeout"]
    inference = next(d for d in server.all("location") if d.args[0] == "~")
    assert values(inference, "proxy_next_upstream") == ["error", "timeout", "non_idempotent"]
    for loc in server.all("location"):
        for directive in loc.all("proxy_next_upstream"):
            assert not any(a.startswith("http_") for a in directive.args), "5xx answers must not be retried"
            if loc is not inference:
                assert "non_idempotent" not in directive.args, loc.args


def test_timeouts_and_body_sizes_fit_the_settings(conf):
    server, defaults = conf.one("server"), Settings.model_fields
    assert seconds(values(server, "proxy_read_timeout")[0]) > defaults["request_timeout_s"].default
    assert size_bytes(values(server, "client_max_body_size")[0]) >= defaults["max_body_bytes"].default
    uploads = location(server, "/v1/adapters")
    upload_limit = defaults["max_adapter_bytes"].default + 64 * 2**10  # the app's own limit for uploads
    assert size_bytes(values(uploads, "client_max_body_size")[0]) >= upload_limit
    assert values(location(server, "=", "/metrics"), "return")[0] == "404"


def test_every_proxied_location_goes_to_the_upstream(conf):
    server = conf.one("server")
    for loc in server.all("location"):
        if loc.args != ["=", "/metrics"] and not loc.args[0].startswith("@"):
            assert values(loc, "proxy_pass") == ["http://ptserve"], loc.args
        assert not loc.all("proxy_set_header"), "a location's proxy_set_header drops the server's ones"


def test_nginx_t_accepts_the_loopback_rendering(nginx_bin, tmp_path):
    conf_path = write_nginx_conf(tmp_path, 18080, ["127.0.0.1:18001", "127.0.0.1:18002"])
    done = subprocess.run([nginx_bin, "-t", "-e", str(tmp_path / "error.log"), "-c", str(conf_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_nginx_t_rejects_a_broken_rendering(nginx_bin, tmp_path):
    # The check above can fail: the same call on a config with a typo in a directive.
    conf_path = write_nginx_conf(tmp_path, 18080, ["127.0.0.1:18001"])
    site = tmp_path / "ptserve.conf"
    site.write_text(site.read_text().replace("proxy_next_upstream_tries", "proxy_next_upstream_trys"))
    done = subprocess.run([nginx_bin, "-t", "-e", str(tmp_path / "error.log"), "-c", str(conf_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0


# --- a real nginx in front of stub replicas -----------------------------------------------------------------

class _Answering(http.server.BaseHTTPRequestHandler):
    name, status, seen = "good", 200, None

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        type(self).seen.append((self.command, self.path))
        body = b'{"ok": true}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Ptserve-Replica", self.name)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815 (http.server's naming)

    def log_message(self, *args):
        pass


@contextmanager
def answering(name: str, status: int = 200):
    handler = type(f"Stub_{name}", (_Answering,), {"name": name, "status": status, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], handler.seen
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def dying():
    """Reads each request, then closes the connection without an answer: a replica killed mid-request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    seen: list[str] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    seen.append(data.split(b"\r\n", 1)[0].decode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@contextmanager
def proxy(nginx_bin: str, run_dir: Path, ports: list[int]):
    """nginx from the template; max_fails=0, so a failing stub is tried again on every request."""
    listen = free_port()
    conf = write_nginx_conf(run_dir, listen, [f"127.0.0.1:{p} max_fails=0" for p in ports])
    proc = subprocess.Popen([nginx_bin, "-e", str(run_dir / "error.log"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((run_dir / "error.log").read_text(errors="replace")) from None
                time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=10) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


CALLS = {
    "classify": ("POST", "/v1/classify"),
    "generate": ("POST", "/v1/generate"),
    "completions": ("POST", "/v1/completions"),
    "upload": ("PUT", "/v1/adapters/acme/a"),
    "delete": ("DELETE", "/v1/adapters/acme/a"),
    "list": ("GET", "/v1/adapters"),
    "create_key": ("POST", "/v1/tenants/acme/keys"),
}


def statuses(client: httpx.Client, call: str, n: int = 6, **kw) -> Counter:
    method, path = CALLS[call]
    body = b"{}" if method in ("POST", "PUT") else None
    return Counter(client.request(method, path, content=body, **kw).status_code for _ in range(n))


def test_adapter_header_sticks_and_no_header_round_robins(nginx_bin, tmp_path):
    with answering("a") as (port_a, _), answering("b") as (port_b, _):
        with proxy(nginx_bin, tmp_path, [port_a, port_b]) as client:
            owners = {}
            for i in range(16):
                adapter = f"acme/adapter-{i}"
                seen = {client.post("/v1/classify", content=b"{}", headers={"X-Ptserve-Adapter": adapter})
                        .headers["x-ptserve-replica"] for _ in range(4)}
                assert len(seen) == 1, f"{adapter} moved between replicas: {seen}"
                owners[adapter] = seen.pop()
            assert set(owners.values()) == {"a", "b"}, "16 adapters all hashed to one replica"
            spread = [client.post("/v1/classify", content=b"{}").headers["x-ptserve-replica"]
                      for _ in range(4)]
            assert sorted(spread) == ["a", "a", "b", "b"], spread


def test_connection_refused_is_retried_for_every_method(nginx_bin, tmp_path):
    closed = free_port()  # nothing listens there: nothing was sent, any request may go on
    with answering("good") as (good, _):
        with proxy(nginx_bin, tmp_path, [closed, good]) as client:
            for call in CALLS:
                assert statuses(client, call) == Counter({200: 6}), call


@pytest.mark.parametrize("call", ["classify", "generate", "completions", "upload", "delete", "list"])
def test_sent_then_dropped_is_retried_where_safe(nginx_bin, tmp_path, call):
    with dying() as (dead, dropped), answering("good") as (good, _):
        with proxy(nginx_bin, tmp_path, [dead, good]) as client:
            assert statuses(client, call) == Counter({200: 6})
    assert dropped, "no request reached the dying replica: the retry path was not exercised"


def test_tenant_key_creation_is_not_retried_once_sent(nginx_bin, tmp_path):
    # A retried key creation could mint a second key while the first one's answer is lost.
    with dying() as (dead, dropped), answering("good") as (good, seen):
        with proxy(nginx_bin, tmp_path, [dead, good]) as client:
            got = statuses(client, "create_key")
    assert got[502] == len(dropped) >= 1, got
    assert got[200] == len(seen) == 6 - got[502]


def test_503_answers_are_passed_through_not_retried(nginx_bin, tmp_path):
    # 503 = draining, loading or store_unavailable: the client (SDK) retries after Retry-After, not the proxy.
    with answering("busy", status=503) as (busy, busy_seen), answering("good") as (good, _):
        with proxy(nginx_bin, tmp_path, [busy, good]) as client:
            got = statuses(client, "classify")
            answers = [client.post("/v1/classify", content=b"{}") for _ in range(2)]
    assert got[503] == len(busy_seen) - 1 >= 1, got
    busy_answer = next(r for r in answers if r.status_code == 503)
    assert busy_answer.json() == {"ok": True}, "a replica's own error body must reach the client untouched"


def test_the_proxys_own_errors_are_api_json(nginx_bin, tmp_path):
    with proxy(nginx_bin, tmp_path, [free_port()]) as client:
        down = client.post("/v1/classify", content=b"{}")
        too_large = client.post("/v1/classify", content=b"x" * (3 * 2**20))
    assert down.status_code == 502 and down.json()["error"]["type"] == "bad_gateway"
    assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "payload_too_large"


def test_metrics_are_not_served_through_the_proxy(nginx_bin, tmp_path):
    with answering("good") as (good, seen):
        with proxy(nginx_bin, tmp_path, [good]) as client:
            r = client.get("/metrics")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert not seen
