"""Graceful shutdown of a real ``ptserve serve`` process: SIGTERM under load — readiness turns 503, new requests
are refused with 503, every request already accepted completes, and the process exits 0."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.factories import make_blob, server_process

pytestmark = pytest.mark.usefixtures("server_modes")  # in process and with an engine core process

TEXT = " ".join(["slow"] * 200)
IN_FLIGHT = 12


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.slow
def test_sigterm_under_load_finishes_accepted_requests_refuses_new_ones_and_exits_0(tmp_path, minilm):
    env = {"PTSERVE_STORE": f"file://{tmp_path / 'store'}", "PTSERVE_MAX_BATCH_SIZE": "4",
           "PTSERVE_DRAIN_TIMEOUT_S": "60"}
    with server_process(env) as server:
        url = server.url
        r = httpx.put(f"{url}/v1/adapters/acme/clf", content=make_blob(minilm.fingerprint, 4),
                      headers={"content-type": "application/octet-stream"}, timeout=30)
        assert r.status_code == 201, r.text

        answers: list[httpx.Response | Exception] = [None] * IN_FLIGHT

        def call(i: int) -> None:
            try:
                answers[i] = httpx.post(f"{url}/v1/classify", timeout=120,
                                        json={"adapter": "acme/clf", "inputs": [TEXT] * 4},
                                        headers={"x-request-id": f"drain-{i}"})
            except Exception as exc:  # noqa: BLE001  (reported below)
                answers[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(IN_FLIGHT)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _metric(url, "ptserve_requests_in_flight") < IN_FLIGHT:  # all accepted, most still queued
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.02)

        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "draining"
        refused = httpx.post(f"{url}/v1/classify", json={"adapter": "acme/clf", "inputs": ["late"]}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "draining"
        assert refused.headers["retry-after"] == "1"
        assert _metric(url, "ptserve_draining") == 1
        assert server.proc.poll() is None, "exited before the accepted requests finished"

        for t in threads:
            t.join(timeout=120)
        assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers
        assert all(len(a.json()["predictions"]) == 4 for a in answers)
        assert server.proc.wait(timeout=30) == 0

        lines = [json.loads(x) for x in server.log_lines() if x.startswith("{")]
        assert any(x["msg"].startswith("drained") for x in lines), lines[-5:]
        done = {x["request_id"] for x in lines if x.get("logger") == "ptserve.access" and x.get("status") == 200}
        assert {f"drain-{i}" for i in range(IN_FLIGHT)} <= done


@pytest.mark.slow
def test_sigterm_when_idle_exits_0_at_once(tmp_path):
    with server_process({"PTSERVE_STORE": f"file://{tmp_path / 'store'}"}) as server:
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0
        assert time.monotonic() - start < 10
