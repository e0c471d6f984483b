"""A request head's size and time are bounded (``server/http_protocol.py``): tested with real sockets against a
real ``ptserve serve`` (uvicorn + httptools). A client cannot make the server hold memory for a huge head, nor a
descriptor for a head that never ends (slowloris), and well-behaved clients (keep-alive included) see no change."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.factories import server_process

MAX_HEADER_BYTES = 16384
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('http-limits')}",
           "PTSERVE_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES), "PTSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
           "PTSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "PTSERVE_KEEP_ALIVE_TIMEOUT_S": "30"}  # longer than the head timeout: the head timer must act alone
    with server_process(env) as srv:
        yield srv


def connect(url: str, timeout: float = 10) -> socket.socket:
    u = urlparse(url)
    return socket.create_connection((u.hostname, u.port), timeout=timeout)


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def assert_healthy(url: str) -> None:
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def test_a_head_over_the_limit_is_431(server):
    for head in (
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * (MAX_HEADER_BYTES + 100)}\r\n\r\n",  # one big header
        "GET /healthz HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-{i}: v\r\n" for i in range(2000)) + "\r\n",  # many
        f"GET /healthz?{'q' * (MAX_HEADER_BYTES + 100)} HTTP/1.1\r\nHost: x\r\n\r\n",  # a long request line
    ):
        with connect(server.url) as s:
            s.sendall(head.encode())
            response = read_response(s)
        assert status_of(response) == 431, response[:200]
        assert b'"type": "header_too_large"' in response and str(MAX_HEADER_BYTES).encode() in response
    assert_healthy(server.url)


def test_a_head_under_the_limit_is_served(server):
    with connect(server.url) as s:
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Ok: {'a' * 8000}\r\nConnection: close\r\n\r\n".encode())
        response = read_response(s)
    assert status_of(response) == 200 and response.endswith(b'{"status":"ok"}')


def _send_until_closed(sock: socket.socket, chunk: bytes, total: int) -> int:
    """Send up to ``total`` bytes; how many went before the server closed the connection on us."""
    sent = 0
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_unfinished_8_mb_heads_are_cut_off_not_buffered(server):
    """Twenty connections each start an 8 MB header and never finish it: the server closes each one early
    instead of reading (and keeping) the 160 MB."""
    total, chunk = 8 << 20, b"a" * 65536
    socks = [connect(server.url, timeout=5) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for s in socks:
            sent = _send_until_closed(s, chunk, total)
            try:
                rest = read_response(s)  # an 8 MB head is never complete: only a refusal or a close ends this
            except ConnectionResetError:
                rest = b""
            except socket.timeout:
                pytest.fail(f"the server kept reading an unfinished head ({sent} bytes sent) and never closed")
            assert not rest or status_of(rest) == 431, rest[:200]
    finally:
        for s in socks:
            s.close()
    assert_healthy(server.url)


def _trickle_until_closed(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Send one header line every 0.2 s (a head that never ends); (seconds until the server closed, its reply)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    reply = b""
    try:
        while time.monotonic() - start < limit_s:
            sock.sendall(b"X-Slow: 1\r\n")
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return time.monotonic() - start, reply
            reply += chunk
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - start, reply
    pytest.fail(f"a head trickling in for {limit_s} s was never timed out")


def test_a_slowloris_head_is_closed_after_the_header_timeout(server):
    with connect(server.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        waited, reply = _trickle_until_closed(s, limit_s=6 * HEADER_TIMEOUT_S)
    assert HEADER_TIMEOUT_S * 0.9 <= waited < HEADER_TIMEOUT_S + 2.0, waited
    assert status_of(reply) == 408 and b'"type": "request_timeout"' in reply
    assert_healthy(server.url)


def test_a_connection_that_never_sends_a_request_is_closed(server):
    with connect(server.url) as s:
        start = time.monotonic()
        reply = read_response(s)  # sends nothing at all
        waited = time.monotonic() - start
    assert HEADER_TIMEOUT_S * 0.9 <= waited < HEADER_TIMEOUT_S + 2.0, waited
    assert status_of(reply) == 408


def test_a_kept_alive_connection_gets_the_head_timeout_again_after_each_response(server):
    with connect(server.url) as s:
        for _ in range(2):  # well-behaved requests on one connection, slower than the timeout in all
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(HEADER_TIMEOUT_S * 0.6)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # then a head that never ends
        waited, reply = _trickle_until_closed(s, limit_s=6 * HEADER_TIMEOUT_S)
    assert waited < HEADER_TIMEOUT_S + 2.0 and status_of(reply) == 408


def test_a_slow_body_is_not_cut_by_the_head_timeout(server):
    """The head timer covers the head only: a body pausing longer than it (but under the body timeout) is
    answered."""
    with connect(server.url) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 3\r\nConnection: close\r\n\r\n{")
        for part in (b" ", b"}"):  # each pause longer than the head timeout, shorter than the body timeout
            time.sleep(HEADER_TIMEOUT_S * 1.5)
            s.sendall(part)
        reply = read_response(s)
    assert status_of(reply) == 422  # the body arrived whole and was answered (it lacks its fields)


def test_a_body_that_stops_arriving_is_closed_after_the_body_timeout(server):
    with connect(server.url) as s:
        s.sendall(b"PUT /v1/adapters/acme/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b"\0" * 10)
        start = time.monotonic()
        reply = read_response(s)  # the other 990 bytes never come
        waited = time.monotonic() - start
    assert BODY_TIMEOUT_S * 0.9 <= waited < BODY_TIMEOUT_S + 3.0, waited
    assert status_of(reply) == 408 and b'"type": "request_timeout"' in reply
    assert_healthy(server.url)


def test_httpx_clients_keep_alive_across_requests(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for _ in range(5):
            assert c.get("/healthz").status_code == 200
            time.sleep(0.05)


def test_a_request_that_is_not_http_gets_the_apis_error_body(server):
    with connect(server.url) as s:
        s.sendall(b"GARBAGE \x01\x02 NOT HTTP\r\n\r\n")
        response = read_response(s)
    assert status_of(response) == 400 and b'"type": "invalid_http"' in response
    assert_healthy(server.url)
