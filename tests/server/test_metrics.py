"""Prometheus on a live server after traffic: every promised metric is there, `promtool check metrics` passes, and
no label value carries a tenant or adapter name. Plus the JSON access log and request ids."""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.components import need_binary
from tests.factories import free_port, make_blob, server_process

ADMIN = "metrics-admin-key"
TENANTS = ("zqalpha", "zqbravo")
ADAPTERS = ("zqsentiment", "zqtopic")
OCTET = {"content-type": "application/octet-stream"}
PROMISED = [
    # requests by endpoint and status class; latencies; batches; queue
    "ptserve_requests", "ptserve_request_duration_seconds", "ptserve_queue_wait_seconds",
    "ptserve_inference_duration_seconds", "ptserve_batch_size", "ptserve_batch_tokens", "ptserve_batch_padding_ratio",
    "ptserve_queue_depth", "ptserve_requests_in_flight", "ptserve_requests_rejected", "ptserve_draining",
    # adapter cache, store, uploads, build
    "ptserve_adapter_cache_hits", "ptserve_adapter_cache_misses", "ptserve_adapter_cache_loads",
    "ptserve_adapter_cache_evictions", "ptserve_adapter_cache_resident_bytes", "ptserve_adapter_cache_resident_adapters",
    "ptserve_store_errors", "ptserve_adapter_uploads", "ptserve_build_info",
    # the batch planner's pass cost (measured at start-up, or set)
    "ptserve_batch_overhead_tokens", "ptserve_batch_pass_fixed_seconds", "ptserve_batch_pass_token_seconds",
    # the process
    "process_resident_memory_bytes",
]


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm):
    env = {"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('metrics')}", "PTSERVE_ADMIN_KEY": ADMIN,
           "PTSERVE_CACHE_BYTES": str(400_000)}  # room for one adapter: traffic causes evictions
    with server_process(env) as srv:
        _traffic(srv.url, minilm.fingerprint)
        yield srv


def _traffic(url: str, fp) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        keys = {t: c.post(f"/v1/tenants/{t}/keys", headers=bearer(ADMIN)).json()["key"] for t in TENANTS}
        for i, tenant in enumerate(TENANTS):
            for j, name in enumerate(ADAPTERS):
                r = c.put(f"/v1/adapters/{tenant}/{name}", content=make_blob(fp, 8, seed=i * 10 + j),
                          headers={**bearer(keys[tenant]), **OCTET})
                assert r.status_code == 201, r.text
            c.put(f"/v1/adapters/{tenant}/zqbroken", content=b"not an adapter", headers={**bearer(keys[tenant]), **OCTET})
            for name in ADAPTERS:
                for _ in range(2):
                    r = c.post("/v1/classify", json={"adapter": f"{tenant}/{name}", "inputs": ["good", "bad day"]},
                               headers=bearer(keys[tenant]))
                    assert r.status_code == 200, r.text
            c.get(f"/v1/adapters/{tenant}/zqmissing", headers=bearer(keys[tenant]))
            c.get(f"/v1/adapters/{TENANTS[1 - i]}/{ADAPTERS[0]}", headers=bearer(keys[tenant]))  # other tenant
            c.get(f"/v1/adapters/{tenant}/{ADAPTERS[0]}/blob", headers=bearer(keys[tenant]))
            c.get("/v1/adapters", headers=bearer(keys[tenant]))
            c.get(f"/{tenant}/nowhere/{ADAPTERS[1]}")  # unmatched route
        c.get("/v1/adapters", headers=bearer("ptk_0123456789abcdef_" + "z" * 43))  # 401
        c.delete(f"/v1/adapters/{TENANTS[0]}/{ADAPTERS[1]}", headers=bearer(ADMIN))


