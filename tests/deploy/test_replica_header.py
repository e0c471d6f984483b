"""Every response names the replica that made it (``X-Ptserve-Replica``: the ``replica_id`` setting), whatever
the route or status — how a client or a test behind the proxy sees where a request landed."""
from __future__ import annotations

import os
import socket

import httpx
import pytest
from pydantic import ValidationError

from ptserve.server.api.app import create_app
from ptserve.server.settings import Settings


async def test_every_response_carries_the_replica_id(tmp_path):
    app = create_app(Settings(store=f"file://{tmp_path}", replica_id="replica-a", max_body_bytes=1024))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as client:
        answers = [
            await client.get("/healthz"),  # 200
            await client.get("/readyz"),  # 503: the lifespan (backbone loading) never ran here
            await client.get("/no-such-route"),  # 404
            await client.post("/v1/classify", content=b"x" * 4096),  # 413 from the body-limit middleware
        ]
    assert [r.status_code for r in answers] == [200, 503, 404, 413]
    assert all(r.headers["x-ptserve-replica"] == "replica-a" for r in answers)


def test_default_replica_id_is_hostname_and_pid(monkeypatch):
    monkeypatch.delenv("PTSERVE_REPLICA_ID", raising=False)
    assert Settings().replica_id == f"{socket.gethostname()}-{os.getpid()}"


@pytest.mark.parametrize("bad", ["", "has space", "new\nline", "x" * 129, "é"])
def test_replica_id_must_be_a_safe_header_value(bad):
    with pytest.raises(ValidationError):
        Settings(replica_id=bad)
