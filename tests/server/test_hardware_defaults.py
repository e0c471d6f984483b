"""A server on its defaults over real HTTP: the dtype it picks for this CPU and why, the torch threads of the
rule, and the planner's pass cost measured at start-up, in the log, ``/readyz`` and ``/metrics``; its answers
agree with float32. And the settings still force each choice. (Other test servers pin float32 and a fixed
overhead, ``tests.factories.FIXED_SERVER_SETTINGS``, so their answers compare with float32 references.)"""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from ptserve.adapters_store.format import encode_blob
from ptserve.server.cost_model import MAX_OVERHEAD_TOKENS
from ptserve.server.engine import Row
from ptserve.server.hardware import choose_dtype, choose_threads, cpu_budget, cpu_features
from tests.factories import make_adapter, server_process

DEFAULTS = {"PTSERVE_DTYPE": "auto", "PTSERVE_BATCH_OVERHEAD_TOKENS": "auto", "PTSERVE_THREADS": "0"}
TEXTS = ["the room was clean and the staff were kind", "it broke after two days", "ok", "delivery took a week"]
OCTET = {"content-type": "application/octet-stream"}


def _samples(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}


def _messages(server) -> list[str]:
    out = []
    for line in server.log_lines():
        try:
            out.append(json.loads(line).get("msg", ""))
        except ValueError:
            continue
    return out


def test_defaults_choose_for_this_machine_and_say_why(tmp_path, minilm, minilm_engine):
    expected = choose_dtype("auto", "cpu", cpu_features())
    with server_process({**DEFAULTS, "PTSERVE_STORE": f"file://{tmp_path}"}) as server:
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["dtype"] == expected.dtype and ready["dtype_reason"] == expected.reason
        assert ready["threads"] == choose_threads(0, cpu_budget()).threads
        overhead, source = ready["batch_overhead_tokens"], ready["batch_overhead_source"]
        assert 0 <= overhead <= MAX_OVERHEAD_TOKENS and (source == "measured" or source.startswith("fallback"))

        samples = _samples(server.url)
        build = samples["ptserve_build_info"].labels
        assert build["dtype"] == expected.dtype and build["dtype_reason"] == expected.reason
        assert build["threads"] == str(ready["threads"])
        assert samples["ptserve_batch_overhead_tokens"].value == overhead
        fixed, per_token = samples["ptserve_batch_pass_fixed_seconds"].value, samples["ptserve_batch_pass_token_seconds"].value
        if source == "measured":
            assert fixed >= 0 and per_token > 0 and round(fixed / per_token) in (overhead, MAX_OVERHEAD_TOKENS)

        messages = _messages(server)
        assert any(expected.dtype in m and expected.reason in m for m in messages), messages
        assert any(m.startswith("batch planner: overhead_tokens") for m in messages), messages
        assert any(m.startswith("torch intra-op threads") for m in messages), messages

        adapter = make_adapter(minilm.fingerprint, 16, seed=5)
        r = httpx.put(f"{server.url}/v1/adapters/acme/a", content=encode_blob(adapter), headers=OCTET, timeout=30)
        assert r.status_code == 201, r.text
        body = httpx.post(f"{server.url}/v1/classify", json={"adapter": "acme/a", "inputs": TEXTS,
                                                             "return_logits": True}, timeout=60).json()
    resident = minilm_engine.make_resident(adapter, "acme/a", 1)
    reference, _ = minilm_engine.classify([Row(resident, ids) for ids in minilm_engine.tokenize(TEXTS, 16)])
    served = torch.tensor([p["logits"] for p in body["predictions"]])
    tol = 1e-5 if expected.dtype == "float32" else 5e-2  # bf16: measured |Δ logit| <= 1e-2 (test_equivalence)
    assert (served - torch.stack(reference)).abs().max() <= tol


def test_settings_force_each_choice(tmp_path):
    env = {"PTSERVE_DTYPE": "float32", "PTSERVE_BATCH_OVERHEAD_TOKENS": "100", "PTSERVE_THREADS": "1",
           "PTSERVE_STORE": f"file://{tmp_path}"}
    with server_process(env) as server:
        ready = httpx.get(f"{server.url}/readyz").json()
        samples = _samples(server.url)
    assert ready["dtype"] == "float32" and ready["dtype_reason"] == "float32 set by PTSERVE_DTYPE"
    assert ready["threads"] == 1
    assert ready["batch_overhead_tokens"] == 100 and ready["batch_overhead_source"] == "setting"
    assert samples["ptserve_batch_overhead_tokens"].value == 100
    assert math.isnan(samples["ptserve_batch_pass_fixed_seconds"].value)


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_a_bad_overhead_setting_is_refused(value):
    from pydantic import ValidationError

    from ptserve.server.settings import Settings

    with pytest.raises(ValidationError):
        Settings(batch_overhead_tokens=value)


@pytest.mark.slow
def test_a_compiled_encoder_is_warmed_up_at_start_and_answers_as_eager(tmp_path, minilm):
    from ptserve.server.backbone import load_backbone
    from ptserve.server.engine import Engine
    from tests.factories import save_tiny_encoder

    folder = save_tiny_encoder("bert", tmp_path / "bert", minilm.path)
    env = {"PTSERVE_BACKBONE": str(folder), "PTSERVE_COMPILE": "true", "PTSERVE_STORE": f"file://{tmp_path / 's'}"}
    eager = Engine(load_backbone(str(folder), device="cpu", dtype="float32"))
    adapter = make_adapter(eager.fp, 4, seed=2, head="pooler_linear")
    with server_process(env, timeout=600) as server:
        assert any(m.startswith("encoder compiled") for m in _messages(server))  # before /readyz said ready
        r = httpx.put(f"{server.url}/v1/adapters/acme/a", content=encode_blob(adapter), headers=OCTET, timeout=30)
        assert r.status_code == 201, r.text
        body = httpx.post(f"{server.url}/v1/classify", json={"adapter": "acme/a", "inputs": TEXTS,
                                                             "return_logits": True}, timeout=300).json()
    resident = eager.make_resident(adapter, "acme/a", 1)
    reference, _ = eager.classify([Row(resident, ids) for ids in eager.tokenize(TEXTS, 4)])
    served = torch.tensor([p["logits"] for p in body["predictions"]])
    assert (served - torch.stack(reference)).abs().max() <= 1e-5
