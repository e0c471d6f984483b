"""Adapter blobs uploaded as application/octet-stream over real HTTP: every bad blob or oversize body gets its
4xx and leaves nothing in the store; valid ones up to the limit are accepted."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store.format import PREFIX_KEY
from tests.factories import make_adapter, make_blob
from tests.server.uploads.http_checks import (
    MAX_ADAPTER_BYTES,
    OCTET,
    Snapshot,
    assert_error,
    raw_blob,
    raw_http,
)


# --- bad blobs (octet-stream) -------------------------------------------------------------------------------
def _bad_blobs(fp) -> dict[str, tuple[bytes, int, str, str]]:
    """case -> (body, status, error type, text the message must contain)."""
    good = make_blob(fp, 4, seed=1)
    adapter = make_adapter(fp, 4, seed=1)
    wrong_shape = {**adapter.tensors, PREFIX_KEY: torch.zeros(4, fp.prefix_width - 8)}
    as_int = {**adapter.tensors, PREFIX_KEY: adapter.prompt_embeddings.to(torch.int64)}
    as_f64 = {**adapter.tensors, PREFIX_KEY: adapter.prompt_embeddings.to(torch.float64)}
    nan = {k: v.clone() for k, v in adapter.tensors.items()}
    nan[PREFIX_KEY][1, 2] = float("nan")
    inf = {k: v.clone() for k, v in adapter.tensors.items()}
    inf["classifier.weight"][0, 0] = float("inf")
    wrong_head = {**adapter.tensors, "classifier.weight": torch.zeros(2, fp.hidden_size)}
    other = dataclasses.replace(adapter.config, backbone=dataclasses.replace(fp, num_layers=fp.num_layers + 6))
    buf = io.BytesIO()
    torch.save(adapter.tensors, buf)
    over = make_blob(fp, 109)  # valid, under the HTTP body limit, over max_adapter_bytes
    assert MAX_ADAPTER_BYTES < len(over) < MAX_ADAPTER_BYTES + (64 << 10)

    def header(text: bytes) -> bytes:  # a hand-made safetensors file: this header, 4 bytes of data
        return struct.pack("<Q", len(text)) + text + b"\0" * 4

    def entry(dtype: bytes = b'"F32"', offsets: bytes = b"[0, 4]") -> bytes:
        return b'{"t": {"dtype": ' + dtype + b', "shape": [1], "data_offsets": ' + offsets + b"}}"

    return {
        # hostile content that answered 500 before (issue 10 finding 2)
        "nested-header": (header(b"[" * 100_000), 422, "invalid_adapter", "nests deeper than"),
        "offsets-strings": (header(entry(offsets=b'["0", "4"]')), 422, "invalid_adapter", "data_offsets"),
        "offsets-null": (header(entry(offsets=b"[null, null]")), 422, "invalid_adapter", "data_offsets"),
        "dtype-list": (header(entry(dtype=b'["F32"]')), 422, "invalid_adapter", "dtype must be a string"),
        "metadata-list": (st_save(adapter.tensors, metadata={"format": "pt", "ptserve": "[]"}), 422,
                          "invalid_adapter", "JSON object expected"),
        "metadata-x": (st_save(adapter.tensors, metadata={"format": "pt", "ptserve": "x"}), 422,
                       "invalid_adapter", "malformed ptserve metadata"),
        "metadata-str": (st_save(adapter.tensors, metadata={"format": "pt", "ptserve": '"x"'}), 422,
                         "invalid_adapter", "JSON object expected, got str"),
        # an adapter this encoder could never serve (issue 10 finding 7)
        "generate-adapter": (make_blob(fp, 2, task="generate"), 422, "invalid_adapter",
                             "'generate' adapter (PEFT task_type CAUSAL_LM) cannot be served here"),
        "empty": (b"", 422, "invalid_adapter", "truncated"),
        "truncated-header": (good[:40], 422, "invalid_adapter", "truncated"),
        "truncated-data": (good[: len(good) - 100], 422, "invalid_adapter", "truncated"),
        "wrong-prefix-shape": (raw_blob(wrong_shape, adapter.config), 422, "invalid_adapter", "shape"),
        "wrong-head-shape": (raw_blob(wrong_head, adapter.config), 422, "invalid_adapter", "classifier.weight"),
        "int64": (raw_blob(as_int, adapter.config), 422, "invalid_adapter", "dtype I64"),
        "float64": (raw_blob(as_f64, adapter.config), 422, "invalid_adapter", "dtype F64"),
        "nan": (raw_blob(nan, adapter.config), 422, "invalid_adapter", "NaN or Inf"),
        "inf": (raw_blob(inf, adapter.config), 422, "invalid_adapter", "NaN or Inf"),
        "other-backbone": (raw_blob(adapter.tensors, other), 422, "backbone_mismatch", "num_layers"),
        "pickle": (pickle.dumps(adapter.tensors), 422, "invalid_adapter", "pickle"),
        "torch-save": (buf.getvalue(), 422, "invalid_adapter", "pickle"),
        "huge-header": (struct.pack("<Q", 2**40) + good[8:], 422, "invalid_adapter", str(2**40)),
        "header-not-json": (struct.pack("<Q", 16) + b"<html>not json!!" + b"\0" * 32, 422, "invalid_adapter",
                            "not JSON"),
        "no-ptserve-metadata": (st_save(adapter.tensors), 422, "invalid_adapter", "'ptserve'"),
        "over-max-adapter-bytes": (over, 413, "payload_too_large", f"at most {MAX_ADAPTER_BYTES}"),
    }


BAD_BLOB_CASES = ["empty", "truncated-header", "truncated-data", "wrong-prefix-shape", "wrong-head-shape", "int64",
                  "float64", "nan", "inf", "other-backbone", "pickle", "torch-save", "huge-header",
                  "header-not-json", "no-ptserve-metadata", "over-max-adapter-bytes", "nested-header",
                  "offsets-strings", "offsets-null", "dtype-list", "metadata-list", "metadata-x", "metadata-str",
                  "generate-adapter"]


@pytest.fixture(scope="module")
def bad_blobs(fp):
    cases = _bad_blobs(fp)
    assert sorted(cases) == sorted(BAD_BLOB_CASES)
    return cases


@pytest.mark.parametrize("case", BAD_BLOB_CASES)
def test_bad_blob_is_refused_and_nothing_is_stored(server, client, bad_blobs, case):
    body, status, type_, needle = bad_blobs[case]
    snap = Snapshot(server, client)
    r = client.put(f"/v1/adapters/acme/bad-{case}", content=body, headers=OCTET)
    assert_error(r, status, type_, needle)
    snap.unchanged(f"acme/bad-{case}")


def test_oversize_body_with_declared_length_is_refused(server, client):
    snap = Snapshot(server, client)
    r = client.put("/v1/adapters/acme/huge", content=b"\0" * 3_000_000, headers=OCTET)
    assert r.request.headers["content-length"] == "3000000"
    assert_error(r, 413, "payload_too_large", "exceeds")
    snap.unchanged("acme/huge")


def test_oversize_declared_length_is_refused_before_the_body_is_sent(server, client):
    snap = Snapshot(server, client)
    status, body = raw_http(server.url, (
        "PUT /v1/adapters/acme/huge HTTP/1.1\nHost: x\nContent-Type: application/octet-stream\n"
        "Content-Length: 1000000000\n"), timeout=10)  # no body follows: a server waiting for it would time out
    assert status == 413
    assert json.loads(body)["error"]["type"] == "payload_too_large"
    snap.unchanged("acme/huge")


def test_oversize_chunked_body_is_refused(server, client):
    sent = []

    def chunks():
        for _ in range(64):
            sent.append(1)
            yield b"\0" * 65536  # 4 MiB in all, never declared

    snap = Snapshot(server, client)
    r = client.put("/v1/adapters/acme/huge-chunked", content=chunks(), headers=OCTET)
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "payload_too_large", "exceeds")
    snap.unchanged("acme/huge-chunked")


def test_valid_chunked_upload_under_the_limit_is_accepted(client, fp):
    blob = make_blob(fp, 2, seed=5)

    def chunks():
        for i in range(0, len(blob), 4096):
            yield blob[i:i + 4096]

    r = client.put("/v1/adapters/acme/chunked-ok", content=chunks(), headers=OCTET)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(blob).hexdigest()
    assert client.delete("/v1/adapters/acme/chunked-ok").status_code == 204


def test_largest_blob_under_the_limit_is_accepted(client, fp):
    blob = make_blob(fp, 108)
    assert len(blob) <= MAX_ADAPTER_BYTES
    r = client.put("/v1/adapters/acme/largest", content=blob, headers=OCTET)
    assert r.status_code == 201, r.text
    assert r.json()["bytes"] == len(blob) and r.json()["num_virtual_tokens"] == 108
    assert client.delete("/v1/adapters/acme/largest").status_code == 204
