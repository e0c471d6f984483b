"""Text logs (``PTSERVE_LOG_FORMAT=text``) cannot be forged: a control character from a request (a path with
``%0A``) is written escaped, and a traceback's lines are indented, so every line at column 0 is a real record."""
from __future__ import annotations

import logging
import re
import socket
from urllib.parse import urlparse

from ptserve.server.logs import TextFormatter, escape_controls
from tests.factories import server_process

RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")  # the formatter's line start


def _record(msg: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("ptserve.access", logging.INFO, __file__, 1, msg, args, exc_info)


def test_escape_controls_escapes_every_line_break_and_terminal_control():
    text = "a\nb\rc\x00d\x1b[31me\x7ff\x85g\u2028h\u2029i\tj"
    out = escape_controls(text)
    assert out == "a\\nb\\rc\\x00d\\x1b[31me\\x7ff\\x85g\\u2028h\\u2029i\\tj"
    assert out.isprintable() and len(out.splitlines()) == 1
    assert escape_controls("plain: é ü 漢字 /v1/adapters") == "plain: é ü 漢字 /v1/adapters"


def test_a_forged_line_in_a_message_stays_on_its_record_line():
    forged = "/x\n2026-01-01 00:00:00,000 INFO ptserve.access: GET /v1/admin 200"
    line = TextFormatter().format(_record("%s %s %d", "GET", forged, 404))
    assert len(line.splitlines()) == 1 and line.endswith("GET /x\\n2026-01-01 00:00:00,000 INFO ptserve.access: "
                                                         "GET /v1/admin 200 404")


def test_a_traceback_follows_indented_and_escaped():
    try:
        raise ValueError("bad path /x\n2026-01-01 00:00:00,000 INFO ptserve.access: forged")
    except ValueError:
        import sys

        info = sys.exc_info()
    lines = TextFormatter().format(_record("unhandled error on %s", "/x\r\n", exc_info=info)).split("\n")
    assert RECORD.match(lines[0]) and lines[0].endswith("unhandled error on /x\\r\\n")
    assert len(lines) > 2 and all(x.startswith("    ") for x in lines[1:])
    assert any("ValueError: bad path /x" in x for x in lines[1:])
    assert sum(bool(RECORD.match(x)) for x in lines) == 1


def test_a_percent_encoded_newline_in_the_path_cannot_forge_an_access_log_line(tmp_path):
    forged = "2026-01-01 00:00:00,000 INFO ptserve.access: GET /v1/adapters/acme/secret 200"
    path = "/v1/adapters/acme/x%0A" + forged.replace(" ", "%20") + "%0D%0A%1B[2K"
    with server_process({"PTSERVE_STORE": f"file://{tmp_path}", "PTSERVE_LOG_FORMAT": "text"}) as server:
        u = urlparse(server.url)
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 404")), reply[:200]  # logged: 4xx are
        lines = server.log_lines()
        mine = [x for x in lines if "/v1/adapters/acme/x" in x]
        assert mine, lines[-20:]
        assert all(RECORD.match(x) for x in mine), mine
        assert not any(x.startswith(forged[:30]) for x in lines)  # no line of the attacker's making
        assert any("/v1/adapters/acme/x\\n2026-01-01" in x and "\\r\\n\\x1b[2K" in x for x in mine)
