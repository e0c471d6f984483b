"""Versions over real HTTP: a re-upload is a new version, served at once; a delete leaves nothing behind and
a later upload starts a higher version."""
from __future__ import annotations

import hashlib

from tests.factories import make_blob
from tests.server.uploads.http_checks import OCTET, assert_error, tree


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
