"""Generation through an engine core process and an API worker, over HTTP: the engine core killed with SIGKILL
while SSE streams and plain requests generate. Every stream ends, with ``[DONE]`` or with its one
``engine_unavailable`` error event (never a hang, never a cut connection; the streams are long enough that some
meet the dead core); every plain request answers 200 or 503
``engine_unavailable`` with ``Retry-After``; after the supervisor restarted the core, generation serves again
(the adapter reloads from the store)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from ptserve.adapters_store.format import encode_blob
from ptserve.server.backbone import load_backbone
from tests.factories import make_adapter, never_ending, save_tiny_decoder, server_process
from tests.server.engine_core.test_multiprocess import children, every_worker_ready

pytestmark = pytest.mark.slow
STREAM = {"adapter": "acme/gen", "prompt": "the quick brown fox", "max_new_tokens": 4000, "temperature": 1.0,
          "seed": 1, "stream": True}
PLAIN = {**STREAM, "stream": False}


def stream_events(url: str, started: threading.Event) -> list | Exception:
    """The ``data:`` payloads of one stream (a client that waits for nothing longer than 30 s)."""
    try:
        events = []
        with httpx.stream("POST", f"{url}/v1/generate", json=STREAM, timeout=30) as r:
            if r.status_code != 200:
                return [("status", r.status_code, r.read().decode())]
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
        return events
    except Exception as exc:  # noqa: BLE001  (reported by the test: a cut connection or a hang)
        return exc


def test_kill_9_of_the_engine_core_mid_stream_ends_every_stream_and_generation_resumes(tmp_path):
    folder = never_ending(save_tiny_decoder("llama", tmp_path / "llama", max_positions=4096))
    bb = load_backbone(str(folder), device="cpu", dtype="float32")
    env = {"PTSERVE_BACKBONE": str(folder), "PTSERVE_STORE": f"file://{tmp_path / 'store'}",
           "PTSERVE_API_WORKERS": "1", "PTSERVE_MAX_SEQ_TOKENS": "4096", "PTSERVE_MAX_NEW_TOKENS_LIMIT": "4000",
           "PTSERVE_MAX_RUNNING": "8", "PTSERVE_MAX_BATCH_TOKENS": "32768"}  # all six decode at once
    with server_process(env) as server:
        url = server.url
        every_worker_ready(url, in_a_row=4)
        r = httpx.put(f"{url}/v1/adapters/acme/gen", content=encode_blob(make_adapter(
            bb.fingerprint, 4, seed=4, task="generate")), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        results: dict[str, list] = {"stream": [], "plain": []}
        started = [threading.Event() for _ in range(4)]

        def plain() -> None:
            try:
                results["plain"].append(httpx.post(f"{url}/v1/generate", json=PLAIN, timeout=30))
            except Exception as exc:  # noqa: BLE001
                results["plain"].append(exc)

        threads = [threading.Thread(target=lambda e=e: results["stream"].append(stream_events(url, e)))
                   for e in started] + [threading.Thread(target=plain) for _ in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started), "the streams did not start"
        [core] = children(server.proc.pid, "engine_core.core_proc")
        os.kill(core, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request hangs after the engine core died"

        cut = 0
        for events in results["stream"]:
            assert isinstance(events, list), f"a stream was cut instead of ending: {events!r}"
            body = [json.loads(e) for e in events if e != "[DONE]"]
            assert all("error" not in b for b in body[:-1])  # at most one error event, the last
            if events[-1] != "[DONE]":  # it met the dead core
                assert body[-1]["error"]["type"] == "engine_unavailable", events[-1]
                cut += 1
        assert cut, "no stream met the dead engine core"
        for answer in results["plain"]:
            assert isinstance(answer, httpx.Response), f"a request failed without an answer: {answer!r}"
            if answer.status_code != 200:
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["type"] == "engine_unavailable", answer.text
                assert answer.headers["retry-after"] == "1"

        deadline = time.monotonic() + 90
        while True:  # the supervisor restarts the core; the adapter reloads from the store on first use
            r = httpx.post(f"{url}/v1/generate", json={**PLAIN, "max_new_tokens": 8}, timeout=30)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.json()["error"]["type"] in ("engine_unavailable", "not_ready"), r.text
            assert time.monotonic() < deadline, "generation did not resume after the engine core was killed"
            time.sleep(0.3)
        assert r.json()["usage"]["completion_tokens"] == 8
        with httpx.stream("POST", f"{url}/v1/generate", json={**STREAM, "max_new_tokens": 8}, timeout=30) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 8
        [new_core] = children(server.proc.pid, "engine_core.core_proc")
        assert new_core != core
