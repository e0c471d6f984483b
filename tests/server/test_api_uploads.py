"""Uploads and classify requests over real HTTP against a real ``ptserve serve``: every bad request gets its 4xx
and the ``{"error": {"type", "message"}}`` body, leaves nothing in the store, and the server stays healthy."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import socket
import struct
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store.format import PREFIX_KEY, AdapterConfig
from ptserve.adapters_store.peft_folder import CONFIG_FILE, WEIGHTS_FILE, read_peft_folder, write_peft_folder
from ptserve.adapters_store.validation import decode_blob
from tests.factories import MINILM_LABELS, make_adapter, make_blob, running_server

MAX_ADAPTER_BYTES = 2_000_000
MAX_INPUTS = 8
OCTET = {"content-type": "application/octet-stream"}


# --- fixtures and helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    store = root / "store"
    env = {"PTSERVE_STORE": "file://" + str(store), "PTSERVE_MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES),
           "PTSERVE_MAX_INPUTS_PER_REQUEST": str(MAX_INPUTS)}
    with running_server(env) as url:
        yield SimpleNamespace(url=url, root=root, store=store)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def fp(minilm):
    return minilm.fingerprint


@pytest.fixture(scope="module")
def classifier(client, fp):
    """A classify adapter with 4 virtual tokens, uploaded once for the classify tests."""
    r = client.put("/v1/adapters/acme/classifier", content=make_blob(fp, 4, seed=11), headers=OCTET)
    assert r.status_code == 201, r.text
    return "acme/classifier"


def raw_blob(tensors: dict[str, torch.Tensor], config: AdapterConfig) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=config.to_metadata())


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size): what "nothing stored" compares."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.stat().st_size
    return out


class Snapshot:
    """What the server holds before a bad request; ``unchanged`` checks it still holds exactly that."""

    def __init__(self, server, client):
        self.server, self.client = server, client
        self.listing = self._listing()
        self.files = tree(self.server.root)

    def _listing(self) -> list[dict]:
        r = self.client.get("/v1/adapters", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def unchanged(self, adapter_id: str | None = None) -> None:
        assert self._listing() == self.listing
        assert tree(self.server.root) == self.files  # nothing written, also not outside the store
        if adapter_id is not None:
            r = self.client.get(f"/v1/adapters/{adapter_id}")
            assert_error(r, 404, "adapter_not_found", adapter_id)
        assert self.client.get("/healthz").status_code == 200
        assert self.client.get("/readyz").status_code == 200


def assert_error(r: httpx.Response, status: int, type_: str, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def raw_http(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side path normalisation); (status, response body)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                headers = data[:head_end].decode().lower()
                length = next((int(line.split(":")[1]) for line in headers.split("\r\n")
                               if line.startswith("content-length:")), None)
                if length is not None and len(data) >= head_end + 4 + length:
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data[data.find(b"\r\n\r\n") + 4:]


def peft_parts(fp, tmp_path: Path, p: int = 4, seed: int = 0, task: str = "classify", **cfg_changes) -> dict:
    adapter = make_adapter(fp, p, seed, task=task)
    config_raw, weights_raw = read_peft_folder(write_peft_folder(adapter, tmp_path / f"peft-{p}-{seed}-{task}"))
    cfg = {**json.loads(config_raw), **cfg_changes}
    return {CONFIG_FILE: (CONFIG_FILE, json.dumps(cfg).encode(), "application/json"),
            WEIGHTS_FILE: (WEIGHTS_FILE, weights_raw, "application/octet-stream")}


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


# --- bad ids ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,statuses,type_", [
    ("%2E%2E/x", {400}, "invalid_adapter_id"),  # tenant '..'
    ("Acme/x", {400}, "invalid_adapter_id"),  # uppercase tenant
    ("a/%2E%2E", {400}, "invalid_adapter_id"),  # name '..'
    ("acme/a..b", {400}, "invalid_adapter_id"),
    ("acme/.hidden", {400}, "invalid_adapter_id"),
    ("acme/x%00y", {400}, "invalid_adapter_id"),
    ("acme/" + "n" * 200, {400}, "invalid_adapter_id"),
    ("-acme/x", {400}, "invalid_adapter_id"),
    ("acme/a%2Fb", {400, 404}, None),  # an encoded slash makes a third path segment
    ("acme%2Fx/y", {400, 404}, None),
    ("acme/..%2F..%2Fescape", {400, 404}, None),
])
def test_bad_adapter_id_is_refused_and_nothing_is_stored(server, client, fp, path, statuses, type_):
    snap = Snapshot(server, client)
    r = client.put(f"/v1/adapters/{path}", content=make_blob(fp, 1), headers=OCTET)  # a valid blob: only the id is bad
    assert r.status_code in statuses, (r.status_code, r.text)
    assert_error(r, r.status_code, type_ or r.json()["error"]["type"])
    snap.unchanged()
    assert not (server.root / "escape").exists() and not (server.root / "x").exists()


def test_literal_dot_dot_in_the_path_is_refused(server, client, fp):
    blob = make_blob(fp, 1)
    snap = Snapshot(server, client)
    for path in ("/v1/adapters/../x", "/v1/adapters/acme/.."):
        status, body = raw_http(server.url, (
            f"PUT {path} HTTP/1.1\nHost: x\nContent-Type: application/octet-stream\n"
            f"Content-Length: {len(blob)}\nConnection: close\n"), blob)
        assert status == 400, (path, status, body)
        assert json.loads(body)["error"]["type"] == "invalid_adapter_id"
    snap.unchanged()


def test_bad_id_on_read_and_delete_is_refused(client):
    assert_error(client.get("/v1/adapters/Acme/x"), 400, "invalid_adapter_id", "'Acme'")
    assert_error(client.get("/v1/adapters/acme/%2E%2E/blob"), 400, "invalid_adapter_id")
    assert_error(client.delete("/v1/adapters/acme/a..b"), 400, "invalid_adapter_id")
    assert_error(client.get("/v1/adapters", params={"tenant": "../etc"}), 400, "invalid_adapter_id")


# --- content types and multipart ----------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
def test_wrong_content_type_is_415(server, client, fp, content_type):
    snap = Snapshot(server, client)
    headers = {"content-type": content_type} if content_type else {}
    r = client.put("/v1/adapters/acme/ctype", content=make_blob(fp, 1), headers=headers)
    if content_type is None:
        assert "content-type" not in r.request.headers
    assert_error(r, 415, "unsupported_media_type", "application/octet-stream", "multipart/form-data")
    snap.unchanged("acme/ctype")


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_multipart_missing_a_part_is_400(server, client, fp, tmp_path, missing):
    parts = peft_parts(fp, tmp_path)
    del parts[missing]
    snap = Snapshot(server, client)
    r = client.put("/v1/adapters/acme/partial", files=parts)
    assert_error(r, 400, "bad_request", repr(missing))
    snap.unchanged("acme/partial")


def test_multipart_with_parts_sent_as_plain_fields_is_400(server, client, fp, tmp_path):
    parts = peft_parts(fp, tmp_path)
    snap = Snapshot(server, client)
    r = client.put("/v1/adapters/acme/fields", data={CONFIG_FILE: parts[CONFIG_FILE][1].decode()},
                   files={WEIGHTS_FILE: parts[WEIGHTS_FILE]})
    assert_error(r, 400, "bad_request", CONFIG_FILE)
    snap.unchanged("acme/fields")


@pytest.mark.parametrize("case", ["peft_type", "geometry", "config-not-json", "labels-not-json", "labels-count",
                                  "weights-pickle", "weights-too-large", "config-nested", "labels-nested",
                                  "labels-surrogate", "causal-lm"])
def test_bad_peft_folder_is_refused(server, client, fp, tmp_path, case):
    parts, data = peft_parts(fp, tmp_path), {}
    if case == "peft_type":
        parts = peft_parts(fp, tmp_path, peft_type="LORA")
        expected = (422, "invalid_adapter", "PREFIX_TUNING")
    elif case == "geometry":
        parts = peft_parts(fp, tmp_path, num_layers=fp.num_layers + 1)
        expected = (422, "backbone_mismatch", f"num_layers: adapter has {fp.num_layers + 1}")
    elif case == "config-not-json":
        parts[CONFIG_FILE] = (CONFIG_FILE, b"{peft_type: PREFIX_TUNING", "application/json")
        expected = (422, "invalid_adapter", "not valid JSON")
    elif case == "labels-not-json":
        data = {"labels": "negative,positive"}
        expected = (422, "invalid_adapter", "JSON list of strings")
    elif case == "labels-count":
        data = {"labels": json.dumps(["negative", "positive"])}  # the head has 3 rows
        expected = (422, "invalid_adapter", "classifier")
    elif case == "config-nested":  # within the 64 KiB cap (issue 10 finding 2)
        raw = b'{"peft_type": "PREFIX_TUNING", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        parts[CONFIG_FILE] = (CONFIG_FILE, raw, "application/json")
        expected = (422, "invalid_adapter", "nests deeper than")
    elif case == "labels-nested":
        data = {"labels": "[" * 50_000}
        expected = (422, "invalid_adapter", "JSON list of strings")
    elif case == "labels-surrogate":  # stored, it would have made every answer naming the labels a 500
        data = {"labels": '["neg\\ud800", "neutral", "positive"]'}
        expected = (422, "invalid_adapter", "JSON list of strings")
    elif case == "causal-lm":  # an encoder can never serve it (issue 10 finding 7)
        parts = peft_parts(fp, tmp_path, task="generate")
        expected = (422, "invalid_adapter", "CAUSAL_LM")
    elif case == "weights-pickle":
        parts[WEIGHTS_FILE] = (WEIGHTS_FILE, pickle.dumps({"x": 1}), "application/octet-stream")
        expected = (422, "invalid_adapter", "pickle")
    else:
        parts = peft_parts(fp, tmp_path, p=109)
        expected = (413, "payload_too_large", f"at most {MAX_ADAPTER_BYTES}")
    snap = Snapshot(server, client)
    r = client.put(f"/v1/adapters/acme/peft-{case}", files=parts, data=data)
    assert_error(r, *expected)
    snap.unchanged(f"acme/peft-{case}")


def test_peft_folder_upload_applies_labels_and_notes_a_different_base_model(client, fp, tmp_path):
    labels = ["sad", "meh", "glad"]
    parts = peft_parts(fp, tmp_path, seed=21, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    r = client.put("/v1/adapters/acme/from-peft", files=parts, data={"labels": json.dumps(labels)})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "acme/from-peft" and info["version"] == 1
    assert info["labels"] == labels and info["task"] == "classify" and info["num_virtual_tokens"] == 4
    assert len(info["notes"]) == 1
    assert "sentence-transformers/all-MiniLM-L6-v2" in info["notes"][0] and "'minilm'" in info["notes"][0]
    assert client.get("/v1/adapters/acme/from-peft").json()["labels"] == labels

    # the stored blob holds the PEFT folder's tensors exactly
    blob = client.get("/v1/adapters/acme/from-peft/blob").content
    stored = decode_blob(blob, fp, "pooler_linear")
    original = make_adapter(fp, 4, 21)
    assert stored.config.labels == tuple(labels)
    assert all(torch.equal(stored.tensors[k], t) for k, t in original.tensors.items())

    # and it serves with those labels
    r = client.post("/v1/classify", json={"adapter": "acme/from-peft", "inputs": ["a fine day", "awful"]})
    assert r.status_code == 200, r.text
    for pred in r.json()["predictions"]:
        assert pred["label"] in labels and set(pred["scores"]) == set(labels)
    assert client.delete("/v1/adapters/acme/from-peft").status_code == 204


@pytest.mark.parametrize("base_model", [None, "minilm"])
def test_peft_folder_upload_without_a_different_base_model_has_no_notes(client, fp, tmp_path, base_model):
    parts = peft_parts(fp, tmp_path, base_model_name_or_path=base_model)
    r = client.put("/v1/adapters/acme/peft-plain", files=parts)
    assert r.status_code == 201, r.text
    assert r.json()["notes"] == [] and r.json()["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert client.delete("/v1/adapters/acme/peft-plain").status_code == 204


# --- versions, blobs, delete --------------------------------------------------------------------------------
def test_reupload_increments_version_and_blob_round_trips(client, fp):
    first, second = make_blob(fp, 3, seed=1), make_blob(fp, 5, seed=2, labels=("no", "yes"))
    r1 = client.put("/v1/adapters/beta/versions", content=first, headers=OCTET)
    r2 = client.put("/v1/adapters/beta/versions", content=second, headers=OCTET)
    assert (r1.status_code, r2.status_code) == (201, 201)
    assert (r1.json()["version"], r2.json()["version"]) == (1, 2)
    info = client.get("/v1/adapters/beta/versions").json()
    assert info["version"] == 2 and info["num_virtual_tokens"] == 5 and info["labels"] == ["no", "yes"]
    assert info["sha256"] == hashlib.sha256(second).hexdigest() and info["bytes"] == len(second)

    r = client.get("/v1/adapters/beta/versions/blob")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == second
    assert r.headers["etag"] == f'"{hashlib.sha256(second).hexdigest()}"'
    assert r.headers["x-ptserve-version"] == "2"
    listed = {a["id"]: a for a in client.get("/v1/adapters", params={"tenant": "beta"}).json()["data"]}
    assert listed["beta/versions"]["version"] == 2
    assert client.delete("/v1/adapters/beta/versions").status_code == 204


def test_reupload_is_served_at_once(client, fp, classifier):
    r = client.put("/v1/adapters/acme/hot", content=make_blob(fp, 4, seed=1), headers=OCTET)
    assert r.status_code == 201
    body = {"adapter": "acme/hot", "inputs": ["the same text"], "return_logits": True}
    before = client.post("/v1/classify", json=body).json()  # now resident in the cache
    assert before["version"] == 1
    assert client.put("/v1/adapters/acme/hot", content=make_blob(fp, 4, seed=2), headers=OCTET).status_code == 201
    after = client.post("/v1/classify", json=body).json()
    assert after["version"] == 2
    assert after["predictions"][0]["logits"] != before["predictions"][0]["logits"]
    assert client.delete("/v1/adapters/acme/hot").status_code == 204


def test_delete_then_everything_is_404(server, client, fp):
    assert client.put("/v1/adapters/acme/doomed", content=make_blob(fp, 2), headers=OCTET).status_code == 201
    assert client.post("/v1/classify", json={"adapter": "acme/doomed", "inputs": ["x"]}).status_code == 200
    r = client.delete("/v1/adapters/acme/doomed")
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get("/v1/adapters/acme/doomed"), 404, "adapter_not_found", "acme/doomed")
    assert_error(client.get("/v1/adapters/acme/doomed/blob"), 404, "adapter_not_found")
    assert_error(client.delete("/v1/adapters/acme/doomed"), 404, "adapter_not_found")
    assert_error(client.post("/v1/classify", json={"adapter": "acme/doomed", "inputs": ["x"]}),
                 404, "adapter_not_found")
    assert "acme/doomed" not in {a["id"] for a in client.get("/v1/adapters").json()["data"]}
    assert not any(k.startswith("store/acme/doomed/v") for k in tree(server.root))  # no blob left behind
    # a later upload starts a new, higher version
    r = client.put("/v1/adapters/acme/doomed", content=make_blob(fp, 2), headers=OCTET)
    assert r.status_code == 201 and r.json()["version"] == 2
    assert client.delete("/v1/adapters/acme/doomed").status_code == 204


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
