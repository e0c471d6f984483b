"""One real ``ptserve serve`` for the whole upload package (started once, as when these suites were one file): small
upload and input limits, a file store in a temporary directory the tests inspect for "nothing stored"."""
from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from tests.factories import make_blob, running_server
from tests.server.uploads.http_checks import MAX_ADAPTER_BYTES, MAX_INPUTS, OCTET


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    store = root / "store"
    env = {"PTSERVE_STORE": "file://" + str(store), "PTSERVE_MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES),
           "PTSERVE_MAX_INPUTS_PER_REQUEST": str(MAX_INPUTS)}
    with running_server(env) as url:
        yield SimpleNamespace(url=url, root=root, store=store)


@pytest.fixture(scope="package")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="package")
def fp(minilm):
    return minilm.fingerprint


@pytest.fixture(scope="package")
def classifier(client, fp):
    """A classify adapter with 4 virtual tokens, uploaded once for the classify tests."""
    r = client.put("/v1/adapters/acme/classifier", content=make_blob(fp, 4, seed=11), headers=OCTET)
    assert r.status_code == 201, r.text
    return "acme/classifier"
