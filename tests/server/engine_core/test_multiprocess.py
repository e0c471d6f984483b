"""``ptserve serve`` with an engine core process and two API workers, over HTTP: the engine core killed with
SIGKILL under load (answers are 200 or 503 engine_unavailable, none hangs, serving resumes by itself), a killed
worker is replaced, and uploads of a new version while requests run (each answer wholly one version)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from ptserve.adapters_store.validation import Limits, decode_blob
from ptserve.server.engine import Row
from tests.factories import make_blob, server_process

pytestmark = pytest.mark.slow
TEXT = "a quiet film about a loud family, better than it sounds"


def children(pid: int, marker: str) -> list[int]:
    """The supervisor's child processes whose command line contains ``marker``."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if marker in cmdline:
            found.append(int(child))
    return found


def every_worker_ready(url: str, in_a_row: int = 16, timeout: float = 60.0) -> None:
    """Until ``in_a_row`` fresh connections in a row got ``/readyz`` 200: the supervisor's readiness is one
    worker's, and a worker still connecting to the engine core answers 503 ``not_ready`` (as it should)."""
    deadline, ok = time.monotonic() + timeout, 0
    while ok < in_a_row:
        assert time.monotonic() < deadline, "not every API worker became ready"
        ok = ok + 1 if httpx.get(f"{url}/readyz", timeout=10).status_code == 200 else 0
        if ok == 0:
            time.sleep(0.2)


def upload(url: str, adapter_id: str, blob: bytes) -> dict:
    r = httpx.put(f"{url}/v1/adapters/{adapter_id}", content=blob,
                  headers={"content-type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def classify(client: httpx.Client, url: str, adapter_id: str) -> httpx.Response:
    return client.post(f"{url}/v1/classify", json={"adapter": adapter_id, "inputs": [TEXT], "return_logits": True})


def expected_logits(engine, blob: bytes, version: int) -> torch.Tensor:
    adapter = decode_blob(blob, engine.fp, engine.backbone.family.head_kind, Limits())
    resident = engine.make_resident(adapter, "acme/clf", version)
    logits, _ = engine.classify([Row(resident, engine.tokenize([TEXT], resident.num_virtual_tokens)[0])])
    return logits[0]


def load(url: str, adapter_id: str, stop: threading.Event, answers: list, clients: int = 4) -> list[threading.Thread]:
    def loop() -> None:
        with httpx.Client(timeout=30) as client:  # a request that hangs fails the test (timeout -> exception)
            while not stop.is_set():
                try:
                    answers.append((time.monotonic(), classify(client, url, adapter_id)))
                except Exception as exc:  # noqa: BLE001  (reported by the test)
                    answers.append((time.monotonic(), exc))

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def test_kill_9_of_the_engine_core_under_load_answers_200_or_503_and_serving_resumes(tmp_path, minilm):
    env = {"PTSERVE_STORE": f"file://{tmp_path / 'store'}", "PTSERVE_API_WORKERS": "2"}
    with server_process(env) as server:
        url = server.url
        every_worker_ready(url)
        upload(url, "acme/clf", make_blob(minilm.fingerprint, 4))
        stop, answers = threading.Event(), []
        threads = load(url, "acme/clf", stop, answers)
        try:
            time.sleep(1.5)
            [core] = children(server.proc.pid, "engine_core.core_proc")
            killed_at = time.monotonic()
            os.kill(core, signal.SIGKILL)
            deadline = killed_at + 90
            while not any(t > killed_at + 0.5 and getattr(a, "status_code", 0) == 200 for t, a in answers):
                assert time.monotonic() < deadline, "serving did not resume after the engine core was killed"
                time.sleep(0.2)
            time.sleep(1.0)  # some load on the restarted core
        finally:
            stop.set()
            for t in threads:
                t.join()
        [new_core] = children(server.proc.pid, "engine_core.core_proc")
        assert new_core != core

    statuses = {}
    for _, answer in answers:
        assert isinstance(answer, httpx.Response), f"a request failed without an answer: {answer!r}"
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        if answer.status_code == 503:
            assert answer.json()["error"]["type"] == "engine_unavailable", answer.text
            assert answer.headers["retry-after"] == "1"
        else:
            assert answer.status_code == 200, answer.text
    assert statuses.get(503, 0) > 0, f"no request met the dead engine core: {statuses}"
    assert statuses[200] > 0


def test_a_killed_api_worker_is_replaced_and_the_other_serves_meanwhile(tmp_path, minilm):
    env = {"PTSERVE_STORE": f"file://{tmp_path / 'store'}", "PTSERVE_API_WORKERS": "2"}
    with server_process(env) as server:
        url = server.url
        every_worker_ready(url)
        upload(url, "acme/clf", make_blob(minilm.fingerprint, 4))
        before = children(server.proc.pid, "engine_core.worker_proc")
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                now = children(server.proc.pid, "engine_core.worker_proc")
                if len(now) == 2 and before[0] not in now:
                    break
                assert time.monotonic() < deadline, "the killed worker was not replaced"
                time.sleep(0.2)
            for _ in range(20):  # connections may land on either worker, the replacement included
                r = httpx.post(f"{url}/v1/classify", json={"adapter": "acme/clf", "inputs": [TEXT]}, timeout=30)
                if r.status_code == 503:  # the replacement may still be connecting to the engine core
                    time.sleep(0.2)
                    continue
                assert r.status_code == 200, r.text
            assert classify(client, url, "acme/clf").status_code == 200


def test_uploading_a_new_version_while_requests_run_answers_each_from_one_whole_version(
    tmp_path, minilm, minilm_engine
):
    env = {"PTSERVE_STORE": f"file://{tmp_path / 'store'}", "PTSERVE_API_WORKERS": "2"}
    blobs = {1: make_blob(minilm.fingerprint, 4, seed=1), 2: make_blob(minilm.fingerprint, 12, seed=2)}
    expected = {v: expected_logits(minilm_engine, b, v) for v, b in blobs.items()}
    assert (expected[1] - expected[2]).abs().max() > 1e-3  # the versions are told apart by their logits
    with server_process(env) as server:
        url = server.url
        every_worker_ready(url)
        upload(url, "acme/clf", blobs[1])
        stop, answers = threading.Event(), []
        threads = load(url, "acme/clf", stop, answers)
        try:
            time.sleep(1.0)
            assert upload(url, "acme/clf", blobs[2])["version"] == 2
            uploaded_at = time.monotonic()
            deadline = uploaded_at + 30
            while not any(t > uploaded_at and getattr(a, "status_code", 0) == 200
                          and a.json()["version"] == 2 for t, a in answers):
                assert time.monotonic() < deadline, "no answer from version 2"
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
    seen = set()
    for _, answer in answers:
        assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
        body = answer.json()
        logits = torch.tensor(body["predictions"][0]["logits"])
        assert (logits - expected[body["version"]]).abs().max() <= 1e-5, body["version"]
        seen.add(body["version"])
    assert seen == {1, 2}
