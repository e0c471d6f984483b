"""Classify requests over real HTTP: a good request's answer, and every bad one's 4xx (unknown adapter,
too long or too many inputs, invalid or malformed JSON bodies)."""
from __future__ import annotations

import pytest

from tests.factories import MINILM_LABELS
from tests.server.uploads.http_checks import MAX_INPUTS, assert_error


# --- classify requests --------------------------------------------------------------------------------------
def test_classify_ok(client, classifier):
    r = client.post("/v1/classify", json={"adapter": classifier, "inputs": ["good", "bad movie"],
                                          "return_logits": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == classifier and body["version"] == 1
    assert len(body["predictions"]) == 2
    for pred in body["predictions"]:
        assert pred["label"] in MINILM_LABELS and len(pred["logits"]) == 3
        assert abs(sum(pred["scores"].values()) - 1) < 1e-5
    assert body["usage"]["input_tokens"] == 3 + 4  # [CLS] good [SEP] + [CLS] bad movie [SEP]


def test_classify_unknown_adapter_is_404(client):
    assert_error(client.post("/v1/classify", json={"adapter": "acme/nope", "inputs": ["x"]}),
                 404, "adapter_not_found", "acme/nope")
    assert_error(client.post("/v1/classify", json={"adapter": "nope", "inputs": ["x"]}), 400, "invalid_adapter_id")


def test_classify_too_long_input_is_422_unless_truncated(client, classifier):
    text = "word " * 600
    assert_error(client.post("/v1/classify", json={"adapter": classifier, "inputs": ["short", text]}),
                 422, "input_too_long", "input 1", "truncate")
    r = client.post("/v1/classify", json={"adapter": classifier, "inputs": ["short", text], "truncate": True})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2
    assert r.json()["usage"]["input_tokens"] == 3 + (512 - 4)  # cut to what fits beside 4 virtual tokens


def test_classify_too_many_inputs_is_422(client, classifier):
    ok = client.post("/v1/classify", json={"adapter": classifier, "inputs": ["x"] * MAX_INPUTS})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == MAX_INPUTS
    assert_error(client.post("/v1/classify", json={"adapter": classifier, "inputs": ["x"] * (MAX_INPUTS + 1)}),
                 422, "invalid_input", f"at most {MAX_INPUTS}")




@pytest.mark.parametrize("body,needle", [
    ({"adapter": "acme/classifier", "inputs": []}, "inputs"),
    ({"adapter": "acme/classifier"}, "inputs"),
    ({"inputs": ["x"]}, "adapter"),
    ({"adapter": "acme/classifier", "inputs": "not a list"}, "inputs"),
    ({"adapter": "acme/classifier", "inputs": [1, 2]}, "inputs"),
    ({"adapter": "acme/classifier", "inputs": ["x"], "temperature": 0.5}, "temperature"),
    ({"adapter": "acme/classifier", "inputs": ["x"], "truncate": "maybe"}, "truncate"),
])
def test_classify_invalid_body_is_422(client, classifier, body, needle):
    assert_error(client.post("/v1/classify", json=body), 422, "invalid_request", needle)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2", b'{"adapter": "acme/classifier", "inputs": ["x"]'])
def test_classify_malformed_json_is_422(client, classifier, raw):
    r = client.post("/v1/classify", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_request")
    assert client.get("/healthz").status_code == 200