def _families(text: str):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_promised_metric_is_exported(server):
    families = _families(httpx.get(f"{server.url}/metrics").text)
    missing = [name for name in PROMISED if name not in families]
    assert not missing, missing
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert samples["ptserve_adapter_cache_evictions_total"].value >= 1
    assert samples["ptserve_adapter_cache_loads_total"].value >= 2
    assert samples["process_resident_memory_bytes"].value > 10e6
    uploads = {s.labels["result"]: s.value for s in families["ptserve_adapter_uploads"].samples
               if s.name.endswith("_total")}
    assert uploads == {"accepted": 4, "rejected": 2}
    build = next(s for s in families["ptserve_build_info"].samples)
    assert build.labels["backbone"] == "minilm" and build.labels["model_type"] == "bert"
    assert build.labels["dtype"] == "float32" and build.labels["dtype_reason"] == "float32 set by PTSERVE_DTYPE"
    assert samples["ptserve_batch_overhead_tokens"].value == 64  # the test servers' fixed setting
    statuses = {(s.labels["endpoint"], s.labels["status_class"]) for s in families["ptserve_requests"].samples
                if s.name == "ptserve_requests_total"}
    assert ("/v1/classify", "2xx") in statuses and ("/v1/adapters/{tenant}/{name}", "4xx") in statuses
    assert ("unmatched", "4xx") in statuses and ("/v1/adapters", "4xx") in statuses  # the 401
    rejected = {s.labels["reason"]: s.value for s in families["ptserve_requests_rejected"].samples
                if s.name.endswith("_total")}
    assert rejected["unauthorized"] >= 1


def test_no_label_value_names_a_tenant_or_adapter(server):
    text = httpx.get(f"{server.url}/metrics").text
    names = [*TENANTS, *ADAPTERS, "zqbroken", "zqmissing"]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, value in sample.labels.items():
                assert not any(n in value for n in names), (sample.name, label, value)
    assert not any(n in text for n in names)  # nor anywhere else in the exposition


def test_promtool_check_metrics_passes_on_a_live_scrape(server):
    promtool = need_binary("promtool", "prometheus")
    text = httpx.get(f"{server.url}/metrics").text
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_access_log_is_one_json_line_per_request_with_its_request_id(server):
    rid = "trace-me.42"
    r = httpx.post(f"{server.url}/v1/classify", json={"adapter": f"{TENANTS[0]}/{ADAPTERS[0]}", "inputs": ["x"]},
                   headers={**bearer(ADMIN), "x-request-id": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    made = httpx.get(f"{server.url}/v1/adapters", headers={"x-request-id": "bad id with spaces"})
    assert made.status_code == 401 and len(made.headers["x-request-id"]) == 32  # a fresh id, not the bad one
    assert httpx.get(f"{server.url}/healthz").headers["x-request-id"]

    lines = server.log_lines()
    parsed = [json.loads(x) for x in lines if x.strip()]  # every line is JSON
    access = [x for x in parsed if x["logger"] == "ptserve.access"]
    mine = [x for x in access if x["request_id"] == rid]
    assert len(mine) == 1, mine
    entry = mine[0]
    assert entry["status"] == 200 and entry["adapter"] == f"{TENANTS[0]}/{ADAPTERS[0]}" and entry["version"] == 1
    assert entry["tenant"] == "admin" and entry["endpoint"] == "/v1/classify" and entry["latency_ms"] > 0
    tenant_lines = [x for x in access if x["tenant"] == TENANTS[1] and x["path"] == "/v1/classify"]
    assert tenant_lines and all(x["key_id"] and x["adapter"].startswith(TENANTS[1] + "/") for x in tenant_lines)
    refused = next(x for x in access if x["request_id"] == made.headers["x-request-id"])
    assert refused["status"] == 401 and refused["tenant"] is None


@pytest.mark.slow
def test_store_errors_are_counted(tmp_path):
    """A Redis store that is down: listing answers 503 store_unavailable and the counter moves."""
    env = {"PTSERVE_STORE": f"redis://127.0.0.1:{free_port()}/0?timeout_s=0.2"}
    with server_process(env) as srv:
        r = httpx.get(f"{srv.url}/v1/adapters", timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "store_unavailable"
        families = _families(httpx.get(f"{srv.url}/metrics").text)
        errors = {s.labels["kind"]: s.value for s in families["ptserve_store_errors"].samples
                  if s.name.endswith("_total")}
        assert errors["store_unavailable"] >= 1
