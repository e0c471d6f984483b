"""The compose topology without Docker (``scripts/topology/``): redis-server, two ``ptserve serve`` replicas on
the Redis store, nginx from docker/nginx/ptserve.conf.template — driven through the proxy like a client would.

Promises checked: one adapter keeps landing on one replica (X-Ptserve-Replica); an upload through one replica
is served by both through the proxy within 1 s; with Redis down, resident adapters keep serving and cold ones
answer 503 store_unavailable, and after a restart the append-only file brought every adapter back; the Grafana
dashboard's metrics are all exported by real servers (and Prometheus evaluates every panel's query); killing a
replica mid-load fails no request the proxy can retry (only answers the dead replica had begun to send arrive cut
short). The tests run in file order on one topology (the last one kills a replica).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from ptserve.adapters_store.format import encode_blob
from scripts.topology import Process, Topology, free_port, prometheus_conf, wait_until
from tests.deploy import dashboard
from tests.deploy.conftest import need_binary
from tests.factories import make_adapter, make_blob, save_tiny_decoder

pytestmark = pytest.mark.slow

ADMIN_KEY = "deploy-test-admin-key"
ADAPTERS = [f"acme/a{i:02d}" for i in range(16)]
COLD = "globex/cold"  # uploaded, never used before Redis goes down
TEXT = ["the service was quick and the staff were kind"]
OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_decoder("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def stack(nginx_bin, tmp_path_factory, llama_dir):
    """The topology, plus a decoder-backbone server (tiny Llama) started alongside, for the dashboard."""
    need_binary("redis-server")
    run_dir = tmp_path_factory.mktemp("topology")
    topo = Topology(run_dir, admin_key=ADMIN_KEY, install=False,
                    env={"PTSERVE_THREADS": "1", "PTSERVE_LOG_LEVEL": "warning"})
    decoder_port = free_port()
    decoder_env = {**topo.replica_env(0), "PTSERVE_PORT": str(decoder_port), "PTSERVE_REPLICA_ID": "decoder",
                   "PTSERVE_BACKBONE": str(llama_dir), "PTSERVE_STORE": f"file://{run_dir / 'decoder-store'}",
                   "PTSERVE_MAX_SEQ_TOKENS": "128"}
    exe = [str(Path(sys.executable).parent / "ptserve"), "serve"]
    decoder = Process("decoder", exe, decoder_env, run_dir / "logs" / "decoder.log").start()
    try:
        with topo:
            decoder_url = f"http://127.0.0.1:{decoder_port}"
            ready = f"{decoder_url}/readyz"
            wait_until(lambda: httpx.get(ready).status_code == 200, "decoder", 120, decoder)
            yield topo, decoder_url
    finally:
        decoder.stop()


@pytest.fixture(scope="module")
def topo(stack):
    return stack[0]


@pytest.fixture(scope="module")
def client(topo):
    with httpx.Client(base_url=topo.proxy_url, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def uploaded(client, minilm):
    for i, aid in enumerate([*ADAPTERS, COLD]):
        r = client.put(f"/v1/adapters/{aid}", content=make_blob(minilm.fingerprint, 4, seed=i), headers=OCTET)
        assert r.status_code == 201, r.text
    return ADAPTERS


def classify(client: httpx.Client, aid: str, affinity: bool = True) -> httpx.Response:
    headers = {"X-Ptserve-Adapter": aid} if affinity else {}
    return client.post("/v1/classify", json={"adapter": aid, "inputs": TEXT}, headers=headers)


def replica_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-ptserve-replica"]


def test_one_adapter_keeps_landing_on_one_replica(topo, client, uploaded):
    owners = {}
    for aid in uploaded:
        seen = {replica_of(classify(client, aid)) for _ in range(3)}
        assert len(seen) == 1, f"{aid} answered by {seen}"
        owners[aid] = seen.pop()
    assert set(owners.values()) == {"ptserve-1", "ptserve-2"}, owners
    # Without the header the proxy spreads requests (round robin): both replicas answer the same adapter.
    spread = Counter(replica_of(classify(client, uploaded[0], affinity=False)) for _ in range(6))
    assert set(spread) == {"ptserve-1", "ptserve-2"}, spread
    # the proxy's access log names the adapter and the replica that answered
    entries = [json.loads(line) for line in topo.access_log.read_text().splitlines()]
    logged = {(e["adapter"], e["replica"]) for e in entries if e["uri"] == "/v1/classify" and e["adapter"]}
    assert logged == set(owners.items())


def _serving(client: httpx.Client, aid: str, version: int, deadline: float) -> dict[str, float]:
    """Headerless requests (round robin) until both replicas answered ``version`` of ``aid``: {replica: s}."""
    start, first = time.monotonic(), {}
    while len(first) < 2 and time.monotonic() < deadline:
        r = classify(client, aid, affinity=False)
        if r.status_code == 200 and r.json()["version"] == version:
            first.setdefault(r.headers["x-ptserve-replica"], time.monotonic() - start)
    return first


def test_upload_through_one_replica_is_served_by_both_within_1s(topo, client, minilm):
    aid, fp = "initech/fresh", minilm.fingerprint
    auth = {"authorization": f"Bearer {ADMIN_KEY}", **OCTET}
    r = httpx.put(f"{topo.replica_url(0)}/v1/adapters/{aid}", content=make_blob(fp, 4, seed=100),
                  headers=auth)
    assert r.status_code == 201 and r.headers["x-ptserve-replica"] == "ptserve-1", r.text
    first = _serving(client, aid, 1, time.monotonic() + 5)
    assert set(first) == {"ptserve-1", "ptserve-2"} and max(first.values()) <= 1.0, first

    # Both replicas now hold version 1; version 2 arrives through the other replica and the change feed.
    r = httpx.put(f"{topo.replica_url(1)}/v1/adapters/{aid}", content=make_blob(fp, 6, seed=101),
                  headers=auth)
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    first = _serving(client, aid, 2, time.monotonic() + 5)
    assert set(first) == {"ptserve-1", "ptserve-2"} and max(first.values()) <= 1.0, first


def test_redis_down_resident_adapters_serve_cold_ones_503_then_aof_brings_all_back(topo, client, uploaded):
    warm = uploaded[:4]
    for aid in warm:
        replica_of(classify(client, aid))  # resident on the replica the proxy sends it to
    time.sleep(1.2)  # appendfsync everysec: the last upload is on disk before the crash
    topo.kill_redis(signal.SIGKILL)
    try:
        for aid in warm:
            for _ in range(2):
                replica_of(classify(client, aid))
        cold = classify(client, COLD)
        assert cold.status_code == 503 and cold.json()["error"]["type"] == "store_unavailable", cold.text
        for i in range(topo.replicas):
            ready = httpx.get(f"{topo.replica_url(i)}/readyz")
            assert ready.status_code == 200 and ready.json()["store_status"] == "unavailable", ready.text
    finally:
        topo.start_redis()  # same port, same directory: Redis replays its append-only file
    deadline = time.monotonic() + 15
    while (r := classify(client, COLD)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, f"the cold adapter did not come back after the Redis restart: {r.text}"
    listed = client.get("/v1/adapters", params={"limit": 1000}).json()["data"]
    assert {a["id"] for a in listed} >= {*uploaded, COLD}


def _traffic(client: httpx.Client, decoder_url: str, adapters: list[str]) -> None:
    """Classification through the proxy, generation on the decoder, and a few 4xx errors on every replica."""
    for aid in adapters[:6]:
        replica_of(classify(client, aid))
    for _ in range(4):
        assert classify(client, "acme/missing", affinity=False).status_code == 404
        assert httpx.post(client.base_url.join("/v1/classify"), json={"adapter": adapters[0], "inputs": TEXT}
                          ).status_code == 401
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=decoder_url, headers=auth, timeout=60) as dec:
        for i, prompt in enumerate(["the quick brown fox", "many tenants share"]):
            r = dec.post("/v1/generate", json={"adapter": "acme/gen", "prompt": prompt, "max_new_tokens": 6,
                                               "temperature": 0, "stream": i == 1})
            assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def decoder_adapter(stack, llama_dir):
    from ptserve.server.backbone import load_backbone

    _, decoder_url = stack
    fp = load_backbone(str(llama_dir), device="cpu", dtype="float32").fingerprint
    blob = encode_blob(make_adapter(fp, 5, task="generate"))
    r = httpx.put(f"{decoder_url}/v1/adapters/acme/gen", content=blob,
                  headers={"authorization": f"Bearer {ADMIN_KEY}", **OCTET})
    assert r.status_code == 201, r.text


def test_every_dashboard_metric_is_exported_by_a_live_server(stack, client, uploaded, decoder_adapter):
    topo, decoder_url = stack
    _traffic(client, decoder_url, uploaded)
    encoder = set().union(*(dashboard.exported_names(httpx.get(f"{topo.replica_url(i)}/metrics").text)
                            for i in range(topo.replicas)))
    decoder = dashboard.exported_names(httpx.get(f"{decoder_url}/metrics").text)
    queries = dashboard.queries(dashboard.load())
    wanted = {q.row: set() for q in queries}
    for q in queries:
        assert q.metrics, f"panel {q.panel!r} reads no ptserve metric: {q.expr}"
        wanted[q.row] |= q.metrics
    decoder_only = wanted.pop(dashboard.DECODER_ROW)
    encoder_wanted = set().union(*wanted.values())
    assert encoder_wanted - encoder == set(), "panels read metrics an encoder replica does not export"
    assert decoder_only - decoder == set(), "generation panels read metrics a decoder server does not export"
    # the generation row is the only one allowed to stay empty on a classification backbone
    assert decoder_only - encoder, "the decoder-only row reads nothing decoder-specific"
    assert "ptserve_build_info" in encoder, "the dashboard's replica variable reads ptserve_build_info"


def test_prometheus_evaluates_every_panel_with_data(stack, client, uploaded, decoder_adapter, tmp_path):
    prometheus = need_binary("prometheus")
    topo, decoder_url = stack
    targets = {topo.replica_id(i): f"127.0.0.1:{topo.replica_ports[i]}" for i in range(topo.replicas)}
    targets["decoder"] = decoder_url.removeprefix("http://")
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump(prometheus_conf(targets, scrape_interval="1s")))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Process("prometheus", [prometheus, f"--config.file={conf}",
                                  f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                  f"--web.listen-address=127.0.0.1:{port}"],
                   dict(os.environ), tmp_path / "prometheus.log").start()
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready").status_code == 200, "prometheus", 60, proc)

        def up() -> set[str]:
            result = httpx.get(f"{url}/api/v1/query", params={"query": "up == 1"}).json()["data"]["result"]
            return {s["metric"].get("replica") for s in result}

        # Prometheus hands new targets to its scrapers after ~5 s; rates need two scrapes after the traffic.
        wait_until(lambda: up() >= set(targets), "first scrapes", 30)
        for _ in range(3):
            _traffic(client, decoder_url, uploaded)
            time.sleep(1.1)
        time.sleep(1.1)
        empty = []
        for q in dashboard.queries(dashboard.load()):
            answer = httpx.get(f"{url}/api/v1/query", params={"query": q.evaluable()}).json()
            assert answer["status"] == "success", (q.panel, q.expr, answer)
            if not answer["data"]["result"]:
                empty.append((q.panel, q.expr))
        assert not empty, f"panels without data after traffic: {empty}"
        variable = dashboard.load()["templating"]["list"][0]
        assert variable["name"] == "replica"
        assert "label_values(ptserve_build_info, replica)" in variable["definition"]
        values = httpx.get(f"{url}/api/v1/label/replica/values",
                           params={"match[]": "ptserve_build_info"}).json()
        assert set(values["data"]) == set(targets)
    finally:
        proc.stop()


def test_killing_a_replica_mid_load_fails_no_request_the_proxy_can_retry(topo, uploaded):
    """SIGKILL one of two replicas under load: every request the proxy could retry is answered 200 (nginx retried
    some on the survivor), traffic moves to the survivor, and only answers the dead replica had begun to send
    (at most one per client, within a second of the kill) arrive cut short."""
    results: list[tuple[float, int, str, str]] = []  # (time, status, replica, body on failure)
    stop = threading.Event()

    def worker(offset: int) -> None:
        with httpx.Client(base_url=topo.proxy_url, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                          timeout=30) as c:
            i = offset
            while not stop.is_set():
                aid = uploaded[i % len(uploaded)]
                i += 1
                try:
                    r = classify(c, aid)
                    results.append((time.monotonic(), r.status_code, r.headers.get("x-ptserve-replica", ""),
                                    "" if r.status_code == 200 else r.text))
                except httpx.HTTPError as e:
                    results.append((time.monotonic(), 0, "", repr(e)))

    threads = [threading.Thread(target=worker, args=(k * 3,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    killed_at = time.monotonic()
    topo.kill_replica(1, signal.SIGKILL)
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)

    # The one failure no proxy can retry: the replica died after its answer's header reached nginx (uvicorn
    # writes header and body in two send()s), so nginx had begun to relay it and the answer arrives cut
    # short. At most the requests in flight at the kill may end so; anything else (a 502, a refused
    # connection, ...) is a request the proxy could have retried and lost. (The SDK resends such an answer:
    # inference is free of side effects; tests/client/test_sdk.py.)
    cut_short = [r for r in results if r[1] == 0 and "without sending complete message body" in r[3]
                 and killed_at < r[0] < killed_at + 1.0]
    failed = [r for r in results if r[1] != 200 and r not in cut_short]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    assert len(cut_short) <= len(threads), cut_short
    before = Counter(r[2] for r in results if r[0] < killed_at)
    after = Counter(r[2] for r in results if r[0] > killed_at + 0.5)
    assert before["ptserve-2"] > 0 and before["ptserve-1"] > 0, before
    assert set(after) == {"ptserve-1"} and after["ptserve-1"] > 0, after
    # the proxy did retry: a request's first attempt failed on the killed replica, the next one answered
    entries = [json.loads(line) for line in topo.access_log.read_text().splitlines()]
    retried = [e for e in entries
               if e["uri"] == "/v1/classify" and ", " in e["upstream"] and e["status"] == 200]
    assert retried, "no retried request in the access log: the kill did not hit a request in flight"
